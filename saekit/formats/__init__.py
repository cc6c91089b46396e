"""The ecosystem's SAE files: export saekit SAEs to SAELens and sparsify; read SAELens, sparsify, Gemma Scope and
OpenAI files as saekit SAEs with the same inference (`saekit eval ckpt=<any of them>`, `saekit import`).

One module per format (saelens.py, sparsify.py, gemmascope.py, openai.py), each holding its layout and inference
in its docstring; common.py folds saekit's input normalization and b_pre convention into (and out of) the plain
affine form those files use. No load path unpickles anything but tensors and plain values.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import torch

from saekit.checkpoint import SAE_FILE, load_sae
from saekit.config import DataConfig, DeadConfig, ForeignSite, ModelConfig, OptimizerConfig, TrainConfig
from saekit.errors import ConfigError, DataError
from saekit.formats.common import Imported
from saekit.formats.gemmascope import read_gemmascope
from saekit.formats.openai import read_openai
from saekit.formats.saelens import WEIGHTS_FILE as SAELENS_WEIGHTS, is_saelens_folder, read_saelens
from saekit.formats.sparsify import is_sparsify_folder, read_sparsify, sparsify_run_hooks
from saekit.sae import SparseAutoencoder

log = logging.getLogger(__name__)

FOREIGN_FORMATS = ("saelens", "sparsify", "gemmascope", "openai")
_READERS = {"saelens": read_saelens, "sparsify": read_sparsify, "gemmascope": read_gemmascope, "openai": read_openai}


def detect_format(path: Path) -> Optional[str]:
    """`saekit`, one of FOREIGN_FORMATS, or None, from what is on disk (a folder's files, a file's suffix)."""
    if path.is_dir():
        if (path / SAE_FILE).is_file() and not is_sparsify_folder(path):
            return "saekit"
        if is_saelens_folder(path):
            return "saelens"
        if is_sparsify_folder(path) or sparsify_run_hooks(path):
            return "sparsify"
        return None
    suffix = path.suffix.lower()
    if path.name == SAELENS_WEIGHTS or path.name == "cfg.json":
        return detect_format(path.parent)
    if suffix == ".npz":
        return "gemmascope"
    if suffix in (".pt", ".pth", ".bin"):
        return "openai"
    if suffix == ".safetensors":
        return "sparsify" if is_sparsify_folder(path.parent) and path.name == "sae.safetensors" else "saekit"
    return None


def foreign_paths(path: Path, fmt: str) -> list[Path]:
    """What to read for a foreign checkpoint argument: the folder or file itself, every hook folder of a sparsify
    run folder, or the folder of a SAELens/sparsify file that was named directly."""
    if path.is_file() and fmt in ("saelens", "sparsify"):
        return [path.parent]
    if fmt == "sparsify" and not is_sparsify_folder(path):
        return sparsify_run_hooks(path)
    return [path]


def read_foreign(path: Path, fmt: str) -> Imported:
    return _READERS[fmt](path)


def checkpoint_name(path: Path) -> str:
    """The run id of a checkpoint in results tables: a run folder's name, a foreign folder's, or a foreign file's
    stem (its folder's name for Gemma Scope's anonymous params.npz)."""
    if path.name == SAE_FILE and path.is_file():
        return path.parent.name
    if path.is_dir():
        return path.name
    return path.parent.name if path.stem == "params" else path.stem


# ---- the training record an imported SAE is evaluated with ---------------------------------------------------------
def imported_meta(imported: Imported, site: ForeignSite) -> dict:
    """Checkpoint metadata for an imported SAE, as `saekit train` would have written it: its spec, and a training
    config naming the model, hook and data (the command line's, else saekit's own record for a file saekit
    exported, else the file's metadata). Raises a one-line DataError naming the missing setting."""
    saved = (imported.provenance.saekit or {}).get("train_config")
    trained = _saved_train_config(saved) if isinstance(saved, dict) else None
    where = f"ckpt={imported.source}"
    model = site.model or (trained.model if trained else _model_of(imported, where))
    hook = site.hook or (trained.hook_name if trained else imported.provenance.hook)
    if hook is None:
        raise DataError(f"{where}: the {imported.format} file does not name its hook; pass hook=<name> (e.g. "
                        f"hook=blocks.8.hook_resid_post; `saekit hooks model=...` lists them)")
    hook_out = site.hook_out or (trained.hook_out if trained else imported.provenance.hook_out)
    if imported.sae.transcoder and hook_out is None:
        raise DataError(f"{where}: a transcoder whose file does not name its output hook; pass hook_out=<name>")
    data = site.data or (trained.data if trained else _data_of(imported, where))
    spec = imported.sae.spec
    data = dataclasses.replace(data, normalize=spec.normalize)  # the SAE's own (the cache is raw either way)
    if imported.provenance.prepend_bos is not None and site.data is None and trained is None:
        data = dataclasses.replace(data, prepend_bos=bool(imported.provenance.prepend_bos))
    config = TrainConfig(model=model, data=data, hook=hook, hook_out=hook_out if spec.d_out is not None else None,
                         activation=spec.variant, dead=DeadConfig(method="none"), optimizer=OptimizerConfig(), n=spec.n,
                         k=min(spec.k, spec.n), lam=trained.lam if trained else spec.lam, skip=spec.skip)
    return {"spec": spec.to_dict(), "train_config": dataclasses.asdict(config), "finished": True,
            "imported": imported.describe(), "trained_tokens": _trained_tokens(imported, trained)}


def _trained_tokens(imported: Imported, trained) -> Optional[int]:
    saekit = imported.provenance.saekit or {}
    if isinstance(saekit.get("trained_tokens"), int):
        return saekit["trained_tokens"]
    return imported.provenance.training_tokens


def _saved_train_config(saved: dict):
    from saekit.tasks import _trained_config

    try:
        return _trained_config({"train_config": saved}, "the file's saekit metadata")
    except DataError as exc:
        log.warning("%s; using the file's own metadata instead", exc)
        return None


def _model_of(imported: Imported, where: str) -> ModelConfig:
    """The model a file names (SAELens's transformer-lens names such as gpt2-small map to Hub names)."""
    name = imported.provenance.model_name
    if not name:
        raise DataError(f"{where}: the {imported.format} file does not name its model; pass model=<option> (e.g. "
                        f"model=gpt2-small) or model.name=<hub name or folder>")
    try:
        from transformer_lens.supported_models import get_official_model_name

        official = get_official_model_name(name)
    except (ImportError, ValueError):
        official = name
    return ModelConfig(name=official, display_name=name)


def _data_of(imported: Imported, where: str) -> DataConfig:
    """The file's training dataset as saekit's `hf` data source; else the user must name some text."""
    path = imported.provenance.dataset_path
    if not path:
        raise DataError(f"{where}: the {imported.format} file does not name its text; pass data=<option> (e.g. "
                        f"data=tinystories, or data=hf data.hf_path=<dataset>)")
    context = imported.provenance.context_size
    return DataConfig(name=path.rstrip("/").split("/")[-1], source="hf", hf_path=path, streaming=True,
                      ctx_len=context if isinstance(context, int) and context >= 2 else 128)


# ---- opening any checkpoint ---------------------------------------------------------------------------------------
def open_checkpoint(path: Path, site: ForeignSite, device: torch.device | str = "cpu"
                    ) -> tuple[SparseAutoencoder, dict]:
    """A saekit checkpoint, or a foreign file read as one: (SAE on `device`, eval mode; its metadata). `site`: the
    command's settings (any ForeignSite) naming what a foreign file does not."""
    fmt = detect_format(path)
    if fmt is None:
        raise DataError(f"ckpt={path}: not a saekit run folder or checkpoint, nor a SAELens or sparsify folder, "
                        f"Gemma Scope .npz or OpenAI .pt")
    if fmt == "saekit":
        if site.model is not None or site.hook is not None or site.hook_out is not None:
            raise ConfigError(f"ckpt={path} is a saekit checkpoint, which records its model and hook; drop model= "
                              f"and hook= (they are for foreign SAE files)")
        return load_sae(path / SAE_FILE if path.is_dir() else path, device)
    imported = read_foreign(path, fmt)
    return imported.sae.to(device).eval(), imported_meta(imported, site)
