"""What each command does, on typed configs (usable from a notebook with plain dataclasses)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from saekit.cache import ActivationCache, ensure_cache
from saekit.checkpoint import load_sae, resolve_checkpoint
from saekit.config import CacheCommandConfig, CacheConfig, DataConfig, EvalConfig, ModelConfig, SiteConfig, TrainConfig
from saekit.evaluate import check_compatible, evaluate_reconstruction
from saekit.model import load_model, resolve_device
from saekit.report import print_summary, tidy_table, write_table
from saekit.sae import sae_class
from saekit.train import TrainingData, fit

console = Console()
STATUS_FILE = "status.json"


@contextmanager
def _cache_progress(total_tokens: int) -> Iterator:
    with Progress(TextColumn("[bold]cache[/bold]"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.completed:,}/{task.total:,} tokens"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("cache", total=total_tokens)
        yield lambda n: bar.advance(task, n)


def activation_cache(cfg: SiteConfig, n_tokens: int) -> ActivationCache:
    """The cache for cfg's model, hook and data: reused when it exists, built (model loaded) when not."""
    device = resolve_device(cfg.device)
    return ensure_cache(cfg, n_tokens, lambda: load_model(cfg.model, device), console.print, _cache_progress)


def _write_status(run_dir: Path, status: str, **facts) -> None:
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps({"status": status, **facts}, indent=2))
    os.replace(tmp, run_dir / STATUS_FILE)


def run_facts(cfg: TrainConfig, hook: str, tokens: int) -> dict:
    """The id columns of the results table; k is empty for the λ-penalized family and λ for the TopK family."""
    topk_family = sae_class(cfg.activation.name).topk_family
    return {"model": cfg.model.short_name, "hook": hook, "layer": cfg.hook_layer, "activation": cfg.activation.name,
            "n": cfg.n, "k": cfg.k if topk_family else None, "lam": None if topk_family else cfg.lam, "tokens": tokens}


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, float]:
    """Cache → fit → evaluate on held-out tokens → results.csv/.parquet in the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    cache = activation_cache(cfg, cfg.n_tokens)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
    _write_status(run_dir, "running")
    started = time.perf_counter()
    try:
        result = fit(cfg, TrainingData.from_cache(cache, cfg), run_dir, device, console)
    except BaseException as exc:  # Ctrl-C too: the status must not stay "running"
        _write_status(run_dir, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    metrics, _ = evaluate_reconstruction(result.sae, cache, device)
    metrics["dead_frac_train"] = result.dead_frac_train
    run = {"run_id": cfg.run_id or run_dir.name, **run_facts(cfg, cache.manifest["hook"], cfg.n_steps * cfg.batch_size)}
    write_table(tidy_table(run, metrics, cfg.overrides), run_dir)
    wall = time.perf_counter() - started
    _write_status(run_dir, "done", train_tokens_per_s=round(result.tokens_per_s, 1), epochs=round(result.epochs, 3),
                  wall_s=round(wall, 2))
    console.print(f"trained {result.steps_run} steps at {result.tokens_per_s:,.0f} tokens/s "
                  f"({result.epochs:.2f} epochs over {cache.n_acts('train'):,} cached vectors)")
    print_summary(console, f"held-out metrics ({cache.n_acts('eval'):,} tokens)", run, metrics)
    console.print(f"results: {run_dir / 'results.csv'}", highlight=False)
    return metrics


def _trained_config(meta: dict) -> TrainConfig:
    """The TrainConfig saved in a checkpoint's metadata, nested dataclasses rebuilt."""
    from saekit.config import ActivationConfig, DeadConfig, InitConfig, OptimizerConfig
    from saekit.errors import DataError

    saved = meta.get("train_config")
    if saved is None:
        raise DataError("ckpt: the checkpoint records no training config; evaluate a checkpoint written by saekit train")
    types = {"model": ModelConfig, "data": DataConfig, "cache": CacheConfig, "activation": ActivationConfig,
             "dead": DeadConfig, "optimizer": OptimizerConfig, "init": InitConfig}
    return TrainConfig(**{**saved, **{key: kind(**saved[key]) for key, kind in types.items()}})


def evaluate(cfg: EvalConfig, run_dir: Path) -> dict[str, float]:
    """Reload a checkpoint, rebuild (or reuse) its held-out activations, and write the same results table."""
    device = resolve_device(cfg.device)
    ckpt = resolve_checkpoint(cfg.ckpt)
    sae, meta = load_sae(ckpt, device)
    trained = _trained_config(meta)
    # The model and hook it was trained on; the data too unless eval names other data.
    site = SiteConfig(model=trained.model, data=cfg.data if cfg.data is not None else trained.data, cache=cfg.cache,
                      layer=trained.layer, hook=trained.hook, device=cfg.device, seed=trained.seed)
    cache = activation_cache(site, trained.n_tokens)
    check_compatible(sae, cache, str(ckpt))
    metrics, _ = evaluate_reconstruction(sae, cache, device, cfg.batch_size)
    run = {"run_id": ckpt.parent.name, **run_facts(trained, cache.manifest["hook"], trained.n_steps * trained.batch_size)}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_table(tidy_table(run, metrics, {"ckpt": str(ckpt), "eval_data": site.data.name}), run_dir)
    print_summary(console, f"held-out metrics ({cache.n_acts('eval'):,} tokens, {site.data.name})", run, metrics)
    console.print(f"results: {run_dir / 'results.csv'}", highlight=False)
    return metrics


def cache(cfg: CacheCommandConfig, run_dir: Path) -> None:
    """Build (or reuse) the cache and say where it is."""
    built = activation_cache(cfg, cfg.n_tokens)
    splits = built.manifest["splits"]
    console.print(f"cache ready: {built.root}\n  train {splits['train']['n_acts']:,} vectors, "
                  f"eval {splits['eval']['n_acts']:,} vectors, d={built.d}, {built.manifest['dtype']}")


def hooks(cfg: CacheCommandConfig, run_dir: Path) -> None:
    """Print the model's hook names (what `hook=` accepts)."""
    model = load_model(cfg.model, resolve_device(cfg.device))
    for name in sorted(model.bridge.hook_dict):
        console.print(name, highlight=False)
