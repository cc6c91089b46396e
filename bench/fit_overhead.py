"""What a whole `fit` call costs beyond its training steps (issue 11): `python bench/fit_overhead.py`.

One process, 2 threads, fp32, the `make bench` configuration (d=512, n=4096, k=32, batch 4096 tokens, the
synthetic activations of bench/speed.py), TopK with AuxK, logging every 10 steps and checkpointing every 100:

  fit_tokens_per_s    1M tokens over the seconds of the whole `fit` call: initialization, the prefetcher's
                      start, log and checkpoint steps and the final checkpoint included;
  steps_tokens_per_s  the same run replayed afterwards as plain `train_step` calls, batches from the same
                      Prefetcher as in `fit`, timed after one warm-up step (the steady-step rate);
  fit_vs_steps        their ratio (1.0: fit adds nothing to its steps);
  init_s              seconds from entering `fit` to its first training step (timed by wrapping
                      `saekit.train.train_step`, which `fit` calls for every step);
  matmul_gflops_*     the encoder matmul rate measured before and after each phase, as bench/speed.py does: these
                      machines flip between a fast and a slow matmul mode, and a flip shows as a gap here.

Rows `name,value,unit` go into --out (default bench/scale_results.csv), replacing rows of the same name.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

import saekit.train as train_mod
from saekit.dead import DeadLatents
from saekit.loader import Prefetcher
from saekit.sae import build_sae
from saekit.train import (TrainingData, dead_window_tokens, fit, initialize, learning_rate, loss_function,
                          make_optimizer, spec_from_config, train_step)
from rows import merge_rows  # bench/rows.py (this script's folder is on sys.path)
from speed import THREADS, Setup, machine, matmul_gflops, synchronize, synthetic_activations, train_config

ROOT = Path(__file__).resolve().parent.parent


def bench_config(setup: Setup, n_tokens: int):
    """The `saekit train` defaults for logging and checkpoints, on the bench's synthetic configuration."""
    return dataclasses.replace(train_config(setup, "topk", True, n_tokens=n_tokens), log_every_steps=10,
                               ckpt_every_steps=100)


def timed_fit(setup: Setup, cfg, x: torch.Tensor) -> dict:
    """Seconds of one whole `fit` call, and of its entry up to the first training step."""
    first_step = []
    real_step = train_mod.train_step

    def marking_step(*args, **kwargs):
        if not first_step:
            first_step.append(time.perf_counter())
        return real_step(*args, **kwargs)

    data = TrainingData.from_tensor(x, cfg.batch_size, cfg.seed, key="bench-fit-overhead")
    train_mod.train_step = marking_step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            synchronize(setup)
            began = time.perf_counter()
            fit(cfg, data, Path(tmp), torch.device(setup.device), Console(quiet=True))
            synchronize(setup)
            seconds = time.perf_counter() - began
    finally:
        train_mod.train_step = real_step
    return {"seconds": seconds, "init_s": first_step[0] - began}


class Replay:
    """The run's steps as plain `train_step` calls (same data, schedule and dead-latent window as the fit), after
    a first, untimed warm-up step. Batches come from a Prefetcher, as in `fit`, so the two differ only in what
    `fit` adds around its steps."""

    def __init__(self, setup: Setup, cfg, x: torch.Tensor):
        self.setup, self.cfg, self.device = setup, cfg, torch.device(setup.device)
        self.data = TrainingData.from_tensor(x, cfg.batch_size, cfg.seed, key="bench-fit-overhead")
        self.sae = build_sae(spec_from_config(cfg, setup.d)).to(self.device)
        initialize(self.sae, cfg, self.data)
        self.sae.train()
        self.loss_fn = loss_function(self.sae, cfg, self.device)
        self.optimizer = make_optimizer(self.sae, cfg)
        self.dead = DeadLatents(torch.zeros(cfg.n, dtype=torch.long, device=self.device), dead_window_tokens(cfg))
        self.tokens, self.seconds = 0, 0.0

    def run(self) -> None:
        cfg = self.cfg
        with Prefetcher(self.data.batches, 0, cfg.n_steps, cfg.prefetch, self.device) as batches:
            for step in range(cfg.n_steps):
                if step == 1:  # the clock starts after the warm-up step
                    synchronize(self.setup)
                    began = time.perf_counter()
                x = self.sae.normalize_input(batches.get(step))[0]
                train_step(self.sae, self.optimizer, x, self.dead, cfg, learning_rate(cfg, self.setup.d, step),
                           self.loss_fn)
            synchronize(self.setup)
        self.seconds = time.perf_counter() - began
        self.tokens = (cfg.n_steps - 1) * cfg.batch_size


def run(setup: Setup, n_tokens: int, console: Console) -> list[tuple[str, float, str]]:
    """The fit first, as in a `saekit train` process (its first optimizer pays torch's one-time imports), then
    the steady replay; the matmul rate around each shows whether the machine's speed changed in between."""
    torch.set_num_threads(THREADS)
    cfg = bench_config(setup, n_tokens)
    x = synthetic_activations(setup, cfg.n_steps * cfg.batch_size, seed=1)
    tokens = cfg.n_steps * cfg.batch_size
    before = matmul_gflops(setup)
    fitted = timed_fit(setup, cfg, x)
    between = matmul_gflops(setup)
    replay = Replay(setup, cfg, x)
    replay.run()
    after = matmul_gflops(setup)
    fit_rate, steps_rate = tokens / fitted["seconds"], replay.tokens / replay.seconds
    return [
        ("fit_vs_steps", fit_rate / steps_rate, "x (whole fit call tokens/s / steady train_step tokens/s)"),
        ("init_s", fitted["init_s"], "s (fit entry to its first step)"),
        ("fit_tokens_per_s", fit_rate, f"tokens/s (whole fit call, {tokens:,} tokens)"),
        ("steps_tokens_per_s", steps_rate, "tokens/s (plain train_step calls)"),
        ("fit_overhead_s", fitted["seconds"] - tokens / steps_rate, "s (fit call minus its steps at the steady rate)"),
        ("matmul_gflops_fit", (before + between) / 2, "GFLOP/s (around the fit call)"),
        ("matmul_gflops_steps", (between + after) / 2, "GFLOP/s (around the plain steps)"),
    ]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small configuration (seconds; for tests)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scale_results.csv")
    args = parser.parse_args(argv)
    setup = Setup.quick() if args.quick else Setup()
    n_tokens = 64 * setup.batch if args.quick else 1_000_000
    console = Console()
    console.print(f"[bold]fit overhead[/bold]: d={setup.d} n={setup.n} k={setup.k} batch={setup.batch}, "
                  f"{n_tokens:,} tokens — {machine()}")
    rows = run(setup, n_tokens, console)
    for name, value, unit in rows:
        console.print(f"  {name:<22} {value:>12,.4g}  {unit}", highlight=False)
    merge_rows(args.out, [(name, f"{value:.6g}", unit) for name, value, unit in rows])
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
