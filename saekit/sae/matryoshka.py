"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima et al. 2025; Nabeshima 2024): nested dictionaries in one SAE.

The latents are split into consecutive groups of `group_sizes`; the prefixes m₁ < m₂ < … < n are the running
sums. Selection is BatchTopK over all n latents (the k·B largest ReLU(h) of the batch); the loss is

    Σ_m ‖x − x̂_{≤m}‖²  (+ AuxK),   x̂_{≤m} = Σ_{i<m} z_i W_dec[i] + b_pre,

each prefix reconstructing on its own with the code it was given (the latents < m of the one BatchTopK code:
selection is not redone per prefix). An early prefix cannot lean on later latents, so the general (parent)
features settle in the early groups and keep firing where their specific (child) features fire, instead of
being absorbed into them (Chanin et al. 2024; `saekit.absorption` measures it). Fixed groups as in Bussmann
et al.; Nabeshima's first version sampled the prefix lengths at random each batch instead.

Summed, not averaged: the SPEC and the paper's loss are a sum over the nested dictionaries (SAELens sums too;
Bussmann's reference code and dictionary_learning average). Under Adam a constant factor on the whole loss
changes nothing, so the two differ only in AuxK's relative weight: averaging over G prefixes equals summing
with `dead.aux_alpha` multiplied by G. The full-width term is logged as `mse`, the others as `prefix_<m>`.

AuxK reconstructs the error of the full reconstruction (as both reference codes do). Inference is BatchTopK's:
in eval mode z = h · 1[h > θ] with the threshold learned over all latents, so the SAE is a plain BatchTopK SAE
at test time, whose prefixes can be read on their own (`saekit.prefix`).

Groups: `activation.group_sizes=[g₁, …, g_G]`, positive and summing to n. Left empty (the default), the
prefixes double up to n: n/16, n/8, n/4, n/2, n (integer division), dropping those below k (a prefix smaller
than the average number of active latents cannot reconstruct on its own), so groups of n/16, n/16, n/8, n/4,
n/2 for the usual sizes; with n < 2k this leaves the single prefix n, i.e. plain BatchTopK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from saekit.errors import ConfigError
from saekit.sae.base import Encoding, SAESpec, reconstruction_loss
from saekit.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from saekit.sae.registry import register
from saekit.sae.sparse import ChosenCodes, DeadSet, SparseCode

DEFAULT_LEVELS = 5
"""Prefixes of the default grouping: n/2^j for j = 0..4 (each prefix twice the one before)."""


def doubling_prefixes(n: int, k: int, levels: int = DEFAULT_LEVELS) -> list[int]:
    """The default prefixes: n // 2^j for j < levels that are ≥ max(k, 1), increasing, always ending at n."""
    prefixes = {n}
    for j in range(1, levels):
        m = n >> j
        if m >= max(k, 1):
            prefixes.add(m)
    return sorted(prefixes)


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    group_sizes: list[int] = field(default_factory=list)
    """Sizes of the consecutive latent groups, summing to n; [] for doubling prefixes n/16 … n (see above)."""

    def check(self) -> None:
        super().check()
        sizes = list(self.group_sizes)  # a Hydra ListConfig or a saved JSON list alike
        if any(isinstance(size, bool) or not isinstance(size, (int, float)) or int(size) != size or size < 1
               for size in sizes):
            raise ConfigError(f"activation.group_sizes={sizes} must hold positive integers (the size of each group "
                              f"of latents, summing to n); leave it empty for doubling groups")
        self.group_sizes = [int(size) for size in sizes]

    def check_run(self, n: int, k: int) -> None:
        super().check_run(n, k)
        total = sum(self.group_sizes)
        if self.group_sizes and total != n:
            raise ConfigError(f"activation.group_sizes={list(self.group_sizes)} sums to {total}, not n={n}; give "
                              f"group sizes that sum to n, or activation.group_sizes=[] for doubling groups")

    def prefixes(self, n: int, k: int) -> list[int]:
        """m₁ < … < n: the running sums of group_sizes, or the doubling default."""
        if not self.group_sizes:
            return doubling_prefixes(n, k)
        ends, total = [], 0
        for size in self.group_sizes:
            total += int(size)
            ends.append(total)
        return ends


def truncated(code: SparseCode, m: int) -> SparseCode:
    """The code with every entry of latent ≥ m given pre-activation 0 (so ReLU makes it 0, with zero gradient).

    Entries are kept, not dropped, so no shape depends on the data (dropping would read a count back to the
    host); a zeroed entry decodes to nothing and passes no gradient (ReLU'(0) = 0 in torch), exactly as the
    dense reference's zeroed latents.
    """
    return code.with_values(torch.where(code.latents < m, code.values, torch.zeros_like(code.values)))


@register
class MatryoshkaSAE(BatchTopKSAE):
    name = "matryoshka"
    Config = MatryoshkaConfig

    def __init__(self, spec: SAESpec):
        super().__init__(spec)
        self.cfg.check_run(spec.n, spec.k)
        self.prefixes: list[int] = self.cfg.prefixes(spec.n, spec.k)
        """The nested prefixes m₁ < … < n (read by `saekit.prefix` for per-prefix rows)."""

    @property
    def inner_prefixes(self) -> list[int]:
        """Prefixes below n: each adds a `prefix_<m>` loss term beside the full-width `mse`."""
        return [m for m in self.prefixes if m < self.spec.n]

    def extra_terms(self, x: torch.Tensor, encoding: Encoding, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense reference: ‖y − x̂_{≤m}‖² (y = x for an SAE) from the batch's latents with latents ≥ m zeroed,
        per inner prefix."""
        terms = {}
        for m in self.inner_prefixes:
            keep = torch.arange(self.spec.n, device=x.device) < m
            terms[f"prefix_{m}"] = reconstruction_loss(y, self.decode(encoding.z * keep, x))
        return terms

    def choose_codes(self, x_centered: torch.Tensor, dead: Optional[DeadSet]) -> ChosenCodes:
        """Sparse path: the BatchTopK code, and per inner prefix the same code truncated to latents < m, added
        with weight 1: O(N·d) per prefix for N chosen entries, as the code's own reconstruction."""
        chosen = super().choose_codes(x_centered, dead)
        extra = {f"prefix_{m}": (truncated(chosen.main, m), 1.0) for m in self.inner_prefixes}
        return ChosenCodes(chosen.main, {**chosen.extra, **extra}, chosen.aux)
