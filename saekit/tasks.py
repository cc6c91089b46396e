"""What each command does, on typed configs (usable from a notebook with plain dataclasses)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from saekit.cache import (SPLITS, ActivationCache, cache_bytes, cache_keys, ensure_caches, excludes_bos, first_problem,
                          read_manifest)
from saekit.distributed import SINGLE, World, rank_device
from saekit.errors import DataError, require
from saekit.checkpoint import resolve_checkpoints
from saekit.config import CacheCommandConfig, CacheConfig, DataConfig, EvalConfig, ModelConfig, SiteConfig, TrainConfig
from saekit.evaluate import Evaluation, check_compatible, evaluate_checkpoint
from saekit.formats import checkpoint_name
from saekit.fileutil import write_status
from saekit.stopping import TrainingInterrupted
from saekit.latents import DENSITY_PLOT, LATENT_TABLE, latent_table, plot_density_histogram, write_latent_table
from saekit.model import LoadedModel, load_model, resolve_device
from saekit.report import print_summary, tidy_table, write_table
from saekit.sae import sae_class
from saekit.tracking import Tracker, make_tracker, tracker_module
from saekit.train import TrainingData, check_precision, fit

# Progress bars and the summary tables only; messages go through `log`, so they reach the job log file too.
console = Console()
log = logging.getLogger(__name__)


@contextmanager
def _cache_progress(total_tokens: int) -> Iterator:
    with Progress(TextColumn("[bold]cache[/bold]"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.completed:,}/{task.total:,} tokens"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("cache", total=total_tokens)
        yield lambda n: bar.advance(task, n)


class ModelPool:
    """Language models loaded at most once per command (cache build, evaluation during and after training)."""

    def __init__(self, device):
        self.device = device
        self.loaded: dict[str, LoadedModel] = {}

    def get(self, cfg: ModelConfig) -> LoadedModel:
        key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
        if key not in self.loaded:
            self.loaded[key] = load_model(cfg, self.device)
        return self.loaded[key]


def activation_cache(cfg: SiteConfig, n_tokens: int, models: Optional[ModelPool] = None,
                     splits: tuple[str, ...] = SPLITS) -> ActivationCache:
    """The cache for cfg's model, hook and data: reused when it exists, built (model loaded) when not."""
    return activation_caches(cfg, n_tokens, models, splits)[0]


def activation_caches(cfg: SiteConfig, n_tokens: int, models: Optional[ModelPool] = None,
                      splits: tuple[str, ...] = SPLITS) -> list[ActivationCache]:
    """One cache per hook of cfg, the missing ones built together from one pass of the model."""
    models = models or ModelPool(resolve_device(cfg.device))
    return ensure_caches(cfg, n_tokens, lambda: models.get(cfg.model), log.info, _cache_progress, splits)


def run_facts(cfg: TrainConfig, hook: str, tokens: int) -> dict:
    """The id columns of the results table; k is empty for the λ-penalized family and λ for the TopK family."""
    topk_family = sae_class(cfg.activation.name).topk_family
    facts = {"model": cfg.model.short_name, "hook": hook, "layer": cfg.hook_layer, "activation": cfg.activation.name,
             "n": cfg.n, "k": cfg.k if topk_family else None, "lam": None if topk_family else cfg.lam, "tokens": tokens}
    if cfg.hook_out is not None:  # a transcoder: what it predicts, and whether it has a skip path
        facts.update(hook_out=cfg.hook_out, skip=cfg.skip)
    return facts


@dataclass
class _Job:
    """One SAE of a `train` command: its single-hook config, training data, held-out cache and run folder."""

    cfg: TrainConfig
    data: TrainingData
    eval_cache: ActivationCache
    run_dir: Path
    run_id: Optional[str]
    started: float = 0.0


def train(cfg: TrainConfig, run_dir: Path) -> dict:
    """Cache (or stream) → fit → evaluate on held-out tokens → results.csv/.parquet in the run folder.

    With a list of hooks (`layer=[…]`/`hook=[…]`) one SAE is trained per hook, each in its own run folder
    `<run_dir>/<hook>/`, with one results table over all of them in `run_dir`.
    """
    world = World.from_env()
    _check_data_parallel(cfg, world)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = rank_device(world, resolve_device(cfg.device))
    check_precision(cfg.precision, device)
    if cfg.logger.name != "none":  # a missing tracker package fails now, not after the cache is built
        tracker_module(cfg.logger.name)
    models = ModelPool(device)
    streamed = cfg.cache.mode == "stream"
    if streamed:
        jobs, stream = _streamed_jobs(cfg, run_dir, models)
        with stream:  # stops the stream's background fill however training ends
            return _train_and_tabulate(cfg, run_dir, jobs, models, device, streamed)
    caches = activation_caches(cfg, cfg.n_tokens, models)  # ranks > 0 wait on the cache's lock while rank 0 builds
    jobs = [_Job(hook_cfg, TrainingData.from_cache(cache, hook_cfg), cache, folder, run_id)
            for hook_cfg, cache, (folder, run_id) in zip(cfg.per_hook(), caches, _job_folders(cfg, run_dir))]
    if world.enabled and not world.is_main:
        return _train_as_worker(jobs[0], device, world)
    return _train_and_tabulate(cfg, run_dir, jobs, models, device, streamed, world)


def _check_data_parallel(cfg: TrainConfig, world: World) -> None:
    """What data-parallel training (torchrun) supports; anything else is one line before any work."""
    if cfg.shard_latents > 1:
        from saekit.sharding import check_sharding

        check_sharding(cfg, world)
    if not world.enabled:
        return
    import torch.distributed

    require(torch.distributed.is_initialized(),
            f"{world.size} ranks but no process group: data-parallel training starts from the command line, under "
            f"torchrun or srun (scripts/slurm/train_ddp.sbatch); a sweep's SLURM jobs take hydra.launcher.tasks_per_node=1")
    if cfg.shard_latents == 1:
        world.check_batch(cfg.batch_size)
    require(not cfg.multi_hook, f"data-parallel training takes one hook (got {len(cfg.hook_names)}); run one "
                                f"torchrun per hook, or train the list of hooks in one process")
    require(cfg.cache.mode != "stream", "cache.mode=stream is not supported under torchrun; use the disk cache "
                                        "(cache.mode=disk), which every rank reads its share of")


def _train_as_worker(job: "_Job", device, world: World) -> dict:
    """Ranks > 0 train their share of every batch in step with rank 0, which writes the run folder (checkpoints,
    step log, status, evaluation, tables); they write nothing."""
    _fit(job, device, world)
    return {}


def _fit(job: "_Job", device, world: World, console=None, evaluator=None, tracker: Optional[Tracker] = None):
    """Train one job: `fit`, or `fit_sharded` when its latents are split over ranks (that loop has no evaluator and
    sends no step rows to a tracker; the final table still goes there)."""
    if job.cfg.shard_latents > 1:
        from saekit.sharding import fit_sharded

        return fit_sharded(job.cfg, job.data, job.run_dir, device, world)
    return fit(job.cfg, job.data, job.run_dir, device, console, evaluator=evaluator, tracker=tracker, world=world)


def _train_and_tabulate(cfg: TrainConfig, run_dir: Path, jobs: list["_Job"], models: ModelPool, device,
                        streamed: bool, world: World = SINGLE) -> dict:
    """Train the jobs; with several hooks, also the status and one results table over all of them in run_dir."""
    _check_resumable(jobs)
    if not cfg.multi_hook:
        return _train_jobs(jobs, models, device, streamed, world)[0]
    _write_config(cfg, run_dir)
    write_status(run_dir, "running", hooks=cfg.hook_names)
    with _failed_status_on_error([_Job(cfg, None, None, run_dir, None)]):
        metrics = _train_jobs(jobs, models, device, streamed)
        write_table(pd.concat([pd.read_csv(job.run_dir / "results.csv") for job in jobs], ignore_index=True), run_dir)
    write_status(run_dir, "done", hooks=cfg.hook_names)
    log.info("results over %d hooks: %s", len(jobs), run_dir / "results.csv")
    return {job.cfg.hook_name: values for job, values in zip(jobs, metrics)}


def _check_resumable(jobs: list["_Job"]) -> None:
    """Refuse a folder holding another configuration's (or a damaged) checkpoint before anything in it is written,
    so a refused rerun leaves a finished run exactly as it was."""
    from saekit.train import resume_step

    for job in jobs:
        resume_step(job.cfg, job.run_dir, job.data.key)


def _job_folders(cfg: TrainConfig, run_dir: Path) -> list[tuple[Path, Optional[str]]]:
    """(run folder, run id) per hook: the run folder itself for one hook, `<run_dir>/<hook>` for a list."""
    if not cfg.multi_hook:
        return [(run_dir, cfg.run_id)]
    base = cfg.run_id or run_dir.name
    return [(run_dir / hook, f"{base}/{hook}") for hook in cfg.hook_names]


def _write_config(cfg: TrainConfig, run_dir: Path) -> None:
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))


def _streamed_jobs(cfg: TrainConfig, run_dir: Path, models: ModelPool) -> tuple[list[_Job], object]:
    """cache.mode=stream: activations made while training (one forward pass feeds every hook's SAE); only the
    held-out split is cached on disk, for evaluation."""
    from saekit.data import load_windows
    from saekit.stream import ActivationStream, stream_buffer_tokens, stream_training_data

    eval_caches = activation_caches(cfg, cfg.n_tokens, models, splits=("eval",))
    model = models.get(cfg.model)
    hooks = cfg.hook_names
    for hook in hooks:
        model.check_hook(hook)
    windows = load_windows(cfg.data, model.tokenizer, model.bos_token_id, cfg.n_tokens)
    keys = cache_keys(cfg, cfg.n_tokens)
    buffer_tokens = stream_buffer_tokens(cfg.loader.buffer_tokens, model.d_model, cfg.batch_size, len(hooks))
    stream = ActivationStream(model, windows.train, hooks, excludes_bos(cfg.data), buffer_tokens, cfg.batch_size,
                              cfg.seed, cfg.cache.batch_windows, n_steps=cfg.n_steps)
    log.info("streaming activations of %d hook(s) from %s windows, shuffled in a buffer of %s tokens; nothing "
             "cached but the held-out split", len(hooks), f"{windows.train.shape[0]:,}", f"{buffer_tokens:,}")
    jobs = []
    for hook_cfg, cache, (folder, run_id) in zip(cfg.per_hook(), eval_caches, _job_folders(cfg, run_dir)):
        data = stream_training_data(stream, hook_cfg.hook_name, keys[hook_cfg.hook_name])
        jobs.append(_Job(hook_cfg, data, cache, folder, run_id))
    return jobs, stream


def _train_jobs(jobs: list[_Job], models: ModelPool, device, lockstep: bool,
                world: World = SINGLE) -> list[dict[str, float]]:
    """Fit every job, then evaluate it and write its run folder. From disk caches the jobs run one after another;
    `lockstep` (a shared stream) runs one step of each in turn, so each chunk of activations is made once."""
    if lockstep and len(jobs) > 1:
        from saekit.train import fit_lockstep

        for job in jobs:
            _start_job(job)
        # evaluation and the table too: an error there must not leave "running"
        with _failed_status_on_error(jobs), ExitStack() as stack:
            trackers = [stack.enter_context(_tracker(job)) for job in jobs]
            results = fit_lockstep([(job.cfg, job.data, job.run_dir) for job in jobs], device, console,
                                   evaluators=[_training_evaluator(job.cfg, job.eval_cache, models) for job in jobs],
                                   trackers=trackers)
            return [_finish_job(job, result, models, tracker) for job, result, tracker in zip(jobs, results, trackers)]
    metrics = []
    for job in jobs:
        _start_job(job)
        # evaluation and the table too: an error there must not leave "running"
        with _failed_status_on_error([job]), _tracker(job) as tracker:
            result = _fit(job, device, world, console, _training_evaluator(job.cfg, job.eval_cache, models), tracker)
            metrics.append(_finish_job(job, result, models, tracker))
    return metrics


def _tracker(job: _Job) -> Tracker:
    """The job's experiment tracker (`logger=`), its run named after the run id: the run folder's name, which in a
    sweep is the job's swept settings (`activation=topk,k=8`); `<run id>/<hook>` per hook of a multi-hook run.
    Used as a context manager, it is finished (marked failed on an error) however the job ends."""
    from saekit.train import resume_step

    start = resume_step(job.cfg, job.run_dir, job.data.key)
    return make_tracker(job.cfg.logger, job.run_id or job.run_dir.name, job.run_dir, dataclasses.asdict(job.cfg), start)


def _start_job(job: _Job) -> None:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(job.cfg, job.run_dir)
    write_status(job.run_dir, "running")
    job.started = time.perf_counter()


@contextmanager
def _failed_status_on_error(jobs: list[_Job]) -> Iterator[None]:
    try:
        yield
    except TrainingInterrupted as exc:  # stopped on request, with a checkpoint to resume from
        for job in jobs:
            write_status(job.run_dir, "interrupted", step=exc.step, error=str(exc))
        raise
    except KeyboardInterrupt:  # a signal outside the training loop: nothing new to resume from, but not "running"
        for job in jobs:
            write_status(job.run_dir, "interrupted", error="interrupted; run the same command to resume")
        raise
    except BaseException as exc:  # the status must not stay "running"
        for job in jobs:
            write_status(job.run_dir, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise


def _finish_job(job: _Job, result, models: ModelPool, tracker: Tracker) -> dict[str, float]:
    cfg, cache, run_dir = job.cfg, job.eval_cache, job.run_dir
    evaluation = _final_evaluation(cfg, result.sae, cache, models)
    metrics = {**evaluation.metrics, "dead_frac_train": result.dead_frac_train}
    run = {"run_id": job.run_id or run_dir.name, **run_facts(cfg, cache.manifest["hook"], cfg.n_steps * cfg.batch_size)}
    table = result_frames(run, metrics, evaluation.progressive + evaluation.prefixes, cfg.overrides)
    write_table(table, run_dir)
    tracker.log_table(table, cfg.n_steps)
    write_status(run_dir, "done", train_tokens_per_s=round(result.tokens_per_s, 1), epochs=round(result.epochs, 3),
                 wall_s=round(time.perf_counter() - job.started, 2))
    log.info("trained %d steps at %s tokens/s (%.2f epochs over %s training vectors)", result.steps_run,
             f"{result.tokens_per_s:,.0f}", result.epochs, f"{job.data.batches.n_rows:,}")
    print_summary(console, f"held-out metrics ({cache.n_acts('eval'):,} tokens)", run, metrics)
    log.info("results: %s", run_dir / "results.csv")
    return metrics


def _evaluate_after_training(cfg: TrainConfig, sae, cache: ActivationCache, models: ModelPool,
                             settings: EvalConfig) -> Evaluation:
    """`saekit eval`'s code path on the run's held-out split, the model loaded only for downstream metrics."""
    model = models.get(cfg.model) if settings.downstream else None
    return evaluate_checkpoint(sae, cache, settings, models.device, model, cfg.hook_name, excludes_bos(cfg.data))


def _final_evaluation(cfg: TrainConfig, sae, cache: ActivationCache, models: ModelPool) -> Evaluation:
    """Held-out metrics after training: reconstruction always; downstream and progressive codes when asked."""
    final = cfg.final_eval
    settings = EvalConfig(ckpt="<training>", downstream=final.downstream, downstream_tokens=final.downstream_tokens,
                          ablation_positions=0, k_primes=list(final.k_primes), thetas=list(final.thetas),
                          refine_tokens=final.refine_tokens, device=cfg.device)
    return _evaluate_after_training(cfg, sae, cache, models, settings)


def result_frames(run: dict, metrics: dict, progressive: list[dict], context: dict) -> pd.DataFrame:
    """The tidy table of one run: its metric rows, then one block per progressive-code value or prefix (a
    `k_prime`, `theta` or `prefix` column names the block)."""
    frames = [tidy_table(run, metrics, context)]
    for row in progressive:
        row = dict(row)
        swept = {key: row.pop(key) for key in ("k_prime", "theta", "prefix") if key in row}
        frames.append(tidy_table(run, row, {**swept, **context}))
    return pd.concat(frames, ignore_index=True)


def _training_evaluator(cfg: TrainConfig, cache: ActivationCache, models: ModelPool):
    """Held-out evaluation during training: the offline path with only nmse (and delta_ce when asked)."""
    if cfg.eval_every_steps is None:
        return None
    settings = EvalConfig(ckpt="<training>", downstream=cfg.eval_delta_ce, downstream_tokens=cfg.eval_tokens,
                          ablation_positions=0, refine_tokens=0, device=cfg.device)
    return lambda sae: _evaluate_after_training(cfg, sae, cache, models, settings).metrics


def _trained_config(meta: dict, source: str = "ckpt") -> TrainConfig:
    """The TrainConfig saved in a checkpoint's metadata, nested dataclasses rebuilt; DataError (naming `source`) for
    one this version cannot read."""
    from saekit.config import DeadConfig, FinalEvalConfig, InitConfig, LoggerConfig, OptimizerConfig
    from saekit.errors import DataError, SaekitError
    from saekit.sae import variant_config

    saved = meta.get("train_config")
    if saved is None:
        raise DataError("ckpt: the checkpoint records no training config; evaluate a checkpoint written by saekit train")
    types = {"model": ModelConfig, "data": DataConfig, "cache": CacheConfig, "dead": DeadConfig,
             "optimizer": OptimizerConfig, "init": InitConfig, "final_eval": FinalEvalConfig, "logger": LoggerConfig}
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(TrainConfig)}) if isinstance(saved, dict) else []
    if not isinstance(saved, dict) or unknown:
        found = ", ".join(unknown) if unknown else "not a mapping"
        raise DataError(f"{source}: its training config has settings this saekit does not know ({found}); evaluate it "
                        f"with the saekit version that wrote it, or retrain")
    try:
        rebuilt = {key: kind(**saved.get(key, {})) for key, kind in types.items()}
        # saekit 0.1 saved every variant's knobs in one activation block: keep those of this variant.
        activation = dict(saved.get("activation", {}))
        rebuilt["activation"] = variant_config(activation.get("name", "topk"), activation, strict=False)
        return TrainConfig(**{**saved, **rebuilt})
    except (TypeError, ValueError, SaekitError) as exc:  # a nested block with a foreign key or a bad value
        raise DataError(f"{source}: its training config cannot be read ({str(exc).splitlines()[0]}); evaluate it with "
                        f"the saekit version that wrote it, or retrain") from exc


def evaluate(cfg: EvalConfig, run_dir: Path) -> pd.DataFrame:
    """Every SPEC 4 metric of one checkpoint, or of every run in a sweep folder, as one tidy table.

    All checkpoints are evaluated before anything is written, so a failure leaves no partial results.
    """
    device = resolve_device(cfg.device)
    checkpoints = eval_checkpoints(cfg.ckpt)
    models = ModelPool(device)
    frames, latents = [], []
    for ckpt in checkpoints:
        frame, table, stats = _evaluate_one(cfg, ckpt, device, models)
        frames.append(frame)
        latents.append((ckpt, table, stats))
    results = pd.concat(frames, ignore_index=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    for ckpt, table, stats in latents:
        folder = run_dir if len(checkpoints) == 1 else run_dir / checkpoint_name(ckpt)
        folder.mkdir(parents=True, exist_ok=True)
        write_latent_table(table, folder)
        plot_density_histogram(table, stats.n_tokens, folder, f"{checkpoint_name(ckpt)}: feature density")
    write_table(results, run_dir)
    log.info("results: %s (%d checkpoint(s)); per-latent statistics: %s, %s", run_dir / "results.csv",
             len(checkpoints), LATENT_TABLE, DENSITY_PLOT)
    return results


def eval_checkpoints(ckpt: str) -> list[Path]:
    """What `ckpt=` names: a saekit checkpoint, run folder or sweep folder (every run below it), or a foreign SAE
    (a SAELens or sparsify folder, every hook of a sparsify run folder, a Gemma Scope .npz, an OpenAI .pt)."""
    from saekit.formats import FOREIGN_FORMATS, detect_format, foreign_paths

    path = Path(ckpt).expanduser()
    fmt = detect_format(path) if path.exists() else None
    if fmt in FOREIGN_FORMATS:
        return foreign_paths(path, fmt)
    return resolve_checkpoints(ckpt)


def single_checkpoint(ckpt: str, command: str) -> Path:
    """The one SAE a command that reads one (export, inspect) is given; DataError when `ckpt` holds several."""
    checkpoints = eval_checkpoints(ckpt)
    require(len(checkpoints) == 1, f"ckpt={ckpt} holds {len(checkpoints)} SAEs; {command} one run at a time",
            DataError)
    return checkpoints[0]


def held_out_cache(trained: TrainConfig, data: Optional[DataConfig], cache_cfg: CacheConfig, device_setting: str,
                   models: ModelPool) -> tuple[SiteConfig, ActivationCache]:
    """The site (model, hook, data) an SAE trained with `trained` is evaluated at, and its held-out activations:
    the training corpus's held-out split, or all of other text (`data`). A full cache is used when there is one,
    else only the held-out split is built."""
    site = SiteConfig(model=trained.model, data=_evaluation_data(data, trained.data), cache=cache_cfg,
                      layer=trained.layer, hook=trained.hook, hook_out=trained.hook_out, device=device_setting,
                      seed=trained.seed)
    return site, activation_cache(site, trained.n_tokens, models, splits=("eval",))


def _evaluation_data(data: Optional[DataConfig], trained: DataConfig) -> DataConfig:
    """The training corpus is evaluated on its held-out split (the SAE saw the rest); a corpus the SAE never saw
    is evaluated on all of it, data.n_eval_tokens capping it."""
    from saekit.data import same_corpus, whole_corpus

    if data is None or same_corpus(data, trained):
        return data if data is not None else trained
    return whole_corpus(data)


def _evaluate_one(cfg: EvalConfig, ckpt: Path, device, models: ModelPool) -> tuple[pd.DataFrame, pd.DataFrame, object]:
    from saekit.formats import open_checkpoint

    sae, meta = open_checkpoint(ckpt, cfg, device)
    trained = _trained_config(meta, f"ckpt={ckpt}")
    # The model and hook it was trained on; the data too unless eval names other data (a foreign SAE's training
    # record names the data given here, so its held-out split is read).
    site, cache = held_out_cache(trained, cfg.data, cfg.cache, cfg.device, models)
    check_compatible(sae, cache, str(ckpt))
    model = None
    if cfg.downstream or cfg.ablation_positions > 0 or cfg.progressive_delta_ce:
        model = models.get(site.model)
        if site.hook_out is not None:
            model.check_transcoder_hooks(site.hook_name, site.hook_out)
        else:
            model.check_hook(site.hook_name)
    evaluation = evaluate_checkpoint(sae, cache, cfg, device, model, site.hook_name, keep_first=excludes_bos(site.data))
    tokens = _trained_tokens(ckpt, meta, trained)
    run = {"run_id": checkpoint_name(ckpt), **run_facts(trained, cache.manifest["hook"], tokens)}
    # finished sits with the context columns: the id columns before metric/value are the fixed SPEC 4 set.
    context = {"ckpt": str(ckpt), "eval_data": site.data.name, "finished": bool(meta.get("finished", True))}
    if "imported" in meta:
        context["format"] = meta["imported"]["format"]
    from saekit.data import evaluates_whole_corpus

    which = "metrics on all of the text" if evaluates_whole_corpus(site.data) else "held-out metrics"
    print_summary(console, f"{which}: {checkpoint_name(ckpt)} ({cache.n_acts('eval'):,} tokens, {site.data.name})",
                  run, evaluation.metrics)
    return result_frames(run, evaluation.metrics, evaluation.progressive + evaluation.prefixes, context), \
        latent_table(evaluation.stats), \
        evaluation.stats


def _trained_tokens(ckpt: Path, meta: dict, trained: TrainConfig) -> Optional[int]:
    """Tokens the checkpoint was actually trained on: its step × batch_size (a killed run's is short of n_tokens).
    Checkpoints from before the step was recorded were always final; an imported SAE's file may say (None if not)."""
    if "imported" in meta:
        return meta.get("trained_tokens")
    step = int(meta.get("step", trained.n_steps))
    if not meta.get("finished", True):
        log.warning("ckpt=%s is unfinished: trained %d of %d steps (%s of %s tokens); evaluating it as it is (run the "
                    "same train command to finish it)", ckpt, step, trained.n_steps, f"{step * trained.batch_size:,}",
                    f"{trained.n_tokens:,}")
    return step * trained.batch_size


def cache(cfg: CacheCommandConfig, run_dir: Path) -> None:
    """Build (or reuse) the cache of every hook of cfg (one model pass for the missing ones) and say where."""
    for built in activation_caches(cfg, cfg.n_tokens):
        splits = built.manifest["splits"]
        site = built.hook if built.hook_out is None else f"pairs {built.hook} -> {built.hook_out}"
        width = f"d={built.d}" if built.hook_out is None else f"d={built.d_in}+{built.d_out}"
        log.info("cache ready: %s (%s)\n  train %s vectors, eval %s vectors, %s, %s", built.root, site,
                 f"{splits['train']['n_acts']:,}", f"{splits['eval']['n_acts']:,}", width, built.manifest["dtype"])


def verify_cache(folder: Path) -> None:
    """Re-hash every file of a cache folder against its manifest, with a progress bar; DataError names the first
    file that does not match."""
    manifest = read_manifest(folder)
    with Progress(TextColumn("[bold]verify[/bold]"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task("verify", total=cache_bytes(manifest))
        problem = first_problem(folder, rehash=True, advance=lambda n: bar.advance(task, n))
    if problem:
        raise DataError(f"cache {folder}: {problem}; delete the folder and run `saekit cache` again")
    # `saekit cache verify` has no run folder and no job log: its verdict is the command's printed output.
    print(f"cache {folder}: all {len(manifest['files'])} files match the manifest "
          f"({cache_bytes(manifest) / 2**30:.2f} GiB re-hashed)")


def hooks(cfg: CacheCommandConfig, run_dir: Path) -> None:
    """Print the model's hook names (what `hook=` accepts): the command's output, one name a line."""
    model = load_model(cfg.model, resolve_device(cfg.device))
    for name in sorted(model.bridge.hook_dict):
        print(name)
