"""One pass over the inspected tokens: per-latent statistics, top contexts and a uniform sample of contexts.

Everything is kept on the device in tensors of n × (contexts kept) entries (plus an n × HIST_BINS histogram),
never tokens × n: each batch's latents z (windows, T, n) are reduced to one candidate per (window, latent) — the
window's strongest token — and merged into running per-latent slots.

- `top`: the `contexts` windows with the largest per-window maximum (of equal ones, the earliest windows).
- `sample`: a bottom-k reservoir over the windows where the latent fires: every (window, latent) pair gets a
  deterministic pseudo-random key (`sample_keys`) and the `reservoir` smallest keys are kept, which is a uniform
  sample without replacement whatever the order of the windows (Cohen & Kaplan 2007, bottom-k sketches). The
  quantile bins are cut from that sample at the end (`quantile_bins`).

Each kept slot carries its activations on ctx_left + 1 + ctx_right positions around the strongest token, taken from
the same batch, so the pages highlight every shown token without a second pass over the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

HIST_LOG10_LO = -3.0
"""The per-latent activation histogram covers log10(value) in [LO, HI); values outside go to the end bins."""
HIST_LOG10_HI = 3.0
HIST_BINS = 60
_PRIME = 2**31 - 1  # a Mersenne prime: multiplication modulo it is a bijection of 1..P-1
_LATENT_BLOCK = 8192  # latents merged at a time, bounding the merge's temporaries
_BATCH_ENTRIES = 2**24  # at most this many latent values (64 MB of float32) per batch


@dataclass
class Slots:
    """Kept contexts, per latent: (n, m) values, window ids, positions, keys and (n, m, C) activations.

    window = -1 marks an empty slot (value 0). `key` is only meaningful for the reservoir.
    """

    value: torch.Tensor
    window: torch.Tensor
    pos: torch.Tensor
    key: torch.Tensor
    ctx: torch.Tensor

    @classmethod
    def empty(cls, n: int, m: int, width: int, device, empty_key: int) -> "Slots":
        return cls(value=torch.zeros(n, m, device=device), window=torch.full((n, m), -1, dtype=torch.int32, device=device),
                   pos=torch.zeros(n, m, dtype=torch.int32, device=device),
                   key=torch.full((n, m), empty_key, dtype=torch.int64, device=device),
                   ctx=torch.zeros(n, m, width, device=device))

    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in (self.value, self.window, self.pos, self.key, self.ctx))

    def cpu(self) -> "Slots":
        return Slots(*(t.cpu() for t in (self.value, self.window, self.pos, self.key, self.ctx)))


@dataclass
class Collected:
    """What one pass found: per-latent statistics and kept contexts (see the module docstring)."""

    n_tokens: int
    """Token positions scored (a dropped BOS position is not one)."""
    fires: torch.Tensor  # (n,) int64: positions where the latent is > 0
    act_sum: torch.Tensor  # (n,) float64: sum of its activations
    act_max: torch.Tensor  # (n,) float32
    hist: torch.Tensor  # (n, HIST_BINS) int64: log10-binned counts of its nonzero activations
    windows_fired: torch.Tensor  # (n,) int64: windows where the latent fires at least once
    top: Slots
    sample: Slots
    windows: torch.Tensor  # (W, T) int64: the token windows the window ids index
    ctx_left: int
    ctx_right: int

    @property
    def n(self) -> int:
        return int(self.fires.shape[0])

    def density(self) -> torch.Tensor:
        """Firing rate per latent (fraction of scored positions where it is > 0)."""
        return self.fires.double() / max(1, self.n_tokens)

    def mean_act(self) -> torch.Tensor:
        """Mean activation over the positions where the latent fires (0 for a dead latent)."""
        return (self.act_sum / self.fires.clamp_min(1)).float()


def sample_keys(windows: torch.Tensor, latents: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Deterministic pseudo-random int64 keys in [0, 2^31 − 1) for (window, latent) pairs (broadcast shapes).

    A bijective mix of the pair's index (distinct pairs get distinct keys while window·n + latent < 2^31 − 1), so a
    brute-force sampler reproduces the reservoir exactly.
    """
    x = (windows.long() * n + latents.long() + 1 + seed * 7919) % _PRIME
    x = torch.where(x == 0, torch.full_like(x, 1), x)
    for multiplier in (48271, 69621, 16807):
        x = (x * multiplier) % _PRIME
        x = x ^ (x >> 13)  # xorshift: breaks the arithmetic progressions of consecutive pairs
        x = torch.where(x >= _PRIME, x - _PRIME + 1, x)
    return x


def batch_windows_for(n: int, ctx_len: int, wanted: int) -> int:
    """Windows per batch: `wanted`, lowered so a batch's (windows, T, n) latents stay under _BATCH_ENTRIES values."""
    return max(1, min(wanted, _BATCH_ENTRIES // max(1, ctx_len * n)))


class Collector:
    """Running per-latent statistics and slots, updated from one batch of latents at a time."""

    def __init__(self, n: int, contexts: int, reservoir: int, ctx_left: int, ctx_right: int, device, seed: int = 0):
        self.n, self.device, self.seed = n, torch.device(device), seed
        self.ctx_left, self.ctx_right = ctx_left, ctx_right
        width = ctx_left + 1 + ctx_right
        self.offsets = torch.arange(-ctx_left, ctx_right + 1, device=self.device)
        self.top = Slots.empty(n, contexts, width, self.device, empty_key=0)
        self.sample = Slots.empty(n, reservoir, width, self.device, empty_key=_PRIME)
        self.fires = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.act_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.act_max = torch.zeros(n, device=self.device)
        self.hist = torch.zeros(n * HIST_BINS, dtype=torch.int64, device=self.device)
        self.windows_fired = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.n_tokens = 0

    @torch.no_grad()
    def add(self, z: torch.Tensor, first_window: int, scored_from: int = 0) -> None:
        """Fold in latents z (windows, T, n) of windows first_window.. (z is modified in place: positions before
        `scored_from`, a BOS position the SAE never saw, are zeroed and not scored)."""
        z = z.float()
        if scored_from:
            z[:, :scored_from] = 0
        self.n_tokens += z.shape[0] * (z.shape[1] - scored_from)
        self._statistics(z)
        best, where = z.max(dim=1)  # (W, n): each window's strongest token per latent
        self.windows_fired += (best > 0).sum(dim=0)
        # Only latents whose candidates can enter their slots are merged: after the first batches that is few of them.
        beats_top = (best.amax(dim=0) > self.top.value[:, -1]).nonzero(as_tuple=True)[0]
        for latents in beats_top.split(_LATENT_BLOCK):
            self._merge_top(z, best[:, latents].T, where[:, latents].T, latents, first_window)
        if self.sample.value.shape[1] == 0:
            return
        window_ids = torch.arange(first_window, first_window + z.shape[0], device=self.device)
        keys = sample_keys(window_ids[:, None], torch.arange(self.n, device=self.device)[None, :], self.n, self.seed)
        keys = torch.where(best > 0, keys, torch.full_like(keys, _PRIME))  # (W, n)
        beats_sample = (keys.amin(dim=0) < self.sample.key[:, -1]).nonzero(as_tuple=True)[0]
        for latents in beats_sample.split(_LATENT_BLOCK):
            self._merge_sample(z, best[:, latents].T, where[:, latents].T, keys[:, latents].T, latents, first_window)

    def _statistics(self, z: torch.Tensor) -> None:
        """Counts, sums, maxima and log10 histogram from the nonzero entries only (sparse for most SAEs)."""
        flat = z.reshape(-1, self.n)
        rows, latents = (flat > 0).nonzero(as_tuple=True)
        values = flat[rows, latents]
        self.fires += torch.bincount(latents, minlength=self.n)
        self.act_sum.index_add_(0, latents, values.double())
        self.act_max.scatter_reduce_(0, latents, values, reduce="amax")
        self.hist += torch.bincount(latents * HIST_BINS + log10_bins(values), minlength=self.n * HIST_BINS)

    def _merge_top(self, z: torch.Tensor, best: torch.Tensor, where: torch.Tensor, latents: torch.Tensor,
                   first_window: int) -> None:
        """Merge candidates best, where (b, W) of `latents` into their top slots."""
        top_k = min(self.top.value.shape[1], best.shape[1])
        # Stable sorts, not topk: equal values (repeated text) keep the earlier window, as brute force would.
        value, local = best.sort(dim=1, descending=True, stable=True)
        value, local = value[:, :top_k], local[:, :top_k]
        self._merge(self.top, latents, z, value, local, where.gather(1, local), first_window,
                    key=torch.zeros_like(local), largest=True)

    def _merge_sample(self, z: torch.Tensor, best: torch.Tensor, where: torch.Tensor, keys: torch.Tensor,
                      latents: torch.Tensor, first_window: int) -> None:
        """Merge the candidates with the smallest keys (b, W) of `latents` into their reservoir slots."""
        sample_k = min(self.sample.value.shape[1], best.shape[1])
        key, local = keys.topk(sample_k, dim=1, largest=False)
        self._merge(self.sample, latents, z, best.gather(1, local), local, where.gather(1, local), first_window,
                    key=key, largest=False)

    def _merge(self, slots: Slots, latents: torch.Tensor, z: torch.Tensor, value: torch.Tensor, local: torch.Tensor,
               pos: torch.Tensor, first_window: int, key: torch.Tensor, largest: bool) -> None:
        """Keep the best of slots[latents] and the candidates (b, c): by value (top) or by smallest key (reservoir)."""
        fired = value > 0
        window = torch.where(fired, local + first_window, torch.full_like(local, -1)).int()
        value = torch.where(fired, value, torch.zeros_like(value))
        ctx = self._context(z, latents, local, pos)
        merged = Slots(value=torch.cat([slots.value[latents], value], 1),
                       window=torch.cat([slots.window[latents], window], 1),
                       pos=torch.cat([slots.pos[latents], pos.int()], 1), key=torch.cat([slots.key[latents], key], 1),
                       ctx=torch.cat([slots.ctx[latents], ctx], 1))
        m = slots.value.shape[1]
        if largest:  # an empty slot or a candidate that did not fire never wins; slots hold earlier windows than the
            # candidates, so a stable sort keeps the earlier of equal values
            score = torch.where(merged.window >= 0, merged.value, torch.full_like(merged.value, -1.0))
            order = score.sort(dim=1, descending=True, stable=True).indices[:, :m]
        else:  # keys are distinct
            order = merged.key.topk(m, dim=1, largest=False).indices
        slots.value[latents] = merged.value.gather(1, order)
        slots.window[latents] = merged.window.gather(1, order)
        slots.pos[latents] = merged.pos.gather(1, order)
        slots.key[latents] = merged.key.gather(1, order)
        slots.ctx[latents] = merged.ctx.gather(1, order[..., None].expand(-1, -1, merged.ctx.shape[2]))

    def _context(self, z: torch.Tensor, latents: torch.Tensor, local: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(b, c, C) activations of each latent at ctx_left..ctx_right positions around its candidate's token
        (0 outside the window)."""
        n_windows, length, n = z.shape
        positions = pos[..., None].long() + self.offsets  # (b, c, C)
        inside = (positions >= 0) & (positions < length)
        flat = (local[..., None] * length + positions.clamp(0, length - 1)) * n + latents[:, None, None]
        return torch.where(inside, z.reshape(-1)[flat], torch.zeros((), device=z.device))

    def result(self, windows: torch.Tensor) -> Collected:
        return Collected(n_tokens=self.n_tokens, fires=self.fires.cpu(), act_sum=self.act_sum.cpu(),
                         act_max=self.act_max.cpu(), hist=self.hist.view(self.n, HIST_BINS).cpu(),
                         windows_fired=self.windows_fired.cpu(), top=self.top.cpu(),
                         sample=self.sample.cpu(), windows=windows, ctx_left=self.ctx_left, ctx_right=self.ctx_right)


def log10_bins(values: torch.Tensor) -> torch.Tensor:
    """Histogram bin of positive activations: HIST_BINS equal bins of log10(value) over [LO, HI), clamped."""
    width = (HIST_LOG10_HI - HIST_LOG10_LO) / HIST_BINS
    bins = torch.floor((torch.log10(values) - HIST_LOG10_LO) / width)
    return bins.clamp(0, HIST_BINS - 1).long()


def hist_edges() -> list[float]:
    """The HIST_BINS + 1 bin edges of `log10_bins`, in log10 units."""
    width = (HIST_LOG10_HI - HIST_LOG10_LO) / HIST_BINS
    return [HIST_LOG10_LO + i * width for i in range(HIST_BINS + 1)]


def collect(windows: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor], n: int, contexts: int,
            reservoir: int, ctx_left: int, ctx_right: int, device, batch_windows: int = 64, scored_from: int = 0,
            seed: int = 0, progress: Optional[Callable[[int], None]] = None) -> Collected:
    """One pass: `encode(tokens (w, T) on device) -> z (w, T, n)` for each batch of `windows` (W, T), folded into a
    Collector. Memory: the collector's slots plus one batch of latents, whatever W."""
    collector = Collector(n, contexts, reservoir, ctx_left, ctx_right, device, seed)
    step = batch_windows_for(n, windows.shape[1], batch_windows)
    for start, batch in _batches(windows, step):
        collector.add(encode(batch.to(collector.device)), start, scored_from)
        if progress:
            progress(batch.numel())
    return collector.result(windows)


def _batches(windows: torch.Tensor, step: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, windows.shape[0], step):
        yield start, windows[start:start + step]


def quantile_bins(values: torch.Tensor, windows: torch.Tensor, n_bins: int) -> list[list[int]]:
    """Slot indices of one latent's reservoir split into n_bins equal-count bins of increasing activation (the
    sample's quantiles); empty slots (window −1) are left out and an empty bin is dropped."""
    kept = (windows >= 0).nonzero(as_tuple=True)[0]
    if kept.numel() == 0 or n_bins == 0:
        return []
    ordered = kept[values[kept].argsort(stable=True)].tolist()
    cuts = [round(i * len(ordered) / n_bins) for i in range(n_bins + 1)]
    return [ordered[lo:hi] for lo, hi in zip(cuts, cuts[1:]) if hi > lo]
