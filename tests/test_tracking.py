"""Experiment tracking (issue 13): `logger=tensorboard|wandb` receives the step log, the final metrics and the config,
offline; the tracker's records are checked against steps.csv and results.csv, the run's own independent record."""

from __future__ import annotations

import csv
import dataclasses
import struct
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli
from saekit.config import LoggerConfig
from saekit.errors import ConfigError
from saekit.tracking import final_metrics, make_tracker


def _tiny(small_text, cache_root, *extra: str) -> list[str]:
    """20 steps of 256 tokens on the session's small text (a few seconds)."""
    return ["data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=1024", "n=64",
            "k=8", "batch_size=256", "n_tokens=5120", "log_every_steps=5", f"cache.dir={cache_root}", *extra]


def _steps(run_dir: Path) -> list[dict]:
    with open(run_dir / "steps.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _results(run_dir: Path) -> dict[str, float]:
    table = pd.read_csv(run_dir / "results.csv")
    return dict(zip(table["metric"], table["value"]))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb without a network or an account, writing nothing outside tmp_path (its settings, cache, staging)."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                        "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                        "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


# ---- TensorBoard --------------------------------------------------------------------------------------------
def _event_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_step_log_and_the_final_metrics(tmp_path, small_text, cache_root):
    run_dir = tmp_path / "run"
    result = run_cli("train", *_tiny(small_text, cache_root, "logger=tensorboard", f"hydra.run.dir={run_dir}"))
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = _event_scalars(run_dir / "tensorboard")
    rows = _steps(run_dir)
    assert [int(row["step"]) for row in rows] == [5, 10, 15, 20]
    for column in ("loss", "mse", "l0", "dead_frac", "lr"):  # event values are float32
        assert scalars[f"train/{column}"] == {int(row["step"]): pytest.approx(float(row[column]), rel=1e-6)
                                              for row in rows}, column
    results = _results(run_dir)
    assert {tag for tag in scalars if tag.startswith("final/")} == {f"final/{metric}" for metric in results}
    for metric, value in results.items():
        assert scalars[f"final/{metric}"] == {20: pytest.approx(value, rel=1e-6)}, metric


def test_a_resumed_tensorboard_run_hides_what_the_killed_run_logged_past_its_checkpoint(tmp_path):
    """The killed run logged steps 1..8 but checkpointed at 5: the resumed run's steps 6.. replace its 6..8."""
    cfg = LoggerConfig(name="tensorboard")
    with make_tracker(cfg, "run", tmp_path) as killed:
        for step in range(1, 9):
            killed.log_step(step, {"step": step, "loss": 100.0 + step})
    time.sleep(1.1)  # event files are read in name order, and named after the second they were opened in
    with make_tracker(cfg, "run", tmp_path, resume_step=5) as resumed:
        for step in range(6, 11):
            resumed.log_step(step, {"step": step, "loss": float(step), "eval_nmse": None})
    losses = _event_scalars(tmp_path / "tensorboard")["train/loss"]
    assert losses == {**{step: 100.0 + step for step in range(1, 6)}, **{step: float(step) for step in range(6, 11)}}


# ---- wandb --------------------------------------------------------------------------------------------------
def _wandb_records(run_folder: Path) -> list:
    """The records of an offline run's `run-<id>.wandb` file (a LevelDB-style log of protobuf records: 32 KiB blocks,
    each record behind a 7-byte header of crc32, length and chunk type), read as `wandb sync` would read them."""
    from wandb.proto import wandb_internal_pb2

    raw = next(run_folder.glob("run-*.wandb")).read_bytes()
    assert raw[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        pending += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_run(records: list) -> dict:
    """Name, history rows by step, last summary values and exit code of a parsed offline run."""
    import json

    run = {"name": None, "history": {}, "summary": {}, "config": set(), "exit_code": None}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["name"] = record.run.display_name
        elif kind == "config":
            run["config"] |= {item.key for item in record.config.update}
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            run["history"][row["_step"]] = row
        elif kind == "summary":
            run["summary"].update({item.key or "/".join(item.nested_key): item.value_json
                                   for item in record.summary.update})
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def test_a_wandb_sweep_makes_one_offline_run_per_job_named_by_its_settings(tmp_path, small_text, cache_root,
                                                                          offline_wandb):
    sweep_dir = tmp_path / "sweep"
    result = run_cli("sweep", *_tiny(small_text, cache_root, "k=4,8", "logger=wandb", f"hydra.sweep.dir={sweep_dir}"))
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(path for path in sweep_dir.iterdir() if (path / "results.csv").exists())
    assert len(jobs) == 2
    for job in jobs:
        offline = list((job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, offline
        run = _wandb_run(_wandb_records(offline[0]))
        assert run["name"] == job.name == pd.read_csv(job / "results.csv")["run_id"][0]
        assert {"k", "n", "activation", "overrides"} <= run["config"]
        for row in _steps(job):
            logged = run["history"][int(row["step"])]
            assert logged["train/loss"] == pytest.approx(float(row["loss"]), rel=1e-12)
            assert logged["train/l0"] == pytest.approx(float(row["l0"]))
        for metric, value in _results(job).items():
            assert float(run["summary"][f"final/{metric}"]) == pytest.approx(value, rel=1e-12), metric
        assert run["exit_code"] == 0
    assert {job.name for job in jobs} == {_wandb_run(_wandb_records(next((job / "wandb").glob("offline-run-*"))))["name"]
                                          for job in jobs}  # two names, one per job


def test_a_failed_job_finishes_its_wandb_run_marked_failed(tmp_path, offline_wandb):
    with pytest.raises(RuntimeError, match="boom"):
        with make_tracker(LoggerConfig(name="wandb"), "failing", tmp_path, {"k": 8}) as tracker:
            tracker.log_step(1, {"step": 1, "loss": 2.5})
            raise RuntimeError("boom")
    run = _wandb_run(_wandb_records(next((tmp_path / "wandb").glob("offline-run-*"))))
    assert run["name"] == "failing" and run["exit_code"] == 1
    assert run["history"][1]["train/loss"] == 2.5


# ---- errors and settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now raises ImportError
    with pytest.raises(ConfigError) as error:
        make_tracker(LoggerConfig(name=name), "run", tmp_path)
    assert str(error.value) == (f'logger={name} needs the {name} package; install the extra: '
                                f'pip install "saekit[{name}]"')
    assert not any(tmp_path.iterdir())  # nothing written


def test_an_unknown_logger_is_one_line_listing_the_options(tmp_path):
    result = run_cli("train", "logger=nope", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "logger=nope" in lines[0]
    assert all(option in lines[0] for option in ("none", "tensorboard", "wandb"))
    assert not (tmp_path / "run").exists()


def test_logger_settings_are_checked_by_name():
    with pytest.raises(ConfigError, match=r"^logger.mode='cloud' is not valid; use one of: offline, online, disabled$"):
        LoggerConfig(name="wandb", mode="cloud")
    with pytest.raises(ConfigError, match=r"^logger='nope' is not valid"):
        LoggerConfig(name="nope")


def test_the_tracker_changes_neither_the_resume_fingerprint_nor_the_saved_config():
    """Adding logger=... to a finished run's command resumes it; its checkpoint's config reads back typed."""
    from saekit.synthetic import synthetic_train_config
    from saekit.tasks import _trained_config
    from saekit.train import config_fingerprint

    cfg = synthetic_train_config("topk", n=64, n_tokens=4096)
    tracked = dataclasses.replace(cfg, logger=LoggerConfig(name="wandb", tags=["a"]))
    assert config_fingerprint(cfg, "key") == config_fingerprint(tracked, "key")
    assert _trained_config({"train_config": dataclasses.asdict(tracked)}).logger == tracked.logger


def test_final_metrics_name_progressive_rows_by_their_block():
    table = pd.DataFrame({"metric": ["nmse", "nmse", "l0"], "value": [0.2, 0.3, 8.0], "k_prime": [None, 4.0, None]})
    assert final_metrics(table) == {"final/nmse": 0.2, "final/nmse/k_prime=4": 0.3, "final/l0": 8.0}
