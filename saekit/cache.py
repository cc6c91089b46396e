"""Content-addressed activation cache: sharded safetensors files plus a manifest.

Layout: `<cache.dir>/<key>/{manifest.json, train_00000.safetensors, …, eval_00000.safetensors, tokens_train.safetensors,
tokens_eval.safetensors}`. The key hashes the model's identity, the hook, the data fingerprint and the storage
settings, so the same model/hook/data reuses a cache and any change builds a new one. A cache is built in a
temporary folder and renamed into place only after its manifest (with every file's size and sha256) is
written, so an interrupted build is never used. A file lock keeps parallel jobs from building one key twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from saekit import __version__
from saekit.config import SiteConfig
from saekit.data import data_fingerprint, load_windows
from saekit.fileutil import sha256_file
from saekit.errors import DataError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# numpy has no bfloat16: those shards are mapped as uint16 and viewed as bfloat16 by torch.
_NUMPY_STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}


def cache_key(model_identity: dict, model_dtype: str, hook: str, fingerprint: dict, dtype: str, exclude_bos: bool) -> str:
    """Content address of a cache: sha256 over everything that decides its contents."""
    spec = {"format": CACHE_FORMAT, "model": model_identity, "model_dtype": model_dtype, "hook": hook,
            "data": fingerprint, "dtype": dtype, "exclude_bos": exclude_bos}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]




def excludes_bos(data) -> bool:
    """The first position is dropped only when it is the BOS token (windows start with it)."""
    return data.exclude_bos and data.prepend_bos


def _safetensors_memmap(path: Path, name: str) -> np.memmap:
    """Memory-map one tensor of a safetensors file (header: u64 length, JSON, then raw little-endian data)."""
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    entry = header[name]
    start, _ = entry["data_offsets"]
    return np.memmap(path, dtype=_NUMPY_STORAGE[entry["dtype"]], mode="r", offset=8 + header_len + start,
                     shape=tuple(entry["shape"]))


@dataclass
class ActivationCache:
    """A validated cache folder: memory-mapped activation shards and token windows per split."""

    root: Path
    manifest: dict

    @property
    def d(self) -> int:
        return int(self.manifest["d"])

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.manifest["dtype"]]

    def n_acts(self, split: str) -> int:
        return int(self.manifest["splits"][split]["n_acts"])

    def shards(self, split: str) -> list[np.memmap]:
        return [_safetensors_memmap(self.root / shard["file"], "acts") for shard in self.manifest["splits"][split]["shards"]]

    def tokens(self, split: str) -> torch.Tensor:
        array = _safetensors_memmap(self.root / f"tokens_{split}.safetensors", "tokens")
        return torch.from_numpy(np.array(array)).long()

    def to_torch(self, rows: np.ndarray) -> torch.Tensor:
        """Rows read from a shard as a float32 tensor (bfloat16 shards are stored as uint16)."""
        if not rows.flags.writeable:  # a view into the read-only memory map: copy it out
            rows = np.array(rows)
        tensor = torch.from_numpy(np.ascontiguousarray(rows))
        if self.manifest["dtype"] == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return tensor.float()

    def iter_split(self, split: str, batch_size: int) -> Iterator[torch.Tensor]:
        """All activations of a split in order, `batch_size` rows at a time (float32)."""
        for shard in self.shards(split):
            for start in range(0, shard.shape[0], batch_size):
                yield self.to_torch(shard[start:start + batch_size])


def open_cache(root: Path, verify: bool) -> ActivationCache:
    """Open a finished cache folder, checking every file against the manifest."""
    manifest_path = root / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cache {root}: manifest.json is missing or unreadable; delete the folder and run `saekit cache` again") from exc
    for entry in manifest["files"]:
        path = root / entry["file"]
        problem = None
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != entry["bytes"]:
            problem = f"has {path.stat().st_size} bytes, manifest says {entry['bytes']}"
        elif verify and sha256_file(path) != entry["sha256"]:
            problem = "has a different sha256 than the manifest"
        if problem:
            raise DataError(
                f"cache {root}: {entry['file']} {problem}; delete the folder and run `saekit cache` again (or train, which rebuilds it)"
            )
    return ActivationCache(root=root, manifest=manifest)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file, so parallel jobs wait for one builder instead of racing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _ShardWriter:
    """Appends activation rows and writes a shard file whenever `shard_rows` are buffered.

    Files are written and hashed by a background thread while the model runs the next batches; at most
    `max_pending` shards wait in memory, so a slow disk slows the build instead of filling memory.
    """

    max_pending = 2

    def __init__(self, folder: Path, split: str, shard_rows: int, dtype: torch.dtype):
        self.folder, self.split, self.shard_rows, self.dtype = folder, split, shard_rows, dtype
        self.pending: list[torch.Tensor] = []
        self.pending_rows = 0
        self.shards: list[dict] = []
        self.files: list[dict] = []
        self.sum_norm = 0.0
        self.n_rows = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saekit-cache-writer")
        self._writes: list[Future] = []

    def add(self, rows: torch.Tensor) -> None:
        self.sum_norm += float(rows.float().norm(dim=-1).double().sum())
        self.n_rows += rows.shape[0]
        self.pending.append(rows.to(self.dtype).cpu())
        self.pending_rows += rows.shape[0]
        while self.pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> None:
        """Write what is left and wait for every file; a failed write raises here."""
        try:
            if self.pending_rows:
                self._flush(self.pending_rows)
            for write in self._writes:
                self.files.append(write.result())
        finally:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Stop without writing what is buffered (the build failed; its folder is never used)."""
        for write in self._writes:
            write.cancel()
        self._pool.shutdown(wait=True)

    def _flush(self, n_rows: int) -> None:
        joined = torch.cat(self.pending)
        shard, rest = joined[:n_rows].contiguous(), joined[n_rows:]
        name = f"{self.split}_{len(self.shards):05d}.safetensors"
        self.shards.append({"file": name, "n_acts": int(shard.shape[0])})
        self.pending = [rest] if rest.shape[0] else []
        self.pending_rows = int(rest.shape[0])
        waiting = [write for write in self._writes if not write.done()]
        if len(waiting) >= self.max_pending:
            waiting[0].result()
        self._writes.append(self._pool.submit(_write_tensor_file, self.folder / name, "acts", shard))


def _write_tensor_file(path: Path, name: str, tensor: torch.Tensor) -> dict:
    """Write one safetensors file and describe it for the manifest (size and sha256)."""
    save_file({name: tensor}, str(path))
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _report_size(console_print: Callable[[str], None], root: Path, n_rows: int, d: int, dtype: str) -> None:
    """Say how large the cache will be before writing it, and refuse when the disk cannot hold it."""
    bytes_needed = n_rows * d * torch.tensor([], dtype=_TORCH_DTYPES[dtype]).element_size()
    free = shutil.disk_usage(root.parent if root.parent.exists() else Path(".")).free
    console_print(f"building activation cache: {n_rows:,} vectors x d={d} ({dtype}) = {bytes_needed / 2**20:,.1f} MiB at {root}")
    if bytes_needed > free:
        raise DataError(
            f"cache.dir={root.parent}: the cache needs {bytes_needed / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB are free; "
            f"free space, point cache.dir elsewhere or lower data.n_train_tokens"
        )


def _write_split(model, windows: torch.Tensor, hook: str, exclude_bos: bool, writer: _ShardWriter,
                 batch_windows: int, progress: Optional[Callable[[int], None]]) -> None:
    for start in range(0, windows.shape[0], batch_windows):
        batch = windows[start:start + batch_windows].to(model.device)
        acts = model.run_to_hook(batch, hook)
        if exclude_bos:
            acts = acts[:, 1:]
        writer.add(acts.reshape(-1, acts.shape[-1]))
        if progress:
            progress(batch.numel())


def build_cache(cfg: SiteConfig, model, final: Path, n_tokens: int,
                console_print: Callable[[str], None] = print,
                progress_factory: Optional[Callable] = None) -> None:
    """Run the model over the token windows and write the cache into `final`, atomically."""
    model.check_hook(cfg.hook_name)
    windows = load_windows(cfg.data, model.tokenizer, model.bos_token_id, n_tokens)
    write_cache(cfg, model, windows, final, n_tokens, console_print, progress_factory)


def write_cache(cfg: SiteConfig, model, windows, final: Path, n_tokens: int,
                console_print: Callable[[str], None] = print,
                progress_factory: Optional[Callable] = None) -> dict:
    """The cache of `windows` (train and eval token windows) at `final`; returns its manifest."""
    hook = cfg.hook_name
    d = model.hook_width(hook)
    per_window = cfg.data.ctx_len - (1 if excludes_bos(cfg.data) else 0)
    n_rows = {split: int(w.shape[0]) * per_window for split, w in (("train", windows.train), ("eval", windows.eval))}
    _report_size(console_print, final, n_rows["train"] + n_rows["eval"], d, cfg.cache.dtype)

    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = _TORCH_DTYPES[cfg.cache.dtype]
    shard_rows = max(1, cfg.cache.shard_mb * 2**20 // (d * torch.tensor([], dtype=dtype).element_size()))
    splits, files = {}, []
    total_tokens = windows.train.numel() + windows.eval.numel()
    started = time.perf_counter()
    with (progress_factory(total_tokens) if progress_factory else _null_progress()) as advance:
        for split, split_windows in (("train", windows.train), ("eval", windows.eval)):
            files.append(_write_tensor_file(tmp / f"tokens_{split}.safetensors", "tokens",
                                            split_windows.to(torch.int32).contiguous()))
            writer = _ShardWriter(tmp, split, shard_rows, dtype)
            try:
                _write_split(model, split_windows, hook, excludes_bos(cfg.data), writer, cfg.cache.batch_windows, advance)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            files.extend(writer.files)
            splits[split] = {"n_acts": writer.n_rows, "n_tokens": int(split_windows.numel()),
                             "n_windows": int(split_windows.shape[0]), "shards": writer.shards,
                             "mean_norm": writer.sum_norm / max(writer.n_rows, 1)}
    elapsed = time.perf_counter() - started
    manifest = {
        "format": CACHE_FORMAT,
        "saekit_version": __version__,
        "key": final.name,
        "model": model.identity,
        "model_name": model.name,
        "hook": hook,
        "d": d,
        "dtype": cfg.cache.dtype,
        "normalization": "none (raw activations; saekit normalizes at training time and stores the scale in the checkpoint)",
        "ctx_len": cfg.data.ctx_len,
        "prepend_bos": cfg.data.prepend_bos,
        "exclude_bos": excludes_bos(cfg.data),
        "data": data_fingerprint(cfg.data, n_tokens),
        "data_name": cfg.data.name,
        "splits": splits,
        "files": sorted(files, key=lambda entry: entry["file"]),
        "build_seconds": round(elapsed, 3),
        "build_tokens_per_s": round(total_tokens / max(elapsed, 1e-9), 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # The manifest is written last and the folder renamed into place: a half-written cache has neither.
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, final)
    return manifest


@contextmanager
def _null_progress():
    yield None


def ensure_cache(cfg: SiteConfig, n_tokens: int, load_model_fn: Callable[[], object],
                 console_print: Callable[[str], None] = print,
                 progress_factory: Optional[Callable] = None) -> ActivationCache:
    """Reuse the cache for (model, hook, data) if one is complete, else build it (holding a lock)."""
    from saekit.model import model_identity

    identity = model_identity(cfg.model)
    key = cache_key(identity, cfg.model.dtype, cfg.hook_name, data_fingerprint(cfg.data, n_tokens), cfg.cache.dtype,
                    excludes_bos(cfg.data))
    root = Path(cfg.cache.dir).expanduser()
    final = root / key
    with _locked(root / f".{key}.lock"):
        if (final / MANIFEST).is_file():
            console_print(f"reusing activation cache {final}")
            return open_cache(final, cfg.cache.verify)
        for stale in root.glob(f".{key}.tmp-*"):  # left by a killed build; we hold the lock, so nobody owns it
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a folder without a manifest is never a usable cache
            shutil.rmtree(final)
        build_cache(cfg, load_model_fn(), final, n_tokens, console_print, progress_factory)
    return open_cache(final, verify=False)
