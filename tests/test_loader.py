"""Block-shuffle loader (caches bigger than RAM): every row once per epoch, batches addressable by step, contiguous
block reads, seeded samples, the auto/global/block choice, one-line errors, and an exact resume through `fit`."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from saekit import loader as loader_mod
from saekit import train as train_mod
from saekit.cache import open_cache
from saekit.config import LoaderConfig
from saekit.errors import ConfigError
from saekit.loader import BlockShuffledBatches, ShuffledBatches, TensorBatches, make_batches
from saekit.synthetic import PlantedDictionary, synthetic_train_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_ROWS = (2000, 1700, 1300)  # 5000 rows; unequal shards, so blocks end at shard ends


def index_rows(first: int, count: int) -> torch.Tensor:
    """Rows that spell their global index: [index // 256, index % 256, index % 97, 100 + index % 13], integers
    below 256, exact in float32, float16 and bfloat16 alike."""
    index = torch.arange(first, first + count)
    return torch.stack([index // 256, index % 256, index % 97, 100 + index % 13], dim=1).float()


def decode(batch: torch.Tensor) -> np.ndarray:
    """Global indices of a batch's rows, after checking that every column belongs to the same row."""
    index = (batch[:, 0] * 256 + batch[:, 1]).long()
    assert torch.equal(batch, index_rows(0, int(index.max()) + 1)[index]), "a row was torn or mixed"
    return index.numpy()


def write_cache(root: Path, shard_rows=SHARD_ROWS, dtype="float32", rows=index_rows) -> Path:
    """A cache folder (manifest with sizes and hashes, as saekit writes one) whose train shards hold `rows`."""
    root.mkdir(parents=True)
    files, shards, first = [], [], 0
    for number, count in enumerate(shard_rows):
        name = f"train_{number:05d}.safetensors"
        save_file({"acts": rows(first, count).to(DTYPES[dtype])}, str(root / name))
        files.append({"file": name, "bytes": (root / name).stat().st_size, "sha256": "-"})
        shards.append({"file": name, "n_acts": count})
        first += count
    d = int(rows(0, 1).shape[1])
    manifest = {"key": root.name, "d": d, "dtype": dtype, "files": files,
                "splits": {"train": {"n_acts": first, "shards": shards, "mean_norm": 1.0}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def cache(tmp_path):
    return open_cache(write_cache(tmp_path / "index"))


def block_loader(cache, batch_size=96, buffer_tokens=1000, block_bytes=1024, **kwargs):
    """d = 4 float32 rows are 16 bytes: 1 KiB blocks hold 64 rows; 96-row batches: 52 per epoch, 8 rows left over."""
    return BlockShuffledBatches(cache, "train", batch_size, seed=3, buffer_tokens=buffer_tokens,
                                block_bytes=block_bytes, **kwargs)


def epoch_rows(batches, epoch: int) -> list[np.ndarray]:
    per = batches.batches_per_epoch
    return [decode(batches.batch(step)) for step in range(epoch * per, (epoch + 1) * per)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_row_is_served_once_per_epoch_and_a_few_differ_as_the_dropped_rest(tmp_path, dtype):
    batches = block_loader(open_cache(write_cache(tmp_path / dtype, dtype=dtype)))
    assert (batches.batches_per_epoch, batches.buffer_rows, batches.n_fills) == (52, 960, 6)
    dropped, orders, first_fills = [], [], []
    for epoch in range(3):
        batch_rows = epoch_rows(batches, epoch)
        first_fills.append(set(np.concatenate(batch_rows[:batches.fill_starts[1]]).tolist()))
        served = np.concatenate(batch_rows)
        assert served.size == 52 * 96 and np.unique(served).size == served.size  # nothing twice
        rest = np.setdiff1d(np.arange(5000), served)
        assert rest.size == 5000 - 52 * 96  # the 8 rows an epoch cannot fill a batch with
        dropped.append(set(rest.tolist()))
        orders.append(served)
    assert dropped[0] != dropped[1] != dropped[2]
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert first_fills[0] != first_fills[1] != first_fills[2]  # each epoch reads the blocks in another order
    # Rows are shuffled inside the buffer: one batch draws from many blocks of 64 rows, not one or two.
    assert np.unique(orders[0][:96] // 64).size >= 8


def test_buffers_of_megabytes_live_on_their_own_pages_and_serve_the_same_rows(tmp_path):
    """Buffers of 4 MiB and more are anonymous memory maps (huge pages where offered); the rows are the same."""
    wide = lambda first, count: index_rows(first, count).repeat(1, 64)  # 256 float32 columns: 1 KiB a row
    batches = BlockShuffledBatches(open_cache(write_cache(tmp_path / "wide", rows=wide)), "train", 500, seed=0,
                                   buffer_tokens=5000, block_bytes=2**16)
    served = np.concatenate([decode(batches.batch(step)[:, :4]) for step in range(batches.batches_per_epoch)])
    assert np.array_equal(np.sort(served), np.arange(5000))
    owner = batches._slots[0]
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(getattr(owner, "obj", owner), mmap.mmap) and batches._slots[0].nbytes == 5000 * 1024
    assert torch.equal(batches.batch(3)[:, 4:], batches.batch(3)[:, :4].repeat(1, 63))


def test_batches_are_addressable_by_step_in_any_order_and_from_a_fresh_loader(cache):
    steps = list(range(130))  # 2.5 epochs
    in_order = block_loader(cache)
    expected = [in_order.batch(step) for step in steps]
    rng = np.random.default_rng(0)
    for loader in (block_loader(cache), block_loader(cache, readahead=False, read_threads=1)):
        for step in rng.permutation(steps):
            assert torch.equal(loader.batch(int(step)), expected[step]), step
    in_order.close()  # lets go of its buffers; a later batch reads its fill again
    assert torch.equal(in_order.batch(60), expected[60])
    resumed = block_loader(cache)  # a resumed run starts in the middle of a fill of the second epoch
    assert [torch.equal(resumed.batch(step), expected[step]) for step in range(77, 130)] == [True] * 53
    assert not torch.equal(block_loader(cache).batch(0), BlockShuffledBatches(
        cache, "train", 96, seed=4, buffer_tokens=1000, block_bytes=1024).batch(0))  # the seed matters


def test_fills_are_read_as_whole_blocks_once_per_epoch_in_file_order(cache, monkeypatch):
    reads = []
    real = loader_mod._read_rows

    def recording(handle, out, offset):
        reads.append((shard_of[os.fstat(handle).st_ino], offset, out.nbytes))
        real(handle, out, offset)

    monkeypatch.setattr(loader_mod, "_read_rows", recording)
    batches = block_loader(cache, readahead=False, read_threads=1)
    shard_of = {os.stat(shard.filename).st_ino: number for number, shard in enumerate(batches.shards)}
    per_fill = []
    for fill in range(batches.n_fills):
        reads.clear()
        for step in range(int(batches.fill_starts[fill]), int(batches.fill_starts[fill + 1])):
            batches.batch(step)
        per_fill.append(list(reads))
    everything = [read for fill in per_fill for read in fill]
    assert sum(size for _, _, size in everything) == 5000 * 16  # every row read exactly once, the rest included
    # 80 blocks (32 + 27 + 21 per shard); a fill boundary may cut one block in two.
    assert 80 <= len(everything) <= 80 + batches.n_fills - 1
    for fill in per_fill:
        assert fill == sorted(fill)  # within a fill, each file is read front to back (by one thread here)
    for shard, offset, size in everything:
        start, rows = batches.shards[shard].offset, batches.shards[shard].shape[0]
        first, last = (offset - start) // 16, (offset - start + size) // 16 - 1
        assert (offset - start) % 16 == 0 and size % 16 == 0 and 0 <= first <= last < rows
        assert first // 64 == last // 64  # inside one 64-row block of one shard: one sequential read


def test_sample_reads_a_few_blocks_and_is_fixed_by_its_seed(cache, monkeypatch):
    reads = []
    real = loader_mod._read_rows
    monkeypatch.setattr(loader_mod, "_read_rows", lambda *args: (reads.append(args[2]), real(*args)))
    batches = block_loader(cache)
    first = decode(batches.sample(300, seed=7))
    assert first.size == 300 and np.unique(first).size == 300
    assert len(reads) == 32  # 600 rows would fit in 10 blocks; at least 32 are read, never 300 single rows
    assert np.array_equal(decode(block_loader(cache).sample(300, seed=7)), first)
    assert not np.array_equal(decode(batches.sample(300, seed=8)), first)
    assert np.array_equal(decode(batches.sample(10**6, seed=1)), np.arange(5000))  # asked for more: all, in order


def test_make_batches_picks_global_or_block_and_names_the_order(cache, monkeypatch, caplog):
    split_bytes = 5000 * 16
    monkeypatch.setattr(loader_mod, "total_memory_bytes", lambda: 2 * split_bytes)  # exactly half: fits
    caplog.set_level(logging.INFO, logger="saekit.loader")
    chosen = make_batches(cache, "train", 96, 0, LoaderConfig())
    assert type(chosen) is ShuffledBatches and chosen.order_key == "global"
    assert "global shuffle (loader.shuffle=auto" in caplog.text
    monkeypatch.setattr(loader_mod, "total_memory_bytes", lambda: 2 * split_bytes - 1)
    chosen = make_batches(cache, "train", 96, 0, LoaderConfig(buffer_tokens=1000))
    assert type(chosen) is BlockShuffledBatches and chosen.order_key == "block:960:65536"
    assert "block shuffle (loader.shuffle=auto" in caplog.text and "buffer of 960 rows" in caplog.text
    # Without buffer_tokens: 1/16 of memory (here 624 rows of 16 bytes), but at least 8 batches of 96 ...
    assert make_batches(cache, "train", 96, 0, LoaderConfig(shuffle="block")).order_key == "block:768:65536"
    monkeypatch.setattr(loader_mod, "total_memory_bytes", lambda: 16 * 16 * 2000)  # ... 2000 rows: 20 batches ...
    assert make_batches(cache, "train", 96, 0, LoaderConfig(shuffle="block")).order_key == "block:1920:65536"
    monkeypatch.setattr(loader_mod, "total_memory_bytes", lambda: 2**40)  # ... and at most the split's 52 batches
    assert make_batches(cache, "train", 96, 0, LoaderConfig(shuffle="block")).order_key == "block:4992:65536"
    assert make_batches(cache, "train", 96, 0, LoaderConfig(shuffle="block", block_kib=2048)).block_rows == 131072
    monkeypatch.setattr(loader_mod, "total_memory_bytes", lambda: 16)  # forced global on a tiny machine
    assert type(make_batches(cache, "train", 96, 0, LoaderConfig(shuffle="global"))) is ShuffledBatches
    assert TensorBatches(torch.zeros(10, 2), 5, 0).order_key == "global"


def test_bad_loader_settings_are_one_line_errors(cache):
    with pytest.raises(ConfigError, match=r"^loader.buffer_tokens=50 is smaller than batch_size=96; raise"):
        block_loader(cache, buffer_tokens=50)
    with pytest.raises(ConfigError, match=r"^loader.block_kib=0 must be positive"):
        block_loader(cache, block_bytes=0)
    with pytest.raises(ConfigError, match=r"^batch_size=6000 exceeds the 5000 training vectors"):
        block_loader(cache, batch_size=6000, buffer_tokens=6000)
    with pytest.raises(ConfigError, match=r"^loader.shuffle='random' is not valid; use one of: auto, global, block"):
        LoaderConfig(shuffle="random")
    settings = LoaderConfig()
    settings.shuffle = "random"  # set after validation: make_batches checks again
    with pytest.raises(ConfigError, match=r"^loader.shuffle='random'"):
        make_batches(cache, "train", 96, 0, settings)


class _Killed(Exception):
    pass


def test_a_resumed_fit_on_the_block_loader_is_bit_identical(tmp_path, monkeypatch):
    planted = PlantedDictionary(d=16, n_features=48, seed=0)
    x = planted.sample(4096, seed=1)
    root = write_cache(tmp_path / "planted", shard_rows=(1500, 1500, 1096), rows=lambda first, count: x[first:first + count])
    cfg = dataclasses.replace(synthetic_train_config("topk", n=64, n_tokens=40 * 256, batch_size=256, k=4),
                              log_every_steps=5, ckpt_every_steps=10)

    def data():  # 16 batches an epoch in fills of 4 batches, 1 KiB blocks of 16 rows: 40 steps are 2.5 epochs
        batches = BlockShuffledBatches(open_cache(root), "train", 256, cfg.seed, buffer_tokens=1024, block_bytes=1024)
        return train_mod.TrainingData(batches=batches, d=16, key=f"planted/{batches.order_key}", mean_norm=1.0)

    quiet = Console(quiet=True)
    train_mod.fit(cfg, data(), tmp_path / "whole", torch.device("cpu"), quiet)
    real_step, calls = train_mod.train_step, []

    def killed_in_step_25(*args, **kwargs):
        calls.append(1)
        if len(calls) == 26:
            raise _Killed()
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", killed_in_step_25)
    with pytest.raises(_Killed):
        train_mod.fit(cfg, data(), tmp_path / "killed", torch.device("cpu"), quiet)
    monkeypatch.setattr(train_mod, "train_step", real_step)
    result = train_mod.fit(cfg, data(), tmp_path / "killed", torch.device("cpu"), quiet)
    assert result.resumed_from == 20
    whole, resumed = (load_file(str(tmp_path / name / "sae.safetensors")) for name in ("whole", "killed"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert _steps(tmp_path / "whole") == _steps(tmp_path / "killed")


def _steps(run_dir: Path) -> list[dict]:
    with open(run_dir / "steps.csv") as handle:
        return [{key: value for key, value in row.items() if key != "tokens_per_s"} for row in csv.DictReader(handle)]
