"""Training loop: resume after a kill is exact, NaN losses stop with the last good checkpoint kept, LR schedule."""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import REPO, cli_env
from saekit import train as train_mod
from saekit.checkpoint import STATE_FILE, read_metadata
from saekit.cli import _register, preflight
from saekit.errors import ConfigError, TrainingDiverged
from saekit.synthetic import PlantedDictionary, synthetic_train_config
from saekit.tasks import activation_cache


def small_args(small_text, cache_root, run_dir, *extra):
    return ["train", "data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=1024",
            "n=128", "k=8", "batch_size=256", "n_tokens=400000", "ckpt_every_steps=50", "seed=3",
            f"cache.dir={cache_root}", f"hydra.run.dir={run_dir}", *extra]


def start(args):
    return subprocess.Popen([sys.executable, "-m", "saekit.cli", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def steps(run_dir):
    with open(run_dir / "steps.csv") as handle:
        return [(row["step"], row["loss"], row["l0"]) for row in csv.DictReader(handle)]


def test_resume_after_kill_gives_the_same_final_checkpoint(tmp_path, small_text, cache_root):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = subprocess.run([sys.executable, "-m", "saekit.cli", *small_args(small_text, cache_root, straight)],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]

    proc = start(small_args(small_text, cache_root, killed))
    state = killed / STATE_FILE
    deadline = time.time() + 300
    # Kill after several checkpoints, so resuming restores a trained state, not the first one.
    while proc.poll() is None and time.time() < deadline and not (state.exists() and read_metadata(state)["step"] >= 200):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = read_metadata(state)["step"]
    assert proc.returncode == -signal.SIGKILL and killed_at < 1562, "the run finished before it could be killed"

    result = subprocess.run([sys.executable, "-m", "saekit.cli", *small_args(small_text, cache_root, killed)],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from step {killed_at}" in result.stdout
    a, b = load_file(str(straight / "sae.safetensors")), load_file(str(killed / "sae.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert steps(straight) == steps(killed)  # the step log was cut back and continued identically


@pytest.mark.parametrize("corrupt, message", [
    ("loss", "loss became nan at step 25"),
    ("weights", "the weights became non-finite at step 25"),
])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, small_text, cache_root, monkeypatch,
                                                             corrupt, message):
    """Step 25 goes bad (its loss, or its weights with a finite loss) just as a checkpoint is due."""
    _register()
    cfg = preflight("train", small_args(small_text, cache_root, tmp_path)[1:-1] + ["ckpt_every_steps=5"])
    cache = activation_cache(cfg, cfg.n_tokens)
    real_step, calls = train_mod.train_step, []

    def step_that_goes_bad(sae, *args, **kwargs):
        terms = real_step(sae, *args, **kwargs)
        calls.append(1)
        if len(calls) == 25 and corrupt == "loss":
            terms["loss"] = torch.tensor(float("nan"))
        elif len(calls) == 25:
            with torch.no_grad():
                sae.W_enc[0, 0] = float("inf")
        return terms

    monkeypatch.setattr(train_mod, "train_step", step_that_goes_bad)
    with pytest.raises(TrainingDiverged, match=re.escape(message) + r"; the last good checkpoint \(step 20\)"):
        train_mod.fit(cfg, train_mod.TrainingData.from_cache(cache, cfg), tmp_path, torch.device("cpu"), console=train_mod.Console(quiet=True))
    assert read_metadata(tmp_path / STATE_FILE)["step"] == 20
    assert torch.isfinite(load_file(str(tmp_path / "sae.safetensors"))["W_enc"]).all()


def test_diverging_run_from_the_cli_is_one_line_and_nonzero(tmp_path, small_text, cache_root):
    run_dir = tmp_path / "nan"
    result = subprocess.run([sys.executable, "-m", "saekit.cli",
                             *small_args(small_text, cache_root, run_dir, "optimizer.lr=1e30")],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("saekit: error:")]
    assert len(error_lines) == 1 and "loss became" in error_lines[0] and "optimizer.lr" in error_lines[0]
    assert "Traceback" not in result.stderr
    assert '"status": "failed"' in (run_dir / "status.json").read_text()


def test_learning_rate_schedule_warms_up_holds_and_decays():
    _register()
    cfg = preflight("train", ["n_tokens=409600", "batch_size=4096", "optimizer.lr=1e-3", "optimizer.warmup_steps=5"])
    rates = [train_mod.learning_rate(cfg, 64, step) for step in range(cfg.n_steps)]
    assert cfg.n_steps == 100
    assert rates[0] == pytest.approx(2e-4) and rates[4] == pytest.approx(1e-3)  # 5 warmup steps
    assert rates[50] == pytest.approx(1e-3)
    assert rates[80] == pytest.approx(1e-3) and rates[90] == pytest.approx(0.5e-3)  # decay over the last 20
    assert rates[99] == pytest.approx(1e-3 / 20)


@pytest.mark.gpu
def test_training_runs_on_cuda(tmp_path, small_text, cache_root):
    _register()
    cfg = preflight("train", small_args(small_text, cache_root, tmp_path)[1:-1] + ["device=cuda", "n_tokens=51200"])
    cache = activation_cache(cfg, cfg.n_tokens)
    result = train_mod.fit(cfg, train_mod.TrainingData.from_cache(cache, cfg), tmp_path, torch.device("cuda"), console=train_mod.Console(quiet=True))
    assert result.sae.W_enc.is_cuda
    rows = steps(tmp_path)
    assert float(rows[-1][1]) < float(rows[0][1])


def _planted_job(tmp_path, name, activation, seed, **changes):
    """A small in-memory job: 40 steps of 256 tokens, logging every 5 and checkpointing every 10 steps."""
    planted = PlantedDictionary(d=16, n_features=48, seed=seed)
    settings = {"n_tokens": 40 * 256, "log_every_steps": 5, "ckpt_every_steps": 10, **changes}
    cfg = dataclasses.replace(synthetic_train_config(activation, n=64, n_tokens=settings.pop("n_tokens"), batch_size=256,
                                                     k=4, seed=seed), **settings)
    data = train_mod.TrainingData.from_tensor(planted.sample(4096, seed=seed + 1), cfg.batch_size, cfg.seed,
                                              key=f"planted-{seed}")
    return cfg, data, tmp_path / name


def _weights(run_dir):
    return load_file(str(run_dir / "sae.safetensors"))


def _step_rows(run_dir):
    with open(run_dir / "steps.csv") as handle:
        return [{key: value for key, value in row.items() if key != "tokens_per_s"} for row in csv.DictReader(handle)]


def _same_runs(a, b):
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert _step_rows(a) == _step_rows(b)


def test_lockstep_training_gives_each_sae_its_own_fit_result(tmp_path, monkeypatch, caplog):
    """Two SAEs (different data, variant and seed) trained one step each in turn come out bit for bit as when
    each is fitted alone; killed mid-run (their last checkpoints at different steps) and run again, too."""
    quiet = Console(quiet=True)
    alone = [_planted_job(tmp_path, "alone-topk", "topk", seed=0),
             _planted_job(tmp_path, "alone-batchtopk", "batchtopk", seed=1, ckpt_every_steps=15)]
    for cfg, data, run_dir in alone:
        train_mod.fit(cfg, data, run_dir, torch.device("cpu"), quiet)

    jobs = [_planted_job(tmp_path, "lock-topk", "topk", seed=0),
            _planted_job(tmp_path, "lock-batchtopk", "batchtopk", seed=1, ckpt_every_steps=15)]
    real_step, trained = train_mod.train_step, []

    def recording_step(sae, *args, **kwargs):
        trained.append(sae.spec.activation)
        return real_step(sae, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_mod, "train_step", recording_step)
        results = train_mod.fit_lockstep(jobs, torch.device("cpu"), quiet)
    assert trained == ["topk", "batchtopk"] * 40  # one step of each in turn
    assert [result.steps_run for result in results] == [40, 40]
    for (_, _, ran_alone), (_, _, ran_together) in zip(alone, jobs):
        _same_runs(ran_alone, ran_together)
    assert any(float(row["auxk_loss"]) > 0 for row in _step_rows(jobs[0][2]))  # dead latents were in play

    killed = [_planted_job(tmp_path, "killed-topk", "topk", seed=0),
              _planted_job(tmp_path, "killed-batchtopk", "batchtopk", seed=1, ckpt_every_steps=15)]
    calls = []

    def killed_in_step_25(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * 25 + 1:  # the first SAE's step 25: checkpoints at steps 20 and 15 are on disk
            raise _Killed()
        return real_step(*args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(_Killed):
        patch.setattr(train_mod, "train_step", killed_in_step_25)
        train_mod.fit_lockstep(killed, torch.device("cpu"), quiet)
    assert [read_metadata(run_dir / STATE_FILE)["step"] for _, _, run_dir in killed] == [20, 15]
    with caplog.at_level(logging.INFO, logger="saekit"):  # messages go through logging (saekit.train's logger)
        results = train_mod.fit_lockstep(killed, torch.device("cpu"), quiet)
    assert [result.resumed_from for result in results] == [20, 15]
    printed = caplog.text
    assert "resuming from step 20 of 40" in printed and "resuming from step 15 of 40" in printed
    for (_, _, ran_alone), (_, _, resumed) in zip(alone, killed):
        _same_runs(ran_alone, resumed)


class _Killed(Exception):
    pass


def test_lockstep_needs_one_step_count(tmp_path):
    jobs = [_planted_job(tmp_path, "a", "topk", seed=0), _planted_job(tmp_path, "b", "topk", seed=1, n_tokens=20 * 256)]
    with pytest.raises(ConfigError, match=r"lockstep training needs one n_steps .* \[20, 40\]"):
        train_mod.fit_lockstep(jobs, torch.device("cpu"), Console(quiet=True))
