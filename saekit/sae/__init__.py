"""The SAE family: shared geometry in `base.py`, one file per activation function, a name registry."""

from saekit.sae import relu, topk  # noqa: F401  (importing registers the variants)
from saekit.sae.base import SAESpec, SparseAutoencoder, geometric_median
from saekit.sae.registry import REGISTRY, sae_class


def build_sae(spec: SAESpec) -> SparseAutoencoder:
    """A freshly constructed (uninitialized) SAE for `spec`."""
    return sae_class(spec.activation)(spec)


__all__ = ["REGISTRY", "SAESpec", "SparseAutoencoder", "build_sae", "geometric_median", "sae_class"]
