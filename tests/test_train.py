"""Training loop: resume after a kill is exact, NaN losses stop with the last good checkpoint kept, LR schedule."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, cli_env
from saekit import train as train_mod
from saekit.checkpoint import STATE_FILE, read_metadata
from saekit.cli import _register, preflight
from saekit.errors import TrainingDiverged
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
