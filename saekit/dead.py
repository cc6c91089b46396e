"""Dead latents (SPEC 3): counted over a window of training tokens, and revived by resampling.

AuxK, the other remedy, is a loss term and lives with the SAE geometry (sae/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saekit.sae import SparseAutoencoder


@dataclass
class DeadLatents:
    """Tokens since each latent last fired; dead once that reaches the window."""

    tokens_since_fired: torch.Tensor
    window: int

    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired.to(self.tokens_since_fired.device)] = 0

    def revive(self, latents: torch.Tensor) -> None:
        """Resampled latents start a fresh window."""
        self.tokens_since_fired[latents] = 0

    @property
    def mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.window

    @property
    def fraction(self) -> float:
        return float(self.mask.float().mean())


def default_resample_steps(n_steps: int) -> list[int]:
    """After 20%, 40% and 60% of the run: late enough for the window to see deaths, early enough to recover."""
    return sorted({max(1, int(n_steps * fraction)) for fraction in (0.2, 0.4, 0.6)} - {n_steps})


@torch.no_grad()
def high_loss_inputs(sae: SparseAutoencoder, inputs: torch.Tensor, count: int,
                     generator: torch.Generator) -> torch.Tensor:
    """`count` rows of `inputs` (N, d), drawn with probability ∝ squared reconstruction loss (Bricken et al. 2023)."""
    x_hat, _ = sae(inputs)
    loss = (inputs - x_hat).pow(2).sum(dim=-1).double()
    weights = loss.pow(2)
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    rows = torch.multinomial(weights.cpu(), count, replacement=count > inputs.shape[0], generator=generator)
    return inputs[rows.to(inputs.device)]


@torch.no_grad()
def resample_dead_latents(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead_mask: torch.Tensor,
                          inputs: torch.Tensor, encoder_frac: float, generator: torch.Generator) -> torch.Tensor:
    """Re-initialize every dead latent toward a high-loss input; returns the indices resampled.

    Decoder row = the input's unit direction from b_pre; encoder row = that direction with `encoder_frac` of
    the mean alive encoder-row norm; bias 0; variant parameters (thresholds, gates, scales) reset; the Adam
    moments of all of them zeroed so stale momentum does not undo the new directions.
    """
    dead = dead_mask.nonzero().flatten()
    if dead.numel() == 0:
        return dead
    targets = high_loss_inputs(sae, inputs, dead.numel(), generator) - sae.b_pre
    directions = targets / targets.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead_mask
    alive_norm = float(sae.W_enc[alive].norm(dim=-1).mean()) if bool(alive.any()) else 1.0
    sae.W_dec[dead] = directions
    sae.W_enc[dead] = directions * alive_norm * encoder_frac
    sae.b_enc[dead] = 0.0
    sae.reset_latents_(dead)
    _reset_adam_rows(sae, optimizer, dead)
    return dead


def _reset_adam_rows(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, latents: torch.Tensor) -> None:
    params = dict(sae.named_parameters())
    for name in sae.per_latent_parameters():
        state = optimizer.state.get(params[name], {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][latents] = 0.0
