"""Experiment tracking (`logger=none|wandb|tensorboard`): one tracker run per training job.

A tracker receives the run config at the start, every row of the step log (`steps.csv`) as it is written, and the
final results table; steps.csv and results.csv stay the record, the tracker is a view of them. wandb and
tensorboard are optional packages, imported only when a run asks for them.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from saekit.config import LoggerConfig
from saekit.errors import ConfigError

log = logging.getLogger(__name__)

# Columns of the results table that name a block of progressive-code or prefix rows (see tasks.result_frames).
_BLOCK_COLUMNS = ("k_prime", "theta", "prefix")


class Tracker:
    """The interface a tracker implements; each method here does nothing."""

    def log_config(self, config: dict) -> None:
        """The run's full config (dataclasses.asdict of its TrainConfig)."""

    def log_step(self, step: int, row: dict) -> None:
        """One row of the step log, at `step` (steps done)."""

    def log_table(self, frame: pd.DataFrame, step: int) -> None:
        """The run's final results table (tidy: one row per metric), reached at `step`."""

    def close(self, failed: bool = False) -> None:
        """Flush and finish the tracker run; `failed` marks it so where the tracker can."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


class NoTracker(Tracker):
    """`logger=none`: steps.csv, results.csv and the job log are the record."""


def make_tracker(cfg: LoggerConfig, run_name: str, run_dir: Path, config: Optional[dict] = None,
                 resume_step: int = 0) -> Tracker:
    """The tracker `cfg.name` asks for, its run named `run_name`, its files under `cfg.dir` or `run_dir`.

    `resume_step`: the step a resumed run starts from (TensorBoard hides the events logged after it by the killed
    run). A missing optional package is a one-line ConfigError naming the extra to install.
    """
    if cfg.name == "none":
        return NoTracker()
    module = tracker_module(cfg.name)
    if cfg.name == "tensorboard":
        tracker: Tracker = TensorBoardTracker(module, _tensorboard_dir(cfg, run_name, run_dir), resume_step)
    else:
        tracker = WandbTracker(module, cfg, run_name, Path(cfg.dir) if cfg.dir else run_dir)
    if config is not None:
        tracker.log_config(config)
    return tracker


# The module behind each tracker: TensorBoard's event files are written by torch's SummaryWriter (it needs the
# tensorboard package, and says so on import).
_MODULES = {"wandb": "wandb", "tensorboard": "torch.utils.tensorboard"}


def tracker_module(name: str):
    """The optional package behind `logger=<name>`, or a one-line ConfigError naming the extra to install."""
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:  # the package is missing (or broken): say which extra brings it
        raise ConfigError(f'logger={name} needs the {name} package; install the extra: pip install "saekit[{name}]"') \
            from None


def _tensorboard_dir(cfg: LoggerConfig, run_name: str, run_dir: Path) -> Path:
    """<run folder>/tensorboard, or <logger.dir>/<run id> so that runs sharing a folder stay apart."""
    return Path(cfg.dir) / run_name if cfg.dir else run_dir / "tensorboard"


def _scalars(row: dict) -> dict[str, float]:
    """The numeric entries of a step-log row (not yet evaluated columns are None and left out)."""
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value))}


def final_metrics(frame: pd.DataFrame) -> dict[str, float]:
    """`final/<metric>` → value from a results table; progressive-code and prefix rows as
    `final/<metric>/<column>=<value>` (e.g. final/nmse/k_prime=4)."""
    metrics = {}
    for _, row in frame.iterrows():
        block = [f"{column}={_plain(row[column])}" for column in _BLOCK_COLUMNS
                 if column in frame.columns and pd.notna(row[column])]
        value = row["value"]
        if pd.notna(value):
            metrics["/".join(["final", str(row["metric"]), *block])] = float(value)
    return metrics


def _plain(value: Any) -> str:
    """4.0 → "4" (k_prime and prefix columns become floats when a table mixes blocks)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config → {"optimizer.lr": …}; values TensorBoard's hparams accept (numbers, strings, booleans)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # None, lists: shown as text
            flat[name] = str(value)
    return flat


class TensorBoardTracker(Tracker):
    """Scalars `train/<column>` per step, `final/<metric>` at the last step with the table as text, the config
    as text and as hparams (so the HParams tab compares the runs of a sweep logged to one folder)."""

    def __init__(self, tensorboard, folder: Path, resume_step: int):
        folder.mkdir(parents=True, exist_ok=True)
        # purge_step: a resumed run continues after its checkpoint; events the killed run logged past it are hidden.
        self.writer = tensorboard.SummaryWriter(log_dir=str(folder), purge_step=resume_step + 1 if resume_step else 0)
        self.folder, self.config = folder, {}
        log.info("tensorboard: logging to %s (tensorboard --logdir %s)", folder, folder)

    def log_config(self, config: dict) -> None:
        self.config = config
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", _code_block(text))

    def log_step(self, step: int, row: dict) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def log_table(self, frame: pd.DataFrame, step: int) -> None:
        metrics = final_metrics(frame)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.add_text("results", _code_block(frame.to_string(index=False)), step)
        self._log_hparams(metrics)

    def _log_hparams(self, metrics: dict[str, float]) -> None:
        """hparams into this run's own event file (SummaryWriter.add_hparams would open a new sub-folder)."""
        from torch.utils.tensorboard.summary import hparams

        writer = self.writer._get_file_writer()
        for summary in hparams(_flat(self.config), metrics):
            writer.add_summary(summary)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def _code_block(text: str) -> str:
    """TensorBoard renders text as markdown: indented lines keep their columns aligned."""
    return "\n".join("    " + line for line in text.splitlines())


class WandbTracker(Tracker):
    """One wandb run: config at init, `train/<column>` per step, the results table as a wandb.Table and the final
    metrics as summary values (`final/<metric>`). A failed run is finished with exit code 1 (marked failed).

    A resumed run starts a new wandb run of the same name (offline runs cannot be resumed in place); its steps
    continue from the checkpoint's.
    """

    def __init__(self, wandb, cfg: LoggerConfig, run_name: str, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        # console="off": wandb would otherwise wrap stdout/stderr, which the CLI's log handlers own.
        settings = wandb.Settings(console="off", silent=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags) or None,
                              name=run_name, dir=str(folder), mode=cfg.mode, settings=settings,
                              reinit="finish_previous")
        log.info("wandb: run %s, %s", run_name, self._where(cfg.mode))

    def _where(self, mode: str) -> str:
        if mode == "online":
            return self.run.url
        if mode == "offline":
            return f"{self.run.dir} (upload: wandb sync {Path(self.run.dir).parent})"
        return "disabled (nothing is recorded)"

    def log_config(self, config: dict) -> None:
        self.run.config.update(json.loads(json.dumps(config, default=str)), allow_val_change=True)

    def log_step(self, step: int, row: dict) -> None:
        self.run.log({f"train/{key}": value for key, value in _scalars(row).items()}, step=step)

    def log_table(self, frame: pd.DataFrame, step: int) -> None:
        # wandb.Table wants one type per column and None for gaps.
        table = frame.astype(object).where(pd.notna(frame), None)
        self.run.log({"results": self.wandb.Table(dataframe=table)}, step=step)
        self.run.summary.update(final_metrics(frame))

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
