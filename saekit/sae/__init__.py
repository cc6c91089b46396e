"""The SAE family: shared geometry in `base.py`, one file per activation function, a name registry."""

from saekit.sae import batchtopk, gated, jumprelu, multi_topk, prolu, relu, topk  # noqa: F401  (importing registers them)
from saekit.sae.base import SAESpec, SparseAutoencoder, geometric_median
from saekit.sae.registry import REGISTRY, sae_class
from saekit.sae.swap import SwappedActivation, swap_activation


def build_sae(spec: SAESpec) -> SparseAutoencoder:
    """A freshly constructed (uninitialized) SAE for `spec`."""
    return sae_class(spec.activation)(spec)


__all__ = ["REGISTRY", "SAESpec", "SparseAutoencoder", "SwappedActivation", "build_sae", "geometric_median",
           "sae_class", "swap_activation"]
