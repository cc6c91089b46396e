"""SLURM, for real (issue 14): `hydra/launcher=slurm` submits a sweep to a one-node SLURM cluster on this machine,
started from Debian's packages by scripts/slurm/start_local_cluster.sh (root; apt-get installs what is missing).

The `slurm` test never skips: a cluster that cannot start fails it with the script's message."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from datetime import datetime

import pandas as pd
import pytest
import yaml

from conftest import REPO, run_cli

START = REPO / "scripts" / "slurm" / "start_local_cluster.sh"
TINY = ["n=64", "data=text_files", "data.ctx_len=32", "data.n_eval_tokens=1024", "n_tokens=8192", "batch_size=1024",
        "final_eval.downstream=false"]
# What a 2-CPU node without GPUs can give each of two jobs at once (the preset's defaults ask for a GPU node).
CPU_JOBS = ["hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]


@pytest.fixture(scope="module")
def slurm_cluster() -> str:
    """Starts (or finds) the local cluster; returns the node's name."""
    started = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"{START.relative_to(REPO)} could not start the cluster (exit {started.returncode}):\n"
                    f"{started.stdout}{started.stderr}", pytrace=False)
    return socket.gethostname().split(".")[0]


def _sacct(array_id: str) -> dict[str, dict[str, str]]:
    out = subprocess.run(["sacct", "-j", array_id, "-X", "-n", "-P", "-o", "JobID,State,NodeList,Start,End"],
                         capture_output=True, text=True, check=True).stdout
    return {fields[0]: dict(zip(("state", "node", "start", "end"), fields[1:]))
            for fields in (line.split("|") for line in out.splitlines() if line.strip())}


@pytest.mark.slurm
def test_a_two_job_sweep_runs_as_a_slurm_job_array(slurm_cluster, small_text, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli("sweep", "hydra/launcher=slurm", "k=4,8", *TINY, f"data.paths=[{small_text}]",
                     f"cache.dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep_dir}", *CPU_JOBS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sweep: 2 jobs, 0 failed" in result.stdout

    table = pd.read_csv(sweep_dir / "results.csv")
    jobs = table.drop_duplicates("run_id")
    assert sorted(jobs["k"]) == [4, 8] and set(jobs["status"]) == {"ok"}
    l0 = table[table["metric"] == "l0"].set_index("k")["value"]
    assert l0.to_dict() == {4: 4.0, 8: 8.0}

    # submitit's folder: one array job, its two tasks each with the log and result a SLURM job left.
    tasks = sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2 and {name.split("_")[1] for name in tasks} == {"0", "1"}, tasks
    array_id = tasks[0].split("_")[0]
    assert tasks[1].split("_")[0] == array_id
    for task in tasks:
        assert (sweep_dir / ".submitit" / task / f"{task}_0_result.pkl").is_file()
        log = (sweep_dir / ".submitit" / task / f"{task}_0_log.out").read_text()
        assert f"JobEnvironment(job_id={task}, hostname={slurm_cluster}" in log, log[-2000:]
    assert "#SBATCH --array=0-1%2" in (sweep_dir / ".submitit" / array_id / f"{array_id}_submission.sh").read_text()

    # The scheduler's accounting (slurmdbd) saw both tasks complete on the node, side by side: they shared the
    # activation cache (its file lock) and the sweep folder (each run folder's lock) while running at once.
    deadline = time.monotonic() + 30
    while True:
        accounted = _sacct(array_id)
        done = [accounted.get(task, {}).get("state") == "COMPLETED" and accounted[task]["end"] not in ("", "Unknown")
                for task in tasks]
        if all(done) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(done), accounted
    assert {accounted[task]["node"] for task in tasks} == {slurm_cluster}
    start = max(datetime.fromisoformat(accounted[task]["start"]) for task in tasks)
    end = min(datetime.fromisoformat(accounted[task]["end"]) for task in tasks)
    assert start < end, f"the two jobs did not overlap: {accounted}"


# ---- without a cluster: the preset composes ------------------------------------------------------------
def test_a_slurm_sweep_composes_its_jobs():
    result = run_cli("sweep", "hydra/launcher=slurm", "k=4,8", *CPU_JOBS, "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.findall(r"^# job \d+: (.*)$", result.stdout, flags=re.M) == ["k=4", "k=8"]
    assert [int(k) for k in re.findall(r"^k: (\d+)$", result.stdout, flags=re.M)] == [4, 8]


def test_the_slurm_preset_is_submitits_slurm_launcher():
    """`--cfg hydra` on one run (a sweep's `--cfg` prints its jobs' configs, see cli._print_sweep_jobs)."""
    result = run_cli("train", "hydra/launcher=slurm", "hydra.launcher.partition=debug", "--cfg", "hydra")
    assert result.returncode == 0, result.stderr[-2000:]
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert launcher["partition"] == "debug"
    assert (launcher["gpus_per_node"], launcher["cpus_per_task"], launcher["mem_gb"]) == (1, 8, 64)


@pytest.mark.slurm
@pytest.mark.distributed
def test_data_parallel_training_runs_as_one_slurm_job_of_two_tasks(slurm_cluster, small_text, tmp_path):
    """scripts/slurm/train_ddp.sbatch: srun starts two tasks, which find their ranks in SLURM's variables and train
    one SAE together over gloo (the node has no GPU)."""
    import sys

    from conftest import cli_env

    run_dir = tmp_path / "dp"
    script = REPO / "scripts" / "slurm" / "train_ddp.sbatch"
    submitted = subprocess.run(
        ["sbatch", "--wait", "--partition=debug", f"--output={tmp_path}/slurm-%j.out", f"--chdir={REPO}", str(script),
         *TINY, "batch_size=512", f"data.paths=[{small_text}]", f"cache.dir={tmp_path / 'cache'}",
         f"hydra.run.dir={run_dir}"],
        env={**cli_env(), "SAEKIT_PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    output = "\n".join(path.read_text() for path in tmp_path.glob("slurm-*.out"))
    assert submitted.returncode == 0, submitted.stderr[-2000:] + output[-3000:]
    job_id = re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)
    assert (run_dir / "results.csv").is_file() and (run_dir / "train.rank1.log").is_file(), output[-3000:]
    assert "step 16/16" in (run_dir / "train.rank1.log").read_text()  # rank 1 trained every step with rank 0
    assert not (run_dir / "train.rank2.log").exists()
    steps = subprocess.run(["sacct", "-j", job_id, "-n", "-P", "-o", "JobID,NTasks,State"], capture_output=True,
                           text=True, check=True).stdout
    assert re.search(rf"^{job_id}\.0\|2\|COMPLETED$", steps, flags=re.M), steps  # one srun step of two tasks
