"""Peak memory of `saekit eval` on a wide SAE (issue 11): `python bench/eval_memory.py`.

Writes an untrained but valid checkpoint of an n = 131,072 TopK SAE for stories260k
blocks.2.hook_resid_post (the config `saekit train` would compose, saved the way training saves it), runs
`saekit eval ckpt=<it>` in a subprocess with every metric at its default (reconstruction, refinement,
downstream splices, ablation sparsity) and reads the child's peak resident memory from the kernel
(wait4's ru_maxrss). The row `eval_wide_peak_rss_mb` (name,value,unit) goes into `--out`
(default bench/scale_results.csv), replacing an older row of that name.

`--quick` runs a small version (n = 16,384, 2,048 downstream tokens, 4 ablation positions, 1,024 refinement
tokens) and writes nothing unless `--out` is given.
A child whose memory passes `--rss-limit-mb` is killed and the row records the limit as a lower bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from rows import merge_rows  # bench/rows.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("SAEKIT_DATA_ROOT", ROOT.parent / "shared" / "data")).resolve()
ROW = "eval_wide_peak_rss_mb"


def child_env() -> dict:
    return dict(os.environ, SAEKIT_DATA_ROOT=str(DATA_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                HF_DATASETS_OFFLINE="1")


def write_checkpoint(run_dir: Path, cache_dir: Path, n: int) -> Path:
    """A TopK SAE of width n with the metadata `saekit eval` reads (the composed `saekit train` config)."""
    os.environ.setdefault("SAEKIT_DATA_ROOT", str(DATA_ROOT))  # what the data/model configs resolve against
    from saekit.checkpoint import SAE_FILE, save_sae
    from saekit.cli import _register, absolutize_paths, preflight
    from saekit.sae import build_sae
    from saekit.train import spec_from_config

    _register()  # the config schemas, as the CLI registers them before composing
    cfg = preflight("train", [f"n={n}", "n_tokens=4096", "batch_size=4096", f"cache.dir={cache_dir}", "device=cpu"])
    absolutize_paths(cfg)
    sae = build_sae(spec_from_config(cfg, 64))
    generator = torch.Generator().manual_seed(0)
    sae.initialize(torch.randn(4096, 64, generator=generator), cfg.init.b_pre, cfg.init.tied, cfg.init.scale_encoder,
                   generator)
    path = run_dir / SAE_FILE
    save_sae(path, sae, {"config_fingerprint": "bench", "train_config": dataclasses.asdict(cfg), "step": 1,
                         "finished": True})
    return path


def peak_rss_of(command: list[str], limit_mb: float, log_path: Path) -> tuple[float, int, bool]:
    """Run `command` (output to log_path); its peak RSS in MiB (the kernel's high-water mark), its exit code, and
    whether it was killed for passing `limit_mb`."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    watcher = psutil.Process(proc.pid)
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            if not killed and watcher.memory_info().rss / 2**20 > limit_mb:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, proc.returncode, killed  # ru_maxrss is in KiB on Linux


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="n=16384 and a small downstream budget (seconds)")
    parser.add_argument("--n", type=int, default=None, help="SAE width (default 131072; 16384 with --quick)")
    parser.add_argument("--downstream-tokens", type=int, default=None, help="eval downstream_tokens (default: eval's)")
    parser.add_argument("--rss-limit-mb", type=float, default=16000, help="kill the eval above this RSS")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint and cache here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    n = args.n or (16384 if args.quick else 131072)
    downstream_tokens = args.downstream_tokens or (2048 if args.quick else None)
    out = args.out or (None if args.quick else ROOT / "bench" / "scale_results.csv")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        ckpt = write_checkpoint(work / "wide_run", work / "activations", n)
        command = [sys.executable, "-m", "saekit.cli", "eval", f"ckpt={ckpt.parent}", "device=cpu",
                   f"cache.dir={work / 'activations'}", f"hydra.run.dir={work / 'eval'}"]
        if downstream_tokens:
            command.append(f"downstream_tokens={downstream_tokens}")
        if args.quick:  # ablation forwards dominate the time on 2 cores
            command += ["ablation_positions=4", "refine_tokens=1024"]
        began = time.perf_counter()
        peak, code, killed = peak_rss_of(command, args.rss_limit_mb, work / "eval.log")
        wall = time.perf_counter() - began
        if code != 0 and not killed:
            raise SystemExit(f"bench: saekit eval exited {code}:\n{(work / 'eval.log').read_text()[-3000:]}")
    budget = f", downstream_tokens={downstream_tokens}" if downstream_tokens else ""
    budget += ", ablation_positions=4, refine_tokens=1024" if args.quick else ""
    unit = f"MiB (saekit eval, n={n}, stories260k d=64{budget}{', killed at the limit: lower bound' if killed else ''})"
    print(f"{ROW}: {peak:,.0f} {unit}; eval took {wall:.0f} s")
    if out is not None:
        merge_rows(out, [(ROW, f"{peak:.6g}", unit)])
        print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
