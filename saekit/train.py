"""The training loop: a readable table of contents, with each step a small function (SPEC section 3)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from saekit.cache import ActivationCache
from saekit.checkpoint import SAE_FILE, STATE_FILE, Checkpoint, load_train_state, read_metadata
from saekit.config import TrainConfig
from saekit.errors import ConfigError, SaekitError, TrainingDiverged
from saekit.dead import DeadLatents, default_resample_steps, resample_dead_latents
from saekit.distributed import SINGLE, World, module_state
from saekit.loader import EpochBatches, Prefetcher, TensorBatches, make_batches
from saekit.stopping import StopFlag, TrainingInterrupted, current_stop_flag
from saekit.sae import SAESpec, SparseAutoencoder, build_sae
from saekit.tracking import NoTracker, Tracker

log = logging.getLogger(__name__)

STEP_LOG = "steps.csv"
STEP_COLUMNS = ("step", "tokens", "loss", "mse", "l0", "dead_frac", "lr", "tokens_per_s", "sparsity_loss", "auxk_loss",
                "aux_loss", "epoch", "eval_nmse", "eval_delta_ce")
# loss_terms keys that are not a variant's own extra loss (Multi-TopK's L(4k), Gated's frozen-decoder term).
_STANDARD_TERMS = ("loss", "mse", "sparsity", "auxk", "l0", "fired")
# Settings that do not change what a run computes; a resumed run may differ in these.
# fast_path and compile compute the same math (to float rounding) as their alternatives.
# Evaluation settings (final_eval, eval_tokens) only measure the trained weights, so they may change too.
_RESUME_IGNORED = ("device", "resume", "log_every_steps", "ckpt_every_steps", "run_id", "overrides", "cache",
                   "eval_every_steps", "eval_delta_ce", "eval_tokens", "final_eval", "fast_path", "compile", "prefetch",
                   "loader", "lock_wait_s", "logger", "objective", "dist_timeout_s",
                   "shard_latents")
# Names and locations: the activation cache's content key already covers the model's weights and the text, so a
# moved repository or a renamed run resumes.
_RESUME_IGNORED_NESTED = {"model": ("name", "display_name"), "data": ("name", "paths", "eval_paths", "hf_data_files")}


@dataclass
class TrainingData:
    """What `fit` trains on: shuffled batches plus the facts initialization and resuming need."""

    batches: EpochBatches
    d: int
    key: str
    """Content key of the activations (a resumed run must see the same ones)."""
    mean_norm: float
    """Mean ||x|| of the raw training activations (for data.normalize=scale)."""
    d_out: Optional[int] = None
    """Transcoders: width of the target y; each batch row is then [x | y] (d + d_out wide). None: an SAE."""
    mean_norm_out: Optional[float] = None
    """Transcoders: mean ||y|| of the raw targets (the output side's scale)."""

    @classmethod
    def from_tensor(cls, x: torch.Tensor, batch_size: int, seed: int, key: str,
                    y: Optional[torch.Tensor] = None) -> "TrainingData":
        """Activations already in memory (synthetic benchmarks, notebooks); `key` names them for resuming.
        With y (N, d_out) the data are a transcoder's (x, y) pairs."""
        if y is None:
            return cls(TensorBatches(x, batch_size, seed), x.shape[1], key, float(x.norm(dim=1).mean()))
        rows = torch.cat([x.float(), y.float()], dim=1)
        return cls(TensorBatches(rows, batch_size, seed), x.shape[1], key, float(x.norm(dim=1).mean()),
                   y.shape[1], float(y.norm(dim=1).mean()))

    @classmethod
    def from_cache(cls, cache: ActivationCache, cfg: TrainConfig) -> "TrainingData":
        """The cache's training split through the loader `cfg.loader` picks; a batch order other than the global
        shuffle is part of the key, so a checkpoint resumes only under the order it was trained with."""
        batches = make_batches(cache, "train", cfg.batch_size, cfg.seed, cfg.loader)
        key = cache.manifest["key"]
        if batches.order_key != "global":
            key = f"{key}/{batches.order_key}"
        train = cache.manifest["splits"]["train"]
        return cls(batches, cache.d_in, key, train["mean_norm"], cache.d_out, train.get("mean_norm_out"))

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A batch (B, d [+ d_out]) → (x (B, d), y (B, d_out) or None for an SAE)."""
        if self.d_out is None:
            return rows, None
        return rows[:, :self.d], rows[:, self.d:]


def spec_from_config(cfg: TrainConfig, d: int, d_out: Optional[int] = None) -> SAESpec:
    """The SAE's spec: run-level settings from the run, the variant's own settings passed through whole; with
    d_out a transcoder's (cfg.skip adds its skip path)."""
    return SAESpec(activation=cfg.activation.name, d=d, n=cfg.n, k=cfg.k, lam=cfg.lam, normalize=cfg.data.normalize,
                   dead_method=cfg.dead.method, k_aux=cfg.dead.k_aux, aux_alpha=cfg.dead.aux_alpha,
                   d_out=d_out, skip=cfg.skip if d_out is not None else False, variant=cfg.activation)


def config_fingerprint(cfg: TrainConfig, cache_key: str) -> str:
    """Hash of the settings and the activations that decide the result; a checkpoint resumes only under the same one."""
    settings = {key: value for key, value in dataclasses.asdict(cfg).items() if key not in _RESUME_IGNORED}
    for section, keys in _RESUME_IGNORED_NESTED.items():
        if isinstance(settings.get(section), dict):
            settings[section] = {key: value for key, value in settings[section].items() if key not in keys}
    if settings.get("precision") == "fp32":  # the default, left out so checkpoints from before the setting resume
        del settings["precision"]
    for key, default in (("hook_out", None), ("skip", False)):  # likewise for an SAE's transcoder settings
        if key in settings and settings[key] == default:
            del settings[key]
    settings["activation_cache"] = cache_key
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_learning_rate(cfg: TrainConfig, d: int) -> float:
    """The configured rate, or 2e-4 / sqrt(n / 2^14) · sqrt(768 / d).

    The first factor is Gao et al. 2024 (A.3), fitted at GPT-2 width (d = 768). The second is saekit's: Adam
    moves each coordinate by about lr, and a unit-norm row of width d has coordinates of size 1/sqrt(d), so
    the same relative step needs lr ∝ 1/sqrt(d). On stories260k (d = 64) it gives 3.9e-3 for n = 512, which
    measured better than the unscaled 1.1e-3 (held-out nmse 0.109 vs 0.161, TopK k = 8, 1M tokens).
    """
    if cfg.optimizer.lr is not None:
        return cfg.optimizer.lr
    return 2e-4 / math.sqrt(cfg.n / 2**14) * math.sqrt(768 / d)


def learning_rate(cfg: TrainConfig, d: int, step: int) -> float:
    """Linear warmup (≤ 5% of the run), constant, then linear decay to 0 over the last `decay_frac`."""
    total = cfg.n_steps
    warmup = min(cfg.optimizer.warmup_steps, total // 20)
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay_steps = int(total * cfg.optimizer.decay_frac)
    if decay_steps > 0 and step >= total - decay_steps:
        factor *= (total - step) / decay_steps
    return base_learning_rate(cfg, d) * factor


def dead_window_tokens(cfg: TrainConfig) -> int:
    """The dead-latent window, scaled down for short runs so 'dead' can happen at all (≤ 10% of the run)."""
    return max(cfg.batch_size, min(cfg.dead.window_tokens, cfg.n_tokens // 10))


class StepLog:
    """The step table (`steps.csv`), appended as training goes, cut back to the checkpoint on resume."""

    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path = path
        if resume_step is None or not path.exists():
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerow(STEP_COLUMNS)
        else:
            with open(path, newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=STEP_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)  # a kill during the rewrite keeps the old log

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=STEP_COLUMNS).writerow(row)


@dataclass
class TrainResult:
    sae: SparseAutoencoder
    steps_run: int
    resumed_from: Optional[int]
    tokens_per_s: float
    dead_frac_train: float
    epochs: float


class _TrainProgress:
    """A rich progress bar on a terminal console; otherwise (no console, files, CI and SLURM logs) a log line about
    every 10% of the run."""

    def __init__(self, console: Optional[Console], total: int, start: int):
        self.total = total
        self.every = max(1, total // 10)
        self.last_printed = start
        self.bar = None
        if console is not None and console.is_terminal:
            self.bar = Progress(TextColumn("[bold]train[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console)
            self.task = self.bar.add_task("train", total=total, completed=start, stats="")

    def __enter__(self) -> "_TrainProgress":
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.__exit__(*exc)

    def update(self, done: int, stats: Optional[str]) -> None:
        if self.bar:
            self.bar.update(self.task, completed=done, **({"stats": stats} if stats else {}))
        elif stats and (done - self.last_printed >= self.every or done == self.total):
            log.info("step %d/%d  %s", done, self.total, stats)
            self.last_printed = done


def initialize(sae: SparseAutoencoder, cfg: TrainConfig, data: TrainingData) -> None:
    """SPEC 3 initialization from a sample of (normalized) training activations, on the SAE's device.

    The sample (`init.n_sample_tokens` rows) is moved to where the SAE lives, and the geometric median and the
    encoder-scale encode run there in row chunks; the random directions come from a CPU generator seeded by
    `seed`, so a run initializes the same on every device.
    A transcoder's output side (b_out, W_skip = 0, the encoder scale) is set from the same sample's targets.
    """
    device = sae.W_enc.device
    if cfg.data.normalize == "scale":
        # E||x|| = sqrt(d) after scaling; the scale is a buffer, so it is saved and undone on splicing.
        sae.input_scale.fill_(math.sqrt(sae.spec.d) / max(data.mean_norm, 1e-12))
        if sae.transcoder:  # the target likewise: E||y|| = sqrt(d_out), undone before y's splice
            sae.output_scale.fill_(math.sqrt(sae.spec.d_output) / max(data.mean_norm_out, 1e-12))
    raw_x, raw_y = data.split(data.batches.sample(cfg.init.n_sample_tokens, seed=cfg.seed).to(device))
    sample, _ = sae.normalize_input(raw_x)
    generator = torch.Generator().manual_seed(cfg.seed)
    sae.initialize(sample, cfg.init.b_pre, cfg.init.tied, cfg.init.scale_encoder, generator)
    if sae.transcoder:
        sae.initialize_output(sample, sae.normalize_target(raw_y), cfg.init.b_pre, cfg.init.scale_encoder)


def _import_in_background(module: str) -> Optional[threading.Thread]:
    """Start importing `module` in a thread (None if it is loaded already), to overlap a slow first import."""
    if module in sys.modules:
        return None
    thread = threading.Thread(target=importlib.import_module, args=(module,), name="saekit-import", daemon=True)
    thread.start()
    return thread


def make_optimizer(sae: SparseAutoencoder, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam; the fused kernel where torch has one (one pass over the weights: 3.6x faster than foreach on 2 CPU cores)."""
    opt = cfg.optimizer
    fused = sae.W_enc.device.type in ("cpu", "cuda")
    return torch.optim.Adam(sae.param_groups(), lr=base_learning_rate(cfg, sae.spec.d), betas=(opt.beta1, opt.beta2),
                            eps=opt.eps, fused=fused)


LossFunction = Callable[..., dict]
"""(x, dead) → loss terms, or (x, dead, y) for a transcoder (`SparseAutoencoder.loss_terms`)."""


def check_precision(precision: str, device: torch.device) -> None:
    """tf32 and bf16 are CUDA settings: a one-line error elsewhere, before anything is built or written."""
    if precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"precision={precision} needs a CUDA device (training runs on {device.type}); "
                          f"use precision=fp32")


def loss_function(sae: SparseAutoencoder, cfg: TrainConfig, device: torch.device) -> LossFunction:
    """`sae.loss_terms` in the configured precision, compiled if asked; the sparse path unless fast_path=false."""
    check_precision(cfg.precision, device)
    sae.sparse_training = cfg.fast_path
    terms = torch.compile(sae.loss_terms) if cfg.compile else sae.loss_terms
    if cfg.precision != "bf16":
        return terms

    def bf16_terms(x: torch.Tensor, dead_mask: Optional[torch.Tensor], *target: torch.Tensor) -> dict:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return terms(x, dead_mask, *target)

    return bf16_terms


@contextmanager
def matmul_precision(precision: str):
    """TF32 tensor-core matmuls for precision=tf32 (CUDA), restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate into every parameter group, times the group's `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def train_step(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               dead: DeadLatents, cfg: TrainConfig, lr: float,
               loss_fn: Optional[LossFunction] = None, y: Optional[torch.Tensor] = None,
               world: World = SINGLE) -> dict[str, torch.Tensor]:
    """One optimizer step: loss, backward, decoder-gradient projection, clip, step, renormalize.

    x: the normalized batch (B, d); y: a transcoder's normalized targets (B, d_out), None for an SAE.
    Under data parallelism x is this rank's share of the global batch: gradients are averaged over the ranks
    before anything reads them, and the dead-latent counters see the whole batch, so every rank stays identical.
    Nothing here reads a device value back, so on an accelerator the host queues the next step at once.
    """
    set_learning_rate(optimizer, lr)
    global_rows = x.shape[0] * world.size
    dead_set = dead.dead_set(global_rows) if cfg.dead.method == "auxk" else None
    terms = (loss_fn or sae.loss_terms)(x, dead_set, *(() if y is None else (y,)))
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    world.average_gradients_(sae.parameters())
    if cfg.init.grad_projection:
        sae.project_decoder_grad_()
    if cfg.optimizer.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.optimizer.grad_clip)
    optimizer.step()
    if cfg.init.decoder_norm:
        sae.normalize_decoder_()
    dead.update(world.any_(terms["fired"]), global_rows)
    return terms


def resample_steps(cfg: TrainConfig) -> set[int]:
    """Steps (counted as steps done) after which dead latents are resampled; empty unless dead=resample."""
    if cfg.dead.method != "resample":
        return set()
    steps = cfg.dead.resample_steps if cfg.dead.resample_steps is not None else default_resample_steps(cfg.n_steps)
    return set(steps)


def resample(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead: DeadLatents, cfg: TrainConfig,
             data: TrainingData, step: int, device: torch.device) -> int:
    """Resample the latents dead after `step`, from inputs drawn by (seed, step) so a resumed run does the same."""
    if sae.transcoder:  # resampling aims new latents at inputs the SAE reconstructs badly: no such inputs here
        raise ConfigError("dead=resample is not supported for transcoders; use dead=auxk or dead=none")
    if not bool(dead.mask.any()):
        return 0
    seed = cfg.seed * 7919 + step
    inputs, _ = sae.normalize_input(data.batches.sample(cfg.dead.resample_n_tokens, seed=seed).to(device))
    generator = torch.Generator().manual_seed(seed)
    revived = resample_dead_latents(sae, optimizer, dead.mask, inputs, cfg.dead.resample_encoder_frac, generator)
    dead.revive(revived)
    return revived.numel()


def _weights_finite(sae: SparseAutoencoder) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in sae.parameters()]).all())


def _check_finite(loss: float, step: int, last_ckpt_step: Optional[int], run_dir: Path, sae: SparseAutoencoder,
                  check_weights: bool) -> None:
    """Stop on a non-finite loss, or (before a checkpoint) non-finite weights, keeping the last good checkpoint."""
    if math.isfinite(loss) and not (check_weights and not _weights_finite(sae)):
        return
    what = f"loss became {loss}" if not math.isfinite(loss) else "the weights became non-finite"
    kept = (f"the last good checkpoint (step {last_ckpt_step}) is kept in {run_dir / STATE_FILE}"
            if last_ckpt_step is not None else "no checkpoint had been written yet")
    raise TrainingDiverged(f"{what} at step {step}; {kept}. Lower optimizer.lr (or set optimizer.grad_clip) and run again")


def _resume_point(cfg: TrainConfig, run_dir: Path, data_key: str) -> Optional[dict]:
    """Facts of a checkpoint this run can continue from, or None to start fresh."""
    state_path = run_dir / STATE_FILE
    if not cfg.resume or not state_path.is_file():
        return None
    facts = read_metadata(state_path)
    if facts.get("config_fingerprint") != config_fingerprint(cfg, data_key):
        raise ConfigError(
            f"hydra.run.dir={run_dir} holds a checkpoint of a different configuration or data; use another hydra.run.dir, "
            f"or resume=false to overwrite it"
        )
    return facts


Evaluator = Callable[[SparseAutoencoder], dict]


class _CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time and in order, while training goes on.

    Each file goes to a temporary name and is renamed (checkpoint.atomic_save), so a kill at any moment leaves
    the previous checkpoint whole; `wait` raises a failed write in the training thread.
    """

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, checkpoint: Checkpoint) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(checkpoint,), name="saekit-checkpoint")
        self._thread.start()

    def _write(self, checkpoint: Checkpoint) -> None:
        try:
            checkpoint.write()
        except BaseException as exc:  # handed to the training thread by `wait`
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class Trainer:
    """One SAE's training run, a step at a time: `fit` drives one, `fit_lockstep` several in turn.

    Construction sets the run up (resume point, the SAE on the device, its initialization or the checkpoint's
    state, optimizer, step log); `step(step, batch)` trains one step and does that step's resampling, logging,
    evaluation and checkpoint; `finish()` returns the TrainResult once the last checkpoint is on disk. Use it as a
    context manager, so that a checkpoint being written is waited for when training stops on an error.

    Only log, checkpoint and resample steps read values back from the device: in between, the first non-finite
    loss is kept on the device and checked there, and steps are timed from one such step to the next.
    """

    def __init__(self, cfg: TrainConfig, data: TrainingData, run_dir: Path, device: torch.device,
                 evaluator: Optional[Evaluator] = None, tracker: Optional[Tracker] = None, world: World = SINGLE):
        self.cfg, self.data, self.run_dir, self.device, self.world = cfg, data, run_dir, device, world
        self.evaluator = evaluator
        self.tracker = tracker or NoTracker()
        resume = _resume_point(cfg, run_dir, data.key)
        self.resumed_from = int(resume["step"]) if resume is not None else None
        self.start = self.resumed_from or 0
        self._build(initialized=resume is None)
        if resume is not None:
            counters, _ = load_train_state(run_dir / STATE_FILE, self.sae, self.optimizer)
            # the last trained step's rate, as a straight run's optimizer has it
            set_learning_rate(self.optimizer, learning_rate(cfg, self.data.d, self.start - 1))
            self.dead.tokens_since_fired = counters["tokens_since_fired"].to(device)
            log.info("resuming from step %d of %d (%s)", self.start, cfg.n_steps, run_dir / STATE_FILE)
        self._agree()
        self.dead.refresh(self._tokens_to_next_log(self.start))
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log = StepLog(run_dir / STEP_LOG, self.resumed_from) if world.is_main else None
        self.facts = {"config_fingerprint": config_fingerprint(cfg, data.key), "train_config": dataclasses.asdict(cfg)}
        self.last_ckpt = self.resumed_from
        self.resampling = resample_steps(cfg)
        self._writer = _CheckpointWriter()
        self._loss_watch = torch.zeros((), device=device)
        self._tokens_timed, self._time_spent = 0, 0.0
        self._began: Optional[float] = None
        self._tokens_running = 0

    def _build(self, initialized: bool) -> None:
        """The SAE on the device (initialized from the data when `initialized`), its loss, optimizer and counters."""
        cfg, device = self.cfg, self.device
        # A process's first optimizer imports torch._dynamo (1-2 s): done while the SAE initializes.
        importing = _import_in_background("torch._dynamo")
        self.sae = build_sae(spec_from_config(cfg, self.data.d, self.data.d_out)).to(device)
        if initialized:
            initialize(self.sae, cfg, self.data)
        self.sae.train()
        self.loss_fn = loss_function(self.sae, cfg, device)
        if importing is not None:
            importing.join()
        self.optimizer = make_optimizer(self.sae, cfg)
        self.dead = DeadLatents(torch.zeros(cfg.n, dtype=torch.long, device=device), dead_window_tokens(cfg))

    def _agree(self) -> None:
        """Every rank starts from rank 0's SAE, optimizer state and counters (they read the same checkpoint or
        initialize from the same sample; this makes it so whatever the arithmetic), and batch-wide statistics
        (AuxK's residual variance, BatchTopK's threshold) are reduced over the ranks."""
        if not self.world.enabled:
            return
        self.sae.reducer = self.world
        self.world.broadcast_([*module_state(self.sae, self.optimizer), self.dead.tokens_since_fired])

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._writer.wait()
        except Exception:
            if exc is None:
                raise
            log.exception("writing a checkpoint failed while training stopped on another error")

    @property
    def tokens_per_s(self) -> float:
        return self._tokens_timed / max(self._time_spent, 1e-9)

    def step(self, step: int, batch: torch.Tensor) -> Optional[str]:
        """Train step `step` (0-based) on a raw batch on the device; returns the progress line on log steps."""
        cfg = self.cfg
        if self._began is None:
            self._began = time.perf_counter()
        x_raw, y_raw = self.data.split(batch)
        x, _ = self.sae.normalize_input(x_raw)
        y = None if y_raw is None else self.sae.normalize_target(y_raw)
        lr = learning_rate(cfg, self.data.d, step)
        terms = train_step(self.sae, self.optimizer, x, self.dead, cfg, lr, self.loss_fn, y, self.world)
        # The first non-finite loss stays (else the latest), for the check on the next log or checkpoint step.
        self._loss_watch = torch.where(torch.isfinite(self._loss_watch), terms["loss"].detach().float(),
                                       self._loss_watch)
        self._tokens_running += x.shape[0]
        done = step + 1
        checkpoint_due = done % cfg.ckpt_every_steps == 0 or done == cfg.n_steps
        eval_due = self.evaluator is not None and bool(cfg.eval_every_steps) and (
            done % cfg.eval_every_steps == 0 or done == cfg.n_steps)
        log_due = done % cfg.log_every_steps == 0 or done == cfg.n_steps or eval_due
        if not (log_due or checkpoint_due or done in self.resampling):
            return None
        self._stop_clock()
        if done in self.resampling:
            revived = resample(self.sae, self.optimizer, self.dead, cfg, self.data, done, self.device)
            self._agree()
            log.info("step %d: resampled %d dead latents", done, revived)
        # A loss that is not finite on one rank stops every rank at the same step (the mean carries the NaN).
        _check_finite(float(self.world.mean_(self._loss_watch)), done, self.last_ckpt, self.run_dir, self.sae,
                      check_weights=checkpoint_due)
        stats = None
        if log_due:
            stats = self._log(terms, step, lr, eval_due)
        if checkpoint_due:
            self._checkpoint(done)
        self.dead.refresh(self._tokens_to_next_log(done))
        return stats

    def interrupt(self, done: int, reason: Optional[str]) -> None:
        """Stop on request with `done` steps trained: checkpoint them now (unless just done) and raise."""
        if done != self.last_ckpt:
            self._checkpoint(done)
        self._writer.wait()
        raise TrainingInterrupted(done, reason)

    def finish(self) -> TrainResult:
        """The result, once every checkpoint is written (an already finished run rewrites its final one)."""
        cfg = self.cfg
        if self.start >= cfg.n_steps and self.world.is_main and not _final_sae_written(self.run_dir, cfg.n_steps):
            # Killed between the final checkpoint's two files: the state file is final, only the weights are due.
            # (Rewriting the state would not even keep its bytes: safetensors orders metadata keys at random.)
            self._take_checkpoint(cfg.n_steps).write_weights()
        self._writer.wait()
        return TrainResult(sae=self.sae, steps_run=cfg.n_steps - self.start, resumed_from=self.resumed_from,
                           tokens_per_s=self.tokens_per_s, dead_frac_train=self.dead.fraction,
                           epochs=cfg.n_steps * cfg.batch_size / self.data.batches.n_rows)

    def _stop_clock(self) -> None:
        """Account the steps since the clock started (waiting for the device: only here is it read back)."""
        if self._began is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._time_spent += time.perf_counter() - self._began
        self._tokens_timed += self._tokens_running
        self._began, self._tokens_running = None, 0

    def _log(self, terms: dict, step: int, lr: float, eval_due: bool) -> str:
        terms = self._batch_means(terms)
        row = _log_row(terms, step + 1, self.cfg, self.dead, lr, self.tokens_per_s * self.world.size,
                       self.data.batches.epoch_of(step))
        if eval_due and self.world.is_main:
            held_out = self.evaluator(self.sae)
            self.sae.train()
            row.update(eval_nmse=held_out.get("nmse"), eval_delta_ce=held_out.get("delta_ce"))
        if self.log is not None:
            self.log.append(row)
        self.tracker.log_step(row["step"], row)
        for warning in self.sae.training_warnings():
            log.warning("step %d: %s", step + 1, warning)
        return (f"loss {row['loss']:.4g}  L0 {row['l0']:.1f}  dead {row['dead_frac']:.1%}  "
                f"{row['tokens_per_s']:,.0f} tok/s")

    def _batch_means(self, terms: dict) -> dict:
        """The logged loss terms over the global batch: each rank's share-mean, averaged (equal shares)."""
        if not self.world.enabled:
            return terms
        return {name: self.world.mean_(value) if torch.is_tensor(value) and value.dim() == 0 else value
                for name, value in terms.items()}

    def _checkpoint(self, step: int) -> None:
        """Snapshot now, write in the background (the next checkpoint, or `finish`, waits for this one). Under
        data parallelism rank 0 writes; the others hold identical state."""
        if not self.world.is_main:
            self.last_ckpt = step
            return
        self._writer.submit(self._take_checkpoint(step))
        self.last_ckpt = step

    def _take_checkpoint(self, step: int) -> Checkpoint:
        facts = {**self.facts, "step": step, "world_size": self.world.size}
        return Checkpoint.take(self.run_dir, self.sae, self.optimizer,
                               {"tokens_since_fired": self.dead.tokens_since_fired}, facts,
                               {**facts, "finished": step >= self.cfg.n_steps})

    def _tokens_to_next_log(self, done: int) -> int:
        """Tokens from step `done` up to the next log step: what the dead-latent candidates must cover."""
        every = self.cfg.log_every_steps
        return ((done // every + 1) * every - done) * self.cfg.batch_size


def _final_sae_written(run_dir: Path, n_steps: int) -> bool:
    """Whether sae.safetensors holds the final step (a kill between the two files of the last checkpoint leaves an
    older one, or none): a finished run's files are then left as they are."""
    try:
        return int(read_metadata(run_dir / SAE_FILE).get("step", -1)) == n_steps
    except SaekitError:
        return False


def fit(cfg: TrainConfig, data: TrainingData, run_dir: Path, device: torch.device, console: Optional[Console] = None,
        evaluator: Optional[Evaluator] = None, stop: Optional[StopFlag] = None,
        tracker: Optional[Tracker] = None, world: World = SINGLE) -> TrainResult:
    """Train one SAE on `data`; resumes from `run_dir`'s checkpoint when it matches.

    `console`: where a terminal progress bar is drawn (None or a non-terminal console: progress log lines).
    `tracker` (saekit.tracking) receives every step-log row.
    `evaluator(sae) -> {"nmse": …, "delta_ce": …}` runs every `cfg.eval_every_steps` on held-out tokens
    (the offline evaluation's code path) and its numbers go into the step log. When `stop` (default: the running
    command's flag, see saekit.stopping) is set, training checkpoints and raises TrainingInterrupted.
    """
    stop = stop or current_stop_flag() or StopFlag()
    start = resume_step(cfg, run_dir, data.key)
    if world.enabled:
        world.check_batch(cfg.batch_size)
        data.batches.for_rank(world.rank, world.size)
    # The prefetcher starts first: its first batches (and the epoch's shuffle) are made while the SAE initializes.
    with (Prefetcher(data.batches, start, cfg.n_steps, cfg.prefetch, device) as batches,
          Trainer(cfg, data, run_dir, device, evaluator, tracker, world) as trainer, matmul_precision(cfg.precision),
          _TrainProgress(console if world.is_main else None, cfg.n_steps, start) as progress, stop.watching()):
        for step in range(trainer.start, cfg.n_steps):
            if _stop_agreed(stop, step, cfg, world, device):
                trainer.interrupt(step, stop.reason)
            progress.update(step + 1, trainer.step(step, batches.get(step)))
        return trainer.finish()


def _stop_agreed(stop: StopFlag, step: int, cfg: TrainConfig, world: World, device: torch.device) -> bool:
    """Whether to stop before `step`. Ranks must stop at the same step (a rank alone in a collective waits for
    the others until the timeout), so under data parallelism the ranks agree at log-step boundaries: a signal
    stops training within `log_every_steps` steps."""
    if not world.enabled:
        return stop.is_set()
    if step % cfg.log_every_steps:
        return False
    return bool(world.any_(torch.tensor(stop.is_set(), device=device)))


def resume_step(cfg: TrainConfig, run_dir: Path, data_key: str) -> int:
    """The step a run in `run_dir` starts at: its checkpoint's, or 0."""
    facts = _resume_point(cfg, run_dir, data_key)
    return int(facts["step"]) if facts is not None else 0


class _LockstepBatches:
    """Several runs' batches in the order lockstep trains them, as one source for one Prefetcher: a single
    thread gathers for every run, so a shared source is never asked from two threads at once."""

    def __init__(self, schedule: list[tuple[int, int]], sources: list):
        self.schedule, self.sources = schedule, sources

    def batch(self, index: int) -> torch.Tensor:
        step, job = self.schedule[index]
        return self.sources[job].batch(step)


def fit_lockstep(jobs: list[tuple[TrainConfig, TrainingData, Path]], device: torch.device,
                 console: Optional[Console] = None, evaluators: Optional[list[Optional[Evaluator]]] = None,
                 stop: Optional[StopFlag] = None, trackers: Optional[list[Optional[Tracker]]] = None) -> list[TrainResult]:
    """Train several SAEs together, one step of each in turn (step s of the first, step s of the second, …).

    Each job is (config, data, run folder) and resumes from its own folder, as `fit` would; a shared data source
    (one model forward pass feeding several hooks) thus makes each chunk once. Every job must have the same
    n_steps and precision. Each SAE's weights come out the same as from its own `fit` call.
    """
    if not jobs:
        return []
    steps = sorted({cfg.n_steps for cfg, _, _ in jobs})
    precisions = sorted({cfg.precision for cfg, _, _ in jobs})
    if len(steps) > 1 or len(precisions) > 1:
        raise ConfigError(f"lockstep training needs one n_steps and one precision for every SAE (got n_steps {steps}, "
                          f"precision {precisions}); give them the same n_tokens, batch_size and precision")
    n_steps, evaluators = steps[0], list(evaluators) if evaluators is not None else [None] * len(jobs)
    trackers = list(trackers) if trackers is not None else [None] * len(jobs)
    stop = stop or current_stop_flag() or StopFlag()
    starts = [resume_step(cfg, run_dir, data.key) for cfg, data, run_dir in jobs]
    schedule = [(step, job) for step in range(min(starts), n_steps) for job in range(len(jobs)) if step >= starts[job]]
    source = _LockstepBatches(schedule, [data.batches for _, data, _ in jobs])
    depth = max(cfg.prefetch for cfg, _, _ in jobs) * len(jobs)
    with ExitStack() as stack:
        batches = stack.enter_context(Prefetcher(source, 0, len(schedule), depth, device))
        trainers = [stack.enter_context(Trainer(cfg, data, run_dir, device, evaluator, tracker))
                    for (cfg, data, run_dir), evaluator, tracker in zip(jobs, evaluators, trackers)]
        stack.enter_context(matmul_precision(precisions[0]))
        stack.enter_context(stop.watching())
        progress = stack.enter_context(_TrainProgress(console, n_steps, min(starts)))
        lines: list[str] = []
        for index, (step, job) in enumerate(schedule):
            if stop.is_set() and (index == 0 or schedule[index - 1][0] != step):  # between two steps
                _interrupt_all(trainers, step, stop.reason)
            stats = trainers[job].step(step, batches.get(index))
            if stats:
                lines.append(f"{jobs[job][2].name}: {stats}" if len(jobs) > 1 else stats)
            if index + 1 == len(schedule) or schedule[index + 1][0] != step:  # the last SAE of this step
                progress.update(step + 1, " | ".join(lines) or None)
                lines = []
        return [trainer.finish() for trainer in trainers]


def _interrupt_all(trainers: list[Trainer], done: int, reason: Optional[str]) -> None:
    """Checkpoint every lockstep SAE at `done` steps (one resumed beyond `done` has not moved: it keeps its own), then
    raise TrainingInterrupted."""
    for trainer in trainers:
        try:
            trainer.interrupt(max(done, trainer.start), reason)
        except TrainingInterrupted:
            pass
    raise TrainingInterrupted(done, reason)


def _log_row(terms: dict, step: int, cfg: TrainConfig, dead: DeadLatents, lr: float, tokens_per_s: float,
             epoch: int) -> dict:
    return {
        "step": step,
        "tokens": step * cfg.batch_size,
        "loss": float(terms["loss"].detach()),
        "mse": float(terms["mse"].detach()),
        "l0": float(terms["l0"]),
        "dead_frac": dead.fraction,
        "lr": lr,
        "tokens_per_s": round(tokens_per_s, 1),
        "sparsity_loss": float(terms["sparsity"].detach()) if "sparsity" in terms else 0.0,
        "auxk_loss": float(terms["auxk"].detach()) if "auxk" in terms else 0.0,
        "aux_loss": sum(float(value.detach()) for key, value in terms.items() if key not in _STANDARD_TERMS),
        "epoch": epoch,
    }
