"""Checkpoints as safetensors (no pickle on any load path), written atomically.

- `sae.safetensors`: the SAE's weights and buffers; metadata["saekit"] holds the SAESpec and run facts as JSON.
- `checkpoints/state.safetensors`: the same weights plus Adam moments, the dead-latent counters and the step,
  enough to resume a killed run bit for bit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from saekit.errors import DataError
from saekit.sae import SAESpec, SparseAutoencoder, build_sae

SAE_FILE = "sae.safetensors"
STATE_FILE = "checkpoints/state.safetensors"


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same folder, then rename: a kill never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


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
    return json.loads(raw)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"ckpt={path}: the file is corrupt or truncated ({exc}); retrain or restore it") from exc


def load_sae(path: Path, device: torch.device | str = "cpu") -> tuple[SparseAutoencoder, dict]:
    """Rebuild an SAE from a checkpoint file; returns it with its metadata."""
    meta = read_metadata(path)
    sae = build_sae(SAESpec.from_dict(meta["spec"]))
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


def train_state_tensors(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
                        counters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAE weights (`sae.*`), Adam state by parameter name (`adam.<param>.<key>`) and counters (`counter.*`)."""
    tensors = {f"sae.{name}": t for name, t in sae.state_dict().items()}
    names = {id(p): name for name, p in sae.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                tensors[f"adam.{names[id(param)]}.{key}"] = torch.as_tensor(value)
    tensors.update({f"counter.{name}": t for name, t in counters.items()})
    return tensors


def save_train_state(path: Path, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
                     counters: dict[str, torch.Tensor], facts: dict) -> None:
    """SAE weights, Adam state (by parameter name) and counters in one file, so they always agree."""
    atomic_save(train_state_tensors(sae, optimizer, counters), path, _metadata(sae, facts))


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
        return cls(run_dir / STATE_FILE, state, _metadata(sae, state_facts), run_dir / SAE_FILE,
                   _metadata(sae, sae_facts))

    def write(self) -> None:
        atomic_save(self.state, self.state_path, self.state_metadata)
        weights = {name[4:]: t for name, t in self.state.items() if name.startswith("sae.")}
        atomic_save(weights, self.sae_path, self.sae_metadata)


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.clone().contiguous() if tensor.device.type == "cpu" else tensor.contiguous().cpu()


def load_train_state(path: Path, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Restore weights and Adam state in place; returns (counters, facts)."""
    facts = read_metadata(path)
    tensors = _load_tensors(path)
    sae.load_state_dict({name[4:]: t for name, t in tensors.items() if name.startswith("sae.")})
    params = dict(sae.named_parameters())
    # A fused (or capturable) Adam keeps its step count on the parameter's device; the plain one on the host.
    step_on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    for name, param in params.items():
        moments = {key.rsplit(".", 1)[1]: t for key, t in tensors.items() if key.startswith(f"adam.{name}.")}
        if moments:
            optimizer.state[param] = {key: t.to(param.device) if key != "step" or step_on_device else t
                                      for key, t in moments.items()}
    counters = {name[8:]: t for name, t in tensors.items() if name.startswith("counter.")}
    return counters, facts
