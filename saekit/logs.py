"""Handlers for saekit's command-line output, named in conf/hydra/saekit.yaml (Hydra's `job_logging`).

Library modules only call `logging.getLogger(__name__)`; nothing here runs on import. The CLI's Hydra config
attaches these handlers for the length of a command, so every message reaches both the terminal and the run
folder's job log, where failed sweep jobs keep their tracebacks.
"""

from __future__ import annotations

import logging
import sys
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
    return handler


def _for_console(record: logging.LogRecord) -> bool:
    """Records logged with `extra={"console": False}` (a failed job's traceback) go to the job log file only."""
    return getattr(record, "console", True)
