"""EleutherAI sparsify folders: `<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors`, one subfolder per hook.

Weights: encoder.weight (n, d_in), encoder.bias (n), W_dec (n, d_out), b_dec (d_out), W_skip (d_out, d_in) with a
skip connection. sparsify's inference (sparsify/sparse_coder.py):

    pre = ReLU(encoder(x − b_dec))            (x itself when `transcode`)
    z   = the k largest entries of pre         (TopK after the ReLU)
    x̂  = z W_dec + b_dec (+ x W_skipᵀ)

Only TopK SAEs exist there: saekit's topk and multi_topk export (Multi-TopK sets `multi_topk`), with their input
scale and b_pre folded into the weights. Hook folders are named by the Hugging Face module sparsify hooked
(`layers.3` for Llama/GPT-NeoX blocks, `h.3` for GPT-2); saekit maps resid_post, mlp_out and attn_out hooks to
and from those names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from saekit.errors import ConfigError, DataError
from saekit.formats.common import (EXPORT_HEADER_KEY, Imported, Provenance, RawAffine, checked_matrix, latent_scale,
                                   load_affine, raw_affine, read_json, read_weights)
from saekit.sae import SparseAutoencoder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

_BLOCK_PREFIX = {"gpt2": "h"}
"""Hugging Face module name of a block by model_type (the rest, Llama, GPT-NeoX, Gemma, Qwen, use `layers`)."""
_SUFFIX_OF_HOOK = {"hook_resid_post": "", "hook_mlp_out": ".mlp", "hook_attn_out": ".self_attn"}
_HOOK_OF_SUFFIX = {"": "hook_resid_post", "mlp": "hook_mlp_out", "self_attn": "hook_attn_out", "attn": "hook_attn_out",
                   "attention": "hook_attn_out"}
_HOOKPOINT = re.compile(r"^(?:[A-Za-z_]+\.)*(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_mlp_out|hook_attn_out)$")


def is_sparsify_folder(path: Path) -> bool:
    return path.is_dir() and (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file() and \
        not _has_saekit_header(path / WEIGHTS_FILE)


def _has_saekit_header(path: Path) -> bool:
    """saekit's own checkpoints are also called sae.safetensors; theirs carry a `saekit` header with a spec (an
    export's header is `saekit_export`)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("saekit")
    except (SafetensorError, OSError, ValueError):
        return False
    return raw is not None and '"spec"' in raw


def sparsify_run_hooks(path: Path) -> list[Path]:
    """The hook subfolders of a sparsify run folder (each a sparsify SAE), sorted; [] when there are none."""
    if not path.is_dir():
        return []
    return sorted(child for child in path.iterdir() if is_sparsify_folder(child))


def hookpoint_of(hook: str, model_type: Optional[str]) -> str:
    """The sparsify folder name for a transformer-lens hook (`blocks.3.hook_resid_post` → `layers.3`)."""
    match = _TL_HOOK.match(hook)
    if not match:
        raise ConfigError(f"hook={hook}: sparsify names folders by module and saekit maps only blocks.L.hook_resid_post, "
                          f"hook_mlp_out and hook_attn_out; name the folder with hookpoint=<module name>")
    prefix = _BLOCK_PREFIX.get(model_type or "", "layers")
    return f"{prefix}.{match.group(1)}{_SUFFIX_OF_HOOK[match.group(2)]}"


def hook_of(hookpoint: str) -> Optional[str]:
    """The transformer-lens hook of a sparsify folder name (`layers.3` → `blocks.3.hook_resid_post`); None when
    the name is not a block, its MLP or its attention."""
    match = _HOOKPOINT.match(hookpoint)
    if not match:
        return None
    return f"blocks.{match.group(1)}.{_HOOK_OF_SUFFIX[match.group(2) or '']}"


# ---- export -----------------------------------------------------------------------------------------------------
def sparsify_weights(sae: SparseAutoencoder) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, cfg.json) of the sparsify SAE with saekit's inference; TopK only."""
    name = sae.spec.activation
    if name not in ("topk", "multi_topk"):
        raise ConfigError(f"format=sparsify: sparsify has only TopK SAEs, and activation={name} is not one; "
                          f"export it with format=saelens")
    if latent_scale(sae) is not None:
        raise ConfigError("format=sparsify: a TopK SAE with activation.learned_scale=true has no sparsify equivalent "
                          "(the scale would change which k latents are kept)")
    if sae.transcoder and sae.spec.d_output != sae.spec.d:
        raise ConfigError(f"format=sparsify: sparsify's transcoders predict an activation as wide as their input "
                          f"({sae.spec.d}), this one {sae.spec.d_output}; export it with format=saelens")
    if sae.spec.normalize == "layer_norm":
        raise ConfigError("format=sparsify: sparsify has no input layer norm; export this SAE with format=saelens")
    raw = raw_affine(sae)
    tensors = {"encoder.weight": raw.W_enc.T, "encoder.bias": raw.b_enc, "W_dec": raw.W_dec, "b_dec": raw.b_dec}
    if raw.W_skip is not None:
        tensors["W_skip"] = raw.W_skip
    cfg = {"expansion_factor": max(1, sae.spec.n // sae.spec.d), "normalize_decoder": True,
           "num_latents": sae.spec.n, "k": sae.spec.k, "multi_topk": name == "multi_topk",
           "skip_connection": bool(sae.spec.skip), "transcode": sae.transcoder, "d_in": sae.spec.d}
    return {key: value.float().contiguous() for key, value in tensors.items()}, cfg


def write_sparsify(folder: Path, hookpoint: str, sae: SparseAutoencoder, saekit_meta: dict) -> Path:
    """`<folder>/<hookpoint>/{cfg.json, sae.safetensors}`; returns the hook folder."""
    tensors, cfg = sparsify_weights(sae)
    hook_dir = folder / hookpoint
    hook_dir.mkdir(parents=True)
    save_file(tensors, str(hook_dir / WEIGHTS_FILE), metadata={EXPORT_HEADER_KEY: json.dumps(saekit_meta)})
    (hook_dir / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return hook_dir


# ---- import -----------------------------------------------------------------------------------------------------
def read_sparsify(folder: Path) -> Imported:
    """One sparsify hook folder as a saekit TopK (or Multi-TopK) SAE with sparsify's inference."""
    where = f"ckpt={folder}"
    cfg = read_json(folder / CFG_FILE, where)
    tensors, record = read_weights(folder / WEIGHTS_FILE, where)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise DataError(f"{where}: activation={activation!r}: saekit reads sparsify's topk SAEs only")
    k = cfg.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise DataError(f"{where}: cfg.json has k={k!r}; it must be a positive integer")
    if "encoder.weight" not in tensors or tensors["encoder.weight"].dim() != 2:
        raise DataError(f"{where}: {WEIGHTS_FILE} has no 2-d encoder.weight; is it a sparsify SAE?")
    n, d_in = tensors["encoder.weight"].shape
    d_out = tensors["W_dec"].shape[1] if "W_dec" in tensors and tensors["W_dec"].dim() == 2 else d_in
    transcode = bool(cfg.get("transcode", False))
    skip = "W_skip" in tensors
    raw = RawAffine(W_enc=checked_matrix(tensors, "encoder.weight", (n, d_in), where).T,
                    b_enc=checked_matrix(tensors, "encoder.bias", (n,), where),
                    W_dec=checked_matrix(tensors, "W_dec", (n, d_out), where),
                    b_dec=checked_matrix(tensors, "b_dec", (d_out,), where), subtract_b_dec=not transcode,
                    W_skip=checked_matrix(tensors, "W_skip", (d_out, d_in), where) if skip else None)
    if raw.subtract_b_dec and d_out != d_in:
        raise DataError(f"{where}: an SAE (transcode=false) must decode to its input width; W_dec has {d_out} != {d_in}")
    activation_name = "multi_topk" if cfg.get("multi_topk") else "topk"
    # sparsify ranks ReLU(pre) (topk_on=relu); on inference the kept values equal TopK-then-ReLU's.
    sae = load_affine(raw, activation_name, transcoder=transcode, k=k, variant={"topk_on": "relu"})
    return Imported(sae=sae, format="sparsify", source=folder,
                    provenance=Provenance(hook=hook_of(folder.name), saekit=record))
