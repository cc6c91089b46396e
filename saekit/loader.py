"""Shuffled training batches from the activation cache, addressable by step (so a resumed run sees the same data).

Each epoch is a fresh permutation of all training vectors drawn from a generator seeded by (seed, epoch);
batch `i` of an epoch is a slice of that permutation, gathered from the memory-mapped shards.
"""

from __future__ import annotations

import queue
import threading
from typing import Optional

import numpy as np
import torch

from saekit.cache import ActivationCache
from saekit.errors import ConfigError


class EpochBatches:
    """Batch `step` of an endless, epoch-wise shuffled stream over `n_rows` rows; subclasses gather the rows."""

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.batches_per_epoch = self.n_rows // batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"batch_size={batch_size} exceeds the {self.n_rows} training vectors; lower batch_size or add data"
            )
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n_rows, generator=generator).numpy()
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> torch.Tensor:
        """The float32 batch used at training step `step` (0-based)."""
        epoch, index = divmod(step, self.batches_per_epoch)
        return self.rows(np.sort(self._permutation(epoch)[index * self.batch_size:(index + 1) * self.batch_size]))

    def sample(self, n_rows: int, seed: int) -> torch.Tensor:
        """A uniform sample of rows (initialization, resampling), independent of the batch order."""
        generator = torch.Generator().manual_seed(seed)
        return self.rows(np.sort(torch.randperm(self.n_rows, generator=generator)[: min(n_rows, self.n_rows)].numpy()))

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        """float32 rows by sorted global index."""
        raise NotImplementedError


class TensorBatches(EpochBatches):
    """Batches from activations already in memory (synthetic benchmarks, notebooks)."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int):
        super().__init__(data.shape[0], batch_size, seed)
        self.data = data.float()

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        return self.data[torch.from_numpy(rows)]


class ShuffledBatches(EpochBatches):
    """Batches over one split of an activation cache, gathered from its memory-mapped shards."""

    def __init__(self, cache: ActivationCache, split: str, batch_size: int, seed: int):
        self.cache = cache
        self.shards = cache.shards(split)
        sizes = np.array([shard.shape[0] for shard in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        super().__init__(int(self.offsets[-1]), batch_size, seed)

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        return self.cache.to_torch(self._gather(rows))

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows by global index (sorted), read shard by shard."""
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        parts = []
        for shard_index in np.unique(shard_of):
            local = rows[shard_of == shard_index] - self.offsets[shard_index]
            parts.append(self.shards[shard_index][local])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


class Prefetcher:
    """Batches `start..stop-1` of `batches`, gathered `depth` steps ahead in a background thread.

    The gather (numpy/torch copies, which release the GIL) overlaps the training step. On CUDA the batch is
    pinned and copied to the device on a side stream, so the host-to-device transfer overlaps compute too.
    `depth=0` gathers in the calling thread. The order of batches never changes, so resumes stay exact.
    """

    def __init__(self, batches: EpochBatches, start: int, stop: int, depth: int, device: torch.device):
        self.batches, self.start, self.stop, self.device = batches, start, stop, device
        self.cuda = device.type == "cuda"
        self._stopped = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread: Optional[threading.Thread] = None
        if depth > 0:
            self._copy_stream = torch.cuda.Stream(device) if self.cuda else None
            self._thread = threading.Thread(target=self._work, name="saekit-prefetch", daemon=True)
            self._thread.start()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, step: int) -> torch.Tensor:
        """The batch of training step `step` on the device (steps must be asked for in order)."""
        if self._thread is None:
            return self.batches.batch(step).to(self.device, non_blocking=True)
        got, batch, ready = self._queue.get()
        if isinstance(batch, BaseException):
            raise batch
        if got != step:
            raise RuntimeError(f"prefetcher out of order: asked for step {step}, got {got}")
        if ready is not None:  # the side-stream copy must finish before compute reads the batch
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            batch.record_stream(current)
        return batch

    def close(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            while self._thread.is_alive():  # unblock a worker waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)

    def _work(self) -> None:
        try:
            for step in range(self.start, self.stop):
                if self._stopped.is_set():
                    return
                self._put((step, *self._fetch(step)))
        except BaseException as exc:  # handed to the training thread, which raises it
            self._put((None, exc, None))

    def _fetch(self, step: int) -> tuple[torch.Tensor, Optional["torch.cuda.Event"]]:
        batch = self.batches.batch(step)
        if not self.cuda or batch.is_cuda:  # already on the GPU (in-memory data): nothing to pin or copy
            return batch.to(self.device), None
        with torch.cuda.stream(self._copy_stream):
            on_device = batch.pin_memory().to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return on_device, ready

    def _put(self, item: tuple) -> None:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
