"""Sweeps that are plain Hydra (issue 13, items 9, 15 and 16): Hydra's own flags, experiments as a config group
run inside one multirun, an objective for sweeper plugins, folder names that need no quoting, job tracebacks kept."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import run_cli

TINY = ["n=64", "data=text_files", "data.ctx_len=32", "data.n_eval_tokens=1024", "n_tokens=8192", "batch_size=1024",
        "final_eval.downstream=false"]


def tiny(small_text: Path, cache_dir: Path) -> list[str]:
    return [*TINY, f"data.paths=[{small_text}]", f"cache.dir={cache_dir}"]


def job_names(stdout: str) -> list[str]:
    return re.findall(r"^# job \d+: (.*)$", stdout, flags=re.M)


# ---- item 9: a bad value inside a sweep is one line, before anything is written -----------------------
@pytest.mark.parametrize("bad, words", [
    ("k=8,abc", "sweep job k=abc n=64: k: Value 'abc' of type 'str' could not be converted to Integer"),
    ("nonsense_key=1,2", "nonsense_key is not a saekit setting"),
    ("+n_tokns=5,6", "+n_tokns: n_tokns is not a saekit setting"),
    ("activation=topk,nope", "activation=nope is not an option"),
    ("k=[1,2", "cannot read the overrides"),
])
def test_a_bad_value_in_a_sweep_is_one_line_and_writes_nothing(tmp_path, bad, words):
    result = run_cli("sweep", bad, "n=64", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_value_check_failure_stays_one_jobs_failure_in_the_preflight(tmp_path):
    """k=600 > n composes; it fails that job alone when it runs (the sweep table records it), so the
    preflight lets it through while refusing what does not compose."""
    result = run_cli("sweep", "k=4,600", "n=64", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    assert job_names(result.stdout) == ["k=4 n=64", "k=600 n=64"]


# ---- item 15: Hydra's flags, experiments, range(), objective --------------------------------------------
def test_cfg_job_expands_hydra_sweep_syntax_without_splitting_it_on_commas():
    result = run_cli("sweep", "k=range(4,12,4)", "n=choice(64,128)", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    assert job_names(result.stdout) == ["k=4 n=64", "k=4 n=128", "k=8 n=64", "k=8 n=128"]
    assert [int(k) for k in re.findall(r"^k: (\d+)$", result.stdout, flags=re.M)] == [4, 4, 8, 8]


@pytest.mark.parametrize("spelling", ["+experiment=frontier", "sweep=frontier"])
def test_an_experiment_is_one_sweep_over_the_union_of_its_grids(spelling):
    result = run_cli("sweep", spelling, "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = job_names(result.stdout)
    assert [job.split(" +")[0] for job in jobs] == [f"activation=topk k={k}" for k in (4, 8, 16, 32)] + \
        [f"activation=relu lam={lam}" for lam in (1, 2, 3, 5, 8)]
    assert result.stdout.count("downstream: true") == 9 and result.stdout.count("ctx_len: 64") == 9


def test_an_unknown_experiment_is_one_line():
    result = run_cli("sweep", "+experiment=nope")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "experiment=nope is not an option; use one of: dead_latents, frontier, progressive, shrinkage" in result.stderr


@pytest.fixture
def user_configs(tmp_path) -> Path:
    """A researcher's own config folder: a primary config extending saekit's `train`, and an experiment."""
    folder = tmp_path / "myconf"
    (folder / "experiment").mkdir(parents=True)
    (folder / "my_train.yaml").write_text("defaults:\n  - train\n  - _self_\nk: 4\nn: 96\n")
    (folder / "experiment" / "two_grids.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    groups:\n      - {activation: topk, k: '2,4'}\n"
        "      - {activation: relu, lam: '3'}\n")
    return folder


@pytest.mark.parametrize("flags", [["-cd", "{dir}", "-cn", "my_train"], ["--config-dir={dir}", "--config-name=my_train"],
                                   ["-cp", "{dir}", "-cn", "my_train"]], ids=["-cd", "--config-dir", "-cp"])
def test_hydras_config_flags_pick_the_primary_config(user_configs, flags):
    flags = [flag.format(dir=user_configs) for flag in flags]
    result = run_cli("train", *flags, "n=80", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^k: 4$", result.stdout, flags=re.M) and re.search(r"^'n': 80$", result.stdout, flags=re.M)


def test_a_missing_config_folder_is_one_line(tmp_path):
    result = run_cli("train", "-cd", str(tmp_path / "nope"), "-cn", "x")
    assert result.returncode == 2 and "not a folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_train_dash_m_runs_a_user_experiment_in_one_multirun_with_plain_folder_names(tmp_path, small_text, user_configs):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep_dir = tmp_path / "sweep"
    result = run_cli("train", "-m", "-cd", str(user_configs), "+experiment=two_grids", *tiny(small_text, tmp_path / "c"),
                     f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(sweep_dir / "results.csv")
    jobs = table.drop_duplicates("run_id")
    assert (jobs["status"] == "ok").all() and len(jobs) == 3
    assert sorted(table.loc[(table["metric"] == "l0") & (table["activation"] == "topk"), "value"]) == [2.0, 4.0]
    assert "groups" in (sweep_dir / "multirun.yaml").read_text()  # one multirun, written once, describes all jobs
    parser = OverridesParser.create()
    for folder in sweep_dir.iterdir():
        if folder.is_dir():
            assert not set("=,'\"[] ") & set(folder.name), folder.name
            assert parser.parse_override(f"ckpt={folder}").value() == str(folder)  # passed back as it is


def test_optuna_searches_lambda_on_the_objective_train_returns(tmp_path, small_text):
    """hydra-optuna-sweeper (the `optuna` extra, in `dev`) minimizes what `train` returns: here the held-out L0."""
    sweep_dir = tmp_path / "optuna"
    result = run_cli("sweep", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0",
                     "activation=relu", "lam=interval(0.5,8.0)", "objective=l0", *tiny(small_text, tmp_path / "c"),
                     f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    table = pd.read_csv(sweep_dir / "results.csv")
    l0 = table[table["metric"] == "l0"].set_index("lam")["value"]
    assert len(l0) == 3 and (table.drop_duplicates("run_id")["status"] == "ok").all()
    assert best["best_value"] == pytest.approx(l0.min(), rel=1e-6)  # what Optuna saw is the results table's l0
    assert best["best_params"]["lam"] == pytest.approx(l0.idxmin(), rel=1e-6)


def test_the_objective_is_the_held_out_metric_and_the_mean_over_hooks():
    from saekit.cli import objective_value

    class Cfg:
        objective = "nmse"

    assert objective_value(Cfg(), {"nmse": 0.25, "l0": 8.0}) == 0.25
    assert objective_value(Cfg(), {"blocks.0": {"nmse": 0.2}, "blocks.1": {"nmse": 0.4}}) == pytest.approx(0.3)
    assert objective_value(Cfg(), {"l0": 8.0}) is None  # no value: a failed trial, not a search-ending NaN
    assert objective_value(Cfg(), {"nmse": float("nan")}) is None
    assert objective_value(object(), {"nmse": 0.25}) is None  # eval, cache: nothing to minimize

    class Pareto:
        objective = ["nmse", "l0"]

    assert objective_value(Pareto(), {"nmse": 0.25, "l0": 8.0}) == [0.25, 8.0]


def test_an_unknown_objective_is_one_line():
    result = run_cli("train", "objective=loss_of_joy")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "objective=loss_of_joy" in result.stderr and "nmse" in result.stderr


# ---- item 16: a failed job's traceback stays in its job log ------------------------------------------
def test_a_crashing_sweep_job_keeps_its_traceback_in_the_job_log(tmp_path, monkeypatch, capsys):
    from saekit import cli, tasks

    def crash(cfg, run_dir):
        raise RuntimeError("boom in the training loop")

    monkeypatch.setattr(tasks, "train", crash)
    sweep_dir = tmp_path / "sweep"
    with pytest.raises(SystemExit) as stopped:
        cli.main(["sweep", "k=4,8", "n=64", f"hydra.sweep.dir={sweep_dir}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("RuntimeError: boom in the training loop") == 2 and "Traceback" not in err
    logs = sorted(sweep_dir.glob("*/sweep.log"))
    assert len(logs) == 2
    for log in logs:
        text = log.read_text()
        assert "Traceback (most recent call last)" in text and "in crash" in text and "RuntimeError: boom" in text
    table = pd.read_csv(sweep_dir / "results.csv")
    assert list(table["status"]) == ["failed", "failed"]
