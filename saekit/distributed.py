"""Data-parallel training over torch.distributed ranks (`torchrun --nproc_per_node=N -m saekit train ...`).

The global batch (`batch_size`) is split over the ranks: each reads only its slice of the step's rows, and the
gradients are averaged, so the update equals one process's on the whole batch (each rank's loss is a mean over
an equal share of the rows). What must agree across ranks is made to: the dead-latent counters see the global
batch (latents fired on any rank), AuxK's residual variance and BatchTopK's running threshold are batch-wide,
and resampling's new latents are rank 0's, broadcast. Rank 0 alone writes (checkpoints, step log, tables).

Nothing here runs on import; `World.from_env()` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) and
the process group is started once by the command line (`start_process_group`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from saekit.errors import ConfigError, SaekitError

DEFAULT_TIMEOUT_S = 300.0
"""How long a collective waits for a rank before the job ends (a dead rank must not hang the others)."""


class RankLost(SaekitError):
    """Another rank stopped answering (killed, crashed, or past the timeout)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Optional[dict] = None) -> "World":
        """The world torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or srun's tasks of one SLURM job step
        (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) when torchrun's variables are absent; one process otherwise."""
        env = os.environ if environ is None else environ
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        if "WORLD_SIZE" not in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
            names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        try:
            return cls(rank=int(env.get(names[0], "0")), size=int(env.get(names[1], "1")),
                       local_rank=int(env.get(names[2], "0")))
        except ValueError as exc:
            raise ConfigError(f"{'/'.join(names)} are not integers ({exc}); start with torchrun or srun") from exc

    def slice_of(self, n_rows: int) -> slice:
        """This rank's rows of a batch of `n_rows` (an equal share; checked by `check_batch`)."""
        share = n_rows // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise ConfigError(f"batch_size={batch_size} does not split over {self.size} ranks; use a multiple of "
                              f"{self.size} (the global batch is shared equally)")

    # ---- collectives (no-ops in a world of one) -------------------------------------------------
    def average_gradients_(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Gradients → their mean over ranks, in one flat all-reduce. A parameter without a gradient on this rank
        takes part as zeros (the ranks run the same graph, so this only guards against a hang)."""
        if not self.enabled:
            return
        params = list(parameters)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        _collective(torch.distributed.all_reduce, flat)
        flat /= self.size
        offset = 0
        for p in params:
            part = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)

    def any_(self, mask: torch.Tensor) -> torch.Tensor:
        """A boolean tensor true where it is true on any rank."""
        if not self.enabled:
            return mask
        as_int = mask.to(torch.int32)
        _collective(torch.distributed.all_reduce, as_int, op=torch.distributed.ReduceOp.MAX)
        return as_int.bool()

    def min_(self, value: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return value
        value = value.detach().clone()
        _collective(torch.distributed.all_reduce, value, op=torch.distributed.ReduceOp.MIN)
        return value

    def mean_(self, value: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return value
        value = value.detach().clone().float()
        _collective(torch.distributed.all_reduce, value)
        return value / self.size

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors (in place)."""
        if not self.enabled:
            return
        for tensor in tensors:
            _collective(torch.distributed.broadcast, tensor, src=0)

    def barrier(self) -> None:
        if self.enabled:
            _collective(torch.distributed.barrier)


SINGLE = World()


def module_state(module: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> list[torch.Tensor]:
    """Every tensor that must agree across ranks: parameters, buffers and the optimizer's per-parameter state."""
    tensors = [*module.parameters(), *module.buffers()]
    if optimizer is not None:
        for param in module.parameters():
            tensors += [value for value in optimizer.state.get(param, {}).values() if torch.is_tensor(value)]
    return tensors


def _collective(function, *args, **kwargs):
    """A collective whose failure (a peer gone, the timeout reached) is one line, not a gloo/NCCL traceback."""
    try:
        return function(*args, **kwargs)
    except (RuntimeError, torch.distributed.DistBackendError) as exc:  # type: ignore[attr-defined]
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise RankLost(f"rank {torch.distributed.get_rank()} lost contact with the other ranks ({first[:200]}); "
                       f"the run stops at its last checkpoint: run the same command to resume") from exc


def start_process_group(world: World, device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join torchrun's process group: NCCL on CUDA, gloo on the CPU; collectives time out after `timeout_s`."""
    if not world.enabled or torch.distributed.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError(f"{world.size} ranks but MASTER_ADDR/MASTER_PORT are not set; start with torchrun "
                          f"(torchrun --nproc_per_node=N -m saekit train ...), or export them before srun "
                          f"(scripts/slurm/train_ddp.sbatch shows how)")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    address = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        torch.distributed.init_process_group(backend, init_method=address, rank=world.rank, world_size=world.size,
                                             timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # rendezvous failures come as several types
        raise RankLost(f"could not join the other {world.size - 1} rank(s) ({str(exc).splitlines()[0][:200]})") \
            from exc


def rank_device(world: World, device: torch.device) -> torch.device:
    """Each rank's own GPU (LOCAL_RANK) on CUDA; the CPU as it is."""
    if device.type == "cuda" and world.enabled:
        return torch.device("cuda", world.local_rank)
    return device


