"""Issue 6 around the kernels: the prefetcher, the precision/compile/fast_path settings, the background cache
writer, and the bench script's contract (its CSV rows; tests never time)."""

from __future__ import annotations

import csv
import dataclasses
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import REPO, cli_env, run_cli
from saekit import cache as cache_mod
from saekit.errors import ConfigError
from saekit.loader import Prefetcher, TensorBatches
from saekit.synthetic import PlantedDictionary, synthetic_train_config
from saekit.train import TrainingData, fit

CONTRACT_ROWS = ("topk_tokens_per_s", "topk_frac_floor", "batchtopk_frac_floor", "relu_frac_floor", "cache_vs_forward",
                 "loader_vs_train", "peak_rss_mb", "matmul_gflops")


def data(rows=4096, batch=256):
    x = torch.randn(rows, 8, generator=torch.Generator().manual_seed(0))
    return TensorBatches(x, batch, seed=1)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_yields_the_loader_batches_in_order(depth):
    batches = data()
    with Prefetcher(batches, start=5, stop=40, depth=depth, device=torch.device("cpu")) as prefetched:
        for step in range(5, 40):
            assert torch.equal(prefetched.get(step), batches.batch(step))


def test_prefetcher_raises_the_loader_error_in_the_training_thread():
    class Broken(TensorBatches):
        def rows(self, rows):
            raise OSError("shard unreadable")

    with Prefetcher(Broken(torch.zeros(64, 2), 8, 0), 0, 4, depth=2, device=torch.device("cpu")) as prefetched:
        with pytest.raises(OSError, match="shard unreadable"):
            prefetched.get(0)


def test_prefetcher_stops_its_thread_when_training_stops_early():
    before = threading.active_count()
    with Prefetcher(data(), 0, 10_000, depth=2, device=torch.device("cpu")) as prefetched:
        prefetched.get(0)
    assert threading.active_count() == before  # no worker left blocked on a full queue


@pytest.mark.gpu
def test_prefetcher_pins_and_copies_on_a_side_stream():
    batches = data()
    with Prefetcher(batches, 0, 8, depth=2, device=torch.device("cuda")) as prefetched:
        for step in range(8):
            batch = prefetched.get(step)
            assert batch.is_cuda and torch.equal(batch.cpu(), batches.batch(step))


def _fit(tmp_path: Path, device: str = "cpu", **changes):
    """30 TopK steps on a small planted dictionary through `fit`."""
    planted = PlantedDictionary(d=16, n_features=48, seed=0)
    x = planted.sample(8192, seed=1)
    cfg = dataclasses.replace(synthetic_train_config("topk", n=64, n_tokens=30 * 512, batch_size=512, k=4),
                              device=device, **changes)
    training = TrainingData.from_tensor(x, cfg.batch_size, cfg.seed, key="planted")
    tmp_path.mkdir(parents=True, exist_ok=True)
    return fit(cfg, training, tmp_path, torch.device(device), Console(quiet=True))


def test_fast_path_and_dense_reference_train_to_the_same_weights(tmp_path):
    fast = _fit(tmp_path / "fast", fast_path=True).sae
    dense = _fit(tmp_path / "dense", fast_path=False).sae
    for name, param in dense.named_parameters():
        assert torch.allclose(getattr(fast, name), param, rtol=1e-3, atol=1e-4), name


def test_bf16_and_tf32_need_cuda(tmp_path):
    with pytest.raises(ConfigError, match=r"precision=bf16 needs a CUDA device .* use precision=fp32"):
        _fit(tmp_path, precision="bf16")
    result = run_cli("train", "precision=fp16", f"hydra.run.dir={tmp_path / 'bad'}")
    assert result.returncode != 0 and "precision='fp16' is not valid; use one of: fp32, tf32, bf16" in result.stderr
    assert not (tmp_path / "bad").exists()
    # from the CLI: refused before any cache or run folder is made
    result = run_cli("train", "precision=bf16", "device=cpu", f"cache.dir={tmp_path / 'cache'}",
                     f"hydra.run.dir={tmp_path / 'cpu'}")
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and errors == ["saekit: error: precision=bf16 needs a CUDA device (training "
                                                 "runs on cpu); use precision=fp32"], result.stderr
    assert not (tmp_path / "cpu").exists() and not (tmp_path / "cache").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_trains_on_cuda(tmp_path, precision):
    result = _fit(tmp_path, device="cuda", precision=precision)
    assert result.sae.W_enc.is_cuda and torch.isfinite(result.sae.W_enc).all()


def test_cache_writer_failure_surfaces_and_leaves_no_shard_list(tmp_path, monkeypatch):
    def disk_full(path, name, tensor):
        raise OSError("No space left on device")

    monkeypatch.setattr(cache_mod, "_write_tensor_file", disk_full)
    writer = cache_mod._ShardWriter(tmp_path, "train", shard_rows=4, dtype=torch.float32)
    writer.add(torch.ones(10, 3))
    with pytest.raises(OSError, match="No space left"):
        writer.close()


def test_cache_writer_writes_shards_in_order_with_their_hashes(tmp_path):
    writer = cache_mod._ShardWriter(tmp_path, "train", shard_rows=4, dtype=torch.float32)
    rows = torch.arange(30, dtype=torch.float32).view(10, 3)
    writer.add(rows[:7])
    writer.add(rows[7:])
    writer.close()
    assert [shard["n_acts"] for shard in writer.shards] == [4, 4, 2]
    assert [entry["file"] for entry in writer.files] == [shard["file"] for shard in writer.shards]
    from saekit.fileutil import sha256_file
    assert all(entry["sha256"] == sha256_file(tmp_path / entry["file"]) for entry in writer.files)
    from safetensors.torch import load_file
    assert torch.equal(torch.cat([load_file(str(tmp_path / s["file"]))["acts"] for s in writer.shards]), rows)


def test_bench_writes_every_contract_row(tmp_path):
    out = tmp_path / "results.csv"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "speed.py"), "--quick", "--out", str(out)],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["name", "value", "unit"]
        rows = {row["name"]: row for row in reader}
    for name in CONTRACT_ROWS:
        value = float(rows[name]["value"])
        assert math.isfinite(value) and value > 0, name
    # the quality check compares the same recipe on both paths: equal to float tolerance at this size
    assert float(rows["topk_heldout_nmse"]["value"]) == pytest.approx(float(rows["topk_dense_heldout_nmse"]["value"]),
                                                                      rel=0.02)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """compile=true goes through torch.compile (graph breaks at the data-dependent parts) to the same weights."""
    eager = _fit(tmp_path / "eager").sae
    compiled = _fit(tmp_path / "compiled", compile=True).sae
    for name, param in eager.named_parameters():
        assert torch.allclose(getattr(compiled, name), param, rtol=1e-3, atol=1e-4), name


def test_the_resume_fingerprint_is_pinned_and_ignores_what_computes_the_same():
    from saekit.train import config_fingerprint

    cfg = synthetic_train_config("topk", n=64, n_tokens=512, batch_size=512, k=4)
    # A literal: any change to what the fingerprint covers shows up here (and breaks resuming older run folders).
    # Re-pinned deliberately (issue 13) when names, paths and evaluation settings left the fingerprint: run folders
    # checkpointed before that restart instead of resuming. Was "bb10ad5a8babfba3" (saekit 0.2).
    assert config_fingerprint(cfg, "key") == "b1006eb1cdd1e4e3"
    assert config_fingerprint(cfg, "key") == config_fingerprint(dataclasses.replace(cfg, fast_path=False), "key")
    assert config_fingerprint(cfg, "key") != config_fingerprint(dataclasses.replace(cfg, precision="bf16"), "key")
