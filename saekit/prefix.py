"""Per-prefix rows (SPEC 4): reconstruction with only the first m latents of an SAE.

A Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024) trains every nested prefix of its dictionary to
reconstruct on its own, so each prefix is a usable, smaller SAE; these rows measure how usable. Any other SAE can
be read as ordered too (its latents in index order), which is the baseline the Matryoshka rows are compared with.

For a prefix m: z = the SAE's own latents (eval mode, so BatchTopK-style SAEs use their threshold θ), then
z_{≤m} = z with every latent i ≥ m zeroed, x̂_{≤m} = decode(z_{≤m}) (b_pre included), measured in the model's
activation space exactly as the core `nmse` and `l0` rows are (`ReconstructionStats`): the row with m = n equals
the core row.

The eval results table takes these as rows with a `prefix` column: one block per boundary m, metrics `nmse` and
`l0`, as the progressive-code rows carry `k_prime` or `theta`.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from saekit.errors import ConfigError
from saekit.metrics import LATENT_CHUNK, ReconstructionStats


def default_boundaries(sae) -> list[int]:
    """The prefixes an SAE is read at: a Matryoshka SAE's own group boundaries (its `prefixes`), else just n."""
    prefixes = getattr(sae, "prefixes", None)
    return list(prefixes) if prefixes else [sae.spec.n]


def check_boundaries(boundaries: Sequence[int], n: int) -> list[int]:
    """Strictly increasing integers in 1..n, as a list; a ConfigError naming the fault otherwise."""
    values = [int(m) for m in boundaries]
    if not values or any(m != raw for m, raw in zip(values, boundaries)):
        raise ConfigError(f"prefix boundaries {list(boundaries)} must be a non-empty list of integers")
    if values[0] < 1 or values[-1] > n or any(b <= a for a, b in zip(values, values[1:])):
        raise ConfigError(f"prefix boundaries {values} must increase strictly within 1..n (n={n})")
    return values


def truncate_latents(z: torch.Tensor, m: int) -> torch.Tensor:
    """(B, n) latents with every latent index ≥ m zeroed (a copy)."""
    kept = z.clone()
    kept[:, m:] = 0
    return kept


def _pairs(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_raw, target_raw) from an SAE's batch x (its own target) or a transcoder's (x, y) pair."""
    if isinstance(batch, torch.Tensor):
        return batch, batch
    x_raw, y_raw = batch
    return x_raw, y_raw


@torch.no_grad()
def prefix_metrics(sae, batches: Iterable, boundaries: Optional[Sequence[int]] = None) -> list[dict[str, float]]:
    """One row {"prefix": m, "nmse": …, "l0": …} per boundary m, over every held-out batch.

    sae: a `SparseAutoencoder` (anything with `encode`, `decode(z, x)`, `normalize_input`, `denormalize_output`,
    `spec`).
    batches: raw activations (B, d) in the model's space, already on the SAE's device and dtype (e.g.
    `sae_input(sae, batch, device) for batch in cache.iter_split("eval", batch_size)`); for a transcoder, pairs
    (x (B, d), y (B, d_out)) whose y is the target. Each is encoded in row chunks so that dense latents stay
    bounded (`metrics.LATENT_CHUNK` entries).
    boundaries: the prefixes m (strictly increasing, within 1..n); default `default_boundaries(sae)`.

    nmse uses the same denominator for every prefix (the held-out variance of the target), l0 counts the
    latents < m that fire. The SAE is evaluated in eval mode and its training mode is restored afterwards.
    """
    n = sae.spec.n
    prefixes = check_boundaries(boundaries if boundaries is not None else default_boundaries(sae), n)
    stats = [ReconstructionStats(getattr(sae.spec, "d_output", sae.spec.d), n) for _ in prefixes]
    was_training = sae.training
    sae.eval()
    try:
        for batch in batches:
            x_all, target_all = _pairs(batch)
            rows_per_chunk = max(1, LATENT_CHUNK // n)  # as `metrics.row_chunks`, applied to x and target alike
            for x_raw, target in zip(x_all.split(rows_per_chunk), target_all.split(rows_per_chunk)):
                x, state = sae.normalize_input(x_raw)
                z = sae.encode(x)
                for m, stat in zip(prefixes, stats):
                    z_m = truncate_latents(z, m)
                    stat.update(target, sae.denormalize_output(sae.decode(z_m, x), state), z_m)
    finally:
        sae.train(was_training)
    rows = []
    for m, stat in zip(prefixes, stats):
        metrics = stat.metrics()
        rows.append({"prefix": m, "nmse": metrics["nmse"], "l0": metrics["l0"]})
    return rows
