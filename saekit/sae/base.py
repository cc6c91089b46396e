"""Geometry every SAE shares (SPEC sections 1 and 3).

Shapes: x (B, d) activations, h (B, n) pre-activations, z (B, n) latents. Weights are stored as
`W_enc` (n, d) and `W_dec` (n, d): row i of `W_dec` is latent i's unit-norm decoder direction (the SPEC's
column `W_dec[:, i]`), the layout SAELens uses too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from saekit.sae.registry import LatentParam, VariantConfig, variant_config
from saekit.sae.sparse import ChosenCodes, DeadSet, SparseCode, chunk_rows, decode_code, preact_values

LN_STYLES = ("saekit", "openai")
OPENAI_LN_EPS = 1e-5
"""OpenAI's LN (and SAELens's layer_norm) add this to the sample std of x − mean."""

DeadLatentsArg = Optional["torch.Tensor | DeadSet"]
"""What loss_terms takes for the dead latents: None, a (n,) bool mask, or a DeadSet (mask plus candidates)."""


@dataclass
class SAESpec:
    """Everything needed to rebuild an SAE from its weights (saved with every checkpoint).

    Run-level settings are fields; the variant's own settings are `variant`, the dataclass its file defines
    (sae/registry.py). Checkpoints store both as one flat dict, as saekit 0.1 did, so old ones still load.
    """

    activation: str
    d: int
    n: int
    k: int = 32
    lam: float = 0.0
    normalize: str = "none"
    dead_method: str = "none"
    k_aux: Optional[int] = None
    aux_alpha: float = 1 / 32
    d_out: Optional[int] = None
    """Transcoders: width of the predicted activation (None: an SAE, which reconstructs its input)."""
    skip: bool = False
    """Transcoders: a linear skip path W_skip (d_out × d)."""
    ln_style: str = "saekit"
    """normalize='layer_norm' only: `saekit` divides x − mean by the population std (clamped at 1e-6); `openai`
    divides by the sample std + 1e-5 and multiplies the output back by the sample std, as OpenAI's GPT-2 SAEs and
    SAELens's `layer_norm` do (set when such a file is imported, so it keeps its own inference)."""
    variant: Optional[VariantConfig] = None
    """The variant's settings (None: its defaults)."""

    def __post_init__(self) -> None:
        if self.ln_style not in LN_STYLES:
            raise ValueError(f"SAESpec: ln_style={self.ln_style!r} is not one of {', '.join(LN_STYLES)}")
        if self.variant is None:
            self.variant = variant_config(self.activation)
        elif not isinstance(self.variant, VariantConfig):
            self.variant = variant_config(self.activation, dict(self.variant))
        if self.variant.name != self.activation:
            raise ValueError(f"SAESpec: variant settings of {self.variant.name!r} given for {self.activation!r}")

    @classmethod
    def run_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "variant")

    @classmethod
    def build(cls, activation: str, d: int, n: int, **settings) -> "SAESpec":
        """A spec from flat keyword settings, each sorted into a run-level field or the variant's config
        (`SAESpec.build("jumprelu", d=64, n=512, lam=0.1, bandwidth=0.05)`); unknown names are errors."""
        run = {key: settings.pop(key) for key in list(settings) if key in cls.run_fields()}
        return cls(activation=activation, d=d, n=n, variant=variant_config(activation, settings), **run)

    def to_dict(self) -> dict:
        run = {name: getattr(self, name) for name in self.run_fields()}
        knobs = {key: value for key, value in self.variant.knobs().items() if key != "name"}
        return {**run, **knobs}

    @classmethod
    def from_dict(cls, data: dict) -> "SAESpec":
        run = {key: data[key] for key in cls.run_fields() if key in data}
        knobs = {key: value for key, value in data.items() if key not in run}
        return cls(variant=variant_config(data["activation"], knobs, strict=False), **run)

    @property
    def d_output(self) -> int:
        """Width of what the decoder produces: d_out for a transcoder, d for an SAE."""
        return self.d_out if self.d_out is not None else self.d

    @property
    def effective_k_aux(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d // 2)


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6,
                     chunk: Optional[int] = None) -> torch.Tensor:
    """Weiszfeld iterations for argmin_y sum_i ||x_i - y||, starting from the mean. points: (N, d) → (d,).

    Runs where `points` lives, over row chunks (`chunk` rows, default 16 MB of float32 each), so the memory
    beyond the points stays bounded whatever N. Each step y ← y + Σ w_i (x_i − y) / Σ w_i (w_i = 1/||x_i − y||)
    works in the points' float32 on the offsets from y and sums in float64: the offsets shrink as y converges,
    so their rounding does too, and y itself is kept in float64.
    """
    chunk = chunk or max(1, 2**22 // max(1, points.shape[1]))
    pieces = points.float().split(chunk)
    median = sum(piece.sum(dim=0, dtype=torch.float64) for piece in pieces) / points.shape[0]
    for _ in range(max_iter):
        center = median.float()
        step = torch.zeros_like(median)
        total_weight = torch.zeros((), dtype=torch.float64, device=points.device)
        for piece in pieces:
            offsets = piece - center
            weights = 1.0 / offsets.norm(dim=1).clamp_min(1e-12)
            step += (weights @ offsets).double()
            total_weight += weights.sum(dtype=torch.float64)
        updated = center.double() + step / total_weight
        moved = (updated - median).norm()
        median = updated
        if moved <= tol * max(1.0, float(median.norm())):
            break
    return median.float()


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] * W_dec[indices[b, j]] without a dense (B, n) matrix. values, indices: (B, k) → (B, d)."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


class _EncoderPreacts(torch.autograd.Function):
    """h = (x − b_pre) W_encᵀ + b_enc, with b_pre's gradient −(Σ_b ∂h_b) W_enc: a (n,)·(n, d) product instead of
    autograd's (B, n)·(n, d) one, which is one of the five B×n×d matmuls of a dense training step."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, b_pre, W_enc, b_enc):
        centered = x - b_pre
        ctx.save_for_backward(centered, W_enc)
        return torch.addmm(b_enc, centered, W_enc.T)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")  # backward under the forward's autocast state (bf16 training)
    def backward(ctx, grad_h):
        centered, W_enc = ctx.saved_tensors
        grad_x = grad_b_pre = grad_W = grad_b = None
        grad_sum = grad_h.sum(dim=0)
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ W_enc
        if ctx.needs_input_grad[1]:
            grad_b_pre = -(grad_sum @ W_enc)
        if ctx.needs_input_grad[2]:
            grad_W = grad_h.T @ centered
        if ctx.needs_input_grad[3]:
            grad_b = grad_sum
        return grad_x, grad_b_pre, grad_W, grad_b


def encoder_preacts(x: torch.Tensor, b_pre: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """(B, d) → (B, n) pre-activations; see `_EncoderPreacts` for the cheaper b_pre gradient."""
    if not torch.is_grad_enabled():
        return torch.addmm(b_enc, x - b_pre, W_enc.T)
    return _EncoderPreacts.apply(x, b_pre, W_enc, b_enc)


@dataclass
class Encoding:
    """What a training forward pass produces before decoding.

    z: (B, n) latents; h: (B, n) the pre-activations AuxK ranks dead latents by; penalties: named, weighted
    loss terms that depend only on the encoding; parts: intermediate tensors a variant's `extra_terms` reuses.
    """

    z: torch.Tensor
    h: torch.Tensor
    penalties: dict[str, torch.Tensor]
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class BatchReducer(Protocol):
    """Batch-wide statistics over data-parallel ranks (saekit.distributed.World implements it)."""

    def mean_(self, value: torch.Tensor) -> torch.Tensor: ...

    def min_(self, value: torch.Tensor) -> torch.Tensor: ...


class SparseAutoencoder(nn.Module):
    """x̂ = W_dec^T σ(W_enc (x − b_pre) + b_enc) + b_pre; variants define σ and their sparsity loss.

    A variant overrides `activate` (and `sparsity_loss`) when σ is a function of h alone; variants whose
    encoder is shaped differently (ProLU, Gated) override `pre_acts`, `encode_for_training` or `extra_terms`.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = VariantConfig
    topk_family: ClassVar[bool] = False
    # The variant implements `choose_codes` (sae/sparse.py) or overrides `sparse_loss_terms` (sae/active_set.py),
    # so training can take the sparse path.
    has_sparse_path: ClassVar[bool] = False
    # σ(c·h) = c·σ(h) for c > 0: the encoder can then be rescaled at init to match reconstruction norms.
    homogeneous: ClassVar[bool] = False

    def __init__(self, spec: SAESpec):
        super().__init__()
        self.spec = spec
        d, n = spec.d, spec.n
        self.reducer: Optional["BatchReducer"] = None
        """Data-parallel training's ranks (saekit.distributed.World): batch-wide statistics are reduced over them;
        None: this process's batch is the whole batch."""
        self.W_enc = nn.Parameter(torch.zeros(n, d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.zeros(n, spec.d_output))
        self.b_pre = nn.Parameter(torch.zeros(d))
        if spec.variant.learned_scale:
            self.latent_scale = nn.Parameter(torch.ones(n))
        # Input normalization (SPEC 3): x is multiplied by input_scale before the SAE sees it.
        self.register_buffer("input_scale", torch.ones(()))
        if self.transcoder:
            self._add_output_side(spec)
        # Train through the sparse path when the variant has one; False runs the dense reference.
        self.sparse_training = True

    @property
    def cfg(self) -> VariantConfig:
        """The variant's own settings (its Config dataclass)."""
        return self.spec.variant

    @property
    def transcoder(self) -> bool:
        """Predicts another activation y (d_out wide) from its input x, instead of reconstructing x."""
        return self.spec.d_out is not None

    def _add_output_side(self, spec: SAESpec) -> None:
        """A transcoder's output-side tensors (SPEC 2, Transcoders): b_out (d_out,) replaces b_pre in the decoder
        (b_pre stays on the input side), W_skip (d_out, d) is the optional linear skip path, and output_scale
        the target's normalization (undone before splicing, as input_scale is for an SAE)."""
        if spec.normalize == "layer_norm":
            # Undoing a per-token layer norm needs the output's own mean and std, unknown at inference.
            raise ValueError("a transcoder cannot undo normalize='layer_norm' on its output; use 'scale' or 'none'")
        self.b_out = nn.Parameter(torch.zeros(spec.d_out))
        if spec.skip:
            self.W_skip = nn.Parameter(torch.zeros(spec.d_out, spec.d))
        self.register_buffer("output_scale", torch.ones(()))

    # ---- the variant's part -------------------------------------------------------------------
    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """Latents from pre-activations h, (B, n) → (B, n), before the optional learned scale."""
        raise NotImplementedError

    def sparsity_loss(self, z: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named penalty terms added to the reconstruction loss (empty for the TopK family)."""
        return {}

    def extra_terms(self, x: torch.Tensor, encoding: Encoding, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms that need the input x (B, d) and the target y (B, d_output) as well (Multi-TopK's L(4k),
        Gated's auxiliary term); y is x itself for an SAE. Decode with `self.decode(z, x)`."""
        return {}

    def latent_table(self) -> dict[str, LatentParam]:
        """Every parameter or buffer whose first axis indexes latents, with what a revived latent gets.

        Resampling and the Adam-moment reset act on exactly these; a variant adding a per-latent tensor adds
        its entry here (tests/test_conformance.py fails any n-sized tensor missing from the table).
        """
        table = {"W_enc": LatentParam(reset=None), "b_enc": LatentParam(reset=0.0), "W_dec": LatentParam(reset=None)}
        if self.cfg.learned_scale:
            table["latent_scale"] = LatentParam(reset=1.0)
        return table

    @torch.no_grad()
    def reset_latents_(self, latents: torch.Tensor) -> None:
        """Every table entry with a reset value back to it for `latents` (the directions are the resampler's)."""
        tensors = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        for name, entry in self.latent_table().items():
            if entry.reset is not None:
                tensors[name][latents] = entry.reset

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; `lr_scale` multiplies the schedule's learning rate for a group."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def swap_preacts(self, x: torch.Tensor) -> torch.Tensor:
        """The per-latent scores a test-time TopK(k') or JumpReLU(θ) acts on (sae/swap.py)."""
        return self.pre_acts(x)

    # ---- shared forward path ------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return encoder_preacts(x, self.b_pre, self.W_enc, self.b_enc)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_scale if self.cfg.learned_scale else z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_latents(self.activate(self.pre_acts(x)))

    def encode_for_training(self, x: torch.Tensor) -> Encoding:
        h = self.pre_acts(x)
        z = self.scale_latents(self.activate(h))
        return Encoding(z=z, h=h, penalties=self.sparsity_loss(z, h))

    def decode(self, z: torch.Tensor, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, n) latents → (B, d_output): z W_dec + `decoder_offset(x)` (x, the input, only a skip path reads)."""
        return z @ self.W_dec + self.decoder_offset(x)

    def decoder_offset(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the decoder adds to z W_dec: b_pre (d,) for an SAE; b_out (d_out,) for a transcoder, plus
        x W_skipᵀ (B, d_out) with a skip path (x: the normalized input (B, d))."""
        if not self.transcoder:
            return self.b_pre
        if not self.spec.skip:
            return self.b_out
        if x is None:
            raise ValueError("a skip transcoder's output depends on its input: call decode(z, x)")
        return torch.addmm(self.b_out, x, self.W_skip.T)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z, x), z

    def choose_codes(self, x_centered: torch.Tensor, dead: Optional[DeadSet]) -> ChosenCodes:
        """The sparse path's selection for a batch (variants with `has_sparse_path`); nothing here needs grad."""
        raise NotImplementedError

    def training_warnings(self) -> list[str]:
        """Problems noticed by training steps since the last call; called on log steps, where reading the
        device is allowed (steps themselves never wait on it)."""
        return []

    def loss_terms(self, x: torch.Tensor, dead: DeadLatentsArg = None,
                   y: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Training loss and its named parts on a normalized batch x (B, d). `loss` is what is minimized.

        y (B, d_out): a transcoder's normalized target, which every reconstruction term (and AuxK's error)
        is measured against; None for an SAE, whose target is x itself.

        In training mode a variant with a sparse path takes it (same loss and gradients, O(k·d) per token
        beyond the encoder matmul); `sparse_training = False` forces this dense reference. Nothing here reads
        a device value back to the host, so a step never waits on the accelerator (except the active-set
        variants' sparse path, sae/active_set.py, whose codes have a data-dependent size). A `sparse_loss_terms`
        that returns None (codes too dense for it to pay) hands the batch to this dense path.
        """
        target = self._target(x, y)
        if self.training and self.sparse_training and self.has_sparse_path:
            # y only for a transcoder: an SAE's sparse path keeps its two-argument form.
            terms = self.sparse_loss_terms(x, dead) if y is None else self.sparse_loss_terms(x, dead, y)
            if terms is not None:
                return terms
        encoding = self.encode_for_training(x)
        x_hat = self.decode(encoding.z, x)
        terms = {"mse": reconstruction_loss(target, x_hat)}
        terms.update(encoding.penalties)
        terms.update(self.extra_terms(x, encoding, target))
        if self.spec.dead_method == "auxk":
            terms["auxk"] = self.auxk_loss(target, x_hat, encoding.h, dead)
        terms["loss"] = sum(terms.values())
        active = (encoding.z != 0).detach()
        terms["l0"] = active.float().sum(dim=-1).mean()
        terms["fired"] = active.any(dim=0)
        return terms

    def _target(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """What the loss compares the output with: y for a transcoder (required), x for an SAE."""
        if self.transcoder and y is None:
            raise ValueError("a transcoder's loss needs its target: loss_terms(x, dead, y)")
        if not self.transcoder and y is not None:
            raise ValueError("an SAE reconstructs its input: call loss_terms(x, dead) without y")
        return x if y is None else y

    def sparse_loss_terms(self, x: torch.Tensor, dead: DeadLatentsArg,
                          y: Optional[torch.Tensor] = None) -> Optional[dict[str, torch.Tensor]]:
        """`loss_terms` through the sparse path: the variant chooses entries, only those carry gradient.
        y: a transcoder's target (None: x), as in `loss_terms`."""
        target = self._target(x, y)
        offset = self.decoder_offset(x)
        x_centered = x - self.b_pre
        dead = DeadSet.of(dead) if self.spec.dead_method == "auxk" else None
        chosen = self.choose_codes(x_centered.detach(), dead)

        def reconstruct(code: SparseCode) -> tuple[SparseCode, torch.Tensor, torch.Tensor]:
            code = preact_values(code, x_centered, self.W_enc, self.b_enc)
            activations = F.relu(code.values)
            if self.cfg.learned_scale:
                activations = activations * self.latent_scale[code.latents]
            return code, activations, decode_code(code, activations, self.W_dec) + offset

        main, activations, x_hat = reconstruct(chosen.main)
        terms = {"mse": reconstruction_loss(target, x_hat)}
        for name, (code, weight) in chosen.extra.items():
            terms[name] = weight * reconstruction_loss(target, reconstruct(code)[2])
        if self.spec.dead_method == "auxk":
            terms["auxk"] = torch.zeros((), device=x.device)
            if chosen.aux is not None:
                aux = preact_values(chosen.aux, x_centered, self.W_enc, self.b_enc)
                error_hat = decode_code(aux, F.relu(aux.values), self.W_dec)
                terms["auxk"] = dead.gate(self._auxk_from((target - x_hat).detach(), error_hat))
        terms["loss"] = sum(terms.values())
        active = activations.detach() != 0
        terms["l0"] = active.float().sum() / x.shape[0]
        # Counted with index_add: a boolean-mask index would read the number of active entries back to the host.
        fired = torch.zeros(self.spec.n, dtype=torch.int32, device=x.device)
        terms["fired"] = fired.index_add_(0, main.latents, active.int()) > 0
        return terms

    def auxk_loss(self, x: torch.Tensor, x_hat: torch.Tensor, h: torch.Tensor, dead: DeadLatentsArg) -> torch.Tensor:
        """α ||e − ê||² / ||e − mean(e)||², ê from the top-k_aux dead pre-activations (Gao et al. 2024, A.2).

        x is the target (a transcoder's y), so e = x − x̂ is the error of what the SAE outputs.

        Exactly zero when no latent is dead. Ranked among the dead set's candidates, with those not dead scored
        −inf, so k_aux is fixed on the host (≤ the number of candidates) and no device value is read.
        """
        dead = DeadSet.of(dead)
        if dead is None:
            return torch.zeros((), device=x.device)
        k_aux = min(self.spec.effective_k_aux, dead.candidates.numel())
        values, where = dead.scores(h).topk(k_aux, dim=-1, sorted=False)
        error_hat = sparse_decode(F.relu(values), dead.candidates[where], self.W_dec)
        return dead.gate(self._auxk_from((x - x_hat).detach(), error_hat))

    def _auxk_from(self, error: torch.Tensor, error_hat: torch.Tensor) -> torch.Tensor:
        # Under data parallelism the variance is the global batch's, not this rank's share's.
        return auxk_from(error, error_hat, self.spec.aux_alpha, self.reducer.mean_ if self.reducer else None)

    # ---- input normalization, applied around the SAE for raw activations -------------------------
    def normalize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple]]:
        """Raw activations → what the SAE trains on; returns the state needed to undo it."""
        if self.spec.normalize == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            if self.spec.ln_style == "openai":
                std = (x - mean).std(dim=-1, keepdim=True)
                return (x - mean) / (std + OPENAI_LN_EPS), (mean, std)
            std = x.std(dim=-1, keepdim=True, unbiased=False).clamp_min(1e-6)
            return (x - mean) / std, (mean, std)
        if self.spec.normalize == "scale":
            return x * self.input_scale, None
        return x, None

    def normalize_target(self, y: torch.Tensor) -> torch.Tensor:
        """A transcoder's raw target (B, d_out) → what its loss compares with (`denormalize_output` undoes it)."""
        return y * self.output_scale if self.spec.normalize == "scale" else y

    def denormalize_output(self, x_hat: torch.Tensor, state: Optional[tuple]) -> torch.Tensor:
        """The SAE's output (B, d_output) back in the model's activation space (a transcoder's: y's space)."""
        if self.transcoder:
            return x_hat / self.output_scale if self.spec.normalize == "scale" else x_hat
        if self.spec.normalize == "layer_norm":
            mean, std = state
            return x_hat * std + mean
        if self.spec.normalize == "scale":
            return x_hat / self.input_scale
        return x_hat

    def reconstruct(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction in the model's own activation space (what is spliced back; a transcoder's prediction
        of y from x_raw (B, d)), and the latents."""
        x, state = self.normalize_input(x_raw)
        x_hat, z = self(x)
        return self.denormalize_output(x_hat, state), z

    # ---- geometry kept by the trainer (SPEC 3) ------------------------------------------------------
    def normalize_decoder_(self) -> None:
        normalize_rows_(self.W_dec)

    def project_decoder_grad_(self) -> None:
        project_row_grads_(self.W_dec)

    @torch.no_grad()
    def initialize(self, sample: torch.Tensor, b_pre: str, tied: bool, scale_encoder: bool,
                   generator: torch.Generator) -> None:
        """SPEC 3 init on a normalized sample (N, d): b_pre, unit decoder rows, encoder = decoder^T, encoder scale."""
        d, n = self.spec.d, self.spec.n
        if b_pre == "geometric_median":
            self.b_pre.copy_(geometric_median(sample))
        else:
            self.b_pre.zero_()
        self.W_dec.copy_(torch.randn(n, self.spec.d_output, generator=generator))
        self.normalize_decoder_()
        if tied and self.transcoder:
            # A transcoder's decoder rows are directions of the output space: tying would read x along them,
            # so its encoder rows are random unit directions of the input space instead.
            rows = torch.randn(n, d, generator=generator)
            self.W_enc.copy_(rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-8))
        elif tied:
            self.W_enc.copy_(self.W_dec)
        else:
            bound = 1 / math.sqrt(d)
            self.W_enc.copy_(torch.rand(n, d, generator=generator) * 2 * bound - bound)
        self.b_enc.zero_()
        # A transcoder's encoder scale is matched to its targets, in `initialize_output`.
        if scale_encoder and self.homogeneous and not self.transcoder:
            self._match_reconstruction_norms(sample)

    @torch.no_grad()
    def initialize_output(self, sample: torch.Tensor, target: torch.Tensor, b_out: str, scale_encoder: bool) -> None:
        """A transcoder's output side, after `initialize`, from normalized inputs (N, d) and targets (N, d_out):
        b_out as b_pre is set on the inputs (`b_out`: geometric_median or zero), W_skip = 0 (the skip path starts
        silent), and the encoder scaled so that E||ŷ − b_out|| = E||y − b_out|| on the sample."""
        self.b_out.copy_(geometric_median(target) if b_out == "geometric_median" else torch.zeros_like(self.b_out))
        if self.spec.skip:
            self.W_skip.zero_()
        if scale_encoder and self.homogeneous:
            self._match_reconstruction_norms(sample, target)

    @torch.no_grad()
    def _match_reconstruction_norms(self, sample: torch.Tensor, target: Optional[torch.Tensor] = None) -> None:
        """Scale W_enc so that E||x̂ − b_pre|| = E||x − b_pre|| on the sample (exact for homogeneous σ and
        b_enc = 0); for a transcoder E||ŷ − b_out|| = E||y − b_out|| on its targets (W_skip is still 0).

        Without it a tied ReLU SAE starts with reconstructions about n/(2d) times too large (32x at n = 4096,
        d = 64), which short runs never recover from.
        """
        goal, center = (sample, self.b_pre) if target is None else (target, self.b_out)
        centered = sum((piece - center).norm(dim=-1).double().sum() for piece in goal.split(2**16))
        recon_norm = self._reconstruction_norms(sample).double().sum()
        if recon_norm > 0:
            self.W_enc.mul_((centered / recon_norm).float())

    @torch.no_grad()
    def _reconstruction_norms(self, sample: torch.Tensor) -> torch.Tensor:
        """(N,) ||x̂ − decoder_offset|| (b_pre for an SAE) of the sample's reconstructions, in row chunks
        (bounded memory at any N and n)."""
        rows = chunk_rows(self.spec.n, sample.device)
        return torch.cat([(self.decode(self.encode(piece), piece) - self.decoder_offset(piece)).norm(dim=-1)
                          for piece in sample.split(rows)])

    def _code_norms(self, code: SparseCode) -> torch.Tensor:
        """||x̂ − b_pre|| per row of a sparse code (the TopK family's cheaper `_reconstruction_norms`)."""
        activations = F.relu(code.values)
        if self.cfg.learned_scale:
            activations = activations * self.latent_scale[code.latents]
        return decode_code(code, activations, self.W_dec).norm(dim=-1)


@torch.no_grad()
def normalize_rows_(W_dec: torch.Tensor) -> None:
    """Unit-norm decoder rows (SPEC 3: after every optimizer step)."""
    W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


@torch.no_grad()
def project_row_grads_(W_dec: torch.Tensor) -> None:
    """Remove each decoder row's gradient component along the row, so Adam does not fight renormalization."""
    if W_dec.grad is None:
        return
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
    W_dec.grad.sub_((W_dec.grad * unit).sum(dim=1, keepdim=True) * unit)


def auxk_from(error: torch.Tensor, error_hat: torch.Tensor, alpha: float,
              mean_over_batch: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """α ||e − ê||² / ||e − mean(e)||², each averaged over rows, e detached (Gao et al. 2024, A.2).

    `mean_over_batch` averages a statistic of these rows over the ranks whose rows make up one batch (data
    parallelism), so the normaliser is the whole batch's, computed in the same two passes; None: these rows are
    the whole batch."""
    average = mean_over_batch or (lambda value: value)
    mean = average(error.mean(dim=0))
    residual_var = average((error - mean).pow(2).sum(dim=-1).mean()).clamp_min(1e-12)
    return alpha * (error - error_hat).pow(2).sum(dim=-1).mean() / residual_var


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||x − x̂||² (summed over d, as in SPEC 2). (B, d), (B, d) → scalar."""
    return (x - x_hat).pow(2).sum(dim=-1).mean()
