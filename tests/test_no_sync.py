"""A steady-state training step never waits on the device (issue 11).

Between log steps, `Trainer.step` (what `fit` runs per batch) must not read a value back to the host: no
`.item()`, `bool(t)`, `float(t)`, boolean-mask indexing, `nonzero`, `bincount`, …, each of which stalls the
host until an accelerator has caught up. On CPU the reads are counted by wrapping those entry points; on CUDA
(`gpu` marker) the same steps run under `torch.cuda.set_sync_debug_mode("error")`, which raises on any sync.
Both cases run with dead latents present, so AuxK's ranking is part of what is checked.
"""

from __future__ import annotations

import dataclasses
import traceback

import pytest
import torch

from saekit import train as train_mod
from saekit.synthetic import PlantedDictionary, synthetic_train_config
from saekit.train import Trainer, TrainingData

BATCH, LOG_EVERY = 256, 10
STEADY = range(LOG_EVERY, 2 * LOG_EVERY - 1)  # steps 11..19 when counted as done: none logs or checkpoints
ACTIVATIONS = {"topk": {}, "batchtopk": {}, "multi_topk": {}, "relu": {"lam": 1.0}, "jumprelu": {"lam": 0.5},
               "prolu": {"lam": 1.0}, "gated": {"lam": 1.0}}
# Their sparse path (sae/active_set.py) sizes each batch's active set with one host read per chunk, by design
# (the number of active entries is the data's); steady steps without reads hold for their dense path.
ACTIVE_SET_VARIANTS = {"relu", "jumprelu", "prolu", "gated"}
READ_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__",
                "nonzero", "unique", "bincount", "masked_select", "repeat_interleave", "equal", "allclose")
READ_FUNCTIONS = ("nonzero", "argwhere", "unique", "bincount", "masked_select", "repeat_interleave", "equal",
                  "allclose", "is_nonzero")


class HostReads:
    """Counts calls that read a tensor's value back to the host while `counting` is set (any thread)."""

    def __init__(self, monkeypatch):
        self.counting = False
        self.seen: list[str] = []
        for name in READ_METHODS:
            self._wrap(monkeypatch, torch.Tensor, name, lambda *args, **kwargs: True)
        for name in READ_FUNCTIONS:
            self._wrap(monkeypatch, torch, name, lambda *args, **kwargs: True)
        for name in ("__getitem__", "__setitem__"):  # a boolean-mask index has a data-dependent size
            self._wrap(monkeypatch, torch.Tensor, name, lambda tensor, index, *rest: _has_bool_index(index))

    def _wrap(self, monkeypatch, owner, name, reads):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            if self.counting and reads(*args, **kwargs):
                caller = traceback.extract_stack(limit=2)[0]
                self.seen.append(f"{name} at {caller.filename.rsplit('/', 2)[-1]}:{caller.lineno}")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def _has_bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


def steady_trainer(activation: str, device: torch.device, run_dir):
    """A Trainer after one logged block of steps, a quarter of its latents then made dead; its batches on the device."""
    planted = PlantedDictionary(d=16, n_features=48, seed=0)
    x = planted.sample(8192, seed=1).to(device)
    cfg = dataclasses.replace(
        synthetic_train_config(activation, n=128, n_tokens=3 * LOG_EVERY * BATCH, batch_size=BATCH, k=4,
                               **ACTIVATIONS[activation]),
        device=device.type, log_every_steps=LOG_EVERY, ckpt_every_steps=10**6,
        fast_path=activation not in ACTIVE_SET_VARIANTS)
    cfg = dataclasses.replace(cfg, init=dataclasses.replace(cfg.init, n_sample_tokens=2048))
    data = TrainingData.from_tensor(x, cfg.batch_size, cfg.seed, key="planted")
    trainer = Trainer(cfg, data, run_dir, device)
    batches = [data.batches.batch(step) for step in range(2 * LOG_EVERY)]
    for step in range(LOG_EVERY):  # warm-up, ending on a log step (which refreshes the dead-latent bookkeeping)
        trainer.step(step, batches[step])
    with torch.no_grad():
        trainer.dead.tokens_since_fired[: cfg.n // 4] = trainer.dead.window
    trainer.dead.refresh(LOG_EVERY * BATCH)  # as a log step would, now that some latents are dead
    return trainer, batches


@pytest.fixture
def auxk_terms(monkeypatch):
    """The AuxK term of every train_step call, to check that it was exercised."""
    recorded, real_step = [], train_mod.train_step

    def recording_step(*args, **kwargs):
        terms = real_step(*args, **kwargs)
        recorded.append(terms.get("auxk"))
        return terms

    monkeypatch.setattr(train_mod, "train_step", recording_step)
    return recorded


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_steady_steps_read_nothing_back_from_the_device(activation, tmp_path, monkeypatch, auxk_terms):
    trainer, batches = steady_trainer(activation, torch.device("cpu"), tmp_path)
    reads = HostReads(monkeypatch)
    del auxk_terms[:]
    reads.counting = True
    for step in STEADY:
        assert trainer.step(step, batches[step]) is None  # not a log step
    reads.counting = False
    assert reads.seen == []
    assert float(auxk_terms[0].detach()) > 0  # AuxK ranked the dead latents in these steps

    reads.counting = True
    assert trainer.step(2 * LOG_EVERY - 1, batches[-1]) is not None  # a log step reads its numbers back
    reads.counting = False
    assert any(entry.startswith("__float__") for entry in reads.seen), reads.seen


def test_a_nonfinite_loss_between_log_steps_is_caught_on_the_next_one(tmp_path, monkeypatch):
    """Non-log steps do not check the loss; the next log step reports the first non-finite one."""
    trainer, batches = steady_trainer("topk", torch.device("cpu"), tmp_path)
    real_step, calls = train_mod.train_step, []

    def inf_once(*args, **kwargs):
        terms = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            terms["loss"] = torch.tensor(float("inf"))
        return terms

    monkeypatch.setattr(train_mod, "train_step", inf_once)
    for step in STEADY:
        trainer.step(step, batches[step])  # the bad step (done = 13) is not noticed yet
    with pytest.raises(train_mod.TrainingDiverged, match=r"loss became inf at step 20; no checkpoint"):
        trainer.step(2 * LOG_EVERY - 1, batches[-1])


@pytest.mark.gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_steady_steps_never_sync_on_cuda(activation, tmp_path, auxk_terms):
    device = torch.device("cuda")
    trainer, batches = steady_trainer(activation, device, tmp_path)
    torch.cuda.synchronize()
    del auxk_terms[:]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in STEADY:
            trainer.step(step, batches[step])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(auxk_terms[0].detach()) > 0
    assert trainer.step(2 * LOG_EVERY - 1, batches[-1]) is not None


def _heavy_batch(rows=320, d=24, heavy=150, seed=5):
    """Activations whose first `heavy` tokens are scaled up so they want many latents (BatchTopK)."""
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed)) + 0.5
    x[:heavy] *= 6.0
    return x


def test_batchtopk_counts_the_rows_it_could_not_recompute():
    """The training path recomputes a fixed number of rows (no data-dependent shape); a batch with more tokens
    wanting more than 2k latents is counted and reported on the next log step, once."""
    from saekit.sae import SAESpec, build_sae

    sae = build_sae(SAESpec.build("batchtopk", d=24, n=192, k=4, dead_method="none"))
    sae.initialize(_heavy_batch(seed=0), "geometric_median", tied=False, scale_encoder=True,
                   generator=torch.Generator().manual_seed(0))
    sae.train()
    assert sae.training_warnings() == []
    sae.loss_terms(_heavy_batch(heavy=8))  # a few heavy tokens: within the 64 rows recomputed
    assert sae.training_warnings() == []
    sae.loss_terms(_heavy_batch(heavy=150))
    warnings = sae.training_warnings()
    assert len(warnings) == 1 and "wanted more than 8 latents beyond the 64 rows" in warnings[0], warnings
    assert sae.training_warnings() == []  # reported once


def test_batch_top_entries_with_a_small_capacity_keeps_the_batch_size():
    from saekit.sae.sparse import batch_top_entries, rank_preacts

    generator = torch.Generator().manual_seed(1)
    W, b = torch.randn(192, 24, generator=generator) / 5, torch.zeros(192)
    x = _heavy_batch()
    ranked = rank_preacts(x, W, b, 8, on="relu")
    exact = batch_top_entries(x, W, b, ranked, 4 * 320)
    overflow = torch.zeros((), dtype=torch.long)
    close = batch_top_entries(x, W, b, ranked, 4 * 320, capacity=4, overflow=overflow)
    dense = torch.relu(x @ W.T).flatten().topk(4 * 320).values
    assert torch.equal(exact.values.sort().values, dense.sort().values)  # capacity None: exact
    assert int(overflow) > 100 and close.values.numel() == 4 * 320  # most heavy rows were not recomputed
    assert torch.equal(close.rows, close.rows.sort().values)
    assert float(close.values.sum()) < float(exact.values.sum())  # it missed some of the largest entries
