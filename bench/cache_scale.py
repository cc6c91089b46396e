"""Issue 11 cache rows: several hooks from one model pass, and opening a large cache.

  multihook_vs_single_sum  seconds of one `ensure_caches` over the five residual hooks of stories260k (one model
                           pass) over the summed seconds of five single-hook builds of the same data, each from a
                           fresh cache folder and each loading the model and tokenizing, as five `saekit cache`
                           commands would (the demo data: 1000 TinyStories stories, context 64);
  multihook_bytes_equal    1 when every data file of the five caches is byte-identical to its single-hook build;
  cache_open_s             seconds to open a >= 4 GB synthetic GPT-2-shaped cache (d=768, float32) with its files
                           evicted from the page cache first (median of 5).

`python bench/cache_scale.py [--quick] [--out bench/scale_results.csv]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rows import merge_rows  # bench/rows.py (this script's folder is on sys.path)
from saekit.cache import ensure_caches, open_cache
from saekit.config import CacheConfig, DataConfig, ModelConfig, SiteConfig
from saekit.model import load_model

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAEKIT_DATA_ROOT", ROOT.parent / "shared" / "data"))


def site(cache_dir: Path, layer, n_train_tokens) -> SiteConfig:
    data = DataConfig(name="tinystories", paths=[str(DATA / "tinystories-text" / "tinystories_train_first1000.json")],
                      eval_paths=[str(DATA / "tinystories-text" / "tinystories_validation_head.txt")], ctx_len=64,
                      n_train_tokens=n_train_tokens)
    return SiteConfig(model=ModelConfig(name=str(DATA / "stories260k")), data=data,
                      cache=CacheConfig(dir=str(cache_dir)), layer=layer, device="cpu")


def timed_build(cfg: SiteConfig) -> tuple[float, list]:
    began = time.perf_counter()
    caches = ensure_caches(cfg, 1_000_000, lambda: load_model(cfg.model, torch.device("cpu")), console_print=lambda _: None)
    return time.perf_counter() - began, caches


def data_files(root: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in root.iterdir() if path.name != "manifest.json"}


def multihook_rows(work: Path, n_train_tokens) -> list[tuple]:
    layers = list(range(5))
    single_seconds, singles = 0.0, []
    for layer in layers:
        seconds, caches = timed_build(site(work / f"single{layer}", layer, n_train_tokens))
        single_seconds += seconds
        singles.append(caches[0])
    multi_seconds, multi = timed_build(site(work / "multi", layers, n_train_tokens))
    equal = all(data_files(a.root) == data_files(b.root) for a, b in zip(multi, singles))
    return [("multihook_seconds", round(multi_seconds, 3), "s"), ("single_hook_sum_seconds", round(single_seconds, 3), "s"),
            ("multihook_vs_single_sum", round(multi_seconds / single_seconds, 4), "ratio"),
            ("multihook_bytes_equal", int(equal), "bool")]


def evict(root: Path) -> None:
    for path in root.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def open_rows(work: Path, n_rows: int) -> list[tuple]:
    from synthetic_cache import write_synthetic_cache  # bench/synthetic_cache.py

    root = write_synthetic_cache(work / "big", n_rows, 768)
    size = sum(path.stat().st_size for path in root.iterdir())
    seconds = []
    for _ in range(5):
        evict(root)
        began = time.perf_counter()
        open_cache(root)
        seconds.append(time.perf_counter() - began)
    return [("cache_open_s", round(statistics.median(seconds), 4), "s"), ("cache_open_bytes", size, "bytes")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (checks that the script runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scale_results.csv")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(dir=ROOT / "outputs") as tmp:
        rows = multihook_rows(Path(tmp), 20_000 if args.quick else None)
        rows += open_rows(Path(tmp), 10_000 if args.quick else 1_400_000)  # 1.4M x 768 x 4 B = 4.3 GB
    merge_rows(args.out, rows)
    for name, value, unit in rows:
        print(f"{name:<28} {value:>14} {unit}")


if __name__ == "__main__":
    sys.exit(main())
