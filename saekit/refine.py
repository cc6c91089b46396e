"""Activation shrinkage by refinement (SPEC 4): re-fit the nonzero latent values with the support fixed.

For each token, the active set S of its code z is kept and the values v ≥ 0 on S are re-optimized for
min ‖x − b_pre − W_S^T v‖² by projected gradient descent (step 1/λ_max of the support's Gram matrix, so every
step decreases the loss). An unshrunk code comes back unchanged (ratio 1, gain 0); an L1-trained code comes
back larger (ratio > 1) with lower MSE.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def refine_codes(W_dec: torch.Tensor, b_pre: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
                 steps: int = 300) -> torch.Tensor:
    """Refined codes with the same support as z. W_dec (n, d), b_pre (d,), x (B, d), z (B, n) → (B, n)."""
    width = int((z != 0).sum(dim=1).max()) if z.numel() else 0
    if width == 0:
        return z.clone()
    values, indices = z.abs().topk(width, dim=1)  # the support, padded with zeros where a token has fewer
    mask = values > 0
    v = z.gather(1, indices).double() * mask
    rows = W_dec.double()[indices] * mask[..., None]  # (B, width, d)
    gram = rows @ rows.transpose(1, 2)  # (B, width, width)
    target = rows @ (x.double() - b_pre.double())[..., None]  # (B, width, 1)
    step = 1.0 / torch.linalg.eigvalsh(gram)[:, -1].clamp_min(1e-12)  # 1 / λ_max per token
    v = v[..., None]
    for _ in range(steps):
        v = (v - step[:, None, None] * (gram @ v - target)).clamp_min(0.0) * mask[..., None]
    refined = torch.zeros_like(z, dtype=torch.float64).scatter(1, indices, v.squeeze(-1))
    return refined.to(z.dtype)


@torch.no_grad()
def refinement_metrics(sae, x_raw: torch.Tensor, steps: int = 300) -> dict[str, float]:
    """refine_ratio = Σ refined / Σ original over active latents; refine_mse_gain = 1 − mse_refined / mse_original.

    Both are computed in the SAE's (normalized) input space, on the values the decoder sees.
    """
    x, _ = sae.normalize_input(x_raw)
    z = sae.encode(x)
    refined = refine_codes(sae.W_dec, sae.b_pre, x, z, steps)
    active = z != 0
    mse_original = (x - sae.decode(z)).double().pow(2).sum(dim=1).mean()
    mse_refined = (x - sae.decode(refined)).double().pow(2).sum(dim=1).mean()
    total = z[active].double().sum()
    return {"refine_ratio": float(refined[active].double().sum() / total) if total > 0 else float("nan"),
            "refine_mse_gain": float(1 - mse_refined / mse_original) if mse_original > 0 else 0.0}
