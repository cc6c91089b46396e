"""Multi-TopK (Gao et al. 2024, section 5.3): TopK latents trained so that more of them also help.

Loss L(k) + L(4k)/8 with shared weights, where L(j) is the MSE of the TopK(j) reconstruction. The extra term
teaches latents ranked k+1..4k to reconstruct too, so at test time TopK(k') keeps improving for k' > k
(progressive codes) instead of overshooting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from saekit.sae.base import Encoding, reconstruction_loss
from saekit.errors import require
from saekit.sae.registry import register
from saekit.sae.sparse import ChosenCodes, DeadSet, SparseCode, aux_code
from saekit.sae.topk import TopKConfig, TopKSAE, topk_activation


@dataclass
class MultiTopKConfig(TopKConfig):
    multi_k_factor: int = 4
    """The second term's k is multi_k_factor * k."""
    multi_weight: float = 0.125
    """Weight of the second term: loss = L(k) + multi_weight * L(multi_k_factor * k)."""

    def check(self) -> None:
        super().check()
        require(self.multi_k_factor >= 1, f"activation.multi_k_factor={self.multi_k_factor} must be >= 1")
        require(self.multi_weight >= 0, f"activation.multi_weight={self.multi_weight} must be >= 0")


@register
class MultiTopKSAE(TopKSAE):
    name = "multi_topk"
    Config = MultiTopKConfig

    @property
    def wide_k(self) -> int:
        return min(self.cfg.multi_k_factor * self.spec.k, self.spec.n)

    def extra_terms(self, x: torch.Tensor, encoding: Encoding, y: torch.Tensor) -> dict[str, torch.Tensor]:
        z_wide = self.scale_latents(topk_activation(encoding.h, self.wide_k, self.cfg.topk_on))
        return {"multi_topk": self.cfg.multi_weight * reconstruction_loss(y, self.decode(z_wide, x))}

    def choose_codes(self, x_centered: torch.Tensor, dead: Optional[DeadSet]) -> ChosenCodes:
        # One ranking of the wide_k largest, sorted, serves both terms: its first k columns are TopK(k).
        ranked = self.rank(x_centered, self.wide_k, dead, sorted=True)
        k = self.spec.k
        main = SparseCode.per_row(ranked.top_values[:, :k], ranked.top_latents[:, :k])
        wide = SparseCode.per_row(ranked.top_values, ranked.top_latents)
        return ChosenCodes(main, {"multi_topk": (wide, self.cfg.multi_weight)}, aux_code(ranked))
