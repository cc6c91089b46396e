"""Evaluate a trained SAE on held-out activations: every metric of SPEC section 4, computed, never written here.

A transcoder (its cache holds [x | y] pairs) is measured against its target y: nmse of ŷ against y, the
downstream splice of ŷ at `hook_out`, ablations at `hook_out`, refinement of its codes towards y; progressive
codes as for an SAE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from saekit.cache import ActivationCache
from saekit.config import EvalConfig
from saekit.downstream import ablation_sparsity, downstream_metrics
from saekit.errors import DataError
from saekit.metrics import ReconstructionStats, decoder_cosine_metrics, row_chunks
from saekit.prefix import default_boundaries, prefix_metrics
from saekit.refine import refinement_metrics
from saekit.sae import SparseAutoencoder, swap_activation


def check_compatible(sae: SparseAutoencoder, cache: ActivationCache, ckpt_name: str) -> None:
    """The SAE must have been trained on activations of the cache's width (a transcoder: on its pairs)."""
    if sae.spec.d != cache.d_in:
        raise DataError(
            f"ckpt={ckpt_name} expects activations of width {sae.spec.d}, but {cache.manifest['model_name']} at "
            f"{cache.hook} has width {cache.d_in}; evaluate it with the model and hook it was trained on"
        )
    if sae.spec.d_out != cache.d_out:
        what = f"a transcoder predicting width {sae.spec.d_out}" if sae.transcoder else "an SAE"
        held = f"pairs predicting {cache.hook_out} (width {cache.d_out})" if cache.d_out is not None else "no pairs"
        raise DataError(f"ckpt={ckpt_name} is {what}, but the cache of {cache.hook} holds {held}; evaluate it with "
                        f"the hook and hook_out it was trained on")


def sae_input(sae, x: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """Activations as the SAE takes them: its device and dtype (a float16/bfloat16 model or cache gives half)."""
    weights = next(sae.parameters())
    return x.to(device=device or weights.device, dtype=weights.dtype)


@torch.no_grad()
def evaluate_reconstruction(sae: SparseAutoencoder, cache: ActivationCache, device: torch.device,
                            batch_size: int = 8192, split: str = "eval") -> tuple[dict[str, float], ReconstructionStats]:
    """mse, nmse, explained_variance, l0, dead_frac over every vector of `split`, in the model's activation space
    (a transcoder's prediction against its target y, in y's space).

    Each batch is encoded in row chunks (`LATENT_CHUNK`), so memory does not grow with batch_size × n.
    """
    if cache.n_acts(split) == 0:
        raise DataError(f"the cache's {split} split is empty; raise data.n_eval_tokens")
    was_training = sae.training
    sae.eval()
    stats = ReconstructionStats(sae.spec.d_output, sae.spec.n, device)
    for batch in cache.iter_split(split, batch_size):
        for rows in row_chunks(sae_input(sae, batch, device), sae.spec.n):
            x, y = cache.split(rows)
            x_hat, z = sae.reconstruct(x)
            stats.update(x if y is None else y, x_hat, z)
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
    prefixes: list[dict] = field(default_factory=list)
    """One dict per prefix m read alone: {"prefix": m, "nmse": …, "l0": …} (saekit/prefix.py)."""


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
    def splice(acts: torch.Tensor) -> torch.Tensor:  # (N, d) → (N, d_output): a transcoder's prediction of y
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


def _prefix_rows(sae: SparseAutoencoder, cache: ActivationCache, cfg: EvalConfig, device: torch.device) -> list[dict]:
    """Per-prefix rows for an SAE trained with nested prefixes (Matryoshka), or at `cfg.prefixes` for any SAE."""
    boundaries = list(cfg.prefixes) or default_boundaries(sae)
    if len(boundaries) <= 1 and not cfg.prefixes:
        return []
    batches = (_pair_or_rows(cache.split(sae_input(sae, batch, device))) for batch in cache.iter_split("eval", cfg.batch_size))
    return prefix_metrics(sae, batches, boundaries)


def _pair_or_rows(split: tuple[torch.Tensor, Optional[torch.Tensor]]):
    x, y = split
    return x if y is None else (x, y)


@torch.no_grad()
def evaluate_checkpoint(sae: SparseAutoencoder, cache: ActivationCache, cfg: EvalConfig, device: torch.device,
                        model=None, hook: Optional[str] = None, keep_first: bool = True) -> Evaluation:
    """Every SPEC 4 metric: reconstruction, refinement, downstream splices and ablation sparsity (when a model
    is given), and progressive codes. Nothing is written here."""
    sae.eval()
    metrics, stats = evaluate_reconstruction(sae, cache, device, cfg.batch_size)
    if cfg.decoder_similarity:
        metrics.update(decoder_cosine_metrics(sae.W_dec.detach()))
    if cfg.refine_tokens > 0:
        x, y = cache.split(sae_input(sae, torch.cat(list(_first_rows(cache, cfg.refine_tokens))), device))
        metrics.update(refinement_metrics(sae, x, cfg.refine_steps, y))
    downstream: Optional[Callable] = None
    if model is not None:
        windows = eval_windows(cache, cfg.downstream_tokens)
        # The mean of what is measured: a transcoder's target y, which the mean variant puts in at hook_out.
        mean_act = (stats.sum_x / max(stats.n_tokens, 1)).float().to(device)

        def splice_metrics(module) -> dict[str, float]:
            return downstream_metrics(model, hook, windows, spliced(module), mean_act, cfg.downstream_batch_windows,
                                      keep_first=keep_first, score_bos=cfg.score_bos, hook_out=cache.hook_out)

        downstream = splice_metrics
        if cfg.downstream:
            metrics.update(downstream(sae))
        if cfg.ablation_positions > 0:
            metrics.update(ablation_sparsity(model, hook, sae, windows, cfg.ablation_positions, cfg.ablation_horizon,
                                             cfg.seed, first_position=1 if keep_first else 0, hook_out=cache.hook_out))
    return Evaluation(metrics, _progressive_rows(sae, cache, cfg, device, downstream), stats,
                      _prefix_rows(sae, cache, cfg, device))


def _first_rows(cache: ActivationCache, n_rows: int):
    taken = 0
    for batch in cache.iter_split("eval", min(n_rows, 8192)):
        yield batch[: n_rows - taken]
        taken += batch.shape[0]
        if taken >= n_rows:
            return
