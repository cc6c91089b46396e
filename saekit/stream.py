"""Activations made while the SAE trains (`cache.mode=stream`): the model runs over the training windows in
*fills*, each fill's rows are shuffled in a RAM buffer, and batches are consecutive slices of that buffer.

Order. Each epoch permutes the training windows by (seed, epoch). The permuted windows are cut into fills of
about `buffer_tokens` rows (all fills of an epoch within one window of each other in size); fill c's rows are
shuffled by (seed, epoch, c). A fill's last `rows % batch_size` rows (fewer than one batch) are dropped, so an
epoch serves every row at most once and each epoch drops other rows. Batch `step` is thus a pure function
of `step`: a resumed run recomputes the fill that holds its step and continues at the same token position.

What is guaranteed: the windows, the rows and their order in every batch, on any device. Bit-identical
values too on CPU (the model in float32 gives the same activations for the same batch of windows). On a GPU
the values are as reproducible as the model's kernels (cuBLAS across streams, atomics in some attention
kernels may change the last bits), so a resumed GPU run may differ from an uninterrupted one in rounding.

One forward pass serves every hook (`batches(hook)` per SAE); at most two fills are kept, and the next fill
is computed in a background thread while the current one is consumed (`ahead=True`), the model's forward
pass overlapping the SAE's steps. A forward pass with hooks changes the model's state (its hook points), so
the stream's passes run one at a time under `model.lock` (when the model has one): anything else running the
same model while a background fill may run must hold that lock too. Pass `n_steps` so that no fill past the
run is made, and `close()` the stream when done.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from saekit.errors import ConfigError
from saekit.loader import EpochBatches

log = logging.getLogger(__name__)

MAX_FILLS = 2
"""Fills kept in memory: the one being consumed and the next."""
MEAN_NORM_ROWS = 16384
"""Rows `mean_norm` is estimated from: init.n_sample_tokens' default, so that with the default the estimate and
the initialization read one sample (drawn by the stream's seed, which is the run's) and the model makes it once."""
DEFAULT_FILL_BYTES = 1 << 30
"""Default buffer: the rows of all hooks of one fill in at most 1 GiB (float32), …"""
DEFAULT_MAX_TOKENS = 1 << 20
"""… and at most 2^20 tokens."""


def _seed(*parts: int) -> int:
    """A 63-bit generator seed from integers (no overflow, no collisions between (a, b) and (b, a))."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _available_bytes() -> Optional[int]:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # no psutil, or a platform it cannot read: size by the fixed caps only
        return None


def stream_buffer_tokens(setting: Optional[int], d_model: int, batch_size: int, n_hooks: int) -> int:
    """Rows per fill: `loader.buffer_tokens` when set, else the largest power of two within 2^20 tokens, 1 GiB
    for the fill (all hooks, float32) and 1/8 of the available memory, and at least one batch.

    A power of two, so the default (part of the batch order, hence of the resume check) stays the same from run
    to run unless memory is short.
    """
    if setting is not None:
        return int(setting)
    row_bytes = 4 * d_model * max(n_hooks, 1)
    budget = DEFAULT_FILL_BYTES
    available = _available_bytes()
    if available is not None:
        budget = min(budget, available // 8)  # two fills, their shuffled copies and the batches in flight
    tokens = min(DEFAULT_MAX_TOKENS, max(budget // row_bytes, 1))
    return max(1 << (int(tokens).bit_length() - 1), batch_size)


class _Fill:
    """One fill's shuffled rows per hook, or the error that computing it raised; `ready` once either is set."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.rows: Optional[dict[str, torch.Tensor]] = None
        self.error: Optional[BaseException] = None


class ActivationStream:
    """Training activations of `hooks` made by `model` over `windows` (int64 (N, ctx_len)) as they are needed.

    `buffer_tokens`: rows per fill (the shuffle buffer); `batch_windows`: windows per forward pass; `ahead`:
    make the next fill in a background thread; `n_steps`: the run's length, so nothing past it is made ahead.
    The model is only read. Use `batches(hook)` as the `EpochBatches` of each hook's SAE, and `close()` (or a
    `with` block) to stop the background thread.
    """

    def __init__(self, model, windows: torch.Tensor, hooks: list[str], exclude_bos: bool, buffer_tokens: int,
                 batch_size: int, seed: int, batch_windows: int = 64, ahead: bool = True,
                 n_steps: Optional[int] = None):
        if not hooks:
            raise ConfigError("hook: streaming needs at least one hook; set layer= or hook=")
        if buffer_tokens < batch_size:
            raise ConfigError(f"loader.buffer_tokens={buffer_tokens} is below batch_size={batch_size}; raise "
                              f"loader.buffer_tokens (the shuffle buffer must hold a batch)")
        self.model, self.windows, self.hooks = model, windows.long(), list(hooks)
        self.exclude_bos, self.buffer_tokens, self.batch_size = exclude_bos, int(buffer_tokens), int(batch_size)
        self.seed, self.batch_windows, self.ahead, self.n_steps = seed, batch_windows, ahead, n_steps
        self.n_windows = int(windows.shape[0])
        self.rows_per_window = int(windows.shape[1]) - (1 if exclude_bos else 0)
        self.total_rows = self.n_windows * self.rows_per_window
        if self.total_rows < batch_size:
            raise ConfigError(f"batch_size={batch_size} exceeds the {self.total_rows} training vectors; lower "
                              f"batch_size or add data")
        self.bounds, self.fill_offsets = self._layout()
        self.n_fills = len(self.bounds) - 1
        self.batches_per_epoch = int(self.fill_offsets[-1])
        self.forward_passes = 0
        """Model forward passes run so far (fills and samples)."""
        self._lock = threading.Lock()
        # Forward passes with hooks set hooks on the shared model, so two at once mix their activations: the
        # model's own lock when it has one (shared with evaluation's passes), else one for this stream's threads.
        self._model_lock = getattr(model, "lock", None) or threading.Lock()
        self._fills: OrderedDict[tuple[int, int], _Fill] = OrderedDict()
        self._perm_epoch, self._perm = -1, None
        self._sample_lock = threading.Lock()
        self._sample_memo: Optional[tuple[tuple[int, int], dict[str, torch.Tensor]]] = None
        self._hook_stats: Optional[dict[str, tuple[float, int]]] = None
        self._stop = threading.Event()
        self._worker: Optional[threading.Thread] = None

    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """Fill c holds the epoch's permuted windows bounds[c]..bounds[c+1]-1 (even fills of about buffer_tokens
        rows) and serves its batches fill_offsets[c]..fill_offsets[c+1]-1 of the epoch."""
        per_fill = min(self.n_windows, max(1, math.ceil(self.buffer_tokens / max(self.rows_per_window, 1))))
        n_fills = math.ceil(self.n_windows / per_fill)
        bounds = np.array([c * self.n_windows // n_fills for c in range(n_fills + 1)], dtype=np.int64)
        fill_batches = np.diff(bounds) * self.rows_per_window // self.batch_size
        if int(fill_batches.min()) == 0:
            raise ConfigError(f"loader.buffer_tokens={self.buffer_tokens}: a fill of {int(np.diff(bounds).min())} "
                              f"windows holds less than batch_size={self.batch_size} rows; raise "
                              f"loader.buffer_tokens to at least {2 * self.batch_size}")
        return bounds, np.concatenate([[0], np.cumsum(fill_batches)])

    # ---- the public side ---------------------------------------------------------------------------------------
    def batches(self, hook: str) -> "StreamBatches":
        if hook not in self.hooks:
            raise ConfigError(f"hook={hook} is not one of the streamed hooks ({', '.join(self.hooks)})")
        return StreamBatches(self, hook)

    def batch(self, hook: str, step: int) -> torch.Tensor:
        """The float32 batch of training step `step` for `hook` (computes its fill when it is not in memory)."""
        epoch, index = divmod(step, self.batches_per_epoch)
        fill = int(np.searchsorted(self.fill_offsets, index, side="right")) - 1
        start = (index - int(self.fill_offsets[fill])) * self.batch_size
        rows = self._fill_rows(epoch, fill)[hook]
        # A copy, so an evicted fill is freed at once and no caller can write into the buffer.
        return rows[start:start + self.batch_size].to(torch.float32, copy=True)

    def sample(self, hook: str, n_rows: int, seed: int) -> torch.Tensor:
        """`n_rows` activations (float32) of windows drawn by `seed`, the same for every hook and every call."""
        return self._sampled(n_rows, seed)[hook].to(torch.float32, copy=True)

    def mean_norm(self, hook: str) -> float:
        """Mean ||x|| estimated on `sample(MEAN_NORM_ROWS, seed)` (whole windows), the same every run.

        An estimate: a disk cache stores the exact mean over all its rows. It only sets the input scale of
        data.normalize=scale, which the checkpoint saves.
        """
        return self._stats()[hook][0]

    def width(self, hook: str) -> int:
        """Width of the activations at `hook`."""
        return self._stats()[hook][1]

    def _stats(self) -> dict[str, tuple[float, int]]:
        """{hook: (mean norm, width)} of the seeded sample, computed once."""
        if self._hook_stats is None:
            sample = self._sampled(MEAN_NORM_ROWS, self.seed)
            self._hook_stats = {hook: (float(rows.float().norm(dim=1).double().mean()), int(rows.shape[1]))
                                for hook, rows in sample.items()}
        return self._hook_stats

    def fill_windows(self, epoch: int, fill: int) -> torch.Tensor:
        """Indices of the training windows that fill `fill` of `epoch` runs the model over."""
        return self._window_order(epoch)[int(self.bounds[fill]):int(self.bounds[fill + 1])]

    def close(self) -> None:
        """Stop the background fill (it stops after its current forward pass) and wait for it."""
        self._stop.set()
        worker = self._worker
        if worker is not None:
            worker.join()

    def __enter__(self) -> "ActivationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- fills -------------------------------------------------------------------------------------------------
    def _window_order(self, epoch: int) -> torch.Tensor:
        with self._lock:
            if epoch != self._perm_epoch:
                generator = torch.Generator().manual_seed(_seed(self.seed, epoch))
                self._perm, self._perm_epoch = torch.randperm(self.n_windows, generator=generator), epoch
            return self._perm

    def _fill_rows(self, epoch: int, fill: int) -> dict[str, torch.Tensor]:
        while True:
            entry, owner = self._claim((epoch, fill))
            if owner:
                self._compute(entry, epoch, fill, background=False)
            else:
                entry.ready.wait()
            if entry.error is not None:
                raise entry.error
            if entry.rows is not None:
                break
            # else a background fill failed or was stopped (and left the table): make it here
        self._start_next(epoch, fill)
        return entry.rows

    def _claim(self, key: tuple[int, int]) -> tuple[_Fill, bool]:
        """The fill entry for `key`, and whether the caller must compute it (a new entry, kept most recent)."""
        with self._lock:
            entry = self._fills.get(key)
            if entry is not None:
                self._fills.move_to_end(key)
                return entry, False
            entry = self._fills[key] = _Fill()
            while len(self._fills) > MAX_FILLS:
                self._fills.popitem(last=False)  # the least recently used; whoever still reads it holds it
            return entry, True

    def _compute(self, entry: _Fill, epoch: int, fill: int, background: bool) -> None:
        """Run the model for one fill into `entry`; a failed fill leaves the table (the next ask makes it again)
        and, in the foreground, keeps its error for every thread waiting on it."""
        try:
            rows = self._run(self.fill_windows(epoch, fill), stoppable=background)
            entry.rows = self._shuffled(rows, _seed(self.seed, epoch, fill))
        except BaseException as exc:
            with self._lock:
                if self._fills.get((epoch, fill)) is entry:
                    del self._fills[(epoch, fill)]
            if not background:
                entry.error = exc
            elif not isinstance(exc, _Stopped):
                log.debug("background fill (%d, %d) failed; it is made again when asked for", epoch, fill,
                          exc_info=exc)
        finally:
            entry.ready.set()

    def _next_key(self, epoch: int, fill: int) -> tuple[int, int]:
        return (epoch, fill + 1) if fill + 1 < self.n_fills else (epoch + 1, 0)

    def _start_next(self, epoch: int, fill: int) -> None:
        """Compute the fill after (epoch, fill) in a background thread, unless it is there, under way or past the
        run's last step."""
        if not self.ahead or self._stop.is_set():
            return
        key = self._next_key(epoch, fill)
        if self.n_steps is not None and key[0] * self.batches_per_epoch + int(self.fill_offsets[key[1]]) >= self.n_steps:
            return
        with self._lock:
            if key in self._fills or (self._worker is not None and self._worker.is_alive()):
                return
        entry, owner = self._claim(key)
        if owner:
            self._worker = threading.Thread(target=self._compute, args=(entry, *key, True), name="saekit-stream",
                                            daemon=True)
            self._worker.start()

    # ---- the model ---------------------------------------------------------------------------------------------
    def _run(self, window_ids: torch.Tensor, stoppable: bool = False) -> dict[str, torch.Tensor]:
        """Rows of every hook for the windows `window_ids`, in window order (BOS position dropped if asked)."""
        parts: dict[str, list[torch.Tensor]] = {hook: [] for hook in self.hooks}
        for start in range(0, window_ids.shape[0], self.batch_windows):
            if stoppable and self._stop.is_set():
                raise _Stopped()
            tokens = self.windows[window_ids[start:start + self.batch_windows]].to(self.model.device)
            with self._model_lock:
                acts = self.model.run_to_hooks(tokens, self.hooks)
                self.forward_passes += 1
            for hook in self.hooks:
                part = acts[hook][:, 1:] if self.exclude_bos else acts[hook]
                parts[hook].append(part.reshape(-1, part.shape[-1]).cpu())
        return {hook: torch.cat(chunks) for hook, chunks in parts.items()}

    @staticmethod
    def _shuffled(rows: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """The same row permutation for every hook (row j of each hook is the same token position)."""
        n_rows = next(iter(rows.values())).shape[0]
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
        return {hook: values[order] for hook, values in rows.items()}

    def _sampled(self, n_rows: int, seed: int) -> dict[str, torch.Tensor]:
        """Rows of whole windows drawn by `seed` (all hooks), shuffled and cut to `n_rows`; the last one is kept,
        so every hook's SAE initializing from the same sample runs the model once."""
        with self._sample_lock:
            if self._sample_memo is not None and self._sample_memo[0] == (n_rows, seed):
                return self._sample_memo[1]
            n_take = min(self.n_windows, max(1, math.ceil(n_rows / max(self.rows_per_window, 1))))
            generator = torch.Generator().manual_seed(_seed(seed, 1))
            chosen, _ = torch.sort(torch.randperm(self.n_windows, generator=generator)[:n_take])
            rows = self._shuffled(self._run(chosen), _seed(seed, 2))
            sample = {hook: values[:n_rows] for hook, values in rows.items()}
            self._sample_memo = ((n_rows, seed), sample)
            return sample


class _Stopped(Exception):
    """The stream was closed while a background fill ran."""


class StreamBatches(EpochBatches):
    """One hook's batches from an `ActivationStream` (fills shared with the stream's other hooks).

    `n_rows` counts the rows an epoch serves (`batches_per_epoch * batch_size`; the stream drops each fill's
    remainder); `stream.total_rows` counts them all.
    """

    def __init__(self, stream: ActivationStream, hook: str):
        super().__init__(stream.batches_per_epoch * stream.batch_size, stream.batch_size, stream.seed)
        self.stream, self.hook = stream, hook
        self.order_key = f"stream:{stream.buffer_tokens}"

    def batch(self, step: int) -> torch.Tensor:
        return self.stream.batch(self.hook, step)

    def sample(self, n_rows: int, seed: int) -> torch.Tensor:
        return self.stream.sample(self.hook, n_rows, seed)


def stream_training_data(stream: ActivationStream, hook: str, key: str):
    """`TrainingData` of one hook of `stream`; `key` names the activations (model, hook, data) and is joined with
    the stream's order, so a resumed run must stream the same way."""
    from saekit.train import TrainingData  # train imports the loaders; only this helper needs train

    batches = stream.batches(hook)
    return TrainingData(batches=batches, d=stream.width(hook), key=f"{key}/{batches.order_key}",
                        mean_norm=stream.mean_norm(hook))
