"""Content-addressed activation cache: sharded safetensors files plus a manifest.

Layout: `<cache.dir>/<key>/{manifest.json, train_00000.safetensors, …, eval_00000.safetensors, tokens_train.safetensors,
tokens_eval.safetensors}`. The key hashes the model's identity, the hook, the data fingerprint and the storage
settings, so the same model/hook/data reuses a cache and any change builds a new one. A cache is built in a
temporary folder and renamed into place only after its manifest (with every file's size and sha256) is
written, so an interrupted build is never used. A file lock keeps parallel jobs from building one key twice.
Several hooks of one model are cached from one forward pass (`ensure_caches`), each into its own folder.

Transcoders (`hook_out` set) cache pairs: each row is [x | y], the activation at `hook` (d_in wide) followed by
the one at `hook_out` (d_out wide) of the same token, both from one forward pass. The loader, its shuffles, the
prefetcher and resuming see ordinary rows of width d_in + d_out; `ActivationCache.split` cuts them apart. The key
names both hooks (an SAE cache of `hook` keeps its own key), and the manifest records d_in, d_out and the mean
norm of each side (the transcoder's input and output scales).

A cache is hashed once, when it is built: opening it checks the manifest and file sizes only (cheap at any
size); `saekit cache verify <folder>` or `cache.verify=full` re-hashes every file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from saekit import __version__
from saekit.config import SiteConfig
from saekit.data import data_fingerprint, load_windows
from saekit.fileutil import DISK_ERRNOS, FULL_ERRNOS, HashMemo, as_os_error, disk_error, sha256_file
from saekit.errors import DataError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
HASH_MEMO = ".file_hashes.json"
"""In the cache root: sha256 of model and text files by stat signature, so unchanged inputs are not re-hashed."""
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# numpy has no bfloat16: those shards are mapped as uint16 and viewed as bfloat16 by torch.
_NUMPY_STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}


SPLITS = ("train", "eval")


def cache_key(model_identity: dict, model_dtype: str, hook: str, fingerprint: dict, dtype: str, exclude_bos: bool,
              splits: tuple[str, ...] = SPLITS, hook_out: Optional[str] = None) -> str:
    """Content address of a cache: sha256 over everything that decides its contents."""
    spec = {"format": CACHE_FORMAT, "model": model_identity, "model_dtype": model_dtype, "hook": hook,
            "data": fingerprint, "dtype": dtype, "exclude_bos": exclude_bos}
    if tuple(splits) != SPLITS:  # a cache of the held-out split only (streamed training); full caches keep their keys
        spec["splits"] = list(splits)
    if hook_out is not None:  # transcoder pairs; an SAE cache keeps the key it always had
        spec["hook_out"] = hook_out
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
        """Width of a stored row (d_in + d_out for transcoder pairs)."""
        return int(self.manifest["d"])

    @property
    def hook(self) -> str:
        return self.manifest["hook"]

    @property
    def hook_out(self) -> Optional[str]:
        """The predicted hook of a transcoder cache; None for an SAE cache."""
        return self.manifest.get("hook_out")

    @property
    def d_in(self) -> int:
        """Width of the activation at `hook` (what an SAE or a transcoder reads)."""
        return int(self.manifest.get("d_in", self.manifest["d"]))

    @property
    def d_out(self) -> Optional[int]:
        """Width of the activation at `hook_out`; None for an SAE cache."""
        return int(self.manifest["d_out"]) if self.manifest.get("d_out") is not None else None

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Rows (B, d) → (x (B, d_in), y (B, d_out)) for transcoder pairs; (rows, None) for an SAE cache."""
        if self.d_out is None:
            return rows, None
        return rows[:, :self.d_in], rows[:, self.d_in:]

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


def read_manifest(root: Path) -> dict:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
            raise ValueError("no file list")
    except (OSError, ValueError) as exc:
        raise DataError(f"cache {root}: manifest.json is missing or unreadable; delete the folder and run `saekit cache` "
                        f"again") from exc
    return manifest


def _file_problem(root: Path, entry: dict, rehash: bool, advance: Optional[Callable[[int], None]] = None) -> Optional[str]:
    """What is wrong with one manifest entry's file, or None."""
    path = root / entry["file"]
    if not path.is_file():
        return "is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"has {path.stat().st_size} bytes, manifest says {entry['bytes']}"
    if rehash:
        digest = sha256_file(path, advance)
        if digest != entry["sha256"]:
            return "has a different sha256 than the manifest"
    return None


def first_problem(root: Path, rehash: bool, advance: Optional[Callable[[int], None]] = None) -> Optional[str]:
    """The first file of the cache at `root` that does not match its manifest, as a phrase; None when all match.

    Without `rehash` only presence and sizes are checked (a cache is hashed once, when built); with it every
    file is read again and its sha256 compared, `advance(bytes)` reporting progress.
    """
    manifest = read_manifest(root)
    for entry in manifest["files"]:
        problem = _file_problem(root, entry, rehash, advance)
        if problem:
            return f"{entry['file']} {problem}"
    return None


def cache_bytes(manifest: dict) -> int:
    return sum(int(entry["bytes"]) for entry in manifest["files"])


def open_cache(root: Path, verify="size", advance: Optional[Callable[[int], None]] = None) -> ActivationCache:
    """Open a finished cache folder, checking the manifest and every file's size (`verify="full"`: and sha256)."""
    rehash = verify in (True, "full")
    problem = first_problem(root, rehash, advance)
    if problem:
        raise DataError(f"cache {root}: {problem}; delete the folder and run `saekit cache` again (or train, which "
                        f"rebuilds it)")
    return ActivationCache(root=root, manifest=read_manifest(root))


CACHE_LOCK_HEARTBEAT_S = 30.0
CACHE_LOCK_STALE_S = 600.0
"""A build lock of another host whose heartbeat has been silent this long is taken over (its node died)."""


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive build lock, so parallel jobs (on any node of a shared file system) wait for one builder instead
    of racing. A lock file created with O_EXCL (NFS-safe, unlike flock) with a heartbeat: see saekit.runlock."""
    from saekit.runlock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    command = "build the activation cache " + path.name.strip(".").removesuffix(".lock")
    with FileLock(path, command, wait_s=float("inf"), heartbeat_s=CACHE_LOCK_HEARTBEAT_S,
                  stale_after_s=CACHE_LOCK_STALE_S, setting="cache.dir"):
        yield


class _ShardWriter:
    """Appends activation rows and writes a shard file whenever `shard_rows` are buffered.

    Files are written and hashed by a background thread while the model runs the next batches; at most
    `max_pending` shards wait in memory, so a slow disk slows the build instead of filling memory.
    """

    max_pending = 2

    def __init__(self, folder: Path, split: str, shard_rows: int, dtype: torch.dtype, d_in: Optional[int] = None):
        self.folder, self.split, self.shard_rows, self.dtype = folder, split, shard_rows, dtype
        self.d_in = d_in
        """Transcoder pairs: the input's width; the mean norms of rows[:, :d_in] and rows[:, d_in:] are kept apart."""
        self.pending: list[torch.Tensor] = []
        self.pending_rows = 0
        self.shards: list[dict] = []
        self.files: list[dict] = []
        self.sum_norm = 0.0
        self.sum_norm_out = 0.0
        self.n_rows = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saekit-cache-writer")
        self._writes: list[Future] = []

    def add(self, rows: torch.Tensor) -> None:
        if self.d_in is None:
            self.sum_norm += float(rows.float().norm(dim=-1).double().sum())
        else:
            self.sum_norm += float(rows[:, :self.d_in].float().norm(dim=-1).double().sum())
            self.sum_norm_out += float(rows[:, self.d_in:].float().norm(dim=-1).double().sum())
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
    try:
        save_file({name: tensor}, str(path))
    except Exception as exc:  # safetensors reports the file system's refusal as text: "... (os error 28) ..."
        error = as_os_error(exc, path)
        if error is None or error is exc:
            raise
        raise error from exc
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _check_space(console_print: Callable[[str], None], finals: dict[str, Path], rows: int, widths: dict[str, int],
                 dtype: str, token_bytes: int) -> None:
    """Say how large the caches will be before writing them, and refuse when the disk cannot hold them."""
    element = torch.tensor([], dtype=_TORCH_DTYPES[dtype]).element_size()
    needed = sum(rows * width * element + token_bytes for width in widths.values())
    some_final = next(iter(finals.values()))
    free = shutil.disk_usage(some_final.parent if some_final.parent.exists() else Path(".")).free
    for hook, final in finals.items():
        console_print(f"building activation cache: {rows:,} vectors x d={widths[hook]} ({dtype}) = "
                      f"{rows * widths[hook] * element / 2**20:,.1f} MiB for {hook} at {final}")
    if needed > free:
        raise DataError(
            f"cache.dir={some_final.parent}: the cache needs {needed / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB are "
            f"free; free space, point cache.dir elsewhere or lower data.n_train_tokens"
        )


def _write_split(model, windows: torch.Tensor, writers: dict[str, _ShardWriter], exclude_bos: bool,
                 batch_windows: int, progress: Optional[Callable[[int], None]],
                 hook_out: Optional[str] = None) -> None:
    """One forward pass per batch of windows, up to the deepest hook; each hook's rows go to its writer (with
    `hook_out`, each row is [x | y]: the hook's activation then hook_out's, of the same token)."""
    hooks = list(writers)
    wanted = hooks + ([hook_out] if hook_out is not None and hook_out not in hooks else [])
    for start in range(0, windows.shape[0], batch_windows):
        batch = windows[start:start + batch_windows].to(model.device)
        acts_at = model.run_to_hooks(batch, wanted)
        for hook in hooks:
            acts = acts_at[hook] if hook_out is None else torch.cat([acts_at[hook], acts_at[hook_out]], dim=-1)
            if exclude_bos:
                acts = acts[:, 1:]
            writers[hook].add(acts.reshape(-1, acts.shape[-1]))
        if progress:
            progress(batch.numel())


def build_cache(cfg: SiteConfig, model, final: Path, n_tokens: int,
                console_print: Callable[[str], None] = print,
                progress_factory: Optional[Callable] = None) -> None:
    """Run the model over the token windows and write the cache into `final`, atomically."""
    if cfg.hook_out is not None:
        model.check_transcoder_hooks(cfg.hook_name, cfg.hook_out)
    else:
        model.check_hook(cfg.hook_name)
    windows = load_windows(cfg.data, model.tokenizer, model.bos_token_id, n_tokens)
    write_cache(cfg, model, windows, final, n_tokens, console_print, progress_factory)


def write_cache(cfg: SiteConfig, model, windows, final: Path, n_tokens: int,
                console_print: Callable[[str], None] = print,
                progress_factory: Optional[Callable] = None) -> dict:
    """The cache of `windows` (train and eval token windows) at `final`; returns its manifest."""
    return write_caches(cfg, model, windows, {cfg.hook_name: final}, n_tokens, console_print, progress_factory)[cfg.hook_name]


def write_caches(cfg: SiteConfig, model, windows, finals: dict[str, Path], n_tokens: int,
                 console_print: Callable[[str], None] = print, progress_factory: Optional[Callable] = None,
                 splits: tuple[str, ...] = SPLITS, fingerprint: Optional[dict] = None) -> dict[str, dict]:
    """One cache per hook in `finals` ({hook: folder}) from a single pass of the model over `windows`.

    Each folder holds exactly what a single-hook build of that hook writes (same shards, same bytes; only the
    manifest's timing fields differ). Every cache is built in a temporary folder and renamed into place after its
    manifest is written; a failed build removes its temporary folders. Returns {hook: manifest}.
    """
    fingerprint = fingerprint if fingerprint is not None else data_fingerprint(cfg.data, n_tokens)
    d_out = model.hook_width(cfg.hook_out) if cfg.hook_out is not None else None
    inputs = {hook: model.hook_width(hook) for hook in finals}
    widths = {hook: width + (d_out or 0) for hook, width in inputs.items()}
    per_window = cfg.data.ctx_len - (1 if excludes_bos(cfg.data) else 0)
    split_windows = {split: getattr(windows, split) for split in splits}
    rows = sum(int(w.shape[0]) * per_window for w in split_windows.values())
    token_bytes = sum(w.numel() * 4 for w in split_windows.values())
    _check_space(console_print, finals, rows, widths, cfg.cache.dtype, token_bytes)
    tmps = {hook: final.parent / f".{final.name}.tmp-{os.getpid()}" for hook, final in finals.items()}
    try:
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        started = time.perf_counter()
        files, split_facts = _write_splits(cfg, model, split_windows, tmps, widths, progress_factory,
                                           inputs if d_out is not None else None)
        elapsed = time.perf_counter() - started
        total_tokens = sum(w.numel() for w in split_windows.values())
        manifests = {}
        for hook, final in finals.items():
            manifests[hook] = {
                "format": CACHE_FORMAT,
                "saekit_version": __version__,
                "key": final.name,
                "model": model.identity,
                "model_name": model.name,
                "hook": hook,
                **({"hook_out": cfg.hook_out, "d_in": inputs[hook], "d_out": d_out} if d_out is not None else {}),
                "d": widths[hook],
                "dtype": cfg.cache.dtype,
                "normalization": "none (raw activations; saekit normalizes at training time and stores the scale in the "
                                 "checkpoint)",
                "ctx_len": cfg.data.ctx_len,
                "prepend_bos": cfg.data.prepend_bos,
                "exclude_bos": excludes_bos(cfg.data),
                "data": fingerprint,
                "data_name": cfg.data.name,
                "splits": split_facts[hook],
                "files": sorted(files[hook], key=lambda entry: entry["file"]),
                "build_seconds": round(elapsed, 3),
                "build_tokens_per_s": round(total_tokens / max(elapsed, 1e-9), 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            # The manifest is written last and the folder renamed into place: a half-written cache has neither.
            (tmps[hook] / MANIFEST).write_text(json.dumps(manifests[hook], indent=2))
            os.replace(tmps[hook], final)
        return manifests
    except BaseException:
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_splits(cfg: SiteConfig, model, split_windows: dict[str, torch.Tensor], tmps: dict[str, Path],
                  widths: dict[str, int], progress_factory: Optional[Callable],
                  pair_inputs: Optional[dict[str, int]] = None) -> tuple[dict, dict]:
    """Token files and activation shards of every split for every hook; returns ({hook: files}, {hook: splits}).
    pair_inputs: transcoder pairs, {hook: d_in} (rows are [x | y] of cfg.hook_out)."""
    dtype = _TORCH_DTYPES[cfg.cache.dtype]
    element = torch.tensor([], dtype=dtype).element_size()
    files: dict[str, list] = {hook: [] for hook in tmps}
    facts: dict[str, dict] = {hook: {} for hook in tmps}
    total_tokens = sum(w.numel() for w in split_windows.values())
    with (progress_factory(total_tokens) if progress_factory else _null_progress()) as advance:
        for split, windows in split_windows.items():
            writers = {}
            for hook, tmp in tmps.items():
                files[hook].append(_write_tensor_file(tmp / f"tokens_{split}.safetensors", "tokens",
                                                      windows.to(torch.int32).contiguous()))
                shard_rows = max(1, cfg.cache.shard_mb * 2**20 // (widths[hook] * element))
                writers[hook] = _ShardWriter(tmp, split, shard_rows, dtype, (pair_inputs or {}).get(hook))
            try:
                _write_split(model, windows, writers, excludes_bos(cfg.data), cfg.cache.batch_windows, advance,
                             cfg.hook_out if pair_inputs else None)
            except BaseException:
                for writer in writers.values():
                    writer.abort()
                raise
            for hook, writer in writers.items():
                writer.close()
                files[hook].extend(writer.files)
                facts[hook][split] = {"n_acts": writer.n_rows, "n_tokens": int(windows.numel()),
                                      "n_windows": int(windows.shape[0]), "shards": writer.shards,
                                      "mean_norm": writer.sum_norm / max(writer.n_rows, 1)}
                if writer.d_in is not None:  # the output side's mean norm, for its own scale
                    facts[hook][split]["mean_norm_out"] = writer.sum_norm_out / max(writer.n_rows, 1)
    return files, facts


@contextmanager
def _null_progress():
    yield None


def cache_keys(cfg: SiteConfig, n_tokens: int, splits: tuple[str, ...] = SPLITS,
               memo: Optional[HashMemo] = None) -> dict[str, str]:
    """{hook: cache key} for every hook of cfg (what a disk cache of that hook is, or would be, named)."""
    from saekit.model import model_identity

    memo = memo if memo is not None else HashMemo(Path(cfg.cache.dir).expanduser() / HASH_MEMO)
    identity = model_identity(cfg.model, memo)
    fingerprint = data_fingerprint(cfg.data, n_tokens, memo)
    return {hook: cache_key(identity, cfg.model.dtype, hook, fingerprint, cfg.cache.dtype, excludes_bos(cfg.data),
                            splits, cfg.hook_out)
            for hook in cfg.hook_names}


def ensure_cache(cfg: SiteConfig, n_tokens: int, load_model_fn: Callable[[], object],
                 console_print: Callable[[str], None] = print,
                 progress_factory: Optional[Callable] = None, splits: tuple[str, ...] = SPLITS) -> ActivationCache:
    """Reuse the cache for (model, hook, data) if one is complete, else build it (holding a lock)."""
    return ensure_caches(cfg, n_tokens, load_model_fn, console_print, progress_factory, splits)[0]


def ensure_caches(cfg: SiteConfig, n_tokens: int, load_model_fn: Callable[[], object],
                  console_print: Callable[[str], None] = print, progress_factory: Optional[Callable] = None,
                  splits: tuple[str, ...] = SPLITS) -> list[ActivationCache]:
    """One cache per hook of `cfg` (in `cfg.hook_names` order): complete ones are reused, the missing ones are
    built together from one pass of the model. Each cache's lock is held meanwhile, so parallel jobs wait.

    `splits=("eval",)` asks only for the held-out split: a full cache of the same data is used when one exists.
    A full or read-only disk is a DataError naming cache.dir (a failed build has already removed its temporary
    folders).
    """
    from saekit.model import check_context_length, context_limit

    # Before anything is hashed, built or written: a local model's config says how many positions it handles.
    check_context_length(cfg.model.short_name, cfg.data.ctx_len, context_limit(cfg.model))
    root = Path(cfg.cache.dir).expanduser()
    try:
        return _ensure_caches(cfg, n_tokens, load_model_fn, console_print, progress_factory, splits, root)
    except OSError as exc:
        elsewhere = exc.filename is not None and not Path(exc.filename).resolve().is_relative_to(root.resolve())
        if exc.errno not in _DISK_ERRNOS or elsewhere:  # e.g. an unreadable text file: not the cache folder's fault
            raise
        raise disk_error(exc, "cache.dir", root) from exc


# Kept here for code that imported them from saekit.cache; they live in saekit.fileutil (shared with run folders).
_FULL_ERRNOS, _DISK_ERRNOS = FULL_ERRNOS, DISK_ERRNOS


def _ensure_caches(cfg: SiteConfig, n_tokens: int, load_model_fn: Callable[[], object],
                   console_print: Callable[[str], None], progress_factory: Optional[Callable],
                   splits: tuple[str, ...], root: Path) -> list[ActivationCache]:
    from saekit.model import check_context_length

    memo = HashMemo(root / HASH_MEMO)
    fingerprint = data_fingerprint(cfg.data, n_tokens, memo)
    hooks = cfg.hook_names
    keys, full_keys = cache_keys(cfg, n_tokens, splits, memo), cache_keys(cfg, n_tokens, SPLITS, memo)
    finals = {hook: root / keys[hook] for hook in hooks}
    ready: dict[str, ActivationCache] = {}
    with ExitStack() as locks:
        for key in sorted({final.name for final in finals.values()}):  # one order everywhere: no deadlock
            locks.enter_context(_locked(root / f".{key}.lock"))
        missing = {}
        for hook, final in finals.items():
            candidates = [final] + ([root / full_keys[hook]] if tuple(splits) != SPLITS else [])
            found = next((c for c in candidates if (c / MANIFEST).is_file()), None)
            if found is not None:
                console_print(f"reusing activation cache {found}")
                ready[hook] = open_cache(found, cfg.cache.verify)
                continue
            for stale in root.glob(f".{final.name}.tmp-*"):  # left by a killed build; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # a folder without a manifest is never a usable cache
                shutil.rmtree(final)
            missing[hook] = final
        if missing:
            model = load_model_fn()
            check_context_length(model.name, cfg.data.ctx_len, getattr(model, "n_ctx", None))  # hub models
            for hook in missing:
                if cfg.hook_out is not None:
                    model.check_transcoder_hooks(hook, cfg.hook_out)
                else:
                    model.check_hook(hook)
            windows = load_windows(cfg.data, model.tokenizer, model.bos_token_id, n_tokens)
            write_caches(cfg, model, windows, missing, n_tokens, console_print, progress_factory, splits, fingerprint)
            for hook, final in missing.items():
                ready[hook] = open_cache(final, "size")
    return [ready[hook] for hook in hooks]
