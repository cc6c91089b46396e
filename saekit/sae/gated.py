"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

Which latents fire and how strongly are separate paths sharing directions:
    π_gate = W_gate (x − b_pre) + b_gate,   π_mag = W_mag (x − b_pre) + b_mag,   W_mag = exp(r_mag) ⊙ W_gate
    z = 1[π_gate > 0] ⊙ ReLU(π_mag)
W_gate is stored as `W_enc` and b_gate as `b_enc`, so the shared geometry (tied init, resampling) applies.
Loss: ‖x − x̂‖² + λ Σ_i ReLU(π_gate)_i ‖d_i‖ + ‖x − x̂_frozen(ReLU(π_gate))‖², the last term decoding the gate
path with a frozen (detached) decoder so it trains only the gate: the L1 penalty would otherwise push the
gate to zero without any reconstruction pressure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataclasses import dataclass
from typing import Optional

from saekit.errors import ConfigError
from saekit.sae import active_set
from saekit.sae.base import DeadLatentsArg, Encoding, SAESpec, SparseAutoencoder, reconstruction_loss
from saekit.sae.registry import LatentParam, register
from saekit.sae.relu import PenaltyConfig, l1_penalty


@dataclass
class GatedConfig(PenaltyConfig):
    """The gate's penalty is the decoder-norm-weighted L1 of the paper; `penalty` admits only `l1`."""

    def check(self) -> None:
        super().check()
        if self.penalty != "l1":
            raise ConfigError(f"activation.penalty={self.penalty} is not supported by gated (its gate penalty is the "
                              f"paper's L1); use activation.penalty=l1")


@register
class GatedSAE(SparseAutoencoder):
    name = "gated"
    Config = GatedConfig
    homogeneous = True  # with zero biases both paths scale with W_gate
    has_sparse_path = True

    def __init__(self, spec: SAESpec):
        super().__init__(spec)
        self.r_mag = torch.nn.Parameter(torch.zeros(spec.n))
        self.b_mag = torch.nn.Parameter(torch.zeros(spec.n))

    @property
    def W_mag(self) -> torch.Tensor:
        return self.r_mag.exp()[:, None] * self.W_enc

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(π_gate, π_mag); π_gate is also `pre_acts`, what AuxK ranks dead latents by."""
        return self.pre_acts(x), (x - self.b_pre) @ self.W_mag.T + self.b_mag

    def _latents(self, pi_gate: torch.Tensor, pi_mag: torch.Tensor) -> torch.Tensor:
        return self.scale_latents((pi_gate > 0) * F.relu(pi_mag))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._latents(*self._paths(x))

    def encode_for_training(self, x: torch.Tensor) -> Encoding:
        pi_gate, pi_mag = self._paths(x)
        z = self._latents(pi_gate, pi_mag)
        gate_acts = F.relu(pi_gate)
        return Encoding(z=z, h=pi_gate, penalties={"sparsity": self.spec.lam * l1_penalty(gate_acts, self.W_dec)},
                        parts={"gate_acts": gate_acts})

    def extra_terms(self, x: torch.Tensor, encoding: Encoding, y: torch.Tensor) -> dict[str, torch.Tensor]:
        # The whole decoder is frozen here: for a transcoder that includes b_out and the skip path.
        frozen = encoding.parts["gate_acts"] @ self.W_dec.detach() + self.decoder_offset(x).detach()
        return {"gate_aux": reconstruction_loss(y, frozen)}

    def sparse_loss_terms(self, x: torch.Tensor, dead: DeadLatentsArg,
                          y: Optional[torch.Tensor] = None) -> Optional[dict[str, torch.Tensor]]:
        """Through the gate's support π_gate > 0 (sae/active_set.py); None (the dense path) while it is dense."""
        return active_set.gated_terms(self, x, dead, y)

    def swap_preacts(self, x: torch.Tensor) -> torch.Tensor:
        """π_mag: the magnitude each latent would report, whatever its gate says."""
        return self._paths(x)[1]

    def latent_table(self) -> dict[str, LatentParam]:
        return {**super().latent_table(), "r_mag": LatentParam(reset=0.0), "b_mag": LatentParam(reset=0.0)}

    @torch.no_grad()
    def initialize(self, sample: torch.Tensor, b_pre: str, tied: bool, scale_encoder: bool,
                   generator: torch.Generator) -> None:
        self.r_mag.zero_()
        self.b_mag.zero_()
        super().initialize(sample, b_pre, tied, scale_encoder, generator)
