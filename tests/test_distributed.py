"""Data-parallel training under torchrun (issue 14): real gloo process groups, 2 ranks on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from conftest import REPO, cli_env, run_cli

pytestmark = pytest.mark.distributed

# 50 steps of 512 tokens; a short dead window so AuxK's dead latents (and their batch-wide statistics) take part.
SETTINGS = ["data=text_files", "data.ctx_len=32", "data.n_eval_tokens=1024", "n=1024", "k=2", "n_tokens=25600",
            "batch_size=512", "final_eval.downstream=false", "dead.window_tokens=1024"]


def settings(small_text: Path, cache_dir: Path) -> list[str]:
    return [*SETTINGS, f"data.paths=[{small_text}]", f"cache.dir={cache_dir}"]


def torchrun_command(*args: str, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "saekit", *args]


def torchrun(*args: str, ranks: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args, ranks=ranks), cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def nmse(run_dir: Path) -> float:
    table = pd.read_csv(run_dir / "results.csv")
    return float(table.loc[table["metric"] == "nmse", "value"].iloc[0])


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, small_text) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    cache = tmp_path_factory.mktemp("dp-cache")
    result = run_cli("train", *settings(small_text, cache), f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_two_gloo_ranks_train_the_same_sae_as_one_process_with_the_same_global_batch(tmp_path, small_text,
                                                                                     one_process_run):
    run_dir = tmp_path / "dp"
    result = torchrun("train", *settings(small_text, tmp_path / "cache"), f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    single, parallel = load_file(one_process_run / "sae.safetensors"), load_file(run_dir / "sae.safetensors")
    assert single.keys() == parallel.keys()
    for name in single:  # float32 sums in another order: 50 Adam steps stay within 1e-5 (measured: about 2e-7)
        assert (single[name] - parallel[name]).abs().max().item() < 1e-5, name
    assert nmse(run_dir) == pytest.approx(nmse(one_process_run), abs=1e-4)
    steps_single, steps_parallel = pd.read_csv(one_process_run / "steps.csv"), pd.read_csv(run_dir / "steps.csv")
    assert list(steps_parallel["step"]) == list(steps_single["step"])  # rank 0 alone wrote the step log
    assert steps_parallel["loss"].tolist() == pytest.approx(steps_single["loss"].tolist(), rel=1e-5)
    assert steps_parallel["dead_frac"].tolist() == steps_single["dead_frac"].tolist()  # counters saw the global batch
    assert steps_single["dead_frac"].iloc[-1] > 0  # AuxK had dead latents to work on
    assert (run_dir / "train.rank1.log").is_file() and "step 50/50" in (run_dir / "train.rank1.log").read_text()


def test_a_batch_that_does_not_split_over_the_ranks_is_one_line(tmp_path, small_text):
    result = torchrun("train", *settings(small_text, tmp_path / "cache"), "batch_size=511", f"hydra.run.dir={tmp_path}/r")
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("saekit: error:")]
    assert ours and "batch_size=511 does not split over 2 ranks" in ours[0]
    assert not (tmp_path / "r" / "sae.safetensors").exists()


def test_sweeps_and_other_commands_refuse_to_run_under_torchrun(tmp_path):
    env = {**cli_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    for args, words in ((["sweep", "k=4,8"], "a sweep cannot run under torchrun or srun"),
                        (["eval", f"ckpt={tmp_path}"], "under torchrun only `train` is data-parallel")):
        result = subprocess.run([sys.executable, "-m", "saekit", *args], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and words in result.stderr, result.stderr[-2000:]


def _rank_pid(parent: int, rank: int, timeout: float = 120) -> int:
    """The pid of torchrun's worker with RANK=`rank` (read from /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                environ = (stat.parent / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(fields[1]) == parent and f"RANK={rank}".encode() in environ:
                return int(stat.parent.name)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} under torchrun pid {parent}")


def test_killing_a_rank_ends_the_job_promptly_and_the_rerun_resumes(tmp_path, small_text):
    run_dir = tmp_path / "dp"
    args = [*settings(small_text, tmp_path / "cache"), "n_tokens=256000", "ckpt_every_steps=20", "dist_timeout_s=30",
            f"hydra.run.dir={run_dir}"]  # 500 steps: still training when the kill comes
    proc = subprocess.Popen(torchrun_command("train", *args), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        state = run_dir / "checkpoints" / "state.safetensors"
        deadline = time.monotonic() + 240
        while not state.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the kill"
            time.sleep(0.2)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        started = time.monotonic()
        _, err = proc.communicate(timeout=90)
        ended_after = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0 and ended_after < 60  # the job ends within dist_timeout_s (30 s) and change
    ours = [line for line in err.splitlines() if line.startswith("saekit:")]
    assert ours, err[-3000:]  # rank 0's own one-line account (lost contact, or interrupted by torchrun's SIGTERM)
    assert "Traceback" not in "\n".join(line for line in err.splitlines() if "saekit" in line)

    rerun = torchrun("train", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from step" in rerun.stdout and "step 500/500" in rerun.stdout
