"""Activation shrinkage by refinement (SPEC 4): re-fit the nonzero latent values with the support fixed.

For each token, the active set S of its code z is kept and the values v ≥ 0 on S are re-optimized for
min ‖x − b_pre − W_S^T v‖² by projected gradient descent (step 1/λ_max of the support's Gram matrix, so every
step decreases the loss). An unshrunk code comes back unchanged (ratio 1, gain 0); an L1-trained code comes
back larger (ratio > 1) with lower MSE.

Tokens are encoded in row chunks (`metrics.LATENT_CHUNK` dense latents) and refined in chunks of
`REFINE_CHUNK` float64 entries of their (tokens, |S|, d) support rows, so memory does not grow with the
number of tokens or latents.
"""

from __future__ import annotations

from typing import Optional

import torch

from saekit.metrics import row_chunks

REFINE_CHUNK = 2 ** 22
"""float64 entries of one chunk's gathered decoder rows (tokens × support width × d): 32 MB."""


def support_of(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices, mask): each row's nonzero latents, padded with zeros to the widest row. z (B, n)."""
    width = int((z != 0).sum(dim=1).max()) if z.numel() else 0
    magnitudes, indices = z.abs().topk(width, dim=1)
    return z.gather(1, indices), indices, magnitudes > 0


@torch.no_grad()
def refine_support(W_dec: torch.Tensor, b_pre: torch.Tensor, x: torch.Tensor, values: torch.Tensor,
                   indices: torch.Tensor, mask: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """Refined values on a fixed support, (B, w) in float64; one chunk, so (B, w, d) float64 is held at once."""
    v = (values.double() * mask)[..., None]
    rows = W_dec[indices].double() * mask[..., None]  # (B, w, d), gathered before the cast: no float64 W_dec
    target = rows @ (x.double() - b_pre.double())[..., None]  # (B, w, 1)
    # W_S W_S^T (w × w) and W_S^T W_S (d × d) share their nonzero eigenvalues: take λ_max from the smaller, and
    # for supports wider than d apply W_S W_S^T as two thin products instead of forming it.
    wide = rows.shape[1] > rows.shape[2]
    gram = rows.transpose(1, 2) @ rows if wide else rows @ rows.transpose(1, 2)
    step = (1.0 / torch.linalg.eigvalsh(gram)[:, -1].clamp_min(1e-12))[:, None, None]  # 1 / λ_max per token
    keep = mask[..., None]
    for _ in range(steps):
        curvature = rows @ (rows.transpose(1, 2) @ v) if wide else gram @ v
        v = (v - step * (curvature - target)).clamp_min(0.0) * keep
    return v.squeeze(-1)


def _chunk_rows(width: int, d: int) -> int:
    """Tokens per chunk: their (width, d) support rows and Gram matrices fit REFINE_CHUNK."""
    return max(1, REFINE_CHUNK // (width * d))


@torch.no_grad()
def refine_codes(W_dec: torch.Tensor, b_pre: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
                 steps: int = 300, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Refined codes with the same support as z. W_dec (n, d), b_pre (d,), x (B, d), z (B, n) → (B, n).

    `chunk_rows` tokens are refined together (default: as many as REFINE_CHUNK allows).
    """
    refined = torch.zeros_like(z)
    width = int((z != 0).sum(dim=1).max()) if z.numel() else 0
    if width == 0:
        return refined
    rows = chunk_rows or _chunk_rows(width, W_dec.shape[1])
    for start in range(0, z.shape[0], rows):
        values, indices, mask = support_of(z[start:start + rows])
        if values.shape[1]:
            v = refine_support(W_dec, b_pre, x[start:start + rows], values, indices, mask, steps)
            refined[start:start + rows].scatter_(1, indices, v.to(z.dtype))
    return refined


@torch.no_grad()
def refinement_metrics(sae, x_raw: torch.Tensor, steps: int = 300,
                       y_raw: Optional[torch.Tensor] = None) -> dict[str, float]:
    """refine_ratio = Σ refined / Σ original over active latents; refine_mse_gain = 1 − mse_refined / mse_original.

    Both are computed in the SAE's (normalized) input space, on the values the decoder sees. Tokens are encoded
    and refined a chunk at a time; only float64 totals are kept. A transcoder's codes (y_raw: its raw targets)
    are refined towards y: the values fit y − decoder_offset(x), what the latents have to explain.
    """
    totals = torch.zeros(4, dtype=torch.float64, device=x_raw.device)  # Σ original, Σ refined, sse original, refined
    chunks = row_chunks(x_raw, sae.spec.n)
    targets = row_chunks(y_raw, sae.spec.n) if y_raw is not None else [None] * len(chunks)
    for chunk, y_chunk in zip(chunks, targets):
        x, _ = sae.normalize_input(chunk)
        z = sae.encode(x)
        if y_chunk is None:
            target = x
            refined = refine_codes(sae.W_dec, sae.b_pre, x, z, steps)
        else:
            target = sae.normalize_target(y_chunk)
            residual = target - sae.decoder_offset(x)
            refined = refine_codes(sae.W_dec, torch.zeros_like(residual[0]), residual, z, steps)
        active = z != 0
        totals += torch.stack([z[active].double().sum(), refined[active].double().sum(),
                               (target - sae.decode(z, x)).double().pow(2).sum(),
                               (target - sae.decode(refined, x)).double().pow(2).sum()])
        del z, refined, active
    total, total_refined, sse_original, sse_refined = totals.tolist()
    return {"refine_ratio": total_refined / total if total > 0 else float("nan"),
            "refine_mse_gain": 1 - sse_refined / sse_original if sse_original > 0 else 0.0}
