"""Handlers for saekit's command-line output, named in conf/hydra/saekit.yaml (Hydra's `job_logging`).

Library modules only call `logging.getLogger(__name__)`; nothing here runs on import. The CLI's Hydra config
attaches these handlers for the length of a command, so every message reaches both the terminal and the run
folder's job log, where failed sweep jobs keep their tracebacks.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, TextIO


class OneLineFormatter(logging.Formatter):
    """The message alone, without the traceback of `log.exception(...)`: the terminal gets one line per failure,
    and the job log file (a plain formatter) keeps the whole traceback."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def console_handler(stream: Optional[TextIO] = None) -> logging.Handler:
    """A rich handler on a terminal (colours, aligned columns); plain `message` lines otherwise (CI, SLURM and
    pipe output stay greppable and unwrapped)."""
    if (stream or sys.stdout).isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        # Console() (no file) writes to whatever sys.stdout is at the time, so a live progress bar, which
        # redirects stdout while it draws, keeps its place under the log lines.
        handler: logging.Handler = RichHandler(console=Console(file=stream), show_path=False, show_time=False,
                                               markup=False, rich_tracebacks=False)
    else:
        handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(OneLineFormatter())
    handler.addFilter(_for_console)
    if _rank() != 0:  # data-parallel ranks > 0 repeat rank 0's progress: their terminal shows warnings and errors
        handler.addFilter(lambda record: record.levelno >= logging.WARNING)
    return handler


def job_log_handler(filename: str) -> logging.Handler:
    """The run folder's job log (`train.log`); data-parallel rank R > 0 writes `train.rankR.log` beside it, so every
    rank's errors are kept and none interleaves with rank 0's lines."""
    rank = _rank()
    path = Path(filename)
    if rank:
        path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return logging.FileHandler(path)


def _rank() -> int:
    """This process's data-parallel rank (torchrun's RANK, or srun's SLURM_PROCID); 0 outside them."""
    from saekit.distributed import World
    from saekit.errors import SaekitError

    try:
        return World.from_env().rank
    except SaekitError:
        return 0


def _for_console(record: logging.LogRecord) -> bool:
    """Records logged with `extra={"console": False}` (a failed job's traceback) go to the job log file only."""
    return getattr(record, "console", True)
