"""Checkpoints as safetensors (no pickle on any load path), written atomically.

- `sae.safetensors`: the SAE's weights and buffers; metadata["saekit"] holds the SAESpec and run facts as JSON.
- `checkpoints/state.safetensors`: the same weights plus the optimizer's state (`optimizer.state_dict()`: its
  tensors by parameter name, the rest as JSON metadata), the dead-latent counters and the step, enough to resume a
  killed run bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from saekit.errors import DataError, SaekitError
from saekit.fileutil import atomic_save_tensors
from saekit.sae import SAESpec, SparseAutoencoder, build_sae

SAE_FILE = "sae.safetensors"
STATE_FILE = "checkpoints/state.safetensors"


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same folder, then rename: a kill never leaves a half file."""
    atomic_save_tensors({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, path, metadata,
                        save=save_file)


def _metadata(sae: SparseAutoencoder, facts: dict) -> dict[str, str]:
    return {"saekit": json.dumps({"spec": sae.spec.to_dict(), **facts})}


def save_sae(path: Path, sae: SparseAutoencoder, facts: dict) -> None:
    atomic_save(dict(sae.state_dict()), path, _metadata(sae, facts))


def read_metadata(path: Path) -> dict:
    """The saekit metadata of a checkpoint file, with one-line errors for missing or damaged files."""
    if not path.is_file():
        raise DataError(f"ckpt={path}: no such checkpoint file; pass a run folder or its sae.safetensors")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("saekit")
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"ckpt={path}: the file is corrupt or truncated ({exc}); retrain or restore it") from exc
    if raw is None:
        raise DataError(f"ckpt={path}: not a saekit checkpoint (no saekit metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"ckpt={path}: its saekit metadata is not valid JSON ({exc}); retrain or restore it") from exc
    if not isinstance(meta, dict):
        raise DataError(f"ckpt={path}: its saekit metadata is not a JSON object; retrain or restore it")
    return meta


def _spec_of(path: Path, meta: dict) -> SAESpec:
    """The SAESpec recorded in a checkpoint, checked enough that building the SAE cannot fail deep inside torch."""
    spec = meta.get("spec")
    if not isinstance(spec, dict):
        raise DataError(f"ckpt={path}: its metadata records no SAE spec; retrain or restore it")
    for key in ("d", "n"):
        value = spec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DataError(f"ckpt={path}: its spec has {key}={value!r} (must be a positive integer); retrain or "
                            f"restore it")
    try:
        return SAESpec.from_dict(spec)
    except (SaekitError, KeyError, TypeError, ValueError) as exc:  # an edited or foreign spec
        raise DataError(f"ckpt={path}: its spec cannot be read ({type(exc).__name__}: {exc}); retrain or restore "
                        f"it") from exc


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"ckpt={path}: the file is corrupt or truncated ({exc}); retrain or restore it") from exc


def load_sae(path: Path, device: torch.device | str = "cpu") -> tuple[SparseAutoencoder, dict]:
    """Rebuild an SAE from a checkpoint file; returns it with its metadata."""
    meta = read_metadata(path)
    spec = _spec_of(path, meta)
    try:
        sae = build_sae(spec)
    except (SaekitError, RuntimeError, TypeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise DataError(f"ckpt={path}: its spec does not build an SAE ({reason}); retrain or restore it") from exc
    tensors = _load_tensors(path)
    expected = set(sae.state_dict())
    if not expected <= set(tensors):
        raise DataError(f"ckpt={path}: missing tensors {sorted(expected - set(tensors))}; pass a run folder or its "
                        f"{SAE_FILE} (not the training state)")
    try:
        sae.load_state_dict({name: tensors[name] for name in expected})
    except RuntimeError as exc:  # shapes that disagree with the saved spec: an edited or mixed-up file
        raise DataError(f"ckpt={path}: its tensors do not match its own spec ({str(exc).splitlines()[-1].strip()}); "
                        f"retrain or restore it") from exc
    return sae.to(device).eval(), meta  # eval mode: BatchTopK applies its threshold instead of batch selection


def resolve_checkpoint(ckpt: str) -> Path:
    """A run folder or a checkpoint file → the `sae.safetensors` to load."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        if (path / SAE_FILE).is_file():
            return path / SAE_FILE
        raise DataError(f"ckpt={ckpt}: the folder has no {SAE_FILE}; pass a finished run folder or a checkpoint file")
    if not path.exists():
        raise DataError(f"ckpt={ckpt}: no such run folder or checkpoint file")
    return path


def resolve_checkpoints(ckpt: str) -> list[Path]:
    """A checkpoint file, a run folder, or a sweep folder (every run folder below it holding a checkpoint)."""
    path = Path(ckpt).expanduser()
    if path.is_dir() and not (path / SAE_FILE).is_file():
        found = sorted(p for p in path.rglob(SAE_FILE) if "checkpoints" not in p.relative_to(path).parts)
        if not found:
            raise DataError(f"ckpt={ckpt}: no {SAE_FILE} in the folder or below it; pass a finished run or sweep folder")
        return found
    return [resolve_checkpoint(ckpt)]


OPTIMIZER_KEY = "saekit_optimizer"
"""State-file metadata key of the optimizer's non-tensor state (JSON); its tensors are `adam.<param>.<key>`."""


def _param_names(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order `optimizer.state_dict()` numbers them (group after group)."""
    names = {id(p): name for name, p in sae.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def optimizer_state(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """`optimizer.state_dict()` split for safetensors: tensors named `adam.<param>.<key>` (by parameter name, so a
    file outlives a change in parameter order) and the non-tensor rest as a JSON-ready dict."""
    state = optimizer.state_dict()
    names = _param_names(sae, optimizer)
    tensors, other = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"adam.{names[index]}.{key}"] = value
            else:
                other.setdefault(names[index], {})[key] = value
    groups = [{key: value for key, value in group.items() if key != "params"} for group in state["param_groups"]]
    return tensors, {"state": other, "param_groups": groups}


def load_optimizer_state(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         extra: Optional[dict]) -> None:
    """Restore through `optimizer.load_state_dict`, which puts each value where this optimizer keeps it (a fused
    Adam's `step` on the parameter's device). Files from before `extra` existed hold only `adam.*` tensors."""
    extra = extra or {}
    names = _param_names(sae, optimizer)
    state: dict[int, dict] = {}
    for index, name in enumerate(names):
        values = {key.rsplit(".", 1)[1]: t for key, t in tensors.items() if key.startswith(f"adam.{name}.")
                  and "." not in key[len(f"adam.{name}."):]}
        values.update(extra.get("state", {}).get(name, {}))
        if values:
            state[index] = values
    current = optimizer.state_dict()["param_groups"]  # this run's hyperparameters (the fingerprint pins them)
    optimizer.load_state_dict({"state": state, "param_groups": current})


def train_state_tensors(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
                        counters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAE weights (`sae.*`), optimizer tensors by parameter name (`adam.<param>.<key>`) and counters (`counter.*`)."""
    tensors = {f"sae.{name}": t for name, t in sae.state_dict().items()}
    tensors.update(optimizer_state(sae, optimizer)[0])
    tensors.update({f"counter.{name}": t for name, t in counters.items()})
    return tensors


def _state_metadata(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, facts: dict) -> dict[str, str]:
    # default=str: a hyperparameter JSON cannot hold (none in Adam today) is kept as text rather than failing the save
    return {**_metadata(sae, facts), OPTIMIZER_KEY: json.dumps(optimizer_state(sae, optimizer)[1], default=str)}


def save_train_state(path: Path, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
                     counters: dict[str, torch.Tensor], facts: dict) -> None:
    """SAE weights, optimizer state (by parameter name) and counters in one file, so they always agree."""
    atomic_save(train_state_tensors(sae, optimizer, counters), path, _state_metadata(sae, optimizer, facts))


@dataclass
class Checkpoint:
    """A run's two checkpoint files as CPU copies taken at one step, written later (by a background thread while
    training goes on): the training state, then `sae.safetensors`, each atomically."""

    state_path: Path
    state: dict[str, torch.Tensor]
    state_metadata: dict[str, str]
    sae_path: Path
    sae_metadata: dict[str, str]

    @classmethod
    def take(cls, run_dir: Path, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
             counters: dict[str, torch.Tensor], state_facts: dict, sae_facts: dict) -> "Checkpoint":
        """Copy everything now (on CUDA the copy to the host is the snapshot; on CPU a clone)."""
        state = {name: _host_copy(t) for name, t in train_state_tensors(sae, optimizer, counters).items()}
        return cls(run_dir / STATE_FILE, state, _state_metadata(sae, optimizer, state_facts), run_dir / SAE_FILE,
                   _metadata(sae, sae_facts))

    def write(self) -> None:
        atomic_save(self.state, self.state_path, self.state_metadata)
        self.write_weights()

    def write_weights(self) -> None:
        """`sae.safetensors` alone (the state file is already this step's)."""
        weights = {name[4:]: t for name, t in self.state.items() if name.startswith("sae.")}
        atomic_save(weights, self.sae_path, self.sae_metadata)


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.clone().contiguous() if tensor.device.type == "cpu" else tensor.contiguous().cpu()


def _optimizer_metadata(path: Path) -> Optional[dict]:
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(OPTIMIZER_KEY)
    try:
        return None if raw is None else json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{path}: its optimizer metadata is not valid JSON; delete the file to start afresh, or "
                        f"resume=false") from exc


def load_train_state(path: Path, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Restore weights and optimizer state in place; returns (counters, facts)."""
    facts = read_metadata(path)
    tensors = _load_tensors(path)
    sae.load_state_dict({name[4:]: t for name, t in tensors.items() if name.startswith("sae.")})
    load_optimizer_state(sae, optimizer, tensors, _optimizer_metadata(path))
    counters = {name[8:]: t for name, t in tensors.items() if name.startswith("counter.")}
    return counters, facts
