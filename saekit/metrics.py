"""Reconstruction metrics (SPEC section 4). Function names are the results-table metric names.

x, x_hat: (B, d) activations in the model's own space; z: (B, n) latents. Streaming evaluation uses
`ReconstructionStats`, whose totals give exactly the same numbers as the batch functions on the whole set.
"""

from __future__ import annotations

from typing import Optional

import torch

CORE_METRICS = ("mse", "nmse", "explained_variance", "l0", "dead_frac")
SAEBENCH_METRICS = ("cossim", "l2_ratio", "relative_reconstruction_bias", "l1", "frac_alive")
"""SAEBench's core reconstruction and sparsity metrics, by its names and definitions (sae_bench/evals/core/main.py):
per-token values averaged over tokens, except relative_reconstruction_bias, a ratio of means."""
L2_RATIO_FLOOR = 1e-4
"""SAEBench's l2_ratio divides by ‖x‖ with norms below this replaced by 1."""

LATENT_CHUNK = 2 ** 24
"""Dense latent entries (rows × n) evaluation encodes at a time: 64 MB of float32 latents, whatever the width."""


def row_chunks(x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """x split by rows so that each chunk's dense (rows, n) latents hold at most LATENT_CHUNK entries."""
    return x.split(max(1, LATENT_CHUNK // n))


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean over tokens of ||x − x̂||²."""
    return float((x - x_hat).double().pow(2).sum(dim=-1).mean())


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """mse / mean ||x − mean(x)||²: the fraction of variance unexplained (1 for the mean predictor)."""
    x64 = x.double()
    return mse(x, x_hat) / float((x64 - x64.mean(dim=0)).pow(2).sum(dim=-1).mean())


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return 1.0 - nmse(x, x_hat)


def l0(z: torch.Tensor) -> float:
    """Mean number of nonzero latents per token."""
    return float((z != 0).double().sum(dim=-1).mean())


def dead_frac(fire_counts: torch.Tensor) -> float:
    """Fraction of latents that never fired. fire_counts: (n,) tokens on which each latent was nonzero."""
    return float((fire_counts == 0).double().mean())


class ReconstructionStats:
    """Running sums over evaluation batches, kept on the latents' device; `metrics()` gives the core table rows.

    Per-token quantities (B × d) are summed in float64; the (B × n) latents are reduced where they are (counts
    exactly, activation sums in float32 per batch) and only n-sized float64 totals are kept. Nothing of size
    B × n ever leaves the device.
    """

    def __init__(self, d: int, n: int, device: torch.device | str = "cpu"):
        self.n_tokens = 0
        self.sum_sq_err = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(d, dtype=torch.float64, device=device)
        self.sum_sq_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_l0 = torch.zeros((), dtype=torch.int64, device=device)
        self.fire_counts = torch.zeros(n, dtype=torch.float64, device=device)
        self.sum_acts = torch.zeros(n, dtype=torch.float64, device=device)
        # SAEBench's core metrics: per-token cos(x, x̂) and ‖x̂‖/‖x‖ summed; Σ‖x̂‖² and Σ x·x̂ for the bias.
        self.sum_cossim = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_l2_ratio = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_out_sq_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_dot = torch.zeros((), dtype=torch.float64, device=device)

    _ACCUMULATORS = ("sum_sq_err", "sum_x", "sum_sq_norm", "sum_l0", "fire_counts", "sum_acts", "sum_cossim",
                     "sum_l2_ratio", "sum_out_sq_norm", "sum_dot")

    def _follow(self, device: torch.device) -> None:
        """Move the accumulators to the batches' device (n-sized vectors: cheap, and done once)."""
        if self.fire_counts.device != device:
            for name in self._ACCUMULATORS:
                setattr(self, name, getattr(self, name).to(device))

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> None:
        self._follow(z.device)
        x64 = x.to(self.sum_x.device, torch.float64)  # (B, d): small next to z
        self.n_tokens += x.shape[0]
        self.sum_sq_err += (x64 - x_hat.to(x64.device, torch.float64)).pow(2).sum()
        self.sum_x += x64.sum(dim=0)
        self.sum_sq_norm += x64.pow(2).sum()
        self._update_saebench(x64, x_hat.to(x64.device, torch.float64))
        active = z != 0
        counts = active.sum(dim=0)
        self.sum_l0 += counts.sum()
        self.fire_counts += counts
        self.sum_acts += z.sum(dim=0, dtype=torch.promote_types(z.dtype, torch.float32)).double()

    def _update_saebench(self, x64: torch.Tensor, out64: torch.Tensor) -> None:
        norm_in, norm_out = x64.norm(dim=-1), out64.norm(dim=-1)
        dot = (x64 * out64).sum(dim=-1)
        self.sum_cossim += (dot / (norm_in * norm_out).clamp_min(1e-30)).sum()
        self.sum_l2_ratio += (norm_out / torch.where(norm_in < L2_RATIO_FLOOR, 1.0, norm_in)).sum()
        self.sum_out_sq_norm += norm_out.pow(2).sum()
        self.sum_dot += dot.sum()

    def saebench_metrics(self) -> dict[str, float]:
        """cossim, l2_ratio, relative_reconstruction_bias (mean ‖x̂‖² / mean x·x̂), l1 (mean Σ z, no abs: SAEBench's),
        frac_alive (latents that fired at least once)."""
        n = max(self.n_tokens, 1)
        dot = float(self.sum_dot)
        return {"cossim": float(self.sum_cossim) / n, "l2_ratio": float(self.sum_l2_ratio) / n,
                "relative_reconstruction_bias": float(self.sum_out_sq_norm) / dot if dot != 0 else float("nan"),
                "l1": float(self.sum_acts.sum()) / n, "frac_alive": float((self.fire_counts > 0).double().mean())}

    def metrics(self) -> dict[str, float]:
        n = max(self.n_tokens, 1)
        mean = self.sum_x / n
        # Σ||x − μ||² = Σ||x||² − N||μ||² (float64 keeps the cancellation harmless at these sizes).
        total_var = (float(self.sum_sq_norm) - n * float(mean.pow(2).sum())) / n
        mse_value = float(self.sum_sq_err) / n
        nmse_value = mse_value / total_var if total_var > 0 else float("nan")
        return {
            "mse": mse_value,
            "nmse": nmse_value,
            "explained_variance": 1.0 - nmse_value,
            "l0": float(self.sum_l0) / n,
            "dead_frac": dead_frac(self.fire_counts),
            **self.saebench_metrics(),
        }

    def latent_density(self) -> torch.Tensor:
        """Firing rate of each latent on the evaluated tokens, (n,), on the CPU."""
        return self.fire_counts.cpu() / max(self.n_tokens, 1)


@torch.no_grad()
def decoder_cosine_metrics(W_dec: torch.Tensor, rows_per_chunk: Optional[int] = None) -> dict[str, float]:
    """max_pairwise_decoder_cosine_sim: the largest cosine similarity between two distinct latents' decoder
    directions; average_max_decoder_cosine_sim: each latent's largest cosine with another, averaged (SAEBench's
    name and definition; signed cosines, as SAEBench). W_dec: (n, d) rows; in row chunks, never an n × n matrix."""
    unit = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = unit.shape[0]
    rows_per_chunk = rows_per_chunk or max(1, LATENT_CHUNK // n)  # blocks no larger than evaluation's latent chunks
    if n < 2:
        return {"max_pairwise_decoder_cosine_sim": float("nan"), "average_max_decoder_cosine_sim": float("nan")}
    best = torch.empty(n, device=unit.device)
    for start in range(0, n, rows_per_chunk):
        block = unit[start:start + rows_per_chunk] @ unit.T
        rows = torch.arange(block.shape[0], device=unit.device)
        block[rows, rows + start] = float("-inf")
        best[start:start + block.shape[0]] = block.max(dim=1).values
    return {"max_pairwise_decoder_cosine_sim": float(best.max()), "average_max_decoder_cosine_sim": float(best.mean())}
