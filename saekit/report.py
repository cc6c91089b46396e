"""Tidy results tables (SPEC section 5) and the printed summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from rich.console import Console
from rich.table import Table

ID_COLUMNS = ("run_id", "model", "hook", "layer", "activation", "n", "k", "lam", "tokens")


def tidy_table(run: dict[str, Any], metrics: dict[str, float], overrides: Optional[dict[str, Any]] = None) -> pd.DataFrame:
    """One row per (run, metric): the SPEC's id columns, `metric`, `value`, then the overrides that made the run."""
    rows = []
    for metric, value in metrics.items():
        row = {column: run.get(column) for column in ID_COLUMNS}
        # Further id facts the run carries (a transcoder's hook_out and skip) follow the SPEC's columns.
        row.update({column: fact for column, fact in run.items() if column not in row})
        row.update(metric=metric, value=float(value))
        for key, override in (overrides or {}).items():
            if key not in row:  # swept id columns (k, n, lam, activation) already carry their value
                row[key] = override
        rows.append(row)
    return pd.DataFrame(rows)


def _stringify_mixed(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet needs one type per column; override columns may mix numbers and strings."""
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].dtype == object and frame[column].map(type).nunique() > 1:
            frame[column] = frame[column].map(lambda v: None if v is None else str(v))
    return frame


def write_table(frame: pd.DataFrame, folder: Path, stem: str = "results") -> Path:
    """`<stem>.csv` and `<stem>.parquet` in `folder`, each written to a temporary name and renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, parquet_path = folder / f"{stem}.csv", folder / f"{stem}.parquet"
    tmp_csv, tmp_parquet = folder / f".{stem}.csv.tmp", folder / f".{stem}.parquet.tmp"
    frame.to_csv(tmp_csv, index=False)
    _stringify_mixed(frame).to_parquet(tmp_parquet, index=False)
    os.replace(tmp_csv, csv_path)
    os.replace(tmp_parquet, parquet_path)
    return csv_path


def print_summary(console: Console, title: str, run: dict[str, Any], metrics: dict[str, float]) -> None:
    """A wide one-row-per-metric summary of one run."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("model", "hook", "hook_out", "skip", "activation", "n", "k", "lam", "tokens"):
        if run.get(key) is not None:
            table.add_row(f"[dim]{key}[/dim]", f"[dim]{run[key]}[/dim]")
    for metric, value in metrics.items():
        table.add_row(metric, f"{value:.4g}")
    console.print(table)
