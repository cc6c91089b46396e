"""Small file helpers shared by the cache, the data fingerprint, the model identity and run folders."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Optional

STATUS_FILE = "status.json"
"""A run folder's state: {"status": "running" | "done" | "failed", "error": ..., ...}."""


def sha256_file(path: Path, advance: Optional[Callable[[int], None]] = None) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks; `advance(n_bytes)` after each chunk (progress bars)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
            if advance is not None:
                advance(len(chunk))
    return digest.hexdigest()


class HashMemo:
    """sha256 of input files (model weights, text), remembered by each file's stat signature.

    Hashing a model's weights or a large corpus on every run costs minutes at real scale; a file whose size,
    mtime, ctime and inode are unchanged is taken to hold the same bytes (what make and rsync assume). The memo
    lives in one JSON file (inside the cache root) and is rewritten atomically; `path=None` keeps it in memory.
    """

    def __init__(self, path: Optional[Path] = None):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.hashed = 0
        """Files actually read and hashed by this memo (the rest were remembered)."""
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):  # a damaged memo only costs a re-hash
                self.entries = {}

    @staticmethod
    def _signature(path: Path) -> list[int]:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]

    def sha256(self, path: Path) -> str:
        key = str(Path(path).resolve())
        signature = self._signature(Path(path))
        known = self.entries.get(key)
        if known is not None and known.get("stat") == signature:
            return known["sha256"]
        digest = sha256_file(Path(path))
        self.hashed += 1
        self.entries[key] = {"stat": signature, "sha256": digest}
        self._save()
        return digest

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError:  # a read-only or full cache root: the memo just does not persist (nor its half-written copy)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def file_sha256(path: Path, memo: Optional[HashMemo]) -> str:
    """sha256 of an input file, through `memo` when one is given."""
    return memo.sha256(path) if memo is not None else sha256_file(path)


def write_status(run_dir: Path, status: str, **facts) -> None:
    """Write the run folder's status.json atomically (a kill never leaves half a file)."""
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    try:
        tmp.write_text(json.dumps({"status": status, **facts}, indent=2))
        os.replace(tmp, run_dir / STATUS_FILE)
    except BaseException:  # a full disk: no half-written copy left beside the old status
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


# ---- a write the file system refused ------------------------------------------------------------------------
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""A full disk or an exhausted quota: the fix is room."""
DISK_ERRNOS = FULL_ERRNOS + (errno.EROFS, errno.EACCES, errno.EPERM)
"""What a full disk, a quota or a read-only / forbidden folder raise; each has a fix the user can apply."""


def disk_error(exc: OSError, setting: str, folder: Path):
    """One line (a DataError) for a write the file system refused: the setting and folder, the reason and the fix."""
    from saekit.errors import DataError

    reason = exc.strerror or type(exc).__name__
    if exc.errno in FULL_ERRNOS:
        fix = f"free space there or point {setting} at a disk with room"
    else:
        fix = f"point {setting} at a folder you can write to"
    return DataError(f"{setting}={folder}: cannot write there ({reason}); {fix}")


def is_disk_error(exc: BaseException, folder: Optional[Path] = None) -> bool:
    """Whether `exc` is a refused write (DISK_ERRNOS) of a file inside `folder` (of any file when None; an error
    without a file name counts as the folder's)."""
    if not isinstance(exc, OSError) or exc.errno not in DISK_ERRNOS:
        return False
    if folder is None or exc.filename is None:
        return True
    return Path(str(exc.filename)).resolve().is_relative_to(Path(folder).resolve())


def as_os_error(exc: BaseException, path: Path) -> Optional[OSError]:
    """safetensors reports the file system's refusal as text ('... I/O error: ... (os error 28)'): the OSError it
    stands for, naming `path`; None for any other error."""
    if isinstance(exc, OSError):
        return exc
    code = re.search(r"os error (\d+)", str(exc))
    if code is None:
        return None
    return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path))


def atomic_save_tensors(tensors: dict, path: Path, metadata: Optional[dict] = None,
                        save: Optional[Callable[..., None]] = None) -> None:
    """Write a safetensors file under a temporary name in the same folder, then rename it into place: a kill never
    leaves half a file at `path`, and a failed write (a full disk) removes its half-written temporary file instead of
    leaving it to hold the space. A refusal of the file system is an OSError naming `path` (see `as_os_error`).
    `save(tensors, filename, metadata=...)` writes the file (default: safetensors.torch.save_file)."""
    if save is None:
        from safetensors.torch import save_file as save
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            save(tensors, str(tmp), metadata=metadata)
        except Exception as exc:
            error = as_os_error(exc, path)
            if error is None or error is exc:
                raise
            raise error from exc
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
