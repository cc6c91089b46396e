"""Test-time activation swap (SPEC 2): run a trained SAE with TopK(k') or JumpReLU(θ) in place of its own σ.

Every weight is shared with the wrapped SAE (nothing is copied or changed); only the activation differs. The
per-latent scores come from the SAE's `swap_preacts` (the pre-activations for most variants; see ProLU and
Gated). Progressive-code evaluation sweeps k' or θ with this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from saekit.errors import ConfigError
from saekit.sae.base import SparseAutoencoder
from saekit.sae.topk import topk_activation

TEST_ACTIVATIONS = ("topk", "jumprelu")


class SwappedActivation(nn.Module):
    """`sae` with σ replaced by TopK(value) (`kind="topk"`) or JumpReLU with one threshold θ = value."""

    def __init__(self, sae: SparseAutoencoder, kind: str, value: float):
        super().__init__()
        if kind not in TEST_ACTIVATIONS:
            raise ConfigError(f"test-time activation {kind!r} is not supported; use one of: {', '.join(TEST_ACTIVATIONS)}")
        if kind == "topk" and not (1 <= int(value) <= sae.spec.n and int(value) == value):
            raise ConfigError(f"k_prime={value} must be an integer in 1..n (n={sae.spec.n})")
        if kind == "jumprelu" and value < 0:
            raise ConfigError(f"theta={value} must be >= 0")
        self.sae, self.kind, self.value = sae, kind, value

    @property
    def spec(self):
        return self.sae.spec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.sae.swap_preacts(x)
        if self.kind == "topk":
            z = topk_activation(scores, int(self.value), "preact")
        else:
            z = F.relu(scores) * (scores > self.value)
        return self.sae.scale_latents(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.sae.decode(z, x), z

    def reconstruct(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, state = self.sae.normalize_input(x_raw)
        x_hat, z = self(x)
        return self.sae.denormalize_output(x_hat, state), z


def swap_activation(sae: SparseAutoencoder, kind: str, value: float) -> SwappedActivation:
    return SwappedActivation(sae, kind, value)
