"""The one CSV writer the issue-11 bench scripts share: rows (name, value, unit) merged into one table."""

from __future__ import annotations

import csv
import os
from pathlib import Path

HEADER = ("name", "value", "unit")


def merge_rows(path: Path, rows: list[tuple[str, float, str]]) -> None:
    """Write `rows` into the CSV at `path`, replacing rows of the same name and keeping the others (atomic)."""
    kept: dict[str, tuple] = {}
    if path.is_file():
        with open(path, newline="") as handle:
            kept = {row["name"]: (row["name"], row["value"], row["unit"]) for row in csv.DictReader(handle)}
    for name, value, unit in rows:
        kept[name] = (name, value, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(kept.values())
    os.replace(tmp, path)
