"""Reconstruction metrics (SPEC section 4). Function names are the results-table metric names.

x, x_hat: (B, d) activations in the model's own space; z: (B, n) latents. Streaming evaluation uses
`ReconstructionStats`, whose totals give exactly the same numbers as the batch functions on the whole set.
"""

from __future__ import annotations

import torch

CORE_METRICS = ("mse", "nmse", "explained_variance", "l0", "dead_frac")


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
    """Running float64 sums over evaluation batches; `metrics()` gives the core table rows."""

    def __init__(self, d: int, n: int):
        self.n_tokens = 0
        self.sum_sq_err = 0.0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_sq_norm = 0.0
        self.sum_l0 = 0.0
        self.fire_counts = torch.zeros(n, dtype=torch.float64)
        self.sum_acts = torch.zeros(n, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> None:
        x64, z64 = x.double().cpu(), z.double().cpu()
        self.n_tokens += x.shape[0]
        self.sum_sq_err += float((x64 - x_hat.double().cpu()).pow(2).sum())
        self.sum_x += x64.sum(dim=0)
        self.sum_sq_norm += float(x64.pow(2).sum())
        active = z64 != 0
        self.sum_l0 += float(active.sum())
        self.fire_counts += active.sum(dim=0)
        self.sum_acts += z64.sum(dim=0)

    def metrics(self) -> dict[str, float]:
        n = max(self.n_tokens, 1)
        mean = self.sum_x / n
        # Σ||x − μ||² = Σ||x||² − N||μ||² (float64 keeps the cancellation harmless at these sizes).
        total_var = (self.sum_sq_norm - n * float(mean.pow(2).sum())) / n
        mse_value = self.sum_sq_err / n
        nmse_value = mse_value / total_var if total_var > 0 else float("nan")
        return {
            "mse": mse_value,
            "nmse": nmse_value,
            "explained_variance": 1.0 - nmse_value,
            "l0": self.sum_l0 / n,
            "dead_frac": dead_frac(self.fire_counts),
        }

    def latent_density(self) -> torch.Tensor:
        """Firing rate of each latent on the evaluated tokens, (n,)."""
        return self.fire_counts / max(self.n_tokens, 1)
