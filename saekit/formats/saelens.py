"""SAELens folders: `cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`), what Neuronpedia and SAEBench read.

Weights (SAELens's layout): W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in); JumpReLU adds
`threshold` (d_sae); Gated has b_gate, r_mag, b_mag instead of b_enc; transcoders have W_dec (d_sae, d_out) and
b_dec (d_out), a skip transcoder W_skip (d_out, d_in). SAELens's inference (sae_lens/saes/*.py):

    x' = normalize(x) − b_dec·apply_b_dec_to_input         normalize: none, or layer_norm (sample std + 1e-5)
    standard  z = ReLU(x' W_enc + b_enc)
    topk      z = TopK_k(x' W_enc + b_enc), then ReLU on the kept values
    jumprelu  h = x' W_enc + b_enc;  z = ReLU(h) · 1[h > threshold]
    gated     z = 1[x' W_enc + b_gate > 0] · ReLU(x' (W_enc · exp(r_mag)) + b_mag)
    x̂ = denormalize(z W_dec + b_dec) (+ x W_skipᵀ for a skip transcoder)

Export maps each saekit variant to the SAELens architecture with the same inference function: BatchTopK and
Matryoshka (a threshold at inference) and ProLU (z = m·1[m > max(0, −b)]) become `jumprelu`, Multi-TopK `topk`.
A learned latent scale is folded into the weights where the activation is positively homogeneous, and refused
for TopK (the scale would change which latents are kept).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from saekit import __version__
from saekit.errors import ConfigError, DataError
from saekit.formats.common import (EXPORT_HEADER_KEY, Imported, Provenance, RawAffine, checked_matrix, latent_scale,
                                   load_affine, positive_latent_scale, raw_affine, read_json,
                                   read_weights)
from saekit.sae import SparseAutoencoder

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SPARSITY_KEY = "sparsity"
"""SAELens stores log10 of each latent's firing rate under this name (log10(rate + 1e-10))."""
THRESHOLD_VARIANTS = ("jumprelu", "batchtopk", "matryoshka", "prolu")
SAELENS_LAYOUT_VERSION = "6.0.0"


def is_saelens_folder(path: Path) -> bool:
    return path.is_dir() and (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


# ---- export -----------------------------------------------------------------------------------------------------
def _threshold(sae: SparseAutoencoder) -> torch.Tensor:
    """The per-latent threshold θ of z = h·1[h > θ] (h the pre-activation SAELens computes)."""
    name = sae.spec.activation
    if name == "jumprelu":
        return sae.threshold.detach().double().cpu()
    if name == "prolu":  # m·1[m > 0 ∧ m + b > 0] = m·1[m > max(0, −b)]
        return (-sae.b_enc.detach().double().cpu()).clamp_min(0.0)
    return torch.full((sae.spec.n,), float(sae.threshold), dtype=torch.float64)  # batchtopk, matryoshka


def _architecture(sae: SparseAutoencoder, kind: str) -> str:
    if not sae.transcoder:
        return kind
    if kind == "gated":
        raise ConfigError("format=saelens: SAELens has no gated transcoder; export a relu, topk or jumprelu one")
    if kind == "topk":
        raise ConfigError("format=saelens: SAELens has no TopK transcoder (it has relu and jumprelu ones); export "
                          "this one with format=sparsify")
    skip = "skip_" if sae.spec.skip else ""
    return {"standard": f"{skip}transcoder", "jumprelu": f"jumprelu_{skip}transcoder"}[kind]


def saelens_weights(sae: SparseAutoencoder) -> tuple[str, dict[str, torch.Tensor], dict]:
    """(architecture, float32 tensors, cfg fields beyond the shared ones) of the SAELens SAE with saekit's inference."""
    name = sae.spec.activation
    if sae.spec.normalize == "layer_norm" and sae.spec.ln_style == "saekit":
        log.warning("this SAE's layer norm divides by the population std (clamped at 1e-6), SAELens's by the sample std "
                    "+ 1e-5: the weights absorb the std ratio, and outputs differ by up to about 1e-5/std (relative) "
                    "per token")
    raw = raw_affine(sae)
    extra_cfg: dict = {}
    if name in ("topk", "multi_topk"):
        if latent_scale(sae) is not None:
            raise ConfigError("format=saelens: a TopK SAE with activation.learned_scale=true has no SAELens "
                              "equivalent (the scale would change which k latents are kept); export one without it")
        kind, tensors = "topk", _affine_tensors(raw)
        extra_cfg.update(k=sae.spec.k, rescale_acts_by_decoder_norm=False)
    elif name == "relu":
        scale = positive_latent_scale(sae, "saelens")
        kind, tensors = "standard", _affine_tensors(_scaled_latents(raw, scale))
    elif name in THRESHOLD_VARIANTS:
        scale = positive_latent_scale(sae, "saelens")
        if name == "prolu":  # h is m alone: ProLU's bias gates, it does not shift
            raw.b_enc = raw.b_enc - sae.b_enc.detach().double().cpu()
        threshold = _threshold(sae) * (scale if scale is not None else 1.0)
        kind, tensors = "jumprelu", {**_affine_tensors(_scaled_latents(raw, scale)), "threshold": threshold}
    elif name == "gated":
        kind, tensors = "gated", _gated_tensors(sae, raw, positive_latent_scale(sae, "saelens"))
    else:
        raise ConfigError(f"format=saelens: activation={name} has no SAELens counterpart")
    architecture = _architecture(sae, kind)
    if sae.transcoder and sae.spec.skip:
        tensors["W_skip"] = raw.W_skip
    return architecture, {key: value.float().contiguous() for key, value in tensors.items()}, extra_cfg


def _affine_tensors(raw: RawAffine) -> dict[str, torch.Tensor]:
    return {"W_enc": raw.W_enc, "b_enc": raw.b_enc, "W_dec": raw.W_dec, "b_dec": raw.b_dec}


def _scaled_latents(raw: RawAffine, scale: Optional[torch.Tensor]) -> RawAffine:
    """s·σ(h) = σ(s·h) for s > 0: the learned scale moves into the encoder's columns and bias."""
    if scale is not None:
        raw.W_enc, raw.b_enc = raw.W_enc * scale, raw.b_enc * scale
    return raw


def _gated_tensors(sae: SparseAutoencoder, raw: RawAffine, scale: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gate path is raw's affine map (b_enc is b_gate); the magnitude path shares W_enc, scaled by exp(r_mag),
    so the b_pre fold of a transcoder (raw.b_enc − b_gate) is carried over scaled too. A learned scale s > 0
    multiplies the magnitude: r_mag + log s, b_mag·s."""
    r_mag = sae.r_mag.detach().double().cpu()
    b_mag = sae.b_mag.detach().double().cpu() + r_mag.exp() * (raw.b_enc - sae.b_enc.detach().double().cpu())
    if scale is not None:
        r_mag, b_mag = r_mag + scale.log(), b_mag * scale
    return {"W_enc": raw.W_enc, "b_gate": raw.b_enc, "r_mag": r_mag, "b_mag": b_mag, "W_dec": raw.W_dec,
            "b_dec": raw.b_dec}


def saelens_cfg(sae: SparseAutoencoder, architecture: str, extra_cfg: dict, site: dict) -> dict:
    """cfg.json in SAELens 6's layout (run facts under `metadata`); `site` holds model_name, hook_name,
    hook_name_out, context_size, prepend_bos, dataset_path."""
    spec = sae.spec
    cfg = {
        "architecture": architecture,
        "d_in": spec.d,
        "d_sae": spec.n,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not sae.transcoder,
        "normalize_activations": "layer_norm" if spec.normalize == "layer_norm" else "none",
        "reshape_activations": "none",
        **extra_cfg,
    }
    if sae.transcoder:
        cfg["d_out"] = spec.d_output
    metadata = {
        "model_name": site.get("model_name"),
        "hook_name": site.get("hook_name"),
        "hook_head_index": None,
        "model_class_name": "HookedTransformer",
        "model_from_pretrained_kwargs": {},
        "context_size": site.get("context_size"),
        "prepend_bos": site.get("prepend_bos", True),
        "dataset_path": site.get("dataset_path"),
        "exclude_special_tokens": False,
        # The layout version this file follows: SAELens reads a cfg.json without one as pre-6.0 and drops `metadata`.
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
        "sae_lens_training_version": None,
        "exported_by": f"saekit {__version__}",
    }
    if sae.transcoder:
        metadata.update(hook_name_out=site.get("hook_name_out"), hook_head_index_out=None)
    cfg["metadata"] = metadata
    return cfg


def write_saelens(folder: Path, sae: SparseAutoencoder, site: dict, saekit_meta: dict,
                  density: Optional[torch.Tensor], weights: Optional[tuple] = None) -> dict:
    """cfg.json, sae_weights.safetensors (saekit's metadata kept in its header) and, given held-out firing rates,
    sparsity.safetensors, into an existing empty folder. `weights`: `saelens_weights(sae)` when the caller already
    made them (export does, to refuse before measuring anything). Returns the cfg written."""
    architecture, tensors, extra_cfg = weights or saelens_weights(sae)
    cfg = saelens_cfg(sae, architecture, extra_cfg, site)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={EXPORT_HEADER_KEY: json.dumps(saekit_meta)})
    if density is not None:
        save_file({SPARSITY_KEY: torch.log10(density.double() + 1e-10).float().contiguous()},
                  str(folder / SPARSITY_FILE))
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


# ---- import -----------------------------------------------------------------------------------------------------
def _flat_cfg(cfg: dict) -> dict:
    """SAELens 6 keeps run facts under `metadata`; SAELens 3–5 kept them at the top level. One flat view."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return {**metadata, **{key: value for key, value in cfg.items() if key != "metadata"}}


def _kind(cfg: dict, where: str) -> tuple[str, bool, bool]:
    """(activation kind: standard, topk, jumprelu or gated; transcoder?; skip?) from `architecture` (and the older
    `activation_fn_str`/`activation_fn` of SAELens 3–5, where TopK was `standard` with activation_fn topk)."""
    architecture = str(cfg.get("architecture", "standard"))
    transcoder = architecture.endswith("transcoder")
    skip = "skip_transcoder" in architecture
    kind = architecture.replace("skip_transcoder", "").replace("transcoder", "").strip("_") or "standard"
    kind = {"jumprelu": "jumprelu", "topk": "topk", "gated": "gated", "standard": "standard",
            "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}.get(kind)
    if kind is None:
        raise DataError(f"{where}: architecture={architecture!r} is not one saekit reads (standard, topk, jumprelu, "
                        f"gated and their transcoders)")
    if kind == "gated" and transcoder:
        raise DataError(f"{where}: architecture={architecture!r}: saekit reads no gated transcoder")
    activation_fn = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    if kind == "standard" and activation_fn == "topk":
        kind = "topk"
    elif kind == "standard" and activation_fn not in ("relu", None):
        raise DataError(f"{where}: activation_fn={activation_fn!r} is not one saekit reads (relu, topk)")
    return kind, transcoder, skip


def _topk_k(cfg: dict, where: str) -> int:
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise DataError(f"{where}: a topk SAE needs a positive integer k in cfg.json (found {k!r})")
    return k


def _normalization(cfg: dict, where: str) -> tuple[str, str]:
    """(saekit normalize, ln_style). expected_average_only_in is folded into the weights when SAELens saves."""
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm in ("none", "expected_average_only_in"):
        return "none", "saekit"
    if norm == "layer_norm":
        return "layer_norm", "openai"
    raise DataError(f"{where}: normalize_activations={norm!r} has no saekit equivalent (it reads none, "
                    f"expected_average_only_in and layer_norm)")


def read_saelens(folder: Path) -> Imported:
    """A SAELens folder as a saekit SAE with SAELens's inference (see the module docstring)."""
    where = f"ckpt={folder}"
    cfg = _flat_cfg(read_json(folder / CFG_FILE, where))
    tensors, record = read_weights(folder / WEIGHTS_FILE, where)
    kind, transcoder, skip = _kind(cfg, where)
    if cfg.get("hook_head_index") is not None:
        raise DataError(f"{where}: hook_head_index={cfg['hook_head_index']} (one attention head) is not supported")
    d_in, n = _positive(cfg, "d_in", where), _positive(cfg, "d_sae", where)
    d_out = _positive(cfg, "d_out", where) if transcoder and "d_out" in cfg else d_in
    normalize, ln_style = _normalization(cfg, where)
    subtract = bool(cfg.get("apply_b_dec_to_input", not transcoder))
    if subtract and d_out != d_in:
        raise DataError(f"{where}: apply_b_dec_to_input=true with d_out != d_in cannot be evaluated")
    bias = "b_gate" if kind == "gated" else "b_enc"
    raw = RawAffine(W_enc=checked_matrix(tensors, "W_enc", (d_in, n), where),
                    b_enc=checked_matrix(tensors, bias, (n,), where),
                    W_dec=checked_matrix(tensors, "W_dec", (n, d_out), where),
                    b_dec=checked_matrix(tensors, "b_dec", (d_out,), where), subtract_b_dec=subtract,
                    W_skip=checked_matrix(tensors, "W_skip", (d_out, d_in), where) if skip else None)
    sae = _saekit_sae(raw, kind, cfg, tensors, where, normalize, ln_style, transcoder)
    return Imported(sae=sae, format="saelens", source=folder, provenance=_provenance(cfg, record))


def _saekit_sae(raw: RawAffine, kind: str, cfg: dict, tensors: dict, where: str, normalize: str,
                ln_style: str, transcoder: bool) -> SparseAutoencoder:
    common = dict(normalize=normalize, ln_style=ln_style, transcoder=transcoder)
    if kind == "standard":
        return load_affine(raw, "relu", **common)
    if kind == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            # SAELens ranks h·‖d_i‖ and decodes z/‖d_i‖: the same as unit decoder rows with the norms in the encoder.
            norms = raw.W_dec.norm(dim=1)
            raw.W_enc, raw.b_enc, raw.W_dec = raw.W_enc * norms, raw.b_enc * norms, raw.W_dec / norms[:, None]
        return load_affine(raw, "topk", k=_topk_k(cfg, where), **common)
    if kind == "jumprelu":
        # ReLU(h)·1[h > θ] = h·1[h > max(θ, 0)]: saekit's JumpReLU with θ clamped at 0 (log 0 = −inf is exact).
        threshold = checked_matrix(tensors, "threshold", (raw.n,), where).clamp_min(0.0)
        return load_affine(raw, "jumprelu", extra={"log_threshold": threshold.log()}, **common)
    n = raw.n
    extra = {"r_mag": checked_matrix(tensors, "r_mag", (n,), where), "b_mag": checked_matrix(tensors, "b_mag", (n,), where)}
    if not raw.subtract_b_dec:  # the b_dec fold load_affine makes into b_gate applies to the magnitude path too
        extra["b_mag"] = extra["b_mag"] + extra["r_mag"].exp() * (raw.b_dec @ raw.W_enc)
    return load_affine(raw, "gated", extra=extra, **common)


def _positive(cfg: dict, key: str, where: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise DataError(f"{where}: cfg.json has {key}={value!r}; it must be a positive integer")
    return value


def _provenance(cfg: dict, record: Optional[dict]) -> Provenance:
    tokens = cfg.get("training_tokens")
    return Provenance(model_name=cfg.get("model_name"), hook=cfg.get("hook_name"), hook_out=cfg.get("hook_name_out"),
                      context_size=cfg.get("context_size"), prepend_bos=cfg.get("prepend_bos"),
                      dataset_path=cfg.get("dataset_path"),
                      training_tokens=tokens if isinstance(tokens, int) else None, saekit=record)
