"""Issue 11 loader rows: the block-shuffle loader on a cache bigger than the page cache holds, and what it costs.

  loader_cold_tokens_per_s         batches (4096 rows) from the block-shuffle loader over one epoch of a >= 4 GB
                                   synthetic GPT-2-shaped cache (d=768, float32, ~1.4M rows), the shard files
                                   evicted from the page cache before each timed epoch (median of the rounds);
                                   default buffer (1/16 of memory), 1 MiB blocks
  loader_cold_global_tokens_per_s  the global-shuffle loader from the same cold cache, over a short block of batches
  train_tokens_per_s               TopK training steps at d=768, n=32768, k=32, batch 4096 (fp32, this machine)
  loader_cold_vs_train             loader_cold_tokens_per_s / train_tokens_per_s (target >= 10)
  block_vs_global_nmse             held-out nmse of the demo configuration (stories260k, TopK k=8 n=512, context 64,
                                   1M tokens) trained on the block loader with an 65,536-row buffer over the nmse
                                   trained on the global shuffle (target <= 1.02); both nmse are rows too

`python bench/loader_cold.py [--quick] [--out bench/scale_results.csv]`; the synthetic cache lives in a temporary
folder under outputs/ that is removed afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from rows import merge_rows  # bench/rows.py (this script's folder is on sys.path)
from synthetic_cache import write_synthetic_cache  # bench/synthetic_cache.py
from saekit.cache import ActivationCache, open_cache
from saekit.config import LoaderConfig
from saekit.dead import DeadLatents
from saekit.loader import BlockShuffledBatches, EpochBatches, ShuffledBatches, make_batches
from saekit.sae import build_sae
from saekit.synthetic import synthetic_train_config
from saekit.train import (TrainingData, fit, initialize, learning_rate, loss_function, make_optimizer, spec_from_config,
                          train_step)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAEKIT_DATA_ROOT", ROOT.parent / "shared" / "data"))
THREADS = 2


@dataclasses.dataclass
class Setup:
    cache_rows: int = 1_400_000
    """1.4M x 768 x 4 B = 4.3 GB of training shards."""
    d: int = 768
    n: int = 32768
    k: int = 32
    batch: int = 4096
    rounds: int = 3
    global_seconds: float = 20.0
    """The global loader runs batches until this much time has passed (it is far slower from a cold cache)."""
    train_steps: int = 3
    demo: list[str] = dataclasses.field(default_factory=list)
    """Extra overrides of the demo runs."""
    demo_buffer: int = 65_536

    @classmethod
    def quick(cls) -> "Setup":
        return cls(cache_rows=40_000, d=128, n=1024, k=16, batch=1024, rounds=2, global_seconds=1.0, train_steps=2,
                   demo=["n_tokens=65536", "data.n_train_tokens=65536", "data.n_eval_tokens=8192"], demo_buffer=16_384)


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache (written pages are flushed first: dirty pages cannot be dropped)."""
    for path in paths:
        handle = os.open(path, os.O_RDONLY)
        try:
            os.fsync(handle)
            os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(handle)


def shard_paths(cache: ActivationCache) -> list[Path]:
    return [cache.root / shard["file"] for shard in cache.manifest["splits"]["train"]["shards"]]


def timed_batches(batches: EpochBatches, steps: int, budget_s: float = float("inf")) -> float:
    """Tokens/s of batches 0.. until `steps` are made or `budget_s` has passed (at least one batch)."""
    began, made = time.perf_counter(), 0
    while made < steps and (made == 0 or time.perf_counter() - began < budget_s):
        batches.batch(made)
        made += 1
    return made * batches.batch_size / (time.perf_counter() - began)


def cold_loader_rows(setup: Setup, work: Path) -> dict:
    """Block-shuffle epochs and a short block of global-shuffle batches, each from an evicted cache."""
    root = write_synthetic_cache(work / "big", setup.cache_rows, setup.d)
    cache = open_cache(root)
    paths = shard_paths(cache)
    speeds, facts = [], {}
    for seed in range(setup.rounds):
        evict(paths)
        batches = make_batches(cache, "train", setup.batch, seed, LoaderConfig(shuffle="block"))
        assert isinstance(batches, BlockShuffledBatches)
        speeds.append(timed_batches(batches, batches.batches_per_epoch))
        batches.close()  # the read-ahead of the next epoch must not refill the page cache of the next round
        facts = {"buffer_rows": batches.buffer_rows, "fills": batches.n_fills, "block_rows": batches.block_rows}
    evict(paths)
    global_speed = timed_batches(ShuffledBatches(cache, "train", setup.batch, seed=0), 10**9, setup.global_seconds)
    bytes_ = sum(path.stat().st_size for path in paths)
    return {"block": statistics.median(speeds), "block_all": speeds, "global": global_speed, "bytes": bytes_, **facts}


def train_speed(setup: Setup) -> float:
    """TopK tokens/s through `train_step` (fit's step), on in-memory batches, after one warm-up step."""
    cfg = synthetic_train_config("topk", n=setup.n, n_tokens=setup.batch * 100, batch_size=setup.batch, k=setup.k)
    x = torch.randn(4 * setup.batch, setup.d, generator=torch.Generator().manual_seed(0))
    data = TrainingData.from_tensor(x, setup.batch, seed=0, key="bench")
    sae = build_sae(spec_from_config(cfg, setup.d))
    initialize(sae, cfg, data)
    sae.train()
    device = torch.device("cpu")
    loss_fn = loss_function(sae, cfg, device)
    optimizer = make_optimizer(sae, cfg)
    dead = DeadLatents(torch.zeros(cfg.n, dtype=torch.long), 10**12)
    batches = [sae.normalize_input(data.batches.batch(i))[0] for i in range(4)]
    train_step(sae, optimizer, batches[0], dead, cfg, learning_rate(cfg, setup.d, 0), loss_fn)  # warm-up
    began = time.perf_counter()
    for step in range(1, setup.train_steps + 1):
        train_step(sae, optimizer, batches[step % 4], dead, cfg, learning_rate(cfg, setup.d, step), loss_fn)
    return setup.train_steps * setup.batch / (time.perf_counter() - began)


def demo_nmse(setup: Setup, work: Path) -> dict:
    """Held-out nmse of the demo configuration trained through `fit` on the global and on the block loader."""
    from saekit.cli import preflight
    from saekit.config import register_schemas
    from saekit.evaluate import evaluate_reconstruction
    from saekit.tasks import activation_cache

    register_schemas()
    overrides = ["activation=topk", "k=8", "n=512", "data.ctx_len=64", "device=cpu", f"cache.dir={work / 'activations'}",
                 *setup.demo]
    cfg = preflight("train", overrides)
    cache = activation_cache(cfg, cfg.n_tokens)
    out = {"train_rows": cache.n_acts("train")}
    for shuffle in ("global", "block"):
        loader = LoaderConfig(shuffle=shuffle, buffer_tokens=setup.demo_buffer)
        batches = make_batches(cache, "train", cfg.batch_size, cfg.seed, loader)
        data = TrainingData(batches=batches, d=cache.d, key=f"{cache.manifest['key']}/{batches.order_key}",
                            mean_norm=cache.manifest["splits"]["train"]["mean_norm"])
        result = fit(dataclasses.replace(cfg, loader=loader), data, work / f"run_{shuffle}", torch.device("cpu"),
                     Console(quiet=True))
        out[shuffle] = evaluate_reconstruction(result.sae, cache, torch.device("cpu"))[0]["nmse"]
        if isinstance(batches, BlockShuffledBatches):
            out["fills"] = batches.n_fills
            batches.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (checks that the script runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scale_results.csv")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("SAEKIT_DATA_ROOT", str(DATA))  # the demo configuration's model and text paths
    torch.set_num_threads(THREADS)
    setup = Setup.quick() if args.quick else Setup()
    (ROOT / "outputs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "outputs", prefix="loader_cold-") as tmp:
        loader = cold_loader_rows(setup, Path(tmp))
        shutil.rmtree(Path(tmp) / "big")  # measured: the demo runs do not need it
        train = train_speed(setup)
        demo = demo_nmse(setup, Path(tmp))
    shape = f"d={setup.d} float32, {loader['bytes'] / 1e9:.2f} GB, batch {setup.batch}"
    rows = [
        ("loader_cold_tokens_per_s", round(loader["block"], 1),
         f"tokens/s (block shuffle, cold cache, {shape}; buffer {loader['buffer_rows']} rows in {loader['fills']} fills, "
         f"blocks of {loader['block_rows']} rows; median of {setup.rounds} epochs)"),
        ("loader_cold_global_tokens_per_s", round(loader["global"], 1),
         f"tokens/s (global shuffle, cold cache, {shape}; first {setup.global_seconds:g} s)"),
        ("train_tokens_per_s", round(train, 1), f"tokens/s (TopK d={setup.d} n={setup.n} k={setup.k} batch {setup.batch}, "
                                               f"fp32, {THREADS} threads)"),
        ("loader_cold_vs_train", round(loader["block"] / train, 2), "ratio (target >= 10)"),
        ("block_vs_global_nmse", round(demo["block"] / demo["global"], 4),
         f"ratio (target <= 1.02; demo config, buffer {setup.demo_buffer} rows = {demo['fills']} fills of "
         f"{demo['train_rows']} rows)"),
        ("demo_nmse_global", round(demo["global"], 5), "nmse (held-out, global shuffle)"),
        ("demo_nmse_block", round(demo["block"], 5), "nmse (held-out, block shuffle)"),
    ]
    merge_rows(args.out, rows)
    for name, value, unit in rows:
        print(f"{name:<32} {value:>14} {unit}")


if __name__ == "__main__":
    sys.exit(main())
