"""Shuffled training batches from the activation cache, addressable by step (so a resumed run sees the same data).

Two orders, both fixed by (seed, epoch) alone:

- global (`ShuffledBatches`): each epoch is a fresh permutation of all training vectors; batch `i` of an epoch is
  a slice of it, gathered row by row from the memory-mapped shards. Fast while the cache sits in the page cache;
  a cache bigger than RAM turns every batch into thousands of random disk reads.
- block (`BlockShuffledBatches`): the shards are cut into contiguous blocks (about 1 MiB each) and each epoch reads
  them in a shuffled order, one sequential read per block, into a RAM buffer whose rows are shuffled before
  batches are cut from it. Built for caches bigger than RAM.

`make_batches` picks one from `LoaderConfig` (`auto`: global when the split fits comfortably in memory).
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from saekit.cache import ActivationCache
from saekit.config import SHUFFLES, LoaderConfig
from saekit.errors import ConfigError, DataError, check_choice

log = logging.getLogger(__name__)

AUTO_GLOBAL_FRACTION = 0.5
"""`loader.shuffle=auto` shuffles globally while the split takes at most this fraction of the machine's memory."""
DEFAULT_BUFFER_FRACTION = 1 / 16
"""Default size of one block-shuffle buffer as a fraction of memory (two are held while the next one is read)."""
MIN_BUFFER_BATCHES = 8
SAMPLE_OVERREAD = 2
"""`sample(n)` on the block loader reads random blocks holding about this many times n rows, then picks n."""
SAMPLE_MIN_BLOCKS = 32


class EpochBatches:
    """Batch `step` of an endless, epoch-wise shuffled stream over `n_rows` rows; subclasses gather the rows."""

    order_key: str = "global"
    """Names the order batches come in (folded into the resume fingerprint unless "global")."""
    part: tuple[int, int] = (0, 1)
    """(rank, ranks): `batch` returns this rank's equal share of each step's rows (data-parallel training)."""

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.batches_per_epoch = self.n_rows // batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"batch_size={batch_size} exceeds the {self.n_rows} training vectors; lower batch_size or add data"
            )
        self.seed = seed
        self._order: Optional[tuple[int, np.ndarray]] = None

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        """The epoch's row order. Kept as one (epoch, order) pair, replaced whole: a batch asked for from another
        thread (the prefetcher's, the training thread's) never pairs one epoch with another's order."""
        cached = self._order
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            cached = self._order = (epoch, torch.randperm(self.n_rows, generator=generator).numpy())
        return cached[1]

    def batch(self, step: int) -> torch.Tensor:
        """The float32 batch used at training step `step` (0-based): this rank's share of it."""
        epoch, index = divmod(step, self.batches_per_epoch)
        return self.rows(self.my_share(np.sort(self._permutation(epoch)[index * self.batch_size:
                                                                          (index + 1) * self.batch_size])))

    def for_rank(self, rank: int, ranks: int) -> "EpochBatches":
        """Serve rank `rank` of `ranks` its share of every step's batch (the global order is unchanged)."""
        self.part = (rank, ranks)
        return self

    def my_share(self, rows: np.ndarray) -> np.ndarray:
        """This rank's slice of one step's sorted rows: only those are read from the cache."""
        rank, ranks = self.part
        share = len(rows) // ranks
        return rows if ranks == 1 else rows[rank * share:(rank + 1) * share]

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


class BlockShuffledBatches(EpochBatches):
    """Batches over one split of a cache read as contiguous blocks in a shuffled order (caches bigger than RAM).

    Each shard is cut into blocks of `block_rows` rows (the last block of a shard may be shorter); an epoch's
    block order is a permutation seeded by (seed, epoch). Laid end to end, the blocks in that order give the
    epoch's *block sequence* of all `n_rows` rows. The epoch's `batches_per_epoch` batches are split evenly into
    `n_fills` consecutive groups of at most `buffer_rows / batch_size` batches; fill `c` holds the stretch of
    the block sequence its batches need (the last fill also holds the `n_rows mod batch_size` rows that are left
    over). A fill is read into RAM (reads sorted by file offset), its rows are permuted (seeded by
    (seed, epoch, c)) and its batches are consecutive slices of that permutation. The rows dropped each epoch are
    thus the last `n_rows mod batch_size` of the last fill's permutation: a few rows, different every epoch,
    as the global loader drops the tail of its permutation.

    Batch `step` depends on nothing but (seed, step) and the geometry named by `order_key`, so steps can be asked
    for in any order (a resumed run sees the same data). While batches are cut from one fill the next is read in a
    background thread (`readahead`), so at most two buffers are held.
    """

    def __init__(self, cache: ActivationCache, split: str, batch_size: int, seed: int, buffer_tokens: int,
                 block_bytes: int = 2**20, readahead: bool = True, read_threads: int = 4):
        self.cache = cache
        self.shards = cache.shards(split)
        if not self.shards:
            raise DataError(f"the cache's {split} split has no shards; rebuild the cache (`saekit cache`)")
        sizes = np.array([shard.shape[0] for shard in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        super().__init__(int(self.offsets[-1]), batch_size, seed)
        if block_bytes <= 0:
            raise ConfigError(f"loader.block_kib={block_bytes / 1024:g} must be positive; use the default 1024")
        if buffer_tokens < batch_size:
            raise ConfigError(f"loader.buffer_tokens={buffer_tokens} is smaller than batch_size={batch_size}; raise "
                              f"loader.buffer_tokens to at least {batch_size} (or null to size it from memory)")
        self.dtype = self.shards[0].dtype
        self.d = int(self.shards[0].shape[1])
        self.row_bytes = self.d * self.dtype.itemsize
        self.block_rows = max(1, block_bytes // self.row_bytes)
        self.buffer_rows = min(buffer_tokens // batch_size, self.batches_per_epoch) * batch_size
        self.n_fills = -(-self.batches_per_epoch // (self.buffer_rows // batch_size))
        # First batch (within the epoch) of each fill, and one past the last: fills differ by at most one batch.
        self.fill_starts = np.arange(self.n_fills + 1, dtype=np.int64) * self.batches_per_epoch // self.n_fills
        self.blocks = self._block_table(sizes)
        self.order_key = f"block:{self.buffer_rows}:{self.block_rows}"
        self.readahead = readahead
        self.read_threads = max(1, read_threads)
        self._order_lock = threading.Lock()
        self._order: Optional[tuple[int, np.ndarray, np.ndarray]] = None
        # Two buffers, allocated once and reused (a fresh array costs a page fault per page on its first write):
        # one holds the fill batches are cut from, the other the fill read ahead. `_use` is held while a
        # batch is cut or the fills change hands, so a buffer is never refilled while it is being read.
        self._capacity = max(hi - lo for lo, hi in map(self.fill_span, range(self.n_fills)))
        self._slots: list[Optional[np.ndarray]] = [None, None]
        self._use = threading.Lock()
        self._held: Optional[tuple[tuple[int, int], int, np.ndarray]] = None
        """(epoch, fill), its slot, the permutation of its rows."""
        self._ahead: Optional[tuple[tuple[int, int], _Background]] = None
        """(epoch, fill) being read into the other slot, and the read (its result is the permutation)."""

    def _block_table(self, sizes: np.ndarray) -> np.ndarray:
        """(n_blocks, 3) int64: shard, first row within the shard, number of rows; in file order."""
        tables = []
        for shard, size in enumerate(sizes):
            starts = np.arange(0, size, self.block_rows, dtype=np.int64)
            tables.append(np.stack([np.full_like(starts, shard), starts, np.minimum(self.block_rows, size - starts)], 1))
        return np.concatenate(tables)

    def fill_of(self, step: int) -> tuple[int, int, int]:
        """(epoch, fill, batch within the fill) of training step `step`."""
        epoch, index = divmod(step, self.batches_per_epoch)
        fill = int(np.searchsorted(self.fill_starts, index, side="right")) - 1
        return epoch, fill, index - int(self.fill_starts[fill])

    def batch(self, step: int) -> torch.Tensor:
        """The float32 batch used at training step `step` (0-based)."""
        epoch, fill, index = self.fill_of(step)
        with self._use:
            buffer, order = self._fill(epoch, fill)
            rows = buffer[self.my_share(np.sort(order[index * self.batch_size:(index + 1) * self.batch_size]))]
        return self.cache.to_torch(rows)

    def sample(self, n_rows: int, seed: int) -> torch.Tensor:
        """About `n_rows` rows drawn uniformly from a few random blocks (a few sequential reads, not n random ones).

        Blocks are taken in a seeded random order until they hold `SAMPLE_OVERREAD · n_rows` rows (and at least
        `SAMPLE_MIN_BLOCKS` blocks, or all of them), then `n_rows` of their rows are picked at random.
        """
        n_rows = min(n_rows, self.n_rows)
        generator = np.random.default_rng(_entropy(seed, 2))
        shuffled = generator.permutation(len(self.blocks))
        held = np.cumsum(self.blocks[shuffled, 2])
        count = max(int(np.searchsorted(held, SAMPLE_OVERREAD * n_rows)) + 1, SAMPLE_MIN_BLOCKS)
        picked = self.blocks[np.sort(shuffled[:count])]
        destinations = np.concatenate([[0], np.cumsum(picked[:, 2])])
        buffer = np.empty((int(destinations[-1]), self.d), dtype=self.dtype)
        self._read([(int(s), int(r), int(n), int(t)) for (s, r, n), t in zip(picked, destinations[:-1])], buffer)
        rows = np.sort(generator.choice(buffer.shape[0], size=n_rows, replace=False))
        return self.cache.to_torch(buffer[rows])

    def close(self) -> None:
        """Wait for a read-ahead in flight and let go of the buffers (a later batch reads its fill again)."""
        with self._use:
            ahead, self._ahead, self._held = self._ahead, None, None
            if ahead is not None:
                ahead[1].wait()
            self._slots = [None, None]

    # ---- fills -------------------------------------------------------------------------------------------------
    def _block_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's block permutation and where each of its blocks starts in the block sequence."""
        with self._order_lock:
            if self._order is not None and self._order[0] == epoch:
                return self._order[1], self._order[2]
        order = np.random.default_rng(_entropy(self.seed, 0, epoch)).permutation(len(self.blocks))
        starts = np.concatenate([[0], np.cumsum(self.blocks[order, 2])])
        with self._order_lock:
            self._order = (epoch, order, starts)
        return order, starts

    def fill_span(self, fill: int) -> tuple[int, int]:
        """Positions [lo, hi) of the block sequence that fill `fill` holds."""
        lo = int(self.fill_starts[fill]) * self.batch_size
        hi = int(self.fill_starts[fill + 1]) * self.batch_size if fill + 1 < self.n_fills else self.n_rows
        return lo, hi

    def _build(self, epoch: int, fill: int, buffer: np.ndarray) -> np.ndarray:
        """Read fill `fill` of `epoch` into the front of `buffer`; returns the permutation of its rows that the
        batches slice."""
        order, starts = self._block_order(epoch)
        lo, hi = self.fill_span(fill)
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi, side="left"))
        reads = []
        for position in range(first, last):  # the blocks overlapping [lo, hi); the two ends may be partial
            shard, row, _ = self.blocks[order[position]]
            begin, end = max(lo, int(starts[position])), min(hi, int(starts[position + 1]))
            reads.append((int(shard), int(row) + begin - int(starts[position]), end - begin, begin - lo))
        self._read(reads, buffer)
        return np.random.default_rng(_entropy(self.seed, 1, epoch, fill)).permutation(hi - lo)

    def _read(self, reads: list[tuple[int, int, int, int]], buffer: np.ndarray) -> None:
        """Each (shard, first row, rows, row in buffer) as one sequential read, in file order; the sorted list is cut
        into `read_threads` consecutive stretches read at once (a disk serves several requests in flight faster)."""
        reads = sorted(reads)
        parts = min(self.read_threads, len(reads))
        if parts <= 1:
            self._read_in_order(reads, buffer)
            return
        stretches = [reads[part * len(reads) // parts:(part + 1) * len(reads) // parts] for part in range(parts)]
        with ThreadPoolExecutor(parts, thread_name_prefix="saekit-block-read") as pool:
            for done in [pool.submit(self._read_in_order, stretch, buffer) for stretch in stretches]:
                done.result()

    def _read_in_order(self, reads: list[tuple[int, int, int, int]], buffer: np.ndarray) -> None:
        handles: dict[int, int] = {}
        try:
            for shard, row, count, target in reads:
                if shard not in handles:
                    handles[shard] = os.open(self.shards[shard].filename, os.O_RDONLY)
                offset = self.shards[shard].offset + row * self.row_bytes
                _read_rows(handles[shard], buffer[target:target + count], offset)
        finally:
            for handle in handles.values():
                os.close(handle)

    def _next(self, epoch: int, fill: int) -> tuple[int, int]:
        return (epoch, fill + 1) if fill + 1 < self.n_fills else (epoch + 1, 0)

    def _slot(self, slot: int) -> np.ndarray:
        if self._slots[slot] is None:
            self._slots[slot] = _large_array((self._capacity, self.d), self.dtype)
        return self._slots[slot]

    def _fill(self, epoch: int, fill: int) -> tuple[np.ndarray, np.ndarray]:
        """The fill's rows and their permutation: held, read ahead, or read now; then the next one is read ahead
        into the buffer this one leaves. Called with `_use` held."""
        key = (epoch, fill)
        lo, hi = self.fill_span(fill)
        if self._held is None or self._held[0] != key:
            slot = 0 if self._held is None else 1 - self._held[1]  # the buffer not being cut from
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead[0] == key:
                order = ahead[1].result()
            else:
                if ahead is not None:  # a read of another fill into this buffer: let it finish first
                    ahead[1].wait()
                order = self._build(epoch, fill, self._slot(slot))
            self._held = (key, slot, order)
            if self.readahead:
                following, spare = self._next(epoch, fill), self._slot(1 - slot)
                self._ahead = (following, _Background(lambda: self._build(*following, spare)))
        _, slot, order = self._held
        return self._slots[slot][:hi - lo], order


def _large_array(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """An uninitialized array, on transparent huge pages where the kernel offers them: its first write then faults
    once per 2 MiB instead of once per 4 KiB (measured 6x faster on a 2-core VM)."""
    size = shape[0] * shape[1] * np.dtype(dtype).itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or size < 2**22:
        return np.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: THP applies, shmem's may not
    try:
        region.madvise(advice)
    except OSError:  # THP switched off: ordinary pages
        pass
    return np.frombuffer(region, dtype=dtype).reshape(shape)


def _entropy(seed: int, *more: int) -> list[int]:
    """Seed material for numpy's generator (non-negative words; negative seeds are allowed in configs)."""
    return [value & (2**64 - 1) for value in (seed, *more)]


def _read_rows(handle: int, out: np.ndarray, offset: int) -> None:
    """Read `out.nbytes` bytes at `offset` of the open file into the contiguous array `out` (one sequential read)."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(handle, [view[done:]], offset + done)
        else:  # no preadv (older macOS): read, then copy in
            chunk = os.pread(handle, len(view) - done, offset + done)
            view[done:done + len(chunk)] = chunk
            got = len(chunk)
        if got == 0:
            raise DataError(f"a cache shard ended {len(view) - done} bytes early; run `saekit cache verify` on the cache")
        done += got


class _Background:
    """One call run in a daemon thread; `result()` waits for it and re-raises what it raised."""

    def __init__(self, fn: Callable[[], object]):
        self._value: object = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="saekit-block-read", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # handed to whoever waits for the result
            self._error = exc

    def wait(self) -> None:
        self._thread.join()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


# ---- choosing a loader -------------------------------------------------------------------------------------------
def total_memory_bytes() -> int:
    """This machine's physical memory, or its cgroup's limit when lower (a SLURM job, a container).

    Total rather than free memory, so the choice is the same on every run of a machine and resumes match.
    """
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in _cgroup_limit_files():
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _cgroup_limit_files() -> list[Path]:
    """cgroup v2 memory.max of this process's group (and the root), and the cgroup v1 limit."""
    files = [Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::/") and len(line) > 4:
                files.insert(0, Path("/sys/fs/cgroup") / line[4:] / "memory.max")
    except OSError:
        pass
    return files


def row_bytes(cache: ActivationCache) -> int:
    return cache.d * torch.empty(0, dtype=cache.dtype).element_size()


def default_buffer_tokens(cache: ActivationCache, split: str, batch_size: int, memory: int) -> int:
    """Rows of one block-shuffle buffer: 1/16 of memory (two are held), at most the split, at least 8 batches."""
    rows = int(memory * DEFAULT_BUFFER_FRACTION) // row_bytes(cache)
    return max(min(rows, cache.n_acts(split)), MIN_BUFFER_BATCHES * batch_size)


def make_batches(cache: ActivationCache, split: str, batch_size: int, seed: int,
                 loader: LoaderConfig) -> EpochBatches:
    """The loader `loader.shuffle` asks for; `auto` shuffles globally while the split takes at most half of the
    machine's total memory, and reads shuffled blocks otherwise."""
    check_choice("loader.shuffle", loader.shuffle, SHUFFLES)
    memory = total_memory_bytes()
    split_bytes = cache.n_acts(split) * row_bytes(cache)
    fits = split_bytes <= AUTO_GLOBAL_FRACTION * memory
    size = f"the {split} split is {split_bytes / 2**30:.2f} GiB, this machine has {memory / 2**30:.1f} GiB"
    shuffle = loader.shuffle
    if shuffle == "auto":
        shuffle = "global" if fits else "block"
        why = f"loader.shuffle=auto: {size}, {'within' if fits else 'over'} {AUTO_GLOBAL_FRACTION:.0%} of it"
    else:
        why = f"loader.shuffle={shuffle}: {size}"
    if shuffle == "global":
        if split_bytes > memory:
            log.warning("loader: global shuffle of a split bigger than memory reads rows at random from disk (%s); "
                        "loader.shuffle=block reads contiguous blocks instead", size)
        log.info("loader: global shuffle (%s)", why)
        return ShuffledBatches(cache, split, batch_size, seed)
    buffer_tokens = loader.buffer_tokens or default_buffer_tokens(cache, split, batch_size, memory)
    batches = BlockShuffledBatches(cache, split, batch_size, seed, buffer_tokens, loader.block_kib * 1024)
    log.info("loader: block shuffle (%s); buffer of %d rows (%.2f GiB, %d fills per epoch), blocks of %d rows",
             why, batches.buffer_rows, batches.buffer_rows * batches.row_bytes / 2**30, batches.n_fills,
             batches.block_rows)
    return batches


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
