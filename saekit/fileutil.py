"""Small file helpers shared by the cache, the data fingerprint, the model identity and run folders."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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
    tmp.write_text(json.dumps({"status": status, **facts}, indent=2))
    os.replace(tmp, run_dir / STATUS_FILE)
