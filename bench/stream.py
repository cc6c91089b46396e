"""Issue 11 streaming rows: training from activations made on the fly (`cache.mode=stream`) against a disk cache.

The demo recipe on stories260k (blocks.2.hook_resid_post, TopK k=8, n=512, data.ctx_len=64, 1M training tokens,
the first 1000 TinyStories train stories, held out: the head of the validation split), on the CPU:

  (a) cached: build the disk cache (timed: tokenizing, hashing, the model pass, writing), train from it (timed),
      evaluate nmse on its held-out split;
  (b) stream: tokenize, then train from an ActivationStream for the same tokens (timed together; 1M tokens are
      about two epochs over the 479k training rows, so the model runs over the text twice), evaluate on the same
      held-out split.

  stream_vs_cached_nmse                 nmse_stream / nmse_cached (target: <= 1.03)
  stream_tokens_per_s                   training tokens / seconds of (b)
  cached_build_plus_train_tokens_per_s  training tokens / (cache build s + train s) of (a)
  stream_nmse, cached_nmse, cache_build_s, cached_train_tokens_per_s: the parts.

`python bench/stream.py [--quick] [--out bench/scale_results.csv]`; --quick trains 200k tokens on 100k cached
training tokens (a check that it runs, not a measurement).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from rows import merge_rows  # bench/rows.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAEKIT_DATA_ROOT", ROOT.parent / "shared" / "data")).resolve()
CPU = torch.device("cpu")


def recipe(work: Path, quick: bool):
    """The demo's `saekit train` config, composed from conf/ as the CLI does."""
    os.environ.setdefault("SAEKIT_DATA_ROOT", str(DATA))  # what conf/data and conf/model resolve against
    from saekit.cli import _register, absolutize_paths, preflight

    _register()
    extra = ["n_tokens=200000", "data.n_train_tokens=100000"] if quick else ["n_tokens=1000000"]
    cfg = preflight("train", ["activation=topk", "k=8", "n=512", "data.ctx_len=64", "device=cpu",
                              f"cache.dir={work / 'activations'}", *extra])
    absolutize_paths(cfg)
    return cfg


def cached_run(cfg, model, work: Path) -> dict:
    from saekit.cache import ensure_cache
    from saekit.evaluate import evaluate_reconstruction
    from saekit.train import TrainingData, fit

    began = time.perf_counter()
    cache = ensure_cache(cfg, cfg.n_tokens, lambda: model, console_print=lambda _: None)
    build_s = time.perf_counter() - began
    began = time.perf_counter()
    result = fit(cfg, TrainingData.from_cache(cache, cfg), work / "cached", CPU, Console(quiet=True))
    train_s = time.perf_counter() - began
    metrics, _ = evaluate_reconstruction(result.sae, cache, CPU)
    return {"cache": cache, "build_s": build_s, "train_s": train_s, "nmse": metrics["nmse"]}


def streamed_run(cfg, model, work: Path, eval_cache) -> dict:
    from saekit.cache import excludes_bos
    from saekit.data import load_windows
    from saekit.evaluate import evaluate_reconstruction
    from saekit.stream import ActivationStream, stream_buffer_tokens, stream_training_data
    from saekit.train import fit

    hook = cfg.hook_name
    began = time.perf_counter()
    windows = load_windows(cfg.data, model.tokenizer, model.bos_token_id, cfg.n_tokens)
    buffer_tokens = stream_buffer_tokens(cfg.loader.buffer_tokens, model.d_model, cfg.batch_size, 1)
    with ActivationStream(model, windows.train, [hook], excludes_bos(cfg.data), buffer_tokens, cfg.batch_size,
                          cfg.seed, cfg.cache.batch_windows, n_steps=cfg.n_steps) as stream:
        data = stream_training_data(stream, hook, key="bench-stream")
        result = fit(cfg, data, work / "stream", CPU, Console(quiet=True))
        passes = stream.forward_passes
    seconds = time.perf_counter() - began
    metrics, _ = evaluate_reconstruction(result.sae, eval_cache, CPU)
    return {"seconds": seconds, "nmse": metrics["nmse"], "buffer_tokens": buffer_tokens, "passes": passes,
            "rows": windows.train.shape[0]}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run that checks the script works")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scale_results.csv")
    args = parser.parse_args(argv)
    from saekit.model import load_model

    with tempfile.TemporaryDirectory(prefix="saekit-bench-stream-") as tmp:
        work = Path(tmp)
        cfg = recipe(work, args.quick)
        model = load_model(cfg.model, CPU)
        cached = cached_run(cfg, model, work)
        streamed = streamed_run(cfg, model, work, cached["cache"])
    tokens = cfg.n_steps * cfg.batch_size
    rows = [
        ("stream_vs_cached_nmse", round(streamed["nmse"] / cached["nmse"], 4), "x (held-out nmse, target <= 1.03)"),
        ("stream_tokens_per_s", round(tokens / streamed["seconds"], 1), "tokens/s (tokenize + stream + train)"),
        ("cached_build_plus_train_tokens_per_s", round(tokens / (cached["build_s"] + cached["train_s"]), 1),
         "tokens/s (cache build + train)"),
        ("stream_nmse", round(streamed["nmse"], 6), f"held-out nmse after {tokens:,} tokens"),
        ("cached_nmse", round(cached["nmse"], 6), f"held-out nmse after {tokens:,} tokens"),
        ("cache_build_s", round(cached["build_s"], 2), "s"),
        ("cached_train_tokens_per_s", round(tokens / cached["train_s"], 1), "tokens/s (train only)"),
    ]
    merge_rows(args.out, rows)
    for name, value, unit in rows:
        print(f"{name:40s} {value:>14} {unit}")
    print(f"stream: buffer {streamed['buffer_tokens']:,} tokens, {streamed['passes']} forward passes; "
          f"rows in {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
