"""cache.mode=stream: activations made while training equal the disk cache's, batches are addressable by step,
one forward pass feeds every hook, and an interrupted streamed run resumes to bit-identical weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import MODEL_DIR
from saekit import train as train_mod
from saekit.cache import open_cache, write_cache
from saekit.checkpoint import STATE_FILE, read_metadata
from saekit.cli import _register, preflight
from saekit.config import CacheConfig, DataConfig, ModelConfig, SiteConfig
from saekit.data import TokenWindows, load_windows
from saekit.errors import ConfigError
from saekit.model import load_model
from saekit.stream import ActivationStream, stream_buffer_tokens, stream_training_data

HOOK = "blocks.2.hook_resid_post"
N_WINDOWS = 128  # of 32 tokens: 31 rows each without BOS, 3968 rows
ROWS_PER_WINDOW = 31
BATCH = 8 * ROWS_PER_WINDOW  # 248: a fill of 32 windows is exactly 4 batches, so nothing is dropped
BUFFER = 32 * ROWS_PER_WINDOW  # 4 fills of 32 windows per epoch, 16 batches


@pytest.fixture(scope="module")
def model():
    return load_model(ModelConfig(name=str(MODEL_DIR)), torch.device("cpu"))


@pytest.fixture(scope="module")
def data_cfg(small_text):
    return DataConfig(paths=[str(small_text)], ctx_len=32, n_eval_tokens=1024)


@pytest.fixture(scope="module")
def windows(model, data_cfg):
    loaded = load_windows(data_cfg, model.tokenizer, model.bos_token_id, 10**6)
    assert loaded.train.shape[0] >= N_WINDOWS
    return TokenWindows(train=loaded.train[:N_WINDOWS], eval=loaded.eval)


@pytest.fixture(scope="module")
def disk_cache(model, data_cfg, windows, tmp_path_factory):
    """The disk cache of the same windows and hook (windows in order, 64 per forward pass)."""
    site = SiteConfig(model=ModelConfig(name=str(MODEL_DIR)), data=data_cfg,
                      cache=CacheConfig(dir=str(tmp_path_factory.mktemp("stream_cache"))), layer=2, device="cpu")
    final = tmp_path_factory.mktemp("stream_cache_final") / "cache"
    write_cache(site, model, windows, final, 10**6, console_print=lambda _: None)
    return open_cache(final)


@pytest.fixture(scope="module")
def cached_rows(disk_cache):
    return torch.cat(list(disk_cache.iter_split("train", 4096)))


def stream(model, windows, hooks=(HOOK,), buffer=BUFFER, batch=BATCH, seed=5, **kwargs) -> ActivationStream:
    return ActivationStream(model, windows.train, list(hooks), True, buffer, batch, seed, **kwargs)


@pytest.fixture(scope="module")
def two_epochs(model, windows):
    """The 32 batches of the first two epochs of HOOK (seed 5), made in order in the calling thread."""
    batches = stream(model, windows, ahead=False).batches(HOOK)
    assert (batches.batches_per_epoch, batches.n_rows) == (16, N_WINDOWS * ROWS_PER_WINDOW)
    return [batches.batch(step) for step in range(32)]


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows in lexicographic order (a canonical form of the multiset of rows)."""
    keys = x.numpy().T[::-1]  # np.lexsort sorts by its last key first
    return x[torch.from_numpy(np.lexsort(keys))]


def test_each_epoch_streams_exactly_the_disk_caches_rows(two_epochs, cached_rows):
    assert cached_rows.shape == (N_WINDOWS * ROWS_PER_WINDOW, 64)
    first, second = torch.cat(two_epochs[:16]), torch.cat(two_epochs[16:])
    # float32 on CPU: the same window gives the same activations whichever windows share its forward pass.
    assert torch.equal(sorted_rows(first), sorted_rows(cached_rows))
    assert torch.equal(sorted_rows(second), sorted_rows(cached_rows))
    assert not torch.equal(first, second)  # a new order each epoch
    assert not torch.equal(first[:BATCH], cached_rows[:BATCH])  # shuffled, not the cache's window order


def test_a_fills_remainder_is_dropped_and_no_row_comes_twice_in_an_epoch(model, windows, cached_rows):
    """Batches of 256 rows: each fill of 32 windows (992 rows) serves 3 batches and drops 224 rows."""
    batches = stream(model, windows, batch=256, ahead=False).batches(HOOK)
    assert batches.batches_per_epoch == 4 * 3
    rows = torch.cat([batches.batch(step) for step in range(12)])
    assert rows.shape[0] == 12 * 256
    # Positions with the same prefix (BOS, "Once") repeat values, so compare counts of each value.
    served, held = Counter(map(tuple, rows.tolist())), Counter(map(tuple, cached_rows.tolist()))
    assert all(count <= held[row] for row, count in served.items())


def test_batches_are_addressable_by_step_in_any_order(model, windows, two_epochs):
    # A new stream, as in a new process, asked out of order while it makes the next fill in the background
    # (its passes and the caller's must not mix: they share the model's hook points).
    fresh = stream(model, windows, ahead=True).batches(HOOK)
    for step in [21, 2, 14, 15, 0, 9, 30]:
        assert torch.equal(fresh.batch(step), two_epochs[step]), step
    assert fresh.epoch_of(15) == 0 and fresh.epoch_of(16) == 1
    other_seed = stream(model, windows, seed=6, ahead=False).batches(HOOK)
    assert not torch.equal(other_seed.batch(0), two_epochs[0])


def test_one_forward_pass_per_window_batch_feeds_every_hook(model, windows, two_epochs, monkeypatch):
    hooks = ["blocks.0.hook_resid_post", HOOK]
    single = stream(model, windows, hooks=[hooks[0]], ahead=False).batches(hooks[0])
    expected = {hooks[0]: [single.batch(step) for step in range(16)], HOOK: two_epochs[:16]}
    calls = []
    real = model.run_to_hooks

    def counting(tokens, asked):
        calls.append((tokens.shape[0], tuple(asked)))
        return real(tokens, asked)

    monkeypatch.setattr(model, "run_to_hooks", counting)
    shared = stream(model, windows, hooks=hooks, ahead=False, batch_windows=16)
    per_hook = {hook: shared.batches(hook) for hook in hooks}
    for step in range(16):  # lockstep: step s of every hook in turn
        for hook in hooks:
            assert torch.equal(per_hook[hook].batch(step), expected[hook][step]), (hook, step)
    # 4 fills of 32 windows, 16 windows a pass, every pass reading both hooks.
    assert calls == [(16, tuple(hooks))] * 8


def test_the_background_fill_stops_at_the_runs_last_step(model, windows, monkeypatch):
    calls = []
    real = model.run_to_hooks
    monkeypatch.setattr(model, "run_to_hooks", lambda tokens, asked: calls.append(1) or real(tokens, asked))
    with stream(model, windows, ahead=True, n_steps=10) as streamed:  # fills 0, 1 and 2 of epoch 0
        batches = streamed.batches(HOOK)
        for step in range(10):
            batches.batch(step)
    assert len(calls) == 3  # one pass of 32 windows per fill; fill 3 (steps 12..15) was never made


def test_sample_and_mean_norm_are_deterministic_rows_of_the_training_windows(model, windows, disk_cache,
                                                                             cached_rows):
    first, again = stream(model, windows, ahead=False), stream(model, windows, ahead=False)
    sample = first.batches(HOOK).sample(500, seed=11)
    assert sample.shape == (500, 64) and sample.dtype == torch.float32
    assert torch.equal(sample, again.batches(HOOK).sample(500, seed=11))
    assert not torch.equal(sample, first.batches(HOOK).sample(500, seed=12))
    known = {tuple(row) for row in cached_rows.tolist()}
    assert all(tuple(row) in known for row in sample.tolist())
    # The mean-norm sample (16384 rows) covers all 3968 rows here, so the estimate is the exact mean.
    exact = disk_cache.manifest["splits"]["train"]["mean_norm"]
    assert first.mean_norm(HOOK) == pytest.approx(exact, rel=1e-6)
    assert first.width(HOOK) == 64


def test_bad_buffer_sizes_are_one_line_errors(model, windows):
    with pytest.raises(ConfigError, match=r"loader.buffer_tokens=100 is below batch_size=248"):
        stream(model, windows, buffer=100)
    with pytest.raises(ConfigError, match=r"batch_size=9000 exceeds the 3968 training vectors"):
        stream(model, windows, buffer=9000, batch=9000)
    assert stream_buffer_tokens(5000, 64, 4096, 1) == 5000
    default = stream_buffer_tokens(None, 64, 4096, 1)
    assert default & (default - 1) == 0 and 4096 <= default <= 2**20


def test_an_interrupted_streamed_run_resumes_to_the_same_weights(tmp_path, small_text, model, windows, monkeypatch):
    """Stopped after step 18 (mid-fill, second epoch), then resumed from its checkpoint with a fresh stream, as a
    new process would."""
    _register()
    cfg = preflight("train", ["data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32", "n=128", "k=8",
                              f"batch_size={BATCH}", f"n_tokens={24 * BATCH}", "ckpt_every_steps=6", "seed=3",
                              "init.n_sample_tokens=2048",
                              f"cache.dir={tmp_path / 'cache'}", "device=cpu"])
    assert cfg.n_steps == 24

    def run(run_dir, stop_after=None):
        with stream(model, windows, seed=cfg.seed, n_steps=cfg.n_steps) as streamed:
            data = stream_training_data(streamed, HOOK, key="stories-blocks2")
            return train_mod.fit(cfg, data, run_dir, torch.device("cpu"), train_mod.Console(quiet=True))

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(straight)
    real_step, calls = train_mod.train_step, []

    def stop_at_19(*args, **kwargs):
        calls.append(1)
        if len(calls) == 19:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(train_mod, "train_step", stop_at_19)
        run(stopped)
    assert read_metadata(stopped / STATE_FILE)["step"] == 18
    result = run(stopped)
    assert result.resumed_from == 18
    a, b = load_file(str(straight / "sae.safetensors")), load_file(str(stopped / "sae.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
