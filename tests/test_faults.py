"""Fault injection: corrupt checkpoints, interrupted and concurrent runs, refused reruns, unfinished evaluations.

Each test injects one fault the way a user meets it (an edited file, a second process, a signal) and checks the
promise: one line, exit 2 (or 130/143 for a signal), and nothing else changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, cli_env, run_cli
from saekit.checkpoint import OPTIMIZER_KEY, STATE_FILE, load_train_state, read_metadata, save_sae, save_train_state
from saekit.sae import build_sae
from saekit.synthetic import synthetic_train_config
from saekit.train import make_optimizer, spec_from_config


def _tiny_sae(d: int = 16, n: int = 32):
    cfg = synthetic_train_config("topk", n=n, n_tokens=4096, batch_size=256, k=4)
    return cfg, build_sae(spec_from_config(cfg, d))


def _one_line_exit_2(result: subprocess.CompletedProcess, *words: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ---- item 8: damaged checkpoint metadata ------------------------------------------------------------
def _rewrite_metadata(path: Path, edit) -> None:
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata()["saekit"]
    save_file(tensors, str(path), metadata={"saekit": edit(raw)})


def _with(key_path: tuple, value):
    def edit(raw: str) -> str:
        meta = json.loads(raw)
        target = meta
        for key in key_path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[key_path[-1]]
        else:
            target[key_path[-1]] = value
        return json.dumps(meta)
    return edit


_DELETE = object()


@pytest.mark.parametrize("edit, words", [
    (lambda raw: raw[: len(raw) // 2], ["not valid JSON"]),
    (_with(("spec",), _DELETE), ["no SAE spec"]),
    (_with(("spec", "n"), -1), ["n=-1"]),
    (_with(("train_config", "n_tokns"), 1000), ["n_tokns"]),
], ids=["not-json", "no-spec", "n-negative", "unknown-train-key"])
def test_damaged_checkpoint_metadata_is_one_line_exit_2(tmp_path, edit, words):
    cfg, sae = _tiny_sae()
    path = tmp_path / "run" / "sae.safetensors"
    save_sae(path, sae, {"train_config": dataclasses.asdict(cfg), "step": 16, "finished": True})
    _rewrite_metadata(path, edit)
    result = run_cli("eval", f"ckpt={path}", f"hydra.run.dir={tmp_path / 'eval'}", timeout=120)
    _one_line_exit_2(result, str(path), *words)


# ---- item 13: optimizer state through state_dict ------------------------------------------------------
def _trained_optimizer(cfg, sae):
    optimizer = make_optimizer(sae, cfg)
    for _ in range(3):
        optimizer.zero_grad()
        sae.loss_terms(torch.randn(64, 16), None)["loss"].backward()
        optimizer.step()
    return optimizer


def _assert_same_optimizer_state(a, b):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for index in sa:
        assert sa[index].keys() == sb[index].keys()
        for key in sa[index]:
            assert torch.equal(sa[index][key].cpu(), sb[index][key].cpu()), (index, key)
            assert sa[index][key].device == sb[index][key].device, (index, key)


def test_optimizer_state_round_trips_through_state_dict(tmp_path):
    cfg, sae = _tiny_sae()
    optimizer = _trained_optimizer(cfg, sae)
    save_train_state(tmp_path / "state.safetensors", sae, optimizer, {}, {"step": 3})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "state.safetensors"), framework="pt") as handle:
        assert "param_groups" in json.loads(handle.metadata()[OPTIMIZER_KEY])  # the non-tensor part, as JSON
    _, fresh = _tiny_sae()
    fresh_optimizer = make_optimizer(fresh, cfg)
    load_train_state(tmp_path / "state.safetensors", fresh, fresh_optimizer)
    _assert_same_optimizer_state(optimizer, fresh_optimizer)


def test_state_files_of_the_old_layout_still_resume(tmp_path):
    """Written as `train_state_tensors` did before: `adam.<param>.<key>` tensors, step on the host, no JSON."""
    cfg, sae = _tiny_sae()
    optimizer = _trained_optimizer(cfg, sae)
    names = {id(p): name for name, p in sae.named_parameters()}
    tensors = {f"sae.{name}": t for name, t in sae.state_dict().items()}
    for param, values in optimizer.state.items():
        for key, value in values.items():
            tensors[f"adam.{names[id(param)]}.{key}"] = torch.as_tensor(value).cpu()
    save_file(tensors, str(tmp_path / "old.safetensors"),
              metadata={"saekit": json.dumps({"spec": sae.spec.to_dict(), "step": 3})})
    _, fresh = _tiny_sae()
    fresh_optimizer = make_optimizer(fresh, cfg)
    load_train_state(tmp_path / "old.safetensors", fresh, fresh_optimizer)
    _assert_same_optimizer_state(optimizer, fresh_optimizer)


@pytest.mark.gpu
def test_fused_adam_on_cuda_resumes_with_step_on_the_device(tmp_path):
    cfg, sae = _tiny_sae()
    sae = sae.cuda()
    optimizer = make_optimizer(sae, cfg)
    for _ in range(3):
        optimizer.zero_grad()
        sae.loss_terms(torch.randn(64, 16, device="cuda"), None)["loss"].backward()
        optimizer.step()
    save_train_state(tmp_path / "state.safetensors", sae, optimizer, {}, {"step": 3})
    _, fresh = _tiny_sae()
    fresh = fresh.cuda()
    fresh_optimizer = make_optimizer(fresh, cfg)
    load_train_state(tmp_path / "state.safetensors", fresh, fresh_optimizer)
    _assert_same_optimizer_state(optimizer, fresh_optimizer)
    for values in fresh_optimizer.state.values():
        assert values["step"].device.type == "cuda"  # fused Adam keeps its step count beside the parameter
    x = torch.randn(64, 16, device="cuda")
    for opt, model in ((optimizer, sae), (fresh_optimizer, fresh)):
        opt.zero_grad()
        model.loss_terms(x, None)["loss"].backward()
        opt.step()
    assert torch.equal(sae.W_enc, fresh.W_enc)


# ---- run folders: shared helpers ----------------------------------------------------------------------
def _args(small_text, cache_root, run_dir, *extra, n_tokens=100_000):
    return ["train", "data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=1024",
            "n=128", "k=8", "batch_size=256", f"n_tokens={n_tokens}", "ckpt_every_steps=50", "seed=3",
            f"cache.dir={cache_root}", f"hydra.run.dir={run_dir}", *extra]


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "saekit.cli", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stopped_after_first_checkpoint(proc, run_dir: Path) -> int:
    """Wait for the run's first checkpoint (both files: the state is written first, then sae.safetensors), then
    freeze the process (SIGSTOP) mid-training; returns the state's step."""
    state, sae = run_dir / STATE_FILE, run_dir / "sae.safetensors"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (state.exists() and sae.exists()):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGSTOP)
    assert state.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint within 300 s"
    step = read_metadata(state)["step"]
    assert step < 390, "the run finished before it could be stopped"
    return step


def _folder_hashes(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


# ---- item 2: a refusal touches nothing --------------------------------------------------------------
@pytest.mark.slow
def test_refused_reruns_leave_a_finished_run_byte_identical(tmp_path, small_text, cache_root):
    run_dir = tmp_path / "run"
    first = run_cli(*_args(small_text, cache_root, run_dir))
    assert first.returncode == 0, first.stderr[-2000:]
    before = _folder_hashes(run_dir)
    assert {".hydra/overrides.yaml", "config.json", "status.json"} <= set(before)

    other = run_cli(*_args(small_text, cache_root, run_dir, "n=64"))  # another config forced into the folder
    _one_line_exit_2(other, "different configuration")
    assert _folder_hashes(run_dir) == before

    state = run_dir / STATE_FILE
    state.write_bytes(state.read_bytes()[:3000])  # a truncated state file
    before = _folder_hashes(run_dir)
    same = run_cli(*_args(small_text, cache_root, run_dir))
    _one_line_exit_2(same, "corrupt or truncated")
    assert _folder_hashes(run_dir) == before
    assert _status(run_dir)["status"] == "done"


# ---- item 1: one process per run folder ----------------------------------------------------------------
def test_a_second_process_on_a_busy_run_folder_refuses_or_waits(tmp_path, small_text, cache_root):
    run_dir = tmp_path / "run"
    first = _start(_args(small_text, cache_root, run_dir))
    try:
        step = _stopped_after_first_checkpoint(first, run_dir)
        second = run_cli(*_args(small_text, cache_root, run_dir))
        line = _one_line_exit_2(second, "in use by", f"pid {first.pid}", "saekit train", "lock_wait_s")
        assert "n=128" in line  # the other process's command
        assert _status(run_dir)["status"] == "running"  # the first run's files are left alone

        waiting = _start(_args(small_text, cache_root, run_dir, "lock_wait_s=300"))
        time.sleep(1)  # not a timing assertion: gives the waiter a chance to find the lock held
        os.kill(first.pid, signal.SIGKILL)  # dies holding the lock: the waiter takes it over and resumes
        first.wait()
        out, err = waiting.communicate(timeout=600)
        assert waiting.returncode == 0, err[-2000:]
        assert f"resuming from step {step}" in out
        assert _status(run_dir)["status"] == "done"
        assert not (run_dir / ".saekit.lock").exists()
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    from saekit.runlock import LOCK_FILE, RunLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps({"pid": pid, "host": __import__("socket").gethostname(),
                                     "started": "earlier", "command": "saekit train"}))
    with RunLock(tmp_path, "saekit train again"):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()


def test_a_lock_of_a_live_process_on_another_host_is_respected(tmp_path):
    from saekit.errors import ConfigError
    from saekit.runlock import LOCK_FILE, RunLock

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "other-node", "started": "earlier",
                                                  "command": "saekit train k=8"}))
    with pytest.raises(ConfigError, match="pid 1 on other-node.*saekit train k=8"):
        RunLock(tmp_path, "saekit train").acquire()


# ---- item 7: Ctrl-C and SIGTERM --------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_says_one_line_and_the_rerun_resumes(tmp_path, small_text, cache_root, sig, code):
    run_dir = tmp_path / "run"
    proc = _start(_args(small_text, cache_root, run_dir))
    try:
        _stopped_after_first_checkpoint(proc, run_dir)
        os.kill(proc.pid, sig)
        os.kill(proc.pid, signal.SIGCONT)  # the signal is handled mid-training, when the process runs again
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    step = read_metadata(run_dir / STATE_FILE)["step"]
    assert lines == [f"saekit: interrupted at step {step}; run the same command to resume"], err[-2000:]
    assert _status(run_dir)["status"] == "interrupted" and _status(run_dir)["step"] == step
    assert 0 < step < 390 and read_metadata(run_dir / "sae.safetensors")["step"] == step  # both files at that step

    rerun = run_cli(*_args(small_text, cache_root, run_dir))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming from step {step}" in rerun.stdout
    assert _status(run_dir)["status"] == "done"


# ---- item 3: evaluating an unfinished checkpoint ---------------------------------------------------------
def test_eval_of_an_unfinished_checkpoint_warns_and_reports_the_tokens_trained(tmp_path, small_text, cache_root):
    import pandas as pd

    run_dir = tmp_path / "run"
    proc = _start(_args(small_text, cache_root, run_dir))
    _stopped_after_first_checkpoint(proc, run_dir)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = read_metadata(run_dir / "sae.safetensors")["step"]
    out_dir = tmp_path / "eval"
    result = run_cli("eval", f"ckpt={run_dir}", "downstream=false", "ablation_positions=0", "refine_tokens=0",
                     f"cache.dir={cache_root}", f"hydra.run.dir={out_dir}", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    shown = result.stdout + result.stderr  # the warning goes through logging (Hydra's console handler)
    assert "unfinished" in shown and f"trained {step} of 390 steps" in shown, shown[-2000:]
    table = pd.read_csv(out_dir / "results.csv")
    assert set(table["tokens"]) == {step * 256}
    assert set(table["finished"]) == {False}


# ---- item 14: an error after training ---------------------------------------------------------------------
def test_an_error_after_fit_leaves_status_failed(tmp_path, small_text, cache_root, monkeypatch):
    from saekit import tasks
    from saekit.cli import _register, preflight

    _register()
    cfg = preflight("train", _args(small_text, cache_root, tmp_path, n_tokens=5120)[1:-1])

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tasks, "write_table", full_disk)
    with pytest.raises(OSError):
        tasks.train(cfg, tmp_path / "run")
    status = _status(tmp_path / "run")
    assert status["status"] == "failed" and "No space left" in status["error"]


def test_a_stop_flag_checkpoints_at_once_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    """The library side of Ctrl-C: no signal handler, just a flag; training stops between steps with a checkpoint."""
    from rich.console import Console

    from saekit.stopping import StopFlag, TrainingInterrupted
    from saekit.train import TrainingData, fit

    cfg = synthetic_train_config("topk", n=32, n_tokens=256 * 40, batch_size=256, k=4)
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))

    class StopBeforeStep(StopFlag):
        def __init__(self, step):
            super().__init__()
            self.calls, self.step = 0, step

        def is_set(self):
            self.calls += 1
            return self.calls > self.step

    def data():
        return TrainingData.from_tensor(x, cfg.batch_size, cfg.seed, key="planted")

    quiet = Console(quiet=True)
    straight = fit(cfg, data(), tmp_path / "straight", torch.device("cpu"), quiet).sae
    with pytest.raises(TrainingInterrupted, match="interrupted at step 15; run the same command to resume"):
        fit(cfg, data(), tmp_path / "stopped", torch.device("cpu"), quiet, stop=StopBeforeStep(15))
    assert read_metadata(tmp_path / "stopped" / STATE_FILE)["step"] == 15
    resumed = fit(cfg, data(), tmp_path / "stopped", torch.device("cpu"), quiet).sae
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


# ---- issue 13: kill -9 while the activation cache is being built ------------------------------------------
def _stories(folder: Path, count: int) -> Path:
    """The first `count` TinyStories train stories as a .txt: 100 make a cache build of a few seconds, long enough
    to be killed in the middle of."""
    from conftest import TRAIN_JSON

    stories = json.loads(TRAIN_JSON.read_text())[:count]
    path = folder / f"stories{count}.txt"
    path.write_text("\n\n".join(story.strip() for story in stories) + "\n")
    return path


def _leftovers(cache_dir: Path) -> list[str]:
    """Temporary files or folders of a build (`.<key>.tmp-<pid>`, the hash memo's `.tmp-<pid>`) in a cache root."""
    return sorted(path.name for path in cache_dir.iterdir() if ".tmp" in path.name)


def _wait_for(condition, proc, what: str, timeout: float = 300) -> None:
    """Poll `condition()` every 5 ms until it holds; fails naming `what` if the process ended or time ran out first."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.005)


def _numbers(run_dir: Path) -> tuple[list, list]:
    """What a run computed, without its timings and paths: steps.csv's losses and results.csv's metric values."""
    import pandas as pd

    steps = pd.read_csv(run_dir / "steps.csv")[["step", "loss", "mse", "l0", "dead_frac"]].values.tolist()
    table = pd.read_csv(run_dir / "results.csv")
    return steps, sorted(zip(table["metric"], table["value"]))


def test_kill_9_during_the_cache_build_then_the_rerun_builds_it_and_trains_the_same(tmp_path):
    text = _stories(tmp_path, 100)

    def args(cache_dir, run_dir):
        return ["train", "data=text_files", f"data.paths=[{text}]", "data.ctx_len=32", "data.n_eval_tokens=1024",
                "n=64", "k=4", "batch_size=512", "n_tokens=20480", "seed=3", "final_eval.downstream=false",
                f"cache.dir={cache_dir}", f"hydra.run.dir={run_dir}"]

    cache_dir, run_dir = tmp_path / "cache", tmp_path / "run"
    proc = _start(args(cache_dir, run_dir))
    try:  # under way: the build's temporary folder holds its first file (the token windows come first)
        _wait_for(lambda: any(cache_dir.glob(".*.tmp-*/tokens_*.safetensors")), proc, "cache build under way")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = [path.name for path in cache_dir.glob(".*.tmp-*")]
    assert left and all(name.endswith(f".tmp-{proc.pid}") for name in left)  # the killed build's temporary folder
    assert not [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]  # no half cache in place

    rerun = run_cli(*args(cache_dir, run_dir))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _leftovers(cache_dir) == []  # the dead builder's temporary folder was removed, not left for good
    [key] = [p for p in cache_dir.iterdir() if p.is_dir()]
    verified = run_cli("cache", "verify", str(key), timeout=120)
    assert verified.returncode == 0, verified.stderr[-2000:]
    assert _status(run_dir)["status"] == "done"

    straight_cache, straight_run = tmp_path / "straight_cache", tmp_path / "straight"
    straight = run_cli(*args(straight_cache, straight_run))
    assert straight.returncode == 0, straight.stderr[-2000:]
    files = lambda folder: json.loads((folder / "manifest.json").read_text())["files"]  # noqa: E731
    assert files(key) == files(straight_cache / key.name)  # same files, same sha256 as a build never killed
    assert _numbers(run_dir) == _numbers(straight_run)


# ---- issue 13: kill -9 in the middle of a sweep ---------------------------------------------------------
def _sweep_jobs(sweep_dir: Path) -> dict[int, Path]:
    """{k: job folder} for the jobs that have started (written their config.json)."""
    jobs = {}
    for config in sweep_dir.glob("*/config.json"):
        try:
            jobs[json.loads(config.read_text())["k"]] = config.parent
        except ValueError:  # being written
            continue
    return jobs


def _job_status(folder: Path) -> str:
    try:
        return json.loads((folder / "status.json").read_text())["status"]
    except (OSError, ValueError):
        return ""


def test_kill_9_mid_sweep_then_the_rerun_finishes_without_training_the_finished_job_again(tmp_path, small_text,
                                                                                          cache_root):
    import pandas as pd

    sweep_dir = tmp_path / "sweep"
    args = ["sweep", "k=4,8,16", "data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32",
            "data.n_eval_tokens=1024", "n=32", "n_tokens=76800", "batch_size=256", "ckpt_every_steps=20", "seed=3",
            "final_eval.downstream=false", f"cache.dir={cache_root}", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "saekit.cli", *args], cwd=REPO, env=cli_env(), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def second_job_training() -> bool:
        jobs = _sweep_jobs(sweep_dir)
        return (4 in jobs and _job_status(jobs[4]) == "done" and 8 in jobs and _job_status(jobs[8]) == "running"
                and (jobs[8] / STATE_FILE).exists())

    try:
        _wait_for(second_job_training, proc, "a checkpoint of the second job")
        os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep, as a scheduler's kill would
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    jobs = _sweep_jobs(sweep_dir)
    killed_at = read_metadata(jobs[8] / STATE_FILE)["step"]
    assert killed_at < 300 and _job_status(jobs[8]) == "running" and 16 not in jobs
    first = _folder_hashes(jobs[4])

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("trained 0 steps") == 1  # the finished job: nothing trained again
    assert f"resuming from step {killed_at} of 300" in rerun.stdout  # the killed one: from its checkpoint
    after = _folder_hashes(jobs[4])
    for name in ("sae.safetensors", STATE_FILE, "steps.csv", "results.csv", "config.json"):
        assert after[name] == first[name], name
    table = pd.read_csv(sweep_dir / "results.csv").drop_duplicates("run_id")
    assert sorted(table["k"]) == [4, 8, 16] and set(table["status"]) == {"ok"}
    assert all(_job_status(folder) == "done" for folder in _sweep_jobs(sweep_dir).values())
    assert not list(sweep_dir.rglob("*.tmp-*")) and not list(sweep_dir.rglob(".saekit.lock"))


# ---- issue 13: a full disk or a read-only file system under the run folder ------------------------------
def _refused_write(code: int):
    def refuse(path) -> OSError:
        return OSError(code, os.strerror(code), str(path))
    return refuse


def _lock_refused(code):
    """The first write into the run folder (its lock file) is refused, as on a read-only mount."""
    def patch(monkeypatch):
        from saekit.runlock import RunLock

        def refuse(self):
            raise _refused_write(code)(self.path)
        monkeypatch.setattr(RunLock, "_try_create", refuse)
    return patch


def _checkpoint_refused(code):
    """The disk fills up mid-training: the first checkpoint's file is half written, then safetensors reports the
    file system's error as text (as it does: '... (os error 28)')."""
    def patch(monkeypatch):
        from saekit import checkpoint

        def fills_up(tensors, path, metadata=None):
            Path(path).write_bytes(b"\0" * 4096)
            raise Exception(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
        monkeypatch.setattr(checkpoint, "save_file", fills_up)
    return patch


@pytest.mark.parametrize("inject, reason, fix", [
    (_lock_refused(30), "Read-only file system", "point hydra.run.dir at a folder you can write to"),
    (_checkpoint_refused(28), "No space left on device", "free space there or point hydra.run.dir at a disk with room"),
    (_checkpoint_refused(122), "Disk quota exceeded", "free space there or point hydra.run.dir at a disk with room"),
], ids=["read-only-lock", "full-disk-checkpoint", "quota-checkpoint"])
def test_a_refused_write_in_the_run_folder_is_one_line_naming_the_folder(tmp_path, small_text, cache_root, monkeypatch,
                                                                        capsys, inject, reason, fix):
    from saekit.cli import main

    run_dir = tmp_path / "run"
    inject(monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        main(_args(small_text, cache_root, run_dir, n_tokens=51200))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stopped.value.code == 2, err[-3000:]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert lines[0] == f"saekit: error: hydra.run.dir={run_dir}: cannot write there ({reason}); {fix}"
    assert not list(run_dir.rglob("*.tmp*"))  # no half-written checkpoint left holding the space
    assert not (run_dir / ".saekit.lock").exists()
    if (run_dir / "status.json").exists():
        assert _status(run_dir)["status"] == "failed" and reason in _status(run_dir)["error"]


# ---- issue 13: kill -9 between the two files of the last checkpoint -------------------------------------------
def test_a_kill_between_the_last_checkpoints_two_files_is_completed_by_the_rerun(tmp_path, small_text, cache_root):
    """The state file is written first, then sae.safetensors: a kill between them leaves a finished state and no
    weights file. The rerun trains nothing and writes the weights; a finished run's files are otherwise untouched."""
    run_dir = tmp_path / "run"
    args = _args(small_text, cache_root, run_dir, "final_eval.downstream=false", n_tokens=12800)  # 50 steps
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _folder_hashes(run_dir)

    again = run_cli(*args)  # a finished run, rerun: nothing trained, nothing rewritten
    assert again.returncode == 0 and "trained 0 steps" in again.stdout, again.stderr[-2000:]
    after = _folder_hashes(run_dir)
    for name in ("sae.safetensors", STATE_FILE, "steps.csv", "results.csv"):
        assert after[name] == before[name], name

    (run_dir / "sae.safetensors").unlink()  # as if killed right after the last state file was renamed into place
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from step 50 of 50" in rerun.stdout and "trained 0 steps" in rerun.stdout
    after = _folder_hashes(run_dir)
    for name in ("sae.safetensors", STATE_FILE, "steps.csv", "results.csv"):
        assert after[name] == before[name], name
    assert not list(run_dir.rglob("*.tmp*"))


def test_ctrl_c_during_the_cache_build_is_one_line_and_removes_the_half_built_cache(tmp_path):
    cache_dir = tmp_path / "cache"
    proc = _start(["cache", "data=text_files", f"data.paths=[{_stories(tmp_path, 100)}]", "data.ctx_len=32",
                   "data.n_eval_tokens=1024", f"cache.dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}"])
    try:
        _wait_for(lambda: any(cache_dir.glob(".*.tmp-*/tokens_*.safetensors")), proc, "cache build under way")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert [line for line in err.splitlines() if line.strip()] == [
        "saekit: interrupted; run the same command to resume"], err[-2000:]
    assert _leftovers(cache_dir) == []  # nothing half-built left behind, under a temporary name or the final one
    assert not [path for path in cache_dir.iterdir() if path.is_dir()]
