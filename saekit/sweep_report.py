"""`saekit report <sweep folder>`: Pareto frontiers, progressive-code curves, a power-law fit and report.md.

Reads the sweep's tidy table (built from the job folders when it is missing), keeps the `ok` runs, and
writes into the folder: `pareto_nmse_l0.png`, `pareto_delta_ce_l0.png` (when runs have delta_ce),
`progressive.png` (when runs have k_prime / theta rows) and `report.md`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from saekit.errors import DataError
from saekit.latents import agg_figure
from saekit.sweep import collect_sweep

SETTING_COLUMNS = ("activation", "k", "lam", "n")


def load_sweep(folder: Path) -> pd.DataFrame:
    path = folder / "results.csv"
    if path.is_file():
        return pd.read_csv(path)
    try:
        return collect_sweep(folder)
    except FileNotFoundError as exc:
        raise DataError(f"{folder}: no results.csv and no sweep jobs below it; pass a sweep folder") from exc


def runs_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per ok run: its settings and its main metrics (progressive and per-prefix rows left out)."""
    main = table[table["status"] == "ok"] if "status" in table else table
    for column in ("k_prime", "theta", "prefix"):
        if column in main:
            main = main[main[column].isna()]
    wide = main.pivot_table(index="run_id", columns="metric", values="value", aggfunc="first")
    settings = main.groupby("run_id")[[c for c in SETTING_COLUMNS if c in main]].first()
    return settings.join(wide).reset_index()


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points not dominated (no other point has x ≤ and y ≤ with one strict), sorted by x."""
    ordered = points.sort_values([x, y])
    best, keep = math.inf, []
    for index, row in ordered.iterrows():
        if row[y] < best:
            keep.append(index)
            best = row[y]
    return ordered.loc[keep]


def fit_power_law(n: np.ndarray, loss: np.ndarray) -> Optional[dict]:
    """loss ≈ a · n^(−b) + c (c ≥ 0: the irreducible part), by a grid over c and least squares in log space."""
    if len(np.unique(n)) < 3:
        return None
    best = None
    for c in np.linspace(0, loss.min() * 0.999, 200):
        slope, intercept = np.polyfit(np.log(n), np.log(loss - c), 1)
        residual = np.sum((np.exp(intercept) * n ** slope + c - loss) ** 2)
        if best is None or residual < best["sse"]:
            best = {"a": float(np.exp(intercept)), "b": float(-slope), "c": float(c), "sse": float(residual)}
    return best


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def plot_pareto(runs: pd.DataFrame, metric: str, path: Path) -> None:
    fig = agg_figure((6, 4))
    ax = fig.subplots()
    for activation, group in runs.dropna(subset=[metric, "l0"]).groupby("activation"):
        ax.scatter(group["l0"], group[metric], s=18, alpha=0.5)
        front = pareto_front(group, "l0", metric)
        ax.plot(front["l0"], front[metric], marker="o", label=str(activation))
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs L0 (lines: Pareto frontier per architecture)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _run_label(table: pd.DataFrame, run_id: str) -> str:
    row = table[table["run_id"] == run_id].iloc[0]
    parts = [str(row.get("activation"))]
    for column in ("k", "lam", "n"):
        if column in row and pd.notna(row[column]):
            parts.append(f"{column}={row[column]:g}" if isinstance(row[column], float) else f"{column}={row[column]}")
    return " ".join(parts)


def plot_progressive(table: pd.DataFrame, path: Path) -> bool:
    if "k_prime" not in table or table["k_prime"].dropna().empty:
        return False
    rows = table[table["k_prime"].notna() & table["metric"].isin(["nmse", "l0"])]
    wide = rows.pivot_table(index=["run_id", "k_prime"], columns="metric", values="value").reset_index()
    fig = agg_figure((6, 4))
    ax = fig.subplots()
    for run_id, group in wide.groupby("run_id"):
        ax.plot(group["l0"], group["nmse"], marker="o", label=_run_label(table, run_id))
    ax.set_xscale("log")
    ax.set_xlabel("L0 at test time (k')")
    ax.set_ylabel("nmse")
    ax.set_title("progressive codes: TopK(k') at test time", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


def _markdown_table(frame: pd.DataFrame) -> str:
    columns = list(frame.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        cells = [f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else ("" if v is None or
                 (isinstance(v, float) and math.isnan(v)) else str(v)) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(folder: Path) -> Path:
    """All plots and report.md for a sweep folder; returns the report's path."""
    table = load_sweep(folder)
    runs = runs_table(table)
    if runs.empty:
        raise DataError(f"{folder}: the sweep has no finished runs to report on")
    lines = [f"# Sweep report: {folder.name}", ""]
    jobs = table.drop_duplicates("run_id")
    failed = jobs[jobs["status"] != "ok"] if "status" in jobs else jobs.iloc[0:0]
    lines.append(f"{len(jobs)} jobs: {len(jobs) - len(failed)} finished, {len(failed)} failed.")
    for _, job in failed.iterrows():
        lines.append(f"- failed: `{job['run_id']}`: {job.get('error', '')}")
    plot_pareto(runs, "nmse", folder / "pareto_nmse_l0.png")
    lines += ["", "## nmse vs L0", "", "![nmse vs L0](pareto_nmse_l0.png)", ""]
    if "delta_ce" in runs and runs["delta_ce"].notna().any():
        plot_pareto(runs, "delta_ce", folder / "pareto_delta_ce_l0.png")
        lines += ["## delta_ce vs L0", "", "![delta_ce vs L0](pareto_delta_ce_l0.png)", ""]
    if plot_progressive(table, folder / "progressive.png"):
        lines += ["## Progressive codes", "", "![progressive codes](progressive.png)", ""]
    lines += _fit_section(runs)
    shown = [c for c in ("run_id", "activation", "k", "lam", "n", "l0", "nmse", "delta_ce", "loss_recovered",
                         "dead_frac", "refine_ratio") if c in runs]
    lines += ["## Runs", "", _markdown_table(runs[shown].sort_values(["activation", "l0"])), ""]
    lines += _dashboard_section(folder, list(runs["run_id"]))
    path = folder / "report.md"
    tmp = folder / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


INSPECT_FOLDER = "inspect"
"""Where the report looks for a run's latent dashboard: <sweep>/<run>/inspect/index.html."""


def _dashboard_section(folder: Path, run_ids: list[str]) -> list[str]:
    """Links to the runs' `saekit inspect` dashboards, and the command that makes one for the others."""
    lines = ["## Latent dashboards", ""]
    made = [run for run in run_ids if (folder / run / INSPECT_FOLDER / "index.html").is_file()]
    lines += [f"- [{run}]({run}/{INSPECT_FOLDER}/index.html)" for run in made]
    if len(made) < len(run_ids):
        example = next(run for run in run_ids if run not in made)
        lines += ["", f"{len(run_ids) - len(made)} run(s) have none yet; for each, e.g. `saekit inspect "
                      f"ckpt={folder / example} hydra.run.dir={folder / example / INSPECT_FOLDER}` (then rerun "
                      f"`saekit report` to link it)."]
    return lines + [""]


def _fit_section(runs: pd.DataFrame) -> list[str]:
    lines = ["## nmse against n at fixed k: nmse ≈ a·n^(−b) + c", ""]
    found = False
    for (activation, k), group in runs.dropna(subset=["n", "nmse"]).groupby(["activation", "k"], dropna=True):
        fit = fit_power_law(group["n"].to_numpy(float), group["nmse"].to_numpy(float))
        if fit:
            found = True
            lines.append(f"- {activation}, k={k:g}: a = {fit['a']:.4g}, b = {fit['b']:.3f}, c = {fit['c']:.4g} "
                         f"({len(group)} runs, n = {', '.join(str(int(v)) for v in sorted(group['n']))})")
    if not found:
        lines.append("No (activation, k) has runs at three or more n; sweep n to get this fit.")
    return lines + [""]
