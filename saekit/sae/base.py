"""Geometry every SAE shares (SPEC sections 1 and 3).

Shapes: x (B, d) activations, h (B, n) pre-activations, z (B, n) latents. Weights are stored as
`W_enc` (n, d) and `W_dec` (n, d): row i of `W_dec` is latent i's unit-norm decoder direction (the SPEC's
column `W_dec[:, i]`), the layout SAELens uses too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SAESpec:
    """Everything needed to rebuild an SAE from its weights (saved with every checkpoint)."""

    activation: str
    d: int
    n: int
    k: int = 32
    lam: float = 0.0
    penalty: str = "l1"
    topk_on: str = "preact"
    normalize: str = "none"
    dead_method: str = "none"
    k_aux: Optional[int] = None
    aux_alpha: float = 1 / 32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SAESpec":
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    @property
    def effective_k_aux(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d // 2)


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld iterations for argmin_y sum_i ||x_i - y||, starting from the mean. points: (N, d) → (d,)."""
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(max_iter):
        distances = (points - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / distances
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if moved <= tol * max(1.0, float(median.norm())):
            break
    return median.float()


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] * W_dec[indices[b, j]] without a dense (B, n) matrix. values, indices: (B, k) → (B, d)."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


class SparseAutoencoder(nn.Module):
    """x̂ = W_dec^T σ(W_enc (x − b_pre) + b_enc) + b_pre; variants define σ and their sparsity loss."""

    name: ClassVar[str] = ""
    topk_family: ClassVar[bool] = False
    # σ(c·h) = c·σ(h) for c > 0: the encoder can then be rescaled at init to match reconstruction norms.
    homogeneous: ClassVar[bool] = False

    def __init__(self, spec: SAESpec):
        super().__init__()
        self.spec = spec
        d, n = spec.d, spec.n
        self.W_enc = nn.Parameter(torch.zeros(n, d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.zeros(n, d))
        self.b_pre = nn.Parameter(torch.zeros(d))
        # Input normalization (SPEC 3): x is multiplied by input_scale before the SAE sees it.
        self.register_buffer("input_scale", torch.ones(()))

    # ---- the variant's part -------------------------------------------------------------------
    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """Latents z from pre-activations h, (B, n) → (B, n)."""
        raise NotImplementedError

    def sparsity_loss(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named penalty terms added to the reconstruction loss (empty for TopK)."""
        return {}

    # ---- shared forward path ------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_pre) @ self.W_enc.T + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_pre

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    def loss_terms(self, x: torch.Tensor, dead_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Training loss and its named parts on a normalized batch x (B, d). `loss` is what is minimized."""
        h = self.pre_acts(x)
        z = self.activate(h)
        x_hat = self.decode(z)
        terms = {"mse": (x - x_hat).pow(2).sum(dim=-1).mean()}
        terms.update(self.sparsity_loss(z))
        if self.spec.dead_method == "auxk":
            terms["auxk"] = self.auxk_loss(x, x_hat, h, dead_mask)
        terms["loss"] = sum(terms.values())
        terms["l0"] = (z > 0).float().sum(dim=-1).mean().detach()
        terms["fired"] = (z > 0).any(dim=0).detach()
        return terms

    def auxk_loss(self, x: torch.Tensor, x_hat: torch.Tensor, h: torch.Tensor,
                  dead_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """α ||e − ê||² / ||e − mean(e)||², ê from the top-k_aux dead pre-activations (Gao et al. 2024, A.2).

        Exactly zero when no latent is dead.
        """
        if dead_mask is None or not bool(dead_mask.any()):
            return torch.zeros((), device=x.device)
        k_aux = min(self.spec.effective_k_aux, int(dead_mask.sum()))
        error = (x - x_hat).detach()
        values, indices = h.masked_fill(~dead_mask, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        error_hat = sparse_decode(F.relu(values), indices, self.W_dec)
        residual_var = (error - error.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
        return self.spec.aux_alpha * (error - error_hat).pow(2).sum(dim=-1).mean() / residual_var

    # ---- input normalization, applied around the SAE for raw activations -------------------------
    def normalize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple]]:
        """Raw activations → what the SAE trains on; returns the state needed to undo it."""
        if self.spec.normalize == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            std = x.std(dim=-1, keepdim=True, unbiased=False).clamp_min(1e-6)
            return (x - mean) / std, (mean, std)
        if self.spec.normalize == "scale":
            return x * self.input_scale, None
        return x, None

    def denormalize_output(self, x_hat: torch.Tensor, state: Optional[tuple]) -> torch.Tensor:
        if self.spec.normalize == "layer_norm":
            mean, std = state
            return x_hat * std + mean
        if self.spec.normalize == "scale":
            return x_hat / self.input_scale
        return x_hat

    def reconstruct(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction in the model's own activation space (what is spliced back), and the latents."""
        x, state = self.normalize_input(x_raw)
        x_hat, z = self(x)
        return self.denormalize_output(x_hat, state), z

    # ---- geometry kept by the trainer (SPEC 3) ------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove each decoder row's gradient component along the row, so Adam does not fight renormalization."""
        if self.W_dec.grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        parallel = (self.W_dec.grad * unit).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * unit)

    @torch.no_grad()
    def initialize(self, sample: torch.Tensor, b_pre: str, tied: bool, scale_encoder: bool,
                   generator: torch.Generator) -> None:
        """SPEC 3 init on a normalized sample (N, d): b_pre, unit decoder rows, encoder = decoder^T, TopK scale."""
        d, n = self.spec.d, self.spec.n
        if b_pre == "geometric_median":
            self.b_pre.copy_(geometric_median(sample))
        else:
            self.b_pre.zero_()
        self.W_dec.copy_(torch.randn(n, d, generator=generator))
        self.normalize_decoder_()
        if tied:
            self.W_enc.copy_(self.W_dec)
        else:
            bound = 1 / math.sqrt(d)
            self.W_enc.copy_(torch.rand(n, d, generator=generator) * 2 * bound - bound)
        self.b_enc.zero_()
        if scale_encoder and self.homogeneous:
            self._match_reconstruction_norms(sample)

    @torch.no_grad()
    def _match_reconstruction_norms(self, sample: torch.Tensor) -> None:
        """Scale W_enc so that E||x̂ − b_pre|| = E||x − b_pre|| on the sample (exact for homogeneous σ, b_enc = 0).

        Without it a tied ReLU SAE starts with reconstructions about n/(2d) times too large (32x at n = 4096,
        d = 64), which short runs never recover from.
        """
        centered = sample - self.b_pre
        recon = self.decode(self.encode(sample)) - self.b_pre
        recon_norm = recon.norm(dim=-1).mean()
        if recon_norm > 0:
            self.W_enc.mul_(centered.norm(dim=-1).mean() / recon_norm)
