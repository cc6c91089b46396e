"""JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"): z = h · H(h − θ) with a learnable θ = exp(log_θ).

The loss penalizes L0 directly: ‖x − x̂‖² + λ Σ_i H(h_i − θ_i). H has no useful derivative, so both the
activation and the step get straight-through pseudo-gradients w.r.t. θ through a rectangle kernel of
bandwidth ε, K(u) = 1[|u| < 1/2] (paper eqs. 11–12):
    ∂/∂θ JumpReLU_θ(h) = −(θ/ε) K((h − θ)/ε),      ∂/∂θ H(h − θ) = −(1/ε) K((h − θ)/ε).
The gradient w.r.t. h is H(h − θ) for the activation and 0 for the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from saekit.errors import require
from saekit.sae import active_set
from saekit.sae.active_set import rectangle as _rectangle  # K, shared with the active-set path
from saekit.sae.base import DeadLatentsArg, SAESpec, SparseAutoencoder
from saekit.sae.registry import LatentParam, VariantConfig, register


class JumpReLUFunction(torch.autograd.Function):
    """h · H(h − θ), pseudo-gradient −(θ/ε)K((h−θ)/ε) w.r.t. θ. h: (B, n), θ: (n,)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return h * (h > threshold)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_h = grad_out * (h > threshold)
        grad_threshold = (-(threshold / eps) * _rectangle((h - threshold) / eps) * grad_out).sum(dim=0)
        return grad_h, grad_threshold, None


class StepFunction(torch.autograd.Function):
    """H(h − θ), pseudo-gradient −(1/ε)K((h−θ)/ε) w.r.t. θ and none w.r.t. h."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return (h > threshold).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (-(1.0 / eps) * _rectangle((h - threshold) / eps) * grad_out).sum(dim=0)
        return torch.zeros_like(h), grad_threshold, None


def jumprelu(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return JumpReLUFunction.apply(h, threshold, bandwidth)


def step(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return StepFunction.apply(h, threshold, bandwidth)


@dataclass
class JumpReLUConfig(VariantConfig):
    bandwidth: float = 0.1
    """Width ε of the rectangle kernel of the straight-through pseudo-gradients (conf/activation/jumprelu.yaml)."""
    init_threshold: float = 0.1
    """Initial threshold θ (also what a resampled latent's threshold is reset to)."""
    threshold_lr_scale: float = 10.0
    """Learning-rate multiplier for log θ (Adam moves it by about lr per step)."""

    def check(self) -> None:
        super().check()
        require(self.bandwidth > 0, f"activation.bandwidth={self.bandwidth} must be positive")
        require(self.init_threshold > 0, f"activation.init_threshold={self.init_threshold} must be positive")
        require(self.threshold_lr_scale > 0, f"activation.threshold_lr_scale={self.threshold_lr_scale} must be positive")


@register
class JumpReLUSAE(SparseAutoencoder):
    name = "jumprelu"
    Config = JumpReLUConfig
    homogeneous = True  # up to the small initial threshold
    has_sparse_path = True

    def __init__(self, spec: SAESpec):
        super().__init__(spec)
        self.log_threshold = torch.nn.Parameter(torch.full((spec.n,), math.log(spec.variant.init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        return jumprelu(h, self.threshold, self.cfg.bandwidth)

    def sparsity_loss(self, z: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
        l0 = step(h, self.threshold, self.cfg.bandwidth).sum(dim=-1).mean()
        return {"sparsity": self.spec.lam * l0}

    def sparse_loss_terms(self, x: torch.Tensor, dead: DeadLatentsArg,
                          y: Optional[torch.Tensor] = None) -> Optional[dict[str, torch.Tensor]]:
        """Through the active entries and the band within ε/2 of θ (sae/active_set.py); None (the dense path)
        while codes are dense."""
        return active_set.jumprelu_terms(self, x, dead, y, self.cfg.bandwidth)

    def param_groups(self) -> list[dict]:
        """log θ moves by about lr per Adam step; `threshold_lr_scale` lets short runs reach useful thresholds."""
        others = [p for name, p in self.named_parameters() if name != "log_threshold"]
        return [{"params": others, "lr_scale": 1.0},
                {"params": [self.log_threshold], "lr_scale": self.cfg.threshold_lr_scale}]

    def latent_table(self) -> dict[str, LatentParam]:
        # A revived latent starts from the initial threshold: one kept from a latent that never fired is
        # typically far above every pre-activation, so the latent would stay dead.
        return {**super().latent_table(), "log_threshold": LatentParam(reset=math.log(self.cfg.init_threshold))}

    @torch.no_grad()
    def initialize(self, sample: torch.Tensor, b_pre: str, tied: bool, scale_encoder: bool,
                   generator: torch.Generator) -> None:
        self.log_threshold.fill_(math.log(self.cfg.init_threshold))
        super().initialize(sample, b_pre, tied, scale_encoder, generator)

