"""ReLU SAE with a sparsity penalty (Bricken et al. 2023; Anthropic's April 2024 update).

`l1`: λ Σ_i z_i ||d_i|| (weighting by decoder norms makes the penalty invariant to rescaling a latent);
`sqrt_l1`: λ Σ_i sqrt(z_i), a concave penalty that shrinks large activations less.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataclasses import dataclass
from typing import Optional

from saekit.errors import check_choice
from saekit.sae import active_set
from saekit.sae.active_set import SQRT_EPS as _SQRT_EPS  # keeps d/dz sqrt(z) finite at z = 0
from saekit.sae.base import DeadLatentsArg, SparseAutoencoder
from saekit.sae.registry import VariantConfig, register

PENALTIES = ("l1", "sqrt_l1")


def l1_penalty(z: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of Σ_i z_i ||W_dec[i]||. z: (B, n), W_dec: (n, d) → scalar."""
    return (z * W_dec.norm(dim=1)).sum(dim=-1).mean()


def sqrt_penalty(z: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of Σ_i sqrt(z_i). z: (B, n) → scalar."""
    return torch.sqrt(z + _SQRT_EPS).sub(_SQRT_EPS ** 0.5).sum(dim=-1).mean()


def penalty(z: torch.Tensor, W_dec: torch.Tensor, kind: str) -> torch.Tensor:
    """The ReLU family's sparsity penalty by name (`l1` or `sqrt_l1`), before λ."""
    return l1_penalty(z, W_dec) if kind == "l1" else sqrt_penalty(z)


@dataclass
class PenaltyConfig(VariantConfig):
    """Settings of the variants trained with an L1-type penalty (relu, prolu, gated)."""

    penalty: str = "l1"
    """Sparsity penalty: `l1` (lam * sum z_i ||d_i||) or `sqrt_l1` (lam * sum sqrt(z_i))."""

    def check(self) -> None:
        super().check()
        check_choice("activation.penalty", self.penalty, PENALTIES)


@dataclass
class ReLUConfig(PenaltyConfig):
    pass


@register
class ReLUSAE(SparseAutoencoder):
    name = "relu"
    Config = ReLUConfig
    homogeneous = True
    has_sparse_path = True

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(h)

    def sparsity_loss(self, z: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sparsity": self.spec.lam * penalty(z, self.W_dec, self.cfg.penalty)}

    def sparse_loss_terms(self, x: torch.Tensor, dead: DeadLatentsArg,
                          y: Optional[torch.Tensor] = None) -> Optional[dict[str, torch.Tensor]]:
        """Through the active set h > 0 (sae/active_set.py); None (the dense path) while codes are dense."""
        return active_set.relu_terms(self, x, dead, y, self.cfg.penalty)
