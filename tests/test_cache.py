"""Activation cache: content-addressed reuse, invalidation, atomic writes, manifest checks, correct contents."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MODEL_DIR
from saekit import cache as cache_mod
from saekit.cache import MANIFEST, ensure_cache, open_cache
from saekit.config import CacheConfig, DataConfig, ModelConfig, SiteConfig
from saekit.errors import DataError
from saekit.model import load_model

N_TOKENS = 100_000


def site(tmp_path, text, **overrides) -> SiteConfig:
    data = DataConfig(name="small", paths=[str(text)], ctx_len=overrides.pop("ctx_len", 32), n_eval_tokens=1024)
    return SiteConfig(model=ModelConfig(name=str(MODEL_DIR)), data=data,
                      cache=CacheConfig(dir=str(tmp_path / "cache"), shard_mb=1), device="cpu", **overrides)


class CountingLoader:
    """Loads the real model and counts how often the cache needed it."""

    def __init__(self, cfg: SiteConfig):
        self.cfg, self.calls = cfg, 0

    def __call__(self):
        self.calls += 1
        return load_model(self.cfg.model, torch.device("cpu"))


def build(cfg: SiteConfig):
    loader = CountingLoader(cfg)
    return ensure_cache(cfg, N_TOKENS, loader, console_print=lambda _: None), loader


def test_same_model_hook_data_reuses_the_cache(tmp_path, small_text):
    first, loader1 = build(site(tmp_path, small_text))
    second, loader2 = build(site(tmp_path, small_text))
    assert loader1.calls == 1 and loader2.calls == 0  # the second call never loaded the model
    assert first.root == second.root
    entries = {path.name for path in (tmp_path / "cache").iterdir()} - {cache_mod.HASH_MEMO}
    assert entries == {first.root.name}  # the cache folder alone: the build lock is removed when the build ends


@pytest.mark.parametrize("change", ["layer", "ctx_len", "text", "dtype"])
def test_any_change_builds_a_new_cache(tmp_path, small_text, change):
    base, _ = build(site(tmp_path, small_text))
    text = small_text
    kwargs = {}
    if change == "layer":
        kwargs["layer"] = 1
    elif change == "ctx_len":
        kwargs["ctx_len"] = 48
    elif change == "text":
        text = tmp_path / "edited.txt"
        text.write_text(small_text.read_text().replace("Lily", "Mia", 1))
    cfg = site(tmp_path, text, **kwargs)
    if change == "dtype":
        cfg.cache.dtype = "bfloat16"
    other, loader = build(cfg)
    assert other.root != base.root and loader.calls == 1


def test_manifest_records_identity_and_counts(tmp_path, small_text):
    built, _ = build(site(tmp_path, small_text))
    manifest = json.loads((built.root / MANIFEST).read_text())
    for key in ("model", "hook", "data", "ctx_len", "dtype", "normalization", "saekit_version", "splits", "files"):
        assert key in manifest
    assert manifest["hook"] == "blocks.2.hook_resid_post" and manifest["d"] == 64
    assert manifest["model"]["sha256"] and manifest["data"]["source"]["train_files"]
    train = manifest["splits"]["train"]
    assert train["n_acts"] == train["n_windows"] * 31  # ctx_len 32 minus the excluded BOS position
    assert sum(s["n_acts"] for s in train["shards"]) == train["n_acts"] and len(train["shards"]) >= 2


def test_cached_activations_equal_a_direct_forward_pass(tmp_path, small_text):
    built, _ = build(site(tmp_path, small_text))
    model = load_model(ModelConfig(name=str(MODEL_DIR)), torch.device("cpu"))
    tokens = built.tokens("eval")[:3]
    direct = model.bridge.run_with_cache(tokens, names_filter="blocks.2.hook_resid_post")[1]["blocks.2.hook_resid_post"]
    cached = next(built.iter_split("eval", 3 * 31))
    assert torch.allclose(cached, direct[:, 1:].reshape(-1, 64), atol=1e-5)


def test_interrupted_build_is_never_used(tmp_path, small_text, monkeypatch):
    cfg = site(tmp_path, small_text)
    real_flush, calls = cache_mod._ShardWriter._flush, []

    def flush_then_die(self, n_rows):
        calls.append(n_rows)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill half way through writing the shards
        real_flush(self, n_rows)

    monkeypatch.setattr(cache_mod._ShardWriter, "_flush", flush_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(cfg)
    root = tmp_path / "cache"
    assert not any((p / MANIFEST).exists() for p in root.iterdir() if p.is_dir())
    assert not [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]  # only the temp folder
    monkeypatch.setattr(cache_mod._ShardWriter, "_flush", real_flush)
    rebuilt, loader = build(cfg)
    assert loader.calls == 1  # the partial build was discarded, not reused
    assert open_cache(rebuilt.root, verify=True).n_acts("train") > 0
    assert not list(root.glob(".*.tmp-*"))  # the stale temp folder was cleaned up


def test_a_corrupted_shard_is_found_by_a_full_verify_naming_the_file(tmp_path, small_text):
    built, _ = build(site(tmp_path, small_text))
    shard = built.root / built.manifest["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    reopened, _ = build(site(tmp_path, small_text))  # the default open checks sizes only: same size, accepted
    assert reopened.root == built.root
    cfg = site(tmp_path, small_text)
    cfg.cache.verify = "full"
    with pytest.raises(DataError, match=f"{shard.name} has a different sha256"):
        build(cfg)


def test_a_truncated_or_missing_shard_is_an_error(tmp_path, small_text):
    built, _ = build(site(tmp_path, small_text))
    shard = built.root / built.manifest["splits"]["eval"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match="bytes, manifest says"):
        open_cache(built.root, verify=False)
    shard.unlink()
    with pytest.raises(DataError, match="is missing"):
        open_cache(built.root, verify=False)


def test_too_few_tokens_for_the_request_is_an_error(tmp_path, small_text):
    cfg = site(tmp_path, small_text)
    cfg.data.n_train_tokens = 10_000_000
    with pytest.raises(DataError, match="data.n_train_tokens=10000000"):
        build(cfg)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # nothing half-built left


def test_bfloat16_cache_reads_back_as_float32(tmp_path, small_text):
    cfg = site(tmp_path, small_text)
    cfg.cache.dtype = "bfloat16"
    built, _ = build(cfg)
    batch = next(built.iter_split("train", 100))
    assert batch.dtype == torch.float32 and batch.shape == (100, 64) and batch.abs().sum() > 0


def test_huggingface_dataset_source_builds_a_cache(tmp_path, small_text):
    """data.source=hf through `datasets` (the offline `text` builder stands in for a Hub dataset)."""
    data = DataConfig(name="hf-text", source="hf", hf_path="text", hf_data_files=[str(small_text)], streaming=True,
                      ctx_len=32, n_eval_tokens=512)
    cfg = SiteConfig(model=ModelConfig(name=str(MODEL_DIR)), data=data,
                     cache=CacheConfig(dir=str(tmp_path / "cache")), device="cpu")
    built = ensure_cache(cfg, 4096, CountingLoader(cfg), console_print=lambda _: None)
    assert built.manifest["splits"]["eval"]["n_tokens"] == 512
    assert built.manifest["splits"]["train"]["n_tokens"] == 4096  # streaming: capped at the training budget
    train_tokens, eval_tokens = built.tokens("train"), built.tokens("eval")
    assert (train_tokens[:, 0] == 1).all()  # every window starts with BOS
    eval_rows = {tuple(row.tolist()) for row in eval_tokens}
    assert not any(tuple(row.tolist()) in eval_rows for row in train_tokens)  # held-out windows are not trained on
