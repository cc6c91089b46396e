"""`saekit export` and `saekit import`: the commands around the format modules.

Both refuse before writing anything (a bad format, an architecture a format cannot hold, an existing folder) and
write their output folder atomically, so a refused or killed command leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from saekit import __version__
from saekit.checkpoint import SAE_FILE, save_sae
from saekit.config import ExportConfig, ImportConfig, ModelConfig, TrainConfig
from saekit.errors import ConfigError, DataError
from saekit.formats import FOREIGN_FORMATS, detect_format, foreign_paths, imported_meta, open_checkpoint, read_foreign
from saekit.formats.common import prepare_out, write_folder_atomically
from saekit.formats.saelens import saelens_weights, write_saelens
from saekit.formats.sparsify import hookpoint_of, sparsify_weights, write_sparsify
from saekit.model import looks_local, resolve_device

log = logging.getLogger(__name__)


# ---- export -----------------------------------------------------------------------------------------------------
def export(cfg: ExportConfig) -> Path:
    """The SAE of `cfg.ckpt` written as a SAELens or sparsify folder at `cfg.out`; returns the folder."""
    from saekit.tasks import ModelPool, _trained_config, _trained_tokens, single_checkpoint

    out = Path(cfg.out).expanduser()
    prepare_out(out, cfg.overwrite)
    ckpt, device = single_checkpoint(cfg.ckpt, "export"), resolve_device(cfg.device)
    sae, meta = open_checkpoint(ckpt, cfg, device)
    trained = _trained_config(meta, f"ckpt={ckpt}")
    saekit_meta = {"spec": meta["spec"], "train_config": meta["train_config"], "source": str(ckpt),
                   "trained_tokens": _trained_tokens(ckpt, meta, trained), "saekit_version": __version__}
    if cfg.format == "sparsify":
        sparsify_weights(sae)  # refuses an architecture sparsify cannot hold, before anything is written
        hookpoint = cfg.hookpoint or hookpoint_of(trained.hook_name, model_type(trained.model))
        write_folder_atomically(out, lambda folder: write_sparsify(folder, hookpoint, sae, saekit_meta))
        log.info("sparsify folder: %s (hook %s as %s/; load it with sparsify's Sae.load_from_disk)", out,
                 trained.hook_name, hookpoint)
        return out
    weights = saelens_weights(sae)  # the same refusal for SAELens
    density = held_out_density(sae, trained, cfg, ModelPool(device), device) if cfg.sparsity else None
    facts = site_facts(trained)
    write_folder_atomically(out, lambda folder: write_saelens(folder, sae, facts, saekit_meta, density, weights))
    log.info("SAELens folder: %s (load it with sae_lens's SAE.load_from_disk)", out)
    return out


def held_out_density(sae, trained: TrainConfig, cfg: ExportConfig, models, device) -> torch.Tensor:
    """Each latent's firing rate on the held-out activations (what SAELens keeps as log10 in sparsity.safetensors)."""
    from saekit.evaluate import check_compatible, evaluate_reconstruction
    from saekit.tasks import held_out_cache

    _, cache = held_out_cache(trained, cfg.data, cfg.cache, cfg.device, models)
    check_compatible(sae, cache, cfg.ckpt)
    _, stats = evaluate_reconstruction(sae, cache, device, cfg.batch_size)
    return stats.latent_density()


def site_facts(trained: TrainConfig) -> dict:
    """The run facts SAELens keeps in cfg.json's metadata. A local model folder is named by its short name, not a
    path on this machine (saekit's own record in the weights file keeps the full config)."""
    model = trained.model
    data = trained.data
    return {"model_name": model.short_name if looks_local(model.name) else model.name, "hook_name": trained.hook_name,
            "hook_name_out": trained.hook_out, "context_size": data.ctx_len, "prepend_bos": data.prepend_bos,
            "dataset_path": data.hf_path if data.source == "hf" else data.name}


def model_type(model: ModelConfig) -> Optional[str]:
    """The Hugging Face model_type (gpt2, llama, ...) from a local folder's config.json, or from a GPT-2 Hub name;
    None when unknown (sparsify folder names then use `layers.L`)."""
    folder = Path(model.name).expanduser()
    if (folder / "config.json").is_file():
        try:
            return json.loads((folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            return None
    name = model.name.split("/")[-1]
    return "gpt2" if name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2") else None


# ---- import -----------------------------------------------------------------------------------------------------
def import_sae(cfg: ImportConfig) -> list[Path]:
    """Another project's SAE file(s) as saekit checkpoint(s) under `cfg.out`; returns the checkpoint files."""
    src = Path(cfg.src).expanduser()
    if not src.exists():
        raise DataError(f"src={cfg.src}: no such file or folder")
    fmt = detect_format(src)
    if fmt == "saekit":
        raise ConfigError(f"src={cfg.src} is already a saekit checkpoint; evaluate it with saekit eval ckpt=...")
    if fmt not in FOREIGN_FORMATS:
        raise DataError(f"src={cfg.src}: not a SAELens folder, sparsify folder, Gemma Scope .npz or OpenAI .pt")
    out = Path(cfg.out).expanduser()
    prepare_out(out, cfg.overwrite)
    paths = foreign_paths(src, fmt)
    if len(paths) > 1 and (cfg.hook is not None or cfg.hook_out is not None):
        raise ConfigError(f"src={cfg.src} holds {len(paths)} hooks, each named by its folder; drop hook= (or import "
                          f"one hook folder)")
    items = []
    for path in paths:
        imported = read_foreign(path, fmt)
        items.append((path, imported, imported_meta(imported, cfg)))

    def write(folder: Path) -> None:
        for path, imported, meta in items:
            target = folder if len(items) == 1 else folder / path.name
            target.mkdir(parents=True, exist_ok=True)
            save_sae(target / SAE_FILE, imported.sae, {key: value for key, value in meta.items() if key != "spec"})

    write_folder_atomically(out, write)
    written = [out / SAE_FILE] if len(items) == 1 else [out / path.name / SAE_FILE for path, _, _ in items]
    for path in written:
        log.info("saekit checkpoint: %s (saekit eval ckpt=%s)", path, path.parent)
    return written
