"""Small file helpers shared by the cache, the data fingerprint, the model identity and run folders."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

STATUS_FILE = "status.json"
"""A run folder's state: {"status": "running" | "done" | "failed", "error": ..., ...}."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_status(run_dir: Path, status: str, **facts) -> None:
    """Write the run folder's status.json atomically (a kill never leaves half a file)."""
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps({"status": status, **facts}, indent=2))
    os.replace(tmp, run_dir / STATUS_FILE)
