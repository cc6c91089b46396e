"""BatchTopK (Bussmann et al. 2024): keep the k·B largest activations over the whole batch, not k per token.

Tokens that need more latents get more, at the same average L0. Because training-time selection depends on
the batch, inference uses a fixed threshold θ instead: z = h · 1[h > θ], where θ is a running mean of the
smallest value kept in training batches (a buffer, saved with the checkpoint). `sae.train()` selects per
batch; `sae.eval()` (what evaluation and checkpoint loading use) applies θ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from saekit.sae.base import Encoding, SAESpec, SparseAutoencoder
from saekit.errors import require
from saekit.sae.registry import VariantConfig, register
from saekit.sae.sparse import ChosenCodes, DeadSet, aux_code, batch_top_entries, overflowing_rows, rank_preacts

CANDIDATES_PER_K = 2
"""The sparse path ranks each row's 2k largest entries; rows that want more are recomputed in full."""
RECOMPUTED_ROWS_PER_BATCH = 1 / 128
"""Rows of a training batch that can be recomputed in full (at least 64): a fixed number, so that no shape
depends on the data and a step never waits on the device. The selection is exact unless more rows want more
than 2k latents in one batch; then the rest keep their 2k candidates, and a warning says so on the next log step."""


def batch_topk_activation(h: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n) → (B, n): the k·B largest entries of ReLU(h) over the whole batch kept, the rest zeroed."""
    flat = F.relu(h).flatten()
    values, indices = flat.topk(min(k * h.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(h)


def threshold_activation(h: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """z = h · 1[h > θ] (θ ≥ 0 a scalar or per-latent (n,) tensor)."""
    return h * (h > threshold)


@dataclass
class BatchTopKConfig(VariantConfig):
    threshold_decay: float = 0.99
    """Decay of the running mean of the smallest kept value (the inference threshold)."""

    def check(self) -> None:
        super().check()
        require(0 <= self.threshold_decay < 1, f"activation.threshold_decay={self.threshold_decay} must be in [0, 1)")


@register
class BatchTopKSAE(SparseAutoencoder):
    name = "batchtopk"
    Config = BatchTopKConfig
    topk_family = True
    homogeneous = True
    has_sparse_path = True

    def __init__(self, spec: SAESpec):
        super().__init__(spec)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        # Rows of training batches that wanted recomputing beyond the fixed number (read on log steps).
        self.register_buffer("selection_overflow", torch.zeros((), dtype=torch.long), persistent=False)
        self.recomputed_rows = 0

    @property
    def candidates_per_row(self) -> int:
        return min(self.spec.n, CANDIDATES_PER_K * self.spec.k)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            return batch_topk_activation(h, self.spec.k)
        return threshold_activation(h, self.threshold)

    def encode_for_training(self, x: torch.Tensor) -> Encoding:
        encoding = super().encode_for_training(x)
        self._update_threshold(encoding.h, encoding.z)
        return encoding

    def choose_codes(self, x_centered: torch.Tensor, dead: Optional[DeadSet]) -> ChosenCodes:
        ranked = rank_preacts(x_centered, self.W_enc, self.b_enc, self.candidates_per_row, on="relu", dead=dead,
                              k_aux=self.spec.effective_k_aux)
        n_rows = x_centered.shape[0]
        self.recomputed_rows = max(64, int(n_rows * RECOMPUTED_ROWS_PER_BATCH))
        main = batch_top_entries(x_centered, self.W_enc, self.b_enc, ranked, self.spec.k * n_rows,
                                 self.recomputed_rows, overflow=self.selection_overflow)
        self._record_smallest_kept(torch.where(main.values > 0, main.values, float("inf")).min())
        return ChosenCodes(main, {}, aux_code(ranked))

    def training_warnings(self) -> list[str]:
        overflow = int(self.selection_overflow)
        if overflow == 0:
            return []
        self.selection_overflow.zero_()
        m = self.candidates_per_row
        return [f"BatchTopK: {overflow} tokens since the last log step wanted more than {m} latents beyond the "
                f"{self.recomputed_rows} rows a batch recomputes in full; they kept their {m} largest, so those "
                f"batches took nearly (not exactly) their top k·B entries"]

    @torch.no_grad()
    def _reconstruction_norms(self, sample: torch.Tensor) -> torch.Tensor:
        """The whole sample is one batch, as the dense `encode` takes it; init may read the device, so exactly
        the rows that need it are recomputed."""
        centered = sample - self.b_pre
        ranked = rank_preacts(centered, self.W_enc, self.b_enc, self.candidates_per_row, on="relu")
        n_keep = self.spec.k * sample.shape[0]
        capacity = int(overflowing_rows(ranked, n_keep)[1].sum())
        return self._code_norms(batch_top_entries(centered, self.W_enc, self.b_enc, ranked, n_keep, capacity))

    @torch.no_grad()
    def _update_threshold(self, h: torch.Tensor, z: torch.Tensor) -> None:
        self._record_smallest_kept(torch.where(z != 0, h, float("inf")).min())

    @torch.no_grad()
    def _record_smallest_kept(self, smallest: torch.Tensor) -> None:
        """θ ← decay·θ + (1 − decay)·(smallest kept value); the first batch sets θ directly; a batch that kept
        nothing (smallest = inf) leaves θ alone. Decided on the device: nothing is read back."""
        if self.reducer is not None:  # data parallel: every rank keeps the same θ (the smallest kept anywhere)
            smallest = self.reducer.min_(smallest)
        decay = self.cfg.threshold_decay
        kept = torch.isfinite(smallest)
        updated = torch.where(self.threshold_updates == 0, smallest, self.threshold * decay + (1 - decay) * smallest)
        self.threshold.copy_(torch.where(kept, updated, self.threshold))
        self.threshold_updates += kept.long()
