"""Messages go through `logging` (issue 13 item 16): the CLI shows them and keeps them in the run's job log, and the
library configures no handler of its own."""

from __future__ import annotations

import logging
import subprocess
import sys

from conftest import REPO, cli_env, run_cli


def _tiny_train(small_text, cache_root, run_dir, *extra: str) -> list[str]:
    """A 20-step run on about 12k cached tokens (a few seconds)."""
    return ["train", "data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=1024",
            "n=64", "k=8", "batch_size=256", "n_tokens=5120", "log_every_steps=5", f"cache.dir={cache_root}",
            f"hydra.run.dir={run_dir}", *extra]


def test_a_train_run_keeps_its_messages_in_the_job_log(tmp_path, small_text, cache_root):
    run_dir = tmp_path / "run"
    result = run_cli(*_tiny_train(small_text, cache_root, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    job_log = (run_dir / "train.log").read_text()
    for line in (f"results: {run_dir / 'results.csv'}", "trained 20 steps at", "step 20/20  loss"):
        assert line in result.stdout  # the terminal (here a pipe: plain lines) still shows them
        assert line in job_log
    assert "activation cache" in job_log  # building it, or reusing the session's
    assert "INFO saekit.tasks: results: " in job_log  # the file handler's format: time, level, logger


_IMPORT_EVERYTHING = """
import logging
import saekit.cache, saekit.evaluate, saekit.report, saekit.synthetic, saekit.tasks, saekit.tracking, saekit.train
root, package = logging.getLogger(), logging.getLogger("saekit")
print(len(root.handlers), root.level, len(package.handlers), package.level)
"""


def test_importing_saekit_configures_no_logging():
    result = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING], cwd=REPO, env=cli_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0", str(logging.WARNING), "0", str(logging.NOTSET)]


def _logging_state() -> dict:
    """Handlers and levels of the root logger and of every saekit logger (caplog.at_level creates "saekit")."""
    logging.getLogger("saekit")
    loggers = {name: logger for name, logger in logging.Logger.manager.loggerDict.items()
               if name.startswith("saekit") and isinstance(logger, logging.Logger)}
    return {"root": (list(logging.getLogger().handlers), logging.getLogger().level),
            **{name: (list(logger.handlers), logger.level, logger.propagate) for name, logger in loggers.items()}}


def test_a_task_logs_through_its_module_logger_and_adds_no_handler(tmp_path, small_text, cache_root, caplog):
    from saekit.cli import _register, preflight
    from saekit.tasks import train

    _register()
    cfg = preflight("train", _tiny_train(small_text, cache_root, tmp_path / "run")[1:-1])
    before = _logging_state()
    with caplog.at_level(logging.INFO, logger="saekit"):
        train(cfg, tmp_path / "run")
    assert _logging_state() == before
    messages = [(record.name, record.getMessage()) for record in caplog.records]
    assert ("saekit.tasks", f"results: {tmp_path / 'run' / 'results.csv'}") in messages
    assert any(name == "saekit.train" and message.startswith("step 20/20") for name, message in messages)
    assert not any("[bold]" in message or "[/" in message for _, message in messages)  # plain text, no rich markup
