"""BatchTopK (Bussmann et al. 2024): keep the k·B largest activations over the whole batch, not k per token.

Tokens that need more latents get more, at the same average L0. Because training-time selection depends on
the batch, inference uses a fixed threshold θ instead: z = h · 1[h > θ], where θ is a running mean of the
smallest value kept in training batches (a buffer, saved with the checkpoint). `sae.train()` selects per
batch; `sae.eval()` (what evaluation and checkpoint loading use) applies θ.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from saekit.sae.base import Encoding, SAESpec, SparseAutoencoder
from saekit.sae.registry import register
from saekit.sae.sparse import ChosenCodes, aux_code, batch_top_entries, rank_preacts

CANDIDATES_PER_K = 2
"""The sparse path ranks each row's 2k largest entries; rows that want more are recomputed in full (exact)."""


def batch_topk_activation(h: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n) → (B, n): the k·B largest entries of ReLU(h) over the whole batch kept, the rest zeroed."""
    flat = F.relu(h).flatten()
    values, indices = flat.topk(min(k * h.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(h)


def threshold_activation(h: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """z = h · 1[h > θ] (θ ≥ 0 a scalar or per-latent (n,) tensor)."""
    return h * (h > threshold)


@register
class BatchTopKSAE(SparseAutoencoder):
    name = "batchtopk"
    topk_family = True
    homogeneous = True
    has_sparse_path = True

    def __init__(self, spec: SAESpec):
        super().__init__(spec)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            return batch_topk_activation(h, self.spec.k)
        return threshold_activation(h, self.threshold)

    def encode_for_training(self, x: torch.Tensor) -> Encoding:
        encoding = super().encode_for_training(x)
        self._update_threshold(encoding.h, encoding.z)
        return encoding

    def choose_codes(self, x_centered: torch.Tensor, dead_latents: Optional[torch.Tensor]) -> ChosenCodes:
        m = min(self.spec.n, CANDIDATES_PER_K * self.spec.k)
        ranked = rank_preacts(x_centered, self.W_enc, self.b_enc, m, on="relu", dead_latents=dead_latents,
                              k_aux=self.spec.effective_k_aux)
        main = batch_top_entries(x_centered, self.W_enc, self.b_enc, ranked, self.spec.k * x_centered.shape[0])
        self._record_smallest_kept(main.values)
        return ChosenCodes(main, {}, aux_code(ranked))

    @torch.no_grad()
    def _update_threshold(self, h: torch.Tensor, z: torch.Tensor) -> None:
        self._record_smallest_kept(h[z != 0])

    @torch.no_grad()
    def _record_smallest_kept(self, kept: torch.Tensor) -> None:
        """θ ← decay·θ + (1 − decay)·(smallest kept value); the first batch sets θ directly."""
        if kept.numel() == 0:
            return
        smallest = kept.min()
        if int(self.threshold_updates) == 0:
            self.threshold.copy_(smallest)
        else:
            decay = self.spec.threshold_decay
            self.threshold.mul_(decay).add_((1 - decay) * smallest)
        self.threshold_updates += 1
