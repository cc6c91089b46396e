"""Eval throughput (issue 4): the full downstream set against the forward passes it needs.

`python bench/eval_throughput.py [run folder] [n_tokens]` measures, in one process on the same held-out windows:
  - forward_s: four plain forward passes of the model (clean, spliced, zero, mean), batch by batch, no hooks;
  - downstream_s: saekit's downstream_metrics (the four variants stacked into one batch, the SAE, KL, bookkeeping);
and reports tokens/s and their ratio (target ≤ 1.25). Rows are appended to bench/eval_results.csv.
"""

from __future__ import annotations

import csv
import platform
import sys
from pathlib import Path

import torch

from saekit.checkpoint import load_sae, resolve_checkpoint
from saekit.downstream import downstream_metrics
from timing import best_of  # bench/timing.py (this script's folder is on sys.path)
from saekit.tasks import ModelPool, _trained_config, activation_cache

BATCH_WINDOWS = 16


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/demo/topk")
    n_tokens = int(float(sys.argv[2])) if len(sys.argv) > 2 else 32768
    sae, meta = load_sae(resolve_checkpoint(str(run)))
    trained = _trained_config(meta)
    models = ModelPool(torch.device("cpu"))
    model = models.get(trained.model)
    cache = activation_cache(trained, trained.n_tokens, models)  # the run's own cache (reused, or rebuilt if missing)
    windows = cache.tokens("eval")[: n_tokens // cache.tokens("eval").shape[1]].long()
    mean = torch.cat(list(cache.iter_split("eval", 65536))).mean(0)
    tokens = windows.numel()

    @torch.no_grad()
    def forwards() -> None:
        for _ in range(4):
            for start in range(0, windows.shape[0], BATCH_WINDOWS):
                model.bridge(windows[start:start + BATCH_WINDOWS])

    def downstream() -> None:
        downstream_metrics(model, trained.hook_name, windows, lambda a: sae.reconstruct(a)[0], mean, BATCH_WINDOWS)

    forwards()  # warm up both paths
    forward_s = best_of(2, forwards)
    downstream_s = best_of(2, downstream)
    rows = [("eval_tokens_per_s", tokens / downstream_s, "tokens/s"),
            ("forward4_tokens_per_s", tokens / forward_s, "tokens/s"),
            ("eval_vs_forward4", downstream_s / forward_s, "ratio")]
    out = Path(__file__).resolve().parent / "eval_results.csv"
    new = not out.exists()
    with open(out, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["name", "value", "unit", "tokens", "threads", "machine"])
        for name, value, unit in rows:
            writer.writerow([name, round(value, 4), unit, tokens, torch.get_num_threads(), platform.processor() or platform.machine()])
    for name, value, unit in rows:
        print(f"{name:24s} {value:12.3f} {unit}")
    print(f"{tokens:,} tokens in {windows.shape[0]} windows of {windows.shape[1]}; wrote {out}")


if __name__ == "__main__":
    main()
