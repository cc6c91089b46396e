"""The SAE family: shared geometry in `base.py`, one file per variant, a name registry (`registry.py`).

Every module of this package is imported here, so a variant registers itself by existing: adding one is a
new file with its config dataclass and `@register`-ed class, plus `conf/activation/<name>.yaml`.
"""

import importlib
import pkgutil

from saekit.sae.base import SAESpec, SparseAutoencoder, geometric_median
from saekit.sae.registry import REGISTRY, LatentParam, VariantConfig, register, sae_class, variant_config
from saekit.sae.swap import SwappedActivation, swap_activation

_SUPPORT_MODULES = {"active_set", "base", "registry", "sparse", "swap"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT_MODULES and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def build_sae(spec: SAESpec) -> SparseAutoencoder:
    """A freshly constructed (uninitialized) SAE for `spec`."""
    return sae_class(spec.activation)(spec)


__all__ = ["REGISTRY", "LatentParam", "SAESpec", "SparseAutoencoder", "SwappedActivation", "VariantConfig",
           "build_sae", "geometric_median", "register", "sae_class", "swap_activation", "variant_config"]
