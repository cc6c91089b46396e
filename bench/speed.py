"""Training speed against the FLOP floor, cache and loader speed, and memory (issue 6): `make bench`.

Everything is measured in one process, on 2 threads, fp32, on synthetic activations built from a seed
(d=512, n=4096, k=32, batch 4096 tokens):

  (a) the machine's fp32 matmul rate for the encoder's shape, (B×d)·(d×n), measured again around every timed
      block, because these machines switch between a fast and a slow matmul mode within minutes;
  (b) training tokens/s of TopK (the sparse path, and the dense reference), BatchTopK, and ReLU and JumpReLU
      at L0 ≈ 32 (their active-set path; ReLU's dense reference too), each as a fraction of the floor
      2·d·n FLOP/token at the matmul rate measured around it; and the held-out nmse of TopK after 1M tokens
      through `fit` on both paths (the speedup must not cost quality);
  (c) activation-cache build tokens/s against a plain forward pass of stories260k over the same tokens;
  (d) loader tokens/s (shuffled batches from a memory-mapped cache) against TopK training tokens/s;
  (e) peak resident memory, and how much a training step adds to it on each path.

Writes bench/results.csv (`name, value, unit`) and prints a table. `--quick` runs a small version (for tests).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from rich.console import Console

from saekit.cache import ActivationCache, _ShardWriter, write_cache
from saekit.dead import DeadLatents
from saekit.loader import ShuffledBatches
from saekit.metrics import ReconstructionStats
from saekit.sae import build_sae
from saekit.sae.sparse import rank_preacts
from saekit.synthetic import synthetic_train_config
from timing import best_of  # bench/timing.py (this script's folder is on sys.path)
from saekit.train import (TrainingData, fit, initialize, learning_rate, loss_function, make_optimizer, spec_from_config,
                          train_step)

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2


@dataclasses.dataclass
class Setup:
    d: int = 512
    n: int = 4096
    k: int = 32
    batch: int = 4096
    quality_tokens: int = 1_000_000
    """Training tokens of the fast-vs-dense quality comparison."""
    eval_tokens: int = 65_536
    rounds: int = 5
    """Timed blocks per architecture (each between two matmul measurements); the median is reported."""
    steps_fast: int = 10
    steps_dense: int = 3
    cache_tokens: int = 524_288
    loader_tokens: int = 262_144
    device: str = "cpu"
    precision: str = "fp32"
    penalty_l0: int = 32
    """L0 at which the penalized SAEs (relu, jumprelu) are timed, the regime of a trained one (see PENALIZED)."""

    @classmethod
    def quick(cls) -> "Setup":
        return cls(d=64, n=512, k=8, batch=512, quality_tokens=8192, eval_tokens=2048, rounds=2, steps_fast=2,
                   steps_dense=1, cache_tokens=8192, loader_tokens=8192, penalty_l0=8)

    @classmethod
    def gpt2_small(cls) -> "Setup":
        """Gao et al.'s GPT-2-small configuration on CUDA in bf16 (training speed only)."""
        return cls(d=768, n=32768, k=32, batch=131_072, rounds=5, steps_fast=5, device="cuda", precision="bf16")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


# ---- (a) the matmul ceiling ---------------------------------------------------------------------------------
def matmul_gflops(setup: Setup, reps: int = 3) -> float:
    """GFLOP/s of the encoder matmul (B×d)·(d×n) in the setup's precision, best of `reps`."""
    x = torch.randn(setup.batch, setup.d, device=setup.device, dtype=setup.dtype)
    W = torch.randn(setup.n, setup.d, device=setup.device, dtype=setup.dtype)
    x @ W.T
    seconds = best_of(reps, lambda: x @ W.T, sync=lambda: synchronize(setup))
    return 2 * setup.batch * setup.d * setup.n / seconds / 1e9


def synchronize(setup: Setup) -> None:
    if setup.device == "cuda":
        torch.cuda.synchronize()


def selection_cost(setup: Setup, reps: int = 3) -> dict:
    """Seconds of the encoder matmul alone, of the chunked matmul + per-row top-k the sparse path runs, and of
    one unchunked torch.topk over the whole (B, n) pre-activations, on the same inputs (best of `reps`)."""
    x = torch.randn(setup.batch, setup.d)
    W = torch.randn(setup.n, setup.d) / math.sqrt(setup.d)
    b = torch.zeros(setup.n)
    h = x @ W.T
    measures = {"matmul": lambda: torch.addmm(b, x, W.T), "ranked": lambda: rank_preacts(x, W, b, setup.k),
                "topk_whole": lambda: h.topk(setup.k, dim=-1, sorted=False)}
    for fn in measures.values():  # warm-up
        fn()
    return {name: best_of(reps, fn) for name, fn in measures.items()}


def floor_tokens_per_s(setup: Setup, gflops: float) -> float:
    """Tokens/s if a step cost only the dense encoder matmul, 2·d·n FLOP per token."""
    return gflops * 1e9 / (2 * setup.d * setup.n)


# ---- synthetic activations ----------------------------------------------------------------------------------
def synthetic_activations(setup: Setup, n_tokens: int, seed: int) -> torch.Tensor:
    """x = μ + Σ c_f·f over 24 features per token drawn from 2n unit directions with power-law frequencies,
    coefficients 0.5 + Exp(1)/2, plus small dense noise; the directions and μ depend on seed 0 only."""
    directions_gen = torch.Generator().manual_seed(0)
    n_features = 2 * setup.n
    directions = F.normalize(torch.randn(n_features, setup.d, generator=directions_gen), dim=1)
    mean = F.normalize(torch.randn(setup.d, generator=directions_gen), dim=0) * 2.0
    frequency = (torch.arange(n_features, dtype=torch.float64) + 1).pow(-0.6)
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(n_tokens, setup.d)
    per_token, chunk = 24, 65_536
    for start in range(0, n_tokens, chunk):
        rows = min(chunk, n_tokens - start)
        features = torch.multinomial(frequency, rows * per_token, replacement=True, generator=generator).view(rows, -1)
        coefficients = 0.5 + 0.5 * torch.empty(rows, per_token).exponential_(generator=generator)
        noise = 0.01 * torch.randn(rows, setup.d, generator=generator)
        out[start:start + rows] = mean + F.embedding_bag(features, directions, per_sample_weights=coefficients,
                                                         mode="sum") + noise
    return out


def train_config(setup: Setup, activation: str, fast_path: bool, n_tokens: int, **knobs):
    cfg = synthetic_train_config(activation, n=setup.n, n_tokens=n_tokens, batch_size=setup.batch, k=setup.k, **knobs)
    return dataclasses.replace(cfg, fast_path=fast_path, device=setup.device, precision=setup.precision)


# ---- (b) training speed -------------------------------------------------------------------------------------
def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (Linux ≥ 4.0), so a phase's peak can be read alone."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def start_at_l0(sae, sample: torch.Tensor, l0: int) -> None:
    """Encoder biases that make each latent fire on l0/n of `sample`'s tokens (so L0 ≈ l0 per token), then the
    encoder rescaled so that reconstructions match the inputs' norms again (SPEC 3's init, at this L0).

    A fresh ReLU or JumpReLU SAE has about half its latents active; a trained one a few dozen, which is what its
    training steps cost most of the time (and what the active-set path is for). Without the rescale its
    reconstructions would be far too small and the first Adam steps would raise every pre-activation (and L0)
    at once. Both variants keep their active set under (W_enc, b_enc, θ) → c·(W_enc, b_enc, θ), c > 0.
    sample: (N, d) normalized.
    """
    jumprelu = hasattr(sae, "log_threshold")
    m = (sample - sae.b_pre) @ sae.W_enc.T  # (N, n)
    rows = sample.shape[0]
    cut = m.kthvalue(rows - max(1, rows * l0 // sae.spec.n), dim=0).values  # l0/n of each column lies above it
    sae.b_enc.copy_((sae.threshold if jumprelu else 0.0) - cut)  # JumpReLU fires where h > θ, ReLU where h > 0
    centered = (sample - sae.b_pre).norm(dim=-1).sum()
    scale = centered / (sae.decode(sae.encode(sample)) - sae.b_pre).norm(dim=-1).sum().clamp_min(1e-12)
    sae.W_enc.mul_(scale)
    sae.b_enc.mul_(scale)
    if jumprelu:
        sae.log_threshold.add_(scale.log())


def time_training(setup: Setup, x: torch.Tensor, activation: str, fast_path: bool, steps: int,
                  at_l0: Optional[int] = None, **knobs) -> dict:
    """Median over rounds of (tokens/s, fraction of the floor), each round between two matmul measurements;
    through the same loss function, optimizer and `train_step` as `fit` (batches already in memory).
    `at_l0`: start from biases giving that L0 (`start_at_l0`); `l0` is the mean L0 of the timed steps."""
    cfg = train_config(setup, activation, fast_path, n_tokens=setup.batch * (steps * setup.rounds + 1), **knobs)
    data = TrainingData.from_tensor(x, setup.batch, seed=0, key="bench")
    sae = build_sae(spec_from_config(cfg, setup.d))
    initialize(sae, cfg, data)
    device = torch.device(setup.device)
    sae.to(device).train()
    loss_fn = loss_function(sae, cfg, device)
    optimizer = make_optimizer(sae, cfg)
    dead = DeadLatents(torch.zeros(cfg.n, dtype=torch.long, device=device), 10**12)
    batches = [sae.normalize_input(data.batches.batch(i).to(device))[0] for i in range(4)]
    if at_l0 is not None:  # from a batch that is not timed
        start_at_l0(sae, sae.normalize_input(data.batches.batch(len(batches)).to(device))[0], at_l0)
    l0s: list[torch.Tensor] = []

    def step(i: int, record: bool = False) -> None:
        terms = train_step(sae, optimizer, batches[i % len(batches)], dead, cfg, learning_rate(cfg, setup.d, i),
                           loss_fn)
        if record:
            l0s.append(terms["l0"].detach())
        synchronize(setup)

    step(0)  # warm-up: Adam's moments and the allocator's pools exist from here on
    # Memory first, alone (the matmul measurements below allocate B×n outputs of their own).
    rss_before = rss_mb()
    reset_peak_rss()
    for i in range(2):
        step(1 + i)
    peak, step_mem = peak_rss_mb(), peak_rss_mb() - rss_before
    speeds, fractions, ceilings = [], [], []
    for r in range(setup.rounds):
        before = matmul_gflops(setup)
        began = time.perf_counter()
        for i in range(steps):
            step(1 + r * steps + i, record=True)
        elapsed = time.perf_counter() - began
        ceiling = (before + matmul_gflops(setup)) / 2
        speed = steps * setup.batch / elapsed
        speeds.append(speed)
        ceilings.append(ceiling)
        fractions.append(speed / floor_tokens_per_s(setup, ceiling))
    return {"tokens_per_s": statistics.median(speeds), "frac_floor": statistics.median(fractions),
            "gflops": statistics.median(ceilings), "peak_rss_mb": peak, "step_mem_mb": step_mem,
            "l0": float(torch.stack(l0s).mean())}


PENALIZED = {"relu": {"lam": 1.0, "start": 1.25}, "jumprelu": {"lam": 0.5, "start": 1.4}}
"""λ and starting L0 (× `penalty_l0`) of the timed ReLU and JumpReLU SAEs. From `start_at_l0` their L0 drifts
down over the timed steps, hardly depending on λ (0.05 to 5 changed it by under 10% over 50 steps; λ as in the
earlier ReLU row and the synthetic benchmark's JumpReLU); these starts put its mean near `penalty_l0` (measured
and reported as `<name>_l0`)."""


def start(setup: Setup, name: str) -> dict:
    """time_training's `at_l0` and λ for a penalized SAE."""
    return {"at_l0": round(PENALIZED[name]["start"] * setup.penalty_l0), "lam": PENALIZED[name]["lam"]}


def penalized_rows(setup: Setup, train_x: torch.Tensor, add) -> list[float]:
    """ReLU and JumpReLU at L0 ≈ 32 on their active-set path, and ReLU's dense reference from the same start;
    returns the matmul rates measured around them."""
    rates = []
    for name in ("relu", "jumprelu"):
        fast = time_training(setup, train_x, name, True, setup.steps_fast, **start(setup, name))
        add(f"{name}_tokens_per_s", fast["tokens_per_s"], "tokens/s")
        add(f"{name}_frac_floor", fast["frac_floor"], "fraction (at the L0 below, active-set path)")
        add(f"{name}_l0", fast["l0"], "latents/token (mean over the timed steps)")
        rates.append(fast["gflops"])
    dense = time_training(setup, train_x, "relu", False, setup.steps_dense, **start(setup, "relu"))
    add("relu_dense_tokens_per_s", dense["tokens_per_s"], "tokens/s")
    add("relu_dense_frac_floor", dense["frac_floor"], "fraction (dense reference, same start)")
    return rates + [dense["gflops"]]


@torch.no_grad()
def heldout_nmse(sae, x: torch.Tensor) -> float:
    sae.eval()
    stats = ReconstructionStats(sae.spec.d, sae.spec.n)
    for chunk in x.split(8192):
        x_hat, z = sae.reconstruct(chunk)
        stats.update(chunk, x_hat, z)
    return stats.metrics()["nmse"]


def quality(setup: Setup, train_x: torch.Tensor, eval_x: torch.Tensor, fast_path: bool) -> dict:
    """Held-out nmse after `quality_tokens` through `fit` (the `saekit train` loop), and fit's tokens/s."""
    cfg = train_config(setup, "topk", fast_path, n_tokens=setup.quality_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(cfg, TrainingData.from_tensor(train_x, setup.batch, seed=0, key="bench"), Path(tmp), torch.device("cpu"), Console(quiet=True))
    return {"nmse": heldout_nmse(result.sae, eval_x), "fit_tokens_per_s": result.tokens_per_s}


# ---- (c) cache build against a forward pass ------------------------------------------------------------------
def cache_speed(setup: Setup, workdir: Path) -> dict:
    """Tokens/s of building the stories260k cache (blocks.2.hook_resid_post) and of full forward passes over the
    same token windows; tokenization is done once, outside both timings."""
    from saekit.cli import preflight
    from saekit.config import register_schemas
    from saekit.data import load_windows
    from saekit.model import load_model

    register_schemas()
    cfg = preflight("train", ["data.ctx_len=64", f"cache.dir={workdir / 'activations'}"])
    model = load_model(cfg.model, torch.device("cpu"))
    windows = load_windows(cfg.data, model.tokenizer, model.bos_token_id, setup.cache_tokens)
    all_windows = torch.cat([windows.train, windows.eval])
    n_tokens = all_windows.numel()
    model.bridge(all_windows[:cfg.cache.batch_windows])  # warm-up
    with torch.no_grad():
        began = time.perf_counter()
        for start in range(0, all_windows.shape[0], cfg.cache.batch_windows):
            model.bridge(all_windows[start:start + cfg.cache.batch_windows])
        forward = n_tokens / (time.perf_counter() - began)
    began = time.perf_counter()
    write_cache(cfg, model, windows, workdir / "activations" / "bench", setup.cache_tokens, console_print=lambda _: None)
    build = n_tokens / (time.perf_counter() - began)
    return {"forward_tokens_per_s": forward, "cache_tokens_per_s": build, "cache_vs_forward": build / forward,
            "cache_n_layers": model.n_layers}


# ---- (d) the loader -------------------------------------------------------------------------------------------
def loader_speed(setup: Setup, workdir: Path) -> float:
    """Tokens/s of shuffled training batches gathered from a memory-mapped float32 cache of synthetic activations."""
    folder = workdir / "loader"
    folder.mkdir()
    writer = _ShardWriter(folder, "train", shard_rows=65_536, dtype=torch.float32)
    for start in range(0, setup.loader_tokens, 65_536):
        writer.add(synthetic_activations(setup, min(65_536, setup.loader_tokens - start), seed=100 + start))
    writer.close()
    cache = ActivationCache(folder, {"dtype": "float32", "splits": {"train": {"shards": writer.shards}}})
    batches = ShuffledBatches(cache, "train", setup.batch, seed=0)
    batches.batch(0)
    steps = batches.batches_per_epoch * 2  # two epochs: two permutations
    began = time.perf_counter()
    for step in range(steps):
        batches.batch(step)
    return steps * setup.batch / (time.perf_counter() - began)


# ---- the table ------------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {THREADS} threads"


def run(setup: Setup, out: Path, console: Console) -> list[tuple[str, float, str]]:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    rows: list[tuple[str, float, str]] = []

    def add(name: str, value: float, unit: str) -> None:
        rows.append((name, value, unit))
        console.print(f"  {name:<28} {value:>12,.4g}  {unit}", highlight=False)

    console.print(f"[bold]saekit bench[/bold]: d={setup.d} n={setup.n} k={setup.k} batch={setup.batch}, fp32, "
                  f"{THREADS} threads — {machine()}")
    train_x = synthetic_activations(setup, setup.quality_tokens, seed=1)
    eval_x = synthetic_activations(setup, setup.eval_tokens, seed=2)

    topk = time_training(setup, train_x, "topk", True, setup.steps_fast)
    add("topk_tokens_per_s", topk["tokens_per_s"], "tokens/s")
    add("topk_frac_floor", topk["frac_floor"], "fraction")
    add("peak_rss_mb", topk["peak_rss_mb"], "MiB")
    add("topk_step_mem_mb", topk["step_mem_mb"], "MiB")
    dense = time_training(setup, train_x, "topk", False, setup.steps_dense)
    add("topk_dense_tokens_per_s", dense["tokens_per_s"], "tokens/s")
    add("topk_dense_frac_floor", dense["frac_floor"], "fraction")
    add("topk_dense_step_mem_mb", dense["step_mem_mb"], "MiB")
    add("topk_speedup_vs_dense", topk["frac_floor"] / dense["frac_floor"], "x")
    batchtopk = time_training(setup, train_x, "batchtopk", True, setup.steps_fast)
    add("batchtopk_tokens_per_s", batchtopk["tokens_per_s"], "tokens/s")
    add("batchtopk_frac_floor", batchtopk["frac_floor"], "fraction")
    penalized = penalized_rows(setup, train_x, add)
    ceilings = [topk["gflops"], dense["gflops"], batchtopk["gflops"], *penalized]
    add("matmul_gflops", statistics.median(ceilings), "GFLOP/s")
    add("matmul_gflops_min", min(ceilings), "GFLOP/s")
    add("matmul_gflops_max", max(ceilings), "GFLOP/s")
    add("floor_tokens_per_s", floor_tokens_per_s(setup, statistics.median(ceilings)), "tokens/s")
    selection = selection_cost(setup)
    add("select_vs_matmul", selection["ranked"] / selection["matmul"], "x (chunked matmul + top-k / matmul)")
    add("unchunked_topk_vs_matmul", selection["topk_whole"] / selection["matmul"], "x (torch.topk on B×n / matmul)")

    fast_quality = quality(setup, train_x, eval_x, fast_path=True)
    dense_quality = quality(setup, train_x, eval_x, fast_path=False)
    add("topk_heldout_nmse", fast_quality["nmse"], f"nmse after {setup.quality_tokens:,} tokens")
    add("topk_dense_heldout_nmse", dense_quality["nmse"], f"nmse after {setup.quality_tokens:,} tokens")
    add("topk_fit_tokens_per_s", fast_quality["fit_tokens_per_s"], "tokens/s")
    add("topk_dense_fit_tokens_per_s", dense_quality["fit_tokens_per_s"], "tokens/s")

    with tempfile.TemporaryDirectory() as tmp:
        cache = cache_speed(setup, Path(tmp))
        add("forward_tokens_per_s", cache["forward_tokens_per_s"], "tokens/s (stories260k, full forward)")
        add("cache_tokens_per_s", cache["cache_tokens_per_s"], "tokens/s (build to blocks.2)")
        add("cache_vs_forward", cache["cache_vs_forward"], "x")
        loader = loader_speed(setup, Path(tmp))
    add("loader_tokens_per_s", loader, "tokens/s")
    add("loader_vs_train", loader / topk["tokens_per_s"], "x")

    write_results(out, rows, machine())
    console.print(f"wrote {out}")
    return rows


def write_results(out: Path, rows: list[tuple[str, float, str]], where: str) -> None:
    """The `name, value, unit` CSV, with a last row naming the machine."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "value", "unit"])
        writer.writerows((name, f"{value:.6g}", unit) for name, value, unit in rows)
        writer.writerow(["machine", where, "text"])


def run_cuda(setup: Setup, out: Path, console: Console) -> list[tuple[str, float, str]]:
    """Training speed only, at the GPT-2-small configuration, against the bf16 matmul ceiling measured here."""
    rows: list[tuple[str, float, str]] = []
    console.print(f"[bold]saekit bench (CUDA)[/bold]: d={setup.d} n={setup.n} k={setup.k} batch={setup.batch}, "
                  f"{setup.precision} — {torch.cuda.get_device_name()}")
    x = synthetic_activations(setup, 4 * setup.batch, seed=1)
    for activation in ("topk", "batchtopk"):
        torch.cuda.reset_peak_memory_stats()
        result = time_training(setup, x, activation, True, setup.steps_fast)
        rows += [(f"{activation}_tokens_per_s", result["tokens_per_s"], "tokens/s"),
                 (f"{activation}_frac_floor", result["frac_floor"], f"fraction ({setup.precision} matmul ceiling)"),
                 (f"{activation}_peak_gpu_mb", torch.cuda.max_memory_allocated() / 2**20, "MiB"),
                 (f"{activation}_matmul_gflops", result["gflops"], "GFLOP/s")]
    for name, value, unit in rows:
        console.print(f"  {name:<28} {value:>12,.4g}  {unit}", highlight=False)
    write_results(out, rows, torch.cuda.get_device_name())
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small configuration (seconds; for tests)")
    parser.add_argument("--cuda", action="store_true",
                        help="GPT-2-small configuration (d=768, n=32768, k=32, batch 131072) in bf16 on CUDA")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("bench: --cuda needs a CUDA device; run without --cuda for the CPU bench")
        run_cuda(Setup.gpt2_small(), args.out or ROOT / "bench" / "results_cuda.csv", Console())
    else:
        run(Setup.quick() if args.quick else Setup(), args.out or ROOT / "bench" / "results.csv", Console())
    print(f"bench took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
