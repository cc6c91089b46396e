"""Evaluate a trained SAE on held-out activations: every metric of SPEC section 4, computed, never written here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from saekit.cache import ActivationCache
from saekit.config import EvalConfig
from saekit.downstream import ablation_sparsity, downstream_metrics
from saekit.errors import DataError
from saekit.metrics import ReconstructionStats, row_chunks
from saekit.refine import refinement_metrics
from saekit.sae import SparseAutoencoder, swap_activation


def check_compatible(sae: SparseAutoencoder, cache: ActivationCache, ckpt_name: str) -> None:
    """The SAE must have been trained on activations of the cache's width."""
    if sae.spec.d != cache.d:
        raise DataError(
            f"ckpt={ckpt_name} expects activations of width {sae.spec.d}, but {cache.manifest['model_name']} at "
            f"{cache.manifest['hook']} has width {cache.d}; evaluate it with the model and hook it was trained on"
        )


def sae_input(sae, x: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """Activations as the SAE takes them: its device and dtype (a float16/bfloat16 model or cache gives half)."""
    weights = next(sae.parameters())
    return x.to(device=device or weights.device, dtype=weights.dtype)


@torch.no_grad()
def evaluate_reconstruction(sae: SparseAutoencoder, cache: ActivationCache, device: torch.device,
                            batch_size: int = 8192, split: str = "eval") -> tuple[dict[str, float], ReconstructionStats]:
    """mse, nmse, explained_variance, l0, dead_frac over every vector of `split`, in the model's activation space.

    Each batch is encoded in row chunks (`LATENT_CHUNK`), so memory does not grow with batch_size × n.
    """
    if cache.n_acts(split) == 0:
        raise DataError(f"the cache's {split} split is empty; raise data.n_eval_tokens")
    was_training = sae.training
    sae.eval()
    stats = ReconstructionStats(sae.spec.d, sae.spec.n, device)
    for batch in cache.iter_split(split, batch_size):
        for x in row_chunks(sae_input(sae, batch, device), sae.spec.n):
            x_hat, z = sae.reconstruct(x)
            stats.update(x, x_hat, z)
            del x_hat, z  # the next chunk's latents replace these, not join them
    sae.train(was_training)
    return stats.metrics(), stats


@dataclass
class Evaluation:
    """Everything `saekit eval` computes for one checkpoint."""

    metrics: dict[str, float]
    progressive: list[dict]
    """One dict per test-time activation value: {"k_prime" or "theta": value, metric: value, ...}."""
    stats: ReconstructionStats


def eval_windows(cache: ActivationCache, n_tokens: int) -> torch.Tensor:
    """The first held-out token windows covering `n_tokens` (at least one window)."""
    windows = cache.tokens("eval")
    if windows.shape[0] == 0:
        raise DataError("the cache's eval split has no token windows; raise data.n_eval_tokens")
    return windows[: max(1, n_tokens // windows.shape[1])]


def spliced(sae) -> Callable[[torch.Tensor], torch.Tensor]:
    """What goes back into the model: the reconstruction in the model's own activation space and dtype.

    The SAE gets its own dtype (float32 from a half-precision model) and the positions in row chunks, so a
    batch of windows never holds dense latents for all its positions at once.
    """
    def splice(acts: torch.Tensor) -> torch.Tensor:
        x = sae_input(sae, acts)
        return torch.cat([sae.reconstruct(rows)[0] for rows in row_chunks(x, sae.spec.n)]).to(acts.dtype)

    return splice


def _progressive_rows(sae: SparseAutoencoder, cache: ActivationCache, cfg: EvalConfig, device: torch.device,
                      downstream: Optional[Callable]) -> list[dict]:
    rows = []
    for kind, column, values in (("topk", "k_prime", cfg.k_primes), ("jumprelu", "theta", cfg.thetas)):
        for value in values:
            swapped = swap_activation(sae, kind, value)
            metrics, _ = evaluate_reconstruction(swapped, cache, device, cfg.batch_size)
            row = {column: value, "nmse": metrics["nmse"], "l0": metrics["l0"]}
            if downstream is not None and cfg.progressive_delta_ce:
                row["delta_ce"] = downstream(swapped)["delta_ce"]
            rows.append(row)
    return rows


@torch.no_grad()
def evaluate_checkpoint(sae: SparseAutoencoder, cache: ActivationCache, cfg: EvalConfig, device: torch.device,
                        model=None, hook: Optional[str] = None, keep_first: bool = True) -> Evaluation:
    """Every SPEC 4 metric: reconstruction, refinement, downstream splices and ablation sparsity (when a model
    is given), and progressive codes. Nothing is written here."""
    sae.eval()
    metrics, stats = evaluate_reconstruction(sae, cache, device, cfg.batch_size)
    if cfg.refine_tokens > 0:
        x = sae_input(sae, torch.cat(list(_first_rows(cache, cfg.refine_tokens))), device)
        metrics.update(refinement_metrics(sae, x, cfg.refine_steps))
    downstream: Optional[Callable] = None
    if model is not None:
        windows = eval_windows(cache, cfg.downstream_tokens)
        mean_act = (stats.sum_x / max(stats.n_tokens, 1)).float().to(device)

        def splice_metrics(module) -> dict[str, float]:
            return downstream_metrics(model, hook, windows, spliced(module), mean_act, cfg.downstream_batch_windows,
                                      keep_first=keep_first, score_bos=cfg.score_bos)

        downstream = splice_metrics
        if cfg.downstream:
            metrics.update(downstream(sae))
        if cfg.ablation_positions > 0:
            metrics.update(ablation_sparsity(model, hook, sae, windows, cfg.ablation_positions, cfg.ablation_horizon,
                                             cfg.seed, first_position=1 if keep_first else 0))
    return Evaluation(metrics, _progressive_rows(sae, cache, cfg, device, downstream), stats)


def _first_rows(cache: ActivationCache, n_rows: int):
    taken = 0
    for batch in cache.iter_split("eval", min(n_rows, 8192)):
        yield batch[: n_rows - taken]
        taken += batch.shape[0]
        if taken >= n_rows:
            return
