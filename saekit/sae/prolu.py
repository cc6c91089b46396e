"""ProLU (Taggart 2024): the bias gates a latent but does not shift its value.

z = m · 1[m > 0 ∧ m + b > 0] with m = W_enc (x − b_pre), so an active latent reports m itself ("scale
consistent"). The bias then gets no gradient, so one is synthesized (SPEC 2), with the gate held fixed for m:
    ∂z/∂m = 1[gate]                         (both modes)
    ∂z/∂b = 1[gate]        grad_mode=relu   (as if the unit were ReLU(m + b))
    ∂z/∂b = m · 1[gate]    grad_mode=ste    (z = m·H(m+b) with H's derivative estimated as 1 where it is open)
Loss as `relu`: MSE + λ·penalty (`l1` or `sqrt_l1`).
"""

from __future__ import annotations

import torch

from dataclasses import dataclass
from typing import Optional

from saekit.errors import check_choice
from saekit.sae import active_set
from saekit.sae.base import DeadLatentsArg, SparseAutoencoder
from saekit.sae.registry import register
from saekit.sae.relu import PenaltyConfig, penalty

GRAD_MODES = ("relu", "ste")


class ProLUFunction(torch.autograd.Function):
    """m (B, n), b (n,) → m · 1[m > 0 ∧ m + b > 0] with the synthetic gradients above."""

    @staticmethod
    def forward(ctx, m: torch.Tensor, b: torch.Tensor, ste: bool) -> torch.Tensor:
        gate = (m > 0) & (m + b > 0)
        ctx.save_for_backward(m, gate)
        ctx.ste = ste
        return m * gate

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        m, gate = ctx.saved_tensors
        gated = grad_out * gate
        grad_b = (gated * m if ctx.ste else gated).sum(dim=0)
        return gated, grad_b, None


def prolu(m: torch.Tensor, b: torch.Tensor, grad_mode: str = "relu") -> torch.Tensor:
    return ProLUFunction.apply(m, b, grad_mode == "ste")


@dataclass
class ProLUConfig(PenaltyConfig):
    grad_mode: str = "relu"
    """Synthetic bias gradient: `relu` (as if ReLU(m + b)) or `ste` (straight-through step derivative)."""

    def check(self) -> None:
        super().check()
        check_choice("activation.grad_mode", self.grad_mode, GRAD_MODES)


@register
class ProLUSAE(SparseAutoencoder):
    name = "prolu"
    Config = ProLUConfig
    homogeneous = True
    has_sparse_path = True

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """m = W_enc (x − b_pre): the bias is applied inside the activation as a gate."""
        return (x - self.b_pre) @ self.W_enc.T

    def activate(self, m: torch.Tensor) -> torch.Tensor:
        return prolu(m, self.b_enc, self.cfg.grad_mode)

    def sparsity_loss(self, z: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sparsity": self.spec.lam * penalty(z, self.W_dec, self.cfg.penalty)}

    def sparse_loss_terms(self, x: torch.Tensor, dead: DeadLatentsArg,
                          y: Optional[torch.Tensor] = None) -> Optional[dict[str, torch.Tensor]]:
        """Through the gate's support m > max(0, −b) (sae/active_set.py); None (the dense path) while it is dense."""
        return active_set.prolu_terms(self, x, dead, y, self.cfg.penalty, self.cfg.grad_mode)

    def swap_preacts(self, x: torch.Tensor) -> torch.Tensor:
        """m where the bias gate is open, 0 elsewhere: the values this latent can report."""
        m = self.pre_acts(x)
        return m * (m + self.b_enc > 0)
