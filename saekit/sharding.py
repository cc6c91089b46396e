"""Latent sharding: a TopK SAE too wide for one device, its latents split over `shard_latents` ranks.

Rank s of a shard group holds latents [s·n/S, (s+1)·n/S): its rows of W_enc, b_enc and W_dec, their Adam moments
and dead-latent counters; b_pre is replicated. A step, on the batch every rank of the group shares:

  1. each rank computes its latents' pre-activations h_s = (x − b_pre) W_enc_sᵀ + b_enc_s;
  2. TopK by a distributed top-k: each rank's k largest per row, gathered (k·S candidates per row), the global
     k largest kept, each rank keeping its own; AuxK's top-k_aux of dead latents the same way;
  3. x̂ = Σ_s z_s W_dec_s + b_pre, the sum an all-reduce (backward: each rank's share of the same gradient);
     the encoder input's gradient is summed over the group (backward of the copy to the shards), so b_pre's
     gradient is whole and identical on every rank;
  4. decoder renormalization and gradient projection act per latent, so each rank does its own.

With world size W = S·D the ranks form a grid: shard groups of S consecutive ranks, each a whole SAE, and D
data-parallel groups (ranks with the same shard index), over which gradients are averaged as in
saekit.distributed. Checkpoints are gathered to rank 0 as a normal single-process SAE (with its Adam state), so
they load, evaluate and resume anywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from saekit.config import TrainConfig
from saekit.distributed import World, _collective
from saekit.errors import ConfigError
from saekit.sae.base import auxk_from, normalize_rows_, project_row_grads_

log = logging.getLogger(__name__)


@dataclass
class Grid:
    """This rank's place in the shards × data-parallel grid, and the two process groups it belongs to."""

    world: World
    shards: int
    shard: int
    data_rank: int
    data_ranks: int
    shard_group: object
    data_group: object

    @classmethod
    def build(cls, world: World, shards: int) -> "Grid":
        if world.size % shards:
            raise ConfigError(f"shard_latents={shards} does not divide the {world.size} ranks; use a divisor of "
                              f"{world.size} (the rest of the ranks form data-parallel groups)")
        data_ranks = world.size // shards
        # Every rank creates every group, in the same order (torch.distributed's rule for new_group).
        shard_groups = [dist.new_group(list(range(g * shards, (g + 1) * shards))) for g in range(data_ranks)]
        data_groups = [dist.new_group(list(range(s, world.size, shards))) for s in range(shards)]
        shard, data_rank = world.rank % shards, world.rank // shards
        return cls(world, shards, shard, data_rank, data_ranks, shard_groups[data_rank], data_groups[shard])

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.shards)]
        _collective(dist.all_gather, parts, tensor.contiguous(), group=self.shard_group)
        return parts

    def sum_over_shards_(self, tensor: torch.Tensor) -> torch.Tensor:
        _collective(dist.all_reduce, tensor, group=self.shard_group)
        return tensor

    def average_over_data_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.data_ranks > 1:
            _collective(dist.all_reduce, tensor, group=self.data_group)
            tensor /= self.data_ranks
        return tensor

    def mean_over_data(self, value: torch.Tensor) -> torch.Tensor:
        """A statistic of this group's rows averaged over the data-parallel groups (a new tensor)."""
        return self.average_over_data_(value.detach().clone())

    def any_over_data(self, mask: torch.Tensor) -> torch.Tensor:
        if self.data_ranks == 1:
            return mask
        as_int = mask.to(torch.int32)
        _collective(dist.all_reduce, as_int, op=dist.ReduceOp.MAX, group=self.data_group)
        return as_int.bool()


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the shard group (each shard used the input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        ctx.grid = grid
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.grid.sum_over_shards_(grad.contiguous().clone()), None


class _SumOverShards(torch.autograd.Function):
    """All-reduce sum forward; backward passes the (identical on every rank) gradient to this rank's share."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, grid: Grid) -> torch.Tensor:
        return grid.sum_over_shards_(partial.contiguous().clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def global_top_k(values: torch.Tensor, k: int, grid: Grid) -> torch.Tensor:
    """This rank's entries among each row's k largest over all shards: a (B, n_s) boolean mask.

    Each rank's local top-k candidates (values, global latent index) are gathered; the k largest of the k·S per
    row win (ties broken by the lower latent index, as one process's topk over the whole row would)."""
    local_k = min(k, values.shape[1])
    top_values, top_index = values.detach().topk(local_k, dim=1)
    offset = grid.shard * values.shape[1]
    candidates = torch.cat(grid.all_gather(top_values), dim=1)
    indices = torch.cat(grid.all_gather(top_index + offset), dim=1)
    # Order by value, then by lower index: a stable sort on index first, then on value.
    by_index = indices.argsort(dim=1, stable=True)
    candidates, indices = candidates.gather(1, by_index), indices.gather(1, by_index)
    order = candidates.argsort(dim=1, descending=True, stable=True)[:, :k]
    winners = indices.gather(1, order)
    mask = torch.zeros_like(values, dtype=torch.bool)
    mine = (winners >= offset) & (winners < offset + values.shape[1])
    rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1).expand_as(winners)
    mask[rows[mine], winners[mine] - offset] = True
    return mask


class ShardedTopK(nn.Module):
    """This rank's shard of a TopK SAE (see the module's docstring)."""

    def __init__(self, full, grid: Grid):
        super().__init__()
        n = full.spec.n
        if n % grid.shards:
            raise ConfigError(f"n={n} latents do not split over shard_latents={grid.shards}; use a multiple of "
                              f"{grid.shards}")
        self.spec, self.grid = full.spec, grid
        self.n_local = n // grid.shards
        rows = slice(grid.shard * self.n_local, (grid.shard + 1) * self.n_local)
        self.rows = rows
        self.W_enc = nn.Parameter(full.W_enc.detach()[rows].clone())
        self.b_enc = nn.Parameter(full.b_enc.detach()[rows].clone())
        self.W_dec = nn.Parameter(full.W_dec.detach()[rows].clone())
        self.b_pre = nn.Parameter(full.b_pre.detach().clone())
        self.register_buffer("input_scale", full.input_scale.detach().clone())

    def param_groups(self) -> list[dict]:
        return [{"params": [self.W_enc, self.b_enc, self.W_dec, self.b_pre], "lr_scale": 1.0}]

    def loss_terms(self, x: torch.Tensor, dead_mask: Optional[torch.Tensor], any_dead: bool) -> dict:
        """mse (+ AuxK when a latent is dead anywhere): the same terms one process computes on the whole SAE."""
        x_in = _CopyToShards.apply(x - self.b_pre, self.grid)
        h = x_in @ self.W_enc.T + self.b_enc
        chosen = global_top_k(h, self.spec.k, self.grid)
        z = torch.where(chosen, F.relu(h), torch.zeros((), device=h.device))
        x_hat = _SumOverShards.apply(z @ self.W_dec, self.grid) + self.b_pre
        mse = (x - x_hat).pow(2).sum(dim=-1).mean()
        terms = {"mse": mse}
        if self.spec.dead_method == "auxk":
            terms["auxk"] = self._auxk(x, x_hat, h, dead_mask) if any_dead else torch.zeros((), device=x.device)
        terms["loss"] = sum(terms.values())
        active = (z != 0).detach()
        terms["fired"] = active.any(dim=0)
        terms["l0"] = self.grid.sum_over_shards_(active.float().sum(dim=1).mean().reshape(1)).squeeze()
        return terms

    def _auxk(self, x, x_hat, h, dead_mask) -> torch.Tensor:
        k_aux = min(self.spec.effective_k_aux, self.spec.n)
        scores = h.masked_fill(~dead_mask, float("-inf"))
        chosen = global_top_k(scores, k_aux, self.grid) & dead_mask
        values = torch.where(chosen, F.relu(h), torch.zeros((), device=h.device))
        error_hat = _SumOverShards.apply(values @ self.W_dec, self.grid)
        # The normaliser over the whole batch, which the data-parallel groups share.
        return auxk_from((x - x_hat).detach(), error_hat, self.spec.aux_alpha, self.grid.mean_over_data)

    def normalize_decoder_(self) -> None:
        normalize_rows_(self.W_dec)  # per latent: each shard its own rows

    def project_decoder_grad_(self) -> None:
        project_row_grads_(self.W_dec)

    def gather_into(self, full) -> None:
        """The whole SAE's weights into `full` (every rank of the shard group takes part; all get them)."""
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec"):
                getattr(full, name).copy_(torch.cat(self.grid.all_gather(getattr(self, name).detach()), dim=0))
            full.b_pre.copy_(self.b_pre)
            full.input_scale.copy_(self.input_scale)


def check_sharding(cfg: TrainConfig, world: World) -> None:
    """What latent sharding supports; anything else is one line before any work."""
    shards = cfg.shard_latents
    if shards == 1:
        return
    if world.size < shards:
        raise ConfigError(f"shard_latents={shards} needs {shards} ranks; start with torchrun "
                          f"--nproc_per_node={shards} -m saekit train ... (this process is one of {world.size})")
    if cfg.activation.name != "topk":
        raise ConfigError(f"shard_latents={shards} supports activation=topk (got {cfg.activation.name}); train "
                          f"other variants with shard_latents=1")
    if cfg.activation.learned_scale or cfg.hook_out or cfg.dead.method == "resample":
        raise ConfigError(f"shard_latents={shards} trains a plain TopK SAE: learned_scale, transcoders and "
                          f"dead=resample are not sharded; use shard_latents=1 for them")
    if cfg.optimizer.grad_clip is not None:
        raise ConfigError(f"shard_latents={shards} does not clip gradients (the norm spans the shards); set "
                          f"optimizer.grad_clip=null")
    if cfg.n % shards:
        raise ConfigError(f"n={cfg.n} latents do not split over shard_latents={shards}; use a multiple of {shards}")
    if cfg.data.normalize == "layer_norm":
        raise ConfigError(f"shard_latents={shards} expects data.normalize=scale or none")


def memory_per_rank_bytes(n: int, d: int, shards: int, bytes_per_value: int = 4) -> int:
    """Weights, gradients and Adam's two moments of one rank's shard: 4 copies of (2·n/S·d + n/S) values, plus
    b_pre's. What the README's memory formula states."""
    per_shard = 2 * (n // shards) * d + n // shards
    return 4 * bytes_per_value * (per_shard + d)


def log_layout(grid: Grid, n: int) -> None:
    log.info("latent sharding: %d shards of %d latents x %d data-parallel group(s); this rank holds latents %d..%d",
             grid.shards, n // grid.shards, grid.data_ranks, grid.shard * (n // grid.shards),
             (grid.shard + 1) * (n // grid.shards) - 1)


# ---- the training loop ---------------------------------------------------------------------------------
def fit_sharded(cfg: TrainConfig, data, run_dir: Path, device: torch.device, world: World, stop=None):
    """Train a TopK SAE whose latents are split over `cfg.shard_latents` ranks (a TrainResult, as `fit`'s).

    Same recipe as `saekit.train.fit` (initialization from the same sample, learning-rate schedule, Adam, decoder
    renormalization and gradient projection, AuxK with the same dead window); the run folder is rank 0's, and
    its checkpoints are a whole single-process SAE."""
    from saekit.checkpoint import STATE_FILE, Checkpoint, load_train_state
    from saekit.loader import Prefetcher
    from saekit.sae import build_sae
    from saekit.stopping import StopFlag, TrainingInterrupted, current_stop_flag
    from saekit.train import (STEP_LOG, StepLog, TrainResult, _resume_point, _stop_agreed, config_fingerprint,
                              dead_window_tokens, initialize, learning_rate, make_optimizer, set_learning_rate,
                              spec_from_config)

    grid = Grid.build(world, cfg.shard_latents)
    log_layout(grid, cfg.n)
    if cfg.batch_size % grid.data_ranks:
        raise ConfigError(f"batch_size={cfg.batch_size} does not split over {grid.data_ranks} data-parallel groups; "
                          f"use a multiple of {grid.data_ranks}")
    data.batches.for_rank(grid.data_rank, grid.data_ranks)
    stop = stop or current_stop_flag() or StopFlag()
    full = build_sae(spec_from_config(cfg, data.d)).to(device)
    full_optimizer = make_optimizer(full, cfg)
    resume = _resume_point(cfg, run_dir, data.key)
    resumed_from = int(resume["step"]) if resume is not None else None
    start = resumed_from or 0
    counters = torch.zeros(cfg.n, dtype=torch.long, device=device)
    if resume is not None:
        saved, _ = load_train_state(run_dir / STATE_FILE, full, full_optimizer)
        counters = saved["tokens_since_fired"].to(device)
        log.info("resuming from step %d of %d (%s)", start, cfg.n_steps, run_dir / STATE_FILE)
    else:
        initialize(full, cfg, data)
    model = ShardedTopK(full, grid).to(device)
    optimizer = torch.optim.Adam(model.param_groups(), lr=full_optimizer.param_groups[0]["lr"],
                                 betas=full_optimizer.defaults["betas"], eps=full_optimizer.defaults["eps"],
                                 fused=device.type in ("cpu", "cuda"))
    if resume is not None:
        _slice_optimizer_state(full, full_optimizer, model, optimizer)
    local_counters = counters[model.rows].clone()
    window, facts = dead_window_tokens(cfg), {"config_fingerprint": config_fingerprint(cfg, data.key)}
    step_log = StepLog(run_dir / STEP_LOG, resumed_from) if world.is_main else None
    began, global_rows = time.perf_counter(), cfg.batch_size

    def checkpoint(step: int) -> None:
        model.gather_into(full)
        _gather_optimizer_state(model, optimizer, full, full_optimizer, grid)
        everything = torch.cat(grid.all_gather(local_counters), dim=0)
        if world.is_main:
            info = {**facts, "train_config": dataclasses.asdict(cfg), "step": step, "world_size": world.size,
                    "shard_latents": grid.shards}
            Checkpoint.take(run_dir, full, full_optimizer, {"tokens_since_fired": everything}, info,
                            {**info, "finished": step >= cfg.n_steps}).write()

    with Prefetcher(data.batches, start, cfg.n_steps, cfg.prefetch, device) as batches, stop.watching():
        for step in range(start, cfg.n_steps):
            if _stop_agreed(stop, step, cfg, world, device):
                checkpoint(step)
                raise TrainingInterrupted(step, stop.reason)
            x = batches.get(step) * model.input_scale
            lr = learning_rate(cfg, data.d, step)
            set_learning_rate(optimizer, lr)
            dead_mask = local_counters >= window
            any_dead = bool(grid.sum_over_shards_(dead_mask.any().to(torch.int32).reshape(1)).item()) \
                if cfg.dead.method == "auxk" else False
            terms = model.loss_terms(x, dead_mask, any_dead)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            for param in model.parameters():
                grid.average_over_data_(param.grad)
            if cfg.init.grad_projection:
                model.project_decoder_grad_()
            optimizer.step()
            if cfg.init.decoder_norm:
                model.normalize_decoder_()
            fired = grid.any_over_data(terms["fired"])
            local_counters.add_(global_rows).masked_fill_(fired, 0)
            done = step + 1
            if done % cfg.log_every_steps == 0 or done == cfg.n_steps:
                row = _row(terms, done, cfg, grid, local_counters >= window, lr, began)
                if step_log is not None:
                    step_log.append(row)
                log.info("step %d/%d  loss %.4g  L0 %.1f  dead %.1f%%", done, cfg.n_steps, row["loss"], row["l0"],
                         100 * row["dead_frac"])
            if done % cfg.ckpt_every_steps == 0 or done == cfg.n_steps:
                checkpoint(done)
        if start >= cfg.n_steps:
            model.gather_into(full)
    elapsed = time.perf_counter() - began
    return TrainResult(sae=full, steps_run=cfg.n_steps - start, resumed_from=resumed_from,
                       tokens_per_s=(cfg.n_steps - start) * cfg.batch_size / max(elapsed, 1e-9),
                       dead_frac_train=float((torch.cat(grid.all_gather(local_counters)) >= window).float().mean()),
                       epochs=cfg.n_steps * cfg.batch_size / data.batches.n_rows)


def _row(terms: dict, step: int, cfg: TrainConfig, grid: Grid, dead_mask: torch.Tensor, lr: float,
         began: float) -> dict:
    """The step-log row, with the data-parallel groups' mean loss and the dead fraction over all shards."""
    loss = grid.mean_over_data(terms["loss"].float()).item()
    mse = grid.mean_over_data(terms["mse"].float()).item()
    auxk = grid.mean_over_data(terms["auxk"].float()).item() if "auxk" in terms else 0.0
    dead = grid.sum_over_shards_(dead_mask.sum().to(torch.float32).reshape(1)).item() / cfg.n
    return {"step": step, "tokens": step * cfg.batch_size, "loss": loss, "mse": mse, "l0": float(terms["l0"]),
            "dead_frac": dead, "lr": lr, "tokens_per_s": round(step * cfg.batch_size / max(time.perf_counter() - began,
                                                                                          1e-9), 1),
            "sparsity_loss": 0.0, "auxk_loss": auxk, "aux_loss": 0.0, "epoch": 0}


_SHARDED = ("W_enc", "b_enc", "W_dec")


def _slice_optimizer_state(full, full_optimizer, model: ShardedTopK, optimizer) -> None:
    """A whole SAE's Adam moments → this shard's (b_pre's whole)."""
    for name in (*_SHARDED, "b_pre"):
        state = full_optimizer.state.get(getattr(full, name))
        if not state:
            continue
        rows = model.rows if name in _SHARDED else slice(None)
        optimizer.state[getattr(model, name)] = {key: value[rows].clone() if value.dim() else value.clone()
                                                 for key, value in state.items()}


def _gather_optimizer_state(model: ShardedTopK, optimizer, full, full_optimizer, grid: Grid) -> None:
    """Every shard's Adam moments → the whole SAE's optimizer (on every rank of the shard group)."""
    for name in (*_SHARDED, "b_pre"):
        state = optimizer.state.get(getattr(model, name))
        if not state:
            continue
        whole = {}
        for key, value in state.items():
            if name in _SHARDED and value.dim():
                whole[key] = torch.cat(grid.all_gather(value), dim=0)
            else:
                whole[key] = value.clone()
        full_optimizer.state[getattr(full, name)] = whole
