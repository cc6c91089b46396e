"""Dead latents (SPEC 3): counted over a window of training tokens, and revived by resampling.

AuxK, the other remedy, is a loss term and lives with the SAE geometry (sae/base.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from saekit.sae import SparseAutoencoder
from saekit.sae.sparse import DeadSet


class DeadLatents:
    """Tokens since each latent last fired (on the training device); dead once that reaches the window.

    A training step updates the counters without reading them back. The host keeps them as of the last
    `refresh` (a log step, where reading the device is allowed), sorted: counters grow by at most the tokens
    trained since, so the latents that *can* be dead now are the first few of that order, a count the host knows
    by itself. AuxK ranks only those (`dead_set`), and nothing at all while no latent is close to the window.
    """

    def __init__(self, tokens_since_fired: torch.Tensor, window: int, refresh_tokens: Optional[int] = None):
        self.tokens_since_fired = tokens_since_fired
        self.window = window
        self.refresh_tokens = refresh_tokens
        """Tokens a refresh covers when `dead_set` has to refresh by itself (None: 10 batches)."""
        self._since_refresh = 0
        self._covered = -1  # tokens past the last refresh that it covers; -1: refresh before the first use
        self._order: Optional[torch.Tensor] = None  # latents by counter at the refresh, largest first (device)
        self._ascending = np.zeros(0, dtype=np.int64)  # the same counters, ascending (host)

    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired.to(self.tokens_since_fired.device), 0)
        self._since_refresh += n_tokens

    def revive(self, latents: torch.Tensor) -> None:
        """Resampled latents start a fresh window (counters only go down: the host's bound stays valid)."""
        self.tokens_since_fired[latents] = 0

    def refresh(self, horizon_tokens: int) -> None:
        """Read the counters (a host sync); `dead_set` then needs no read for the next `horizon_tokens` tokens."""
        counters = self.tokens_since_fired.cpu()
        order = torch.argsort(counters, descending=True, stable=True)
        self._ascending = counters[order].numpy()[::-1].copy()
        # Only latents that can reach the window within the horizon are ever ranked: move just those.
        reachable = self._count_reaching(horizon_tokens)
        self._order = order[:reachable].to(self.tokens_since_fired.device) if reachable else None
        self._since_refresh, self._covered = 0, horizon_tokens

    def dead_set(self, n_tokens: int) -> Optional[DeadSet]:
        """What AuxK ranks in the step about to train `n_tokens` tokens: None when no latent can be dead.

        Without a refresh covering the step it refreshes itself (a sync; `fit` refreshes on its log steps, so
        its other steps never wait).
        """
        if self._since_refresh > self._covered:
            self.refresh(self.refresh_tokens or 10 * n_tokens)
        count = self._count_reaching(self._since_refresh)
        if count == 0:
            return None
        return DeadSet(self.mask, self._order[:count])

    def _count_reaching(self, tokens: int) -> int:
        """Latents whose counter at the refresh plus `tokens` reaches the window (host only)."""
        return len(self._ascending) - int(np.searchsorted(self._ascending, self.window - tokens, side="left"))

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
    the mean alive encoder-row norm; every other entry of the variant's per-latent table (bias, thresholds,
    gates, scales) back to its reset value; the Adam moments of all of them zeroed so stale momentum does not
    undo the new directions.
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
    sae.reset_latents_(dead)
    _reset_adam_rows(sae, optimizer, dead)
    return dead


def _reset_adam_rows(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, latents: torch.Tensor) -> None:
    """Zero the Adam moments of `latents` in every parameter of the SAE's per-latent table."""
    params = dict(sae.named_parameters())
    for name in sae.latent_table():
        if name not in params:  # a per-latent buffer: no optimizer state
            continue
        state = optimizer.state.get(params[name], {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][latents] = 0.0
