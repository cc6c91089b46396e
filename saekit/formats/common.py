"""What every format shares: a saekit SAE seen in the model's raw activation space, and back.

saekit keeps its input normalization (`input_scale`, SPEC 3) and its b_pre convention inside the SAE; the other
projects' files describe an SAE as plain affine maps on raw activations x (d_in) with one nonlinearity between:

    h = (x − c) · W_enc + b_enc        W_enc (d_in, n); c = b_dec when `apply_b_dec_to_input`, else 0
    z = σ(h)                           the variant's latents (ReLU, TopK, JumpReLU threshold, Gated's two paths)
    x̂ = z · W_dec + b_dec (+ x · W_skipᵀ)   W_dec (n, d_out), b_dec (d_out), W_skip (d_out, d_in)

`RawAffine` is that view. `raw_affine(sae)` folds saekit's scale and b_pre into it; `load_affine(...)` builds a
saekit SAE from one, so that encode/decode agree to float32 rounding. Folding is done in float64.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from saekit.errors import ConfigError, DataError
from saekit.sae import SAESpec, SparseAutoencoder, build_sae

log = logging.getLogger(__name__)

EXPORT_HEADER_KEY = "saekit_export"
"""safetensors header key of an exported weights file: saekit's spec and training config as JSON, so saekit can read
the folder back with the run's own model, hook and data (the other projects ignore it)."""


@dataclass
class RawAffine:
    """An SAE's encoder and decoder on raw activations (see the module docstring), float64 on the CPU."""

    W_enc: torch.Tensor
    """(d_in, n)"""
    b_enc: torch.Tensor
    """(n,)"""
    W_dec: torch.Tensor
    """(n, d_out)"""
    b_dec: torch.Tensor
    """(d_out,)"""
    subtract_b_dec: bool
    """h reads x − b_dec (SAELens's apply_b_dec_to_input; only when d_in = d_out)."""
    W_skip: Optional[torch.Tensor] = None
    """(d_out, d_in): a skip transcoder's linear path on the raw input."""

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]


def layer_norm_gap(d: int) -> float:
    """std_population / std_sample = sqrt((d − 1)/d): how saekit's layer norm (population std) relates to the
    sample-std layer norm of OpenAI and SAELens, which a file's weights can absorb as a scale."""
    return math.sqrt((d - 1) / d)


def normalization_scale(sae: SparseAutoencoder) -> float:
    """The factor s with saekit's normalized input = s · (the other format's input): the input scale for
    normalize='scale', 1 for 'none', and for 'layer_norm' what turns the sample-std layer norm the formats use
    into saekit's (1 when the SAE already uses it, ln_style='openai')."""
    spec = sae.spec
    if spec.normalize == "scale":
        return float(sae.input_scale)
    if spec.normalize == "layer_norm" and spec.ln_style == "saekit":
        return 1.0 / layer_norm_gap(spec.d)
    return 1.0


def raw_affine(sae: SparseAutoencoder) -> RawAffine:
    """The saekit SAE's encoder pre-activations and decoder as maps of the format's input, s·x_format being what
    saekit's SAE reads (s = `normalization_scale`). Latent values are unchanged: h_format = saekit's h exactly
    (up to rounding) for the variants whose h is W_enc (x − b_pre) + b_enc.

    An SAE subtracts its decoder bias from the input (SAELens's apply_b_dec_to_input, sparsify's default):
    (x − b_pre/s)·(s W_encᵀ) = W_enc (s x − b_pre). A transcoder's decoder bias lives in the output space, so its
    b_pre is folded into b_enc instead, and its output is unscaled by its own output_scale.

    Gated's magnitude path and ProLU's bias are the variant writer's to fold; this is the shared part."""
    scale = normalization_scale(sae)
    W_enc = sae.W_enc.detach().double().cpu()
    b_enc = sae.b_enc.detach().double().cpu()
    b_pre = sae.b_pre.detach().double().cpu()
    W_dec = sae.W_dec.detach().double().cpu()
    if not sae.transcoder:
        return RawAffine(W_enc=(W_enc * scale).T.contiguous(), b_enc=b_enc, W_dec=W_dec / scale,
                         b_dec=b_pre / scale, subtract_b_dec=True)
    out_scale = float(sae.output_scale) if sae.spec.normalize == "scale" else 1.0
    skip = sae.W_skip.detach().double().cpu() * scale / out_scale if sae.spec.skip else None
    return RawAffine(W_enc=(W_enc * scale).T.contiguous(), b_enc=b_enc - W_enc @ b_pre, W_dec=W_dec / out_scale,
                     b_dec=sae.b_out.detach().double().cpu() / out_scale, subtract_b_dec=False, W_skip=skip)


def latent_scale(sae: SparseAutoencoder) -> Optional[torch.Tensor]:
    """The learned per-latent scale s (n,) in float64, or None without one."""
    if not sae.cfg.learned_scale:
        return None
    return sae.latent_scale.detach().double().cpu()


def positive_latent_scale(sae: SparseAutoencoder, fmt: str) -> Optional[torch.Tensor]:
    """The learned scale when it can be folded into a positively homogeneous activation (s·σ(h) = σ(s·h) needs
    s > 0); a one-line refusal otherwise."""
    scale = latent_scale(sae)
    if scale is not None and bool((scale <= 0).any()):
        bad = int((scale <= 0).sum())
        raise ConfigError(f"format={fmt}: {bad} latent(s) have a learned scale <= 0, which {fmt}'s activation cannot "
                          f"absorb; this SAE cannot be exported to {fmt}")
    return scale


# ---- building a saekit SAE from a raw view --------------------------------------------------------------------
def load_affine(raw: RawAffine, activation: str, *, transcoder: bool = False, k: int = 32, normalize: str = "none",
                ln_style: str = "saekit", extra: Optional[dict[str, torch.Tensor]] = None,
                variant: Optional[dict] = None) -> SparseAutoencoder:
    """A saekit SAE (eval mode) whose inference equals `raw` followed by `activation`'s latents.

    saekit decodes with b_pre and encodes x − b_pre; a format that does not subtract its decoder bias from the
    input gets it folded into b_enc (h = x W + b = (x − b_dec) W + (b + b_dec W)). A transcoder keeps b_pre = 0 and
    its bias as b_out. `extra`: the variant's own tensors by saekit name (log_threshold, r_mag, b_mag, threshold).
    """
    transcoder = transcoder or raw.d_out != raw.d_in or raw.W_skip is not None
    spec = SAESpec.build(activation, d=raw.d_in, n=raw.n, k=min(k, raw.n), normalize=normalize, ln_style=ln_style,
                         d_out=raw.d_out if transcoder else None, skip=raw.W_skip is not None, **(variant or {}))
    sae = build_sae(spec)
    state = {name: tensor.detach().clone() for name, tensor in sae.state_dict().items()}
    b_enc = raw.b_enc
    if transcoder:
        if raw.subtract_b_dec:
            raise DataError("a transcoder's decoder bias cannot be subtracted from its input (d_in != d_out)")
        state["b_out"] = raw.b_dec
        if raw.W_skip is not None:
            state["W_skip"] = raw.W_skip
    else:
        state["b_pre"] = raw.b_dec
        if not raw.subtract_b_dec:
            b_enc = raw.b_enc + raw.b_dec @ raw.W_enc
    state.update(W_enc=raw.W_enc.T, b_enc=b_enc, W_dec=raw.W_dec)
    state.update(extra or {})
    expected = dict(sae.state_dict())
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"load_affine: {activation} has no tensor {name!r}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise DataError(f"{name} has shape {tuple(tensor.shape)}, but an SAE with d_in={raw.d_in}, n={raw.n}, "
                            f"d_out={raw.d_out} needs {tuple(expected[name].shape)}; the file is inconsistent")
        state[name] = tensor.to(expected[name].dtype)
    sae.load_state_dict(state)
    return sae.eval()


def checked_matrix(tensors: dict[str, torch.Tensor], name: str, shape: tuple, where: str) -> torch.Tensor:
    """tensors[name] as float64, with a one-line error naming the file when it is missing or misshapen
    (None in `shape`: any size)."""
    if name not in tensors:
        raise DataError(f"{where}: no tensor {name!r} (found: {', '.join(sorted(tensors)) or 'none'}); is it the "
                        f"format it claims to be?")
    tensor = tensors[name]
    if not torch.is_tensor(tensor):
        raise DataError(f"{where}: {name} is a {type(tensor).__name__}, not a tensor")
    ok = tensor.dim() == len(shape) and all(want is None or got == want for got, want in zip(tensor.shape, shape))
    if not ok:
        raise DataError(f"{where}: {name} has shape {tuple(tensor.shape)}; expected {tuple('?' if s is None else s for s in shape)}")
    if not torch.is_floating_point(tensor):
        raise DataError(f"{where}: {name} holds {tensor.dtype}, not floating-point weights")
    if not bool(torch.isfinite(tensor).all()):
        raise DataError(f"{where}: {name} holds NaN or infinite values; the file is damaged")
    return tensor.double()


def read_weights(path: Path, where: str) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """(tensors, saekit's export record or None) of a safetensors weights file, one-line errors when damaged."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{where}: {path.name} is corrupt or truncated ({exc})") from exc
    record = None
    if EXPORT_HEADER_KEY in header:
        try:
            record = json.loads(header[EXPORT_HEADER_KEY])
        except ValueError:
            log.warning("%s: its saekit export record is not valid JSON; ignoring it", where)
    return tensors, record if isinstance(record, dict) else None


def read_json(path: Path, where: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(f"{where}: cannot read {path.name} ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise DataError(f"{where}: {path.name} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{where}: {path.name} holds a {type(data).__name__}, not a JSON object")
    return data


# ---- what a file says about where its SAE was trained --------------------------------------------------------
@dataclass
class Provenance:
    """Where a foreign SAE reads from, as far as its file says (None: the file does not say)."""

    model_name: Optional[str] = None
    hook: Optional[str] = None
    hook_out: Optional[str] = None
    context_size: Optional[int] = None
    prepend_bos: Optional[bool] = None
    dataset_path: Optional[str] = None
    training_tokens: Optional[int] = None
    saekit: Optional[dict] = None
    """saekit's own metadata (spec, train_config, ...), when saekit exported the file."""


@dataclass
class Imported:
    """An SAE read from another project's file: a saekit SAE with the same inference, and its provenance."""

    sae: SparseAutoencoder
    format: str
    source: Path
    provenance: Provenance = field(default_factory=Provenance)

    def describe(self) -> dict:
        """What the import records in the saekit checkpoint's metadata."""
        return {"format": self.format, "source": str(self.source),
                "provenance": {key: value for key, value in dataclasses.asdict(self.provenance).items()
                               if key != "saekit" and value is not None}}


# ---- writing a folder without ever leaving half of one ----------------------------------------------------------
def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to write over an existing non-empty folder unless overwrite=true (nothing is changed when refused)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; name a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={out} exists and is not empty; choose another folder or pass overwrite=true")


def _umask() -> int:
    """The process's umask, read without setting it (os.umask can only be read by changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _shareable(folder: Path) -> None:
    """Files as an ordinary write would make them (the atomic writers' temporary files are 0600)."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        os.chmod(path, mode | (0o111 & ~_umask()) if path.is_dir() else mode)


def write_folder_atomically(out: Path, write) -> None:
    """`write(tmp_folder)` fills a temporary sibling folder; it then replaces `out` in one rename (an existing
    folder is moved aside first and removed only after the new one is in place), so a crash leaves the old
    folder or the new one, never a mix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # not mkdtemp: its 0700 would make a folder meant for sharing private
    old = None
    try:
        write(tmp)
        _shareable(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
