"""TopK SAE (Makhzani & Frey 2013; Gao et al. 2024): keep the k largest latents, zero the rest.

The sparsity is set by k, so the loss is the reconstruction error alone (+ AuxK for dead latents).
Gradients reach only the k kept entries: the dense latent vector is a scatter of the kept values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from typing import Optional

from dataclasses import dataclass

from saekit.errors import check_choice
from saekit.sae.base import SparseAutoencoder
from saekit.sae.registry import VariantConfig, register
from saekit.sae.sparse import ChosenCodes, DeadSet, SparseCode, aux_code, rank_preacts


def topk_activation(h: torch.Tensor, k: int, on: str = "preact") -> torch.Tensor:
    """(B, n) pre-activations → (B, n) latents with at most k nonzeros per row.

    on="preact": the k largest entries of h, then ReLU (Gao et al.); on="relu": the k largest of ReLU(h).
    """
    source = h if on == "preact" else F.relu(h)
    values, indices = source.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(h).scatter(-1, indices, F.relu(values))


@dataclass
class TopKConfig(VariantConfig):
    topk_on: str = "preact"
    """Select the k largest of the pre-activations then ReLU (`preact`), or of ReLU(h) (`relu`)."""

    def check(self) -> None:
        super().check()
        check_choice("activation.topk_on", self.topk_on, ("preact", "relu"))


@register
class TopKSAE(SparseAutoencoder):
    name = "topk"
    Config = TopKConfig
    topk_family = True
    homogeneous = True
    has_sparse_path = True

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        return topk_activation(h, self.spec.k, self.cfg.topk_on)

    def rank(self, x_centered: torch.Tensor, m: int, dead: Optional[DeadSet], sorted: bool = False):
        return rank_preacts(x_centered, self.W_enc, self.b_enc, m, self.cfg.topk_on, sorted=sorted, dead=dead,
                            k_aux=self.spec.effective_k_aux)

    def choose_codes(self, x_centered: torch.Tensor, dead: Optional[DeadSet]) -> ChosenCodes:
        ranked = self.rank(x_centered, self.spec.k, dead)
        return ChosenCodes(SparseCode.per_row(ranked.top_values, ranked.top_latents), {}, aux_code(ranked))

    @torch.no_grad()
    def _reconstruction_norms(self, sample: torch.Tensor) -> torch.Tensor:
        """Through the sparse path: one chunked encoder matmul and ranking, a k-sparse decode (TopK(k) for
        Multi-TopK too, as its `encode`)."""
        ranked = self.rank(sample - self.b_pre, self.spec.k, None)
        return self._code_norms(SparseCode.per_row(ranked.top_values, ranked.top_latents))
