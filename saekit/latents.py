"""Per-latent firing statistics: a Parquet table and the feature-density histogram (log10 firing rate)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import torch

from saekit.metrics import ReconstructionStats

LATENT_TABLE = "latents.parquet"
DENSITY_PLOT = "feature_density.png"


def latent_table(stats: ReconstructionStats) -> pd.DataFrame:
    """latent, fire_count, density (fraction of tokens it fires on), mean_activation (over the tokens it fires on).

    The statistics were accumulated on the evaluation device; only these n-sized vectors come to the CPU.
    """
    counts = stats.fire_counts.detach().cpu().double()
    return pd.DataFrame({
        "latent": torch.arange(counts.numel()).numpy(),
        "fire_count": counts.long().numpy(),
        "density": (counts / max(stats.n_tokens, 1)).numpy(),
        "mean_activation": (stats.sum_acts.detach().cpu().double() / counts.clamp_min(1)).numpy(),
    })


def write_latent_table(table: pd.DataFrame, folder: Path) -> Path:
    path, tmp = folder / LATENT_TABLE, folder / f".{LATENT_TABLE}.tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def agg_figure(figsize: tuple[float, float]):
    """A matplotlib Figure drawn by the Agg canvas: PNGs without pyplot, so the caller's backend (a notebook's, a
    GUI's) and pyplot's figure list are left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_density_histogram(table: pd.DataFrame, n_tokens: int, folder: Path, title: str) -> Path:
    """Histogram of log10 firing rate over the alive latents; the dead count is stated in the legend."""
    alive = table[table["density"] > 0]["density"]
    dead = int((table["density"] == 0).sum())
    fig = agg_figure((6, 3.5))
    ax = fig.subplots()
    floor = math.log10(1 / max(n_tokens, 1))
    ax.hist(alive.map(math.log10), bins=50, range=(floor, 0), color="#4c72b0",
            label=f"{len(alive)} alive, {dead} dead (never fired in {n_tokens:,} tokens)")
    ax.set_xlabel("log10 firing rate")
    ax.set_ylabel("latents")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path, tmp = folder / DENSITY_PLOT, folder / f".{DENSITY_PLOT}.tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path
