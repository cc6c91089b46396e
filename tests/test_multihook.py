"""Several hooks from one model pass, cheap cache open, `saekit cache verify`, and input hashes that are remembered."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from conftest import MODEL_DIR, run_cli
from saekit import fileutil
from saekit.cache import HASH_MEMO, MANIFEST, ensure_cache, ensure_caches, open_cache
from saekit.config import CacheConfig, DataConfig, ModelConfig, SiteConfig
from saekit.errors import ConfigError
from saekit.model import LoadedModel, load_model

N_TOKENS = 100_000
TIMING_FIELDS = ("build_seconds", "build_tokens_per_s", "created")


def site(cache_dir, text, layer, model_dir=MODEL_DIR) -> SiteConfig:
    data = DataConfig(name="small", paths=[str(text)], ctx_len=32, n_eval_tokens=1024)
    return SiteConfig(model=ModelConfig(name=str(model_dir)), data=data,
                      cache=CacheConfig(dir=str(cache_dir), shard_mb=1), layer=layer, device="cpu")


class PassCounter:
    """Counts full-window forward passes of the real model and how often it was loaded."""

    def __init__(self, monkeypatch, ctx_len: int = 32):
        self.window_passes, self.loads = 0, 0
        real = LoadedModel.run_to_hooks

        def counted(model, tokens, hooks):
            if tokens.shape[1] == ctx_len:  # not the tiny width probe
                self.window_passes += 1
            return real(model, tokens, hooks)

        monkeypatch.setattr(LoadedModel, "run_to_hooks", counted)

    def loader(self, cfg: SiteConfig):
        def load():
            self.loads += 1
            return load_model(cfg.model, torch.device("cpu"))

        return load


def _files(root):
    return {path.name: path.read_bytes() for path in root.iterdir() if path.name != MANIFEST}


def _manifest_without_timing(root):
    manifest = json.loads((root / MANIFEST).read_text())
    return {key: value for key, value in manifest.items() if key not in TIMING_FIELDS}


def _passes_for(cache) -> int:
    """Forward passes of one build: batches of 64 windows (cache.batch_windows) per split."""
    return sum(-(-split["n_windows"] // 64) for split in cache.manifest["splits"].values())


def test_five_hooks_in_one_pass_write_the_bytes_of_five_single_builds(tmp_path, small_text, monkeypatch):
    counter = PassCounter(monkeypatch)
    multi_cfg = site(tmp_path / "multi", small_text, [0, 1, 2, 3, 4])
    multi = ensure_caches(multi_cfg, N_TOKENS, counter.loader(multi_cfg), console_print=lambda _: None)
    assert [c.manifest["hook"] for c in multi] == [f"blocks.{layer}.hook_resid_post" for layer in range(5)]
    assert counter.window_passes == _passes_for(multi[0])  # one pass served all five hooks

    singles = []
    for layer in range(5):
        cfg = site(tmp_path / "single", small_text, layer)
        singles.append(ensure_cache(cfg, N_TOKENS, counter.loader(cfg), console_print=lambda _: None))
    assert counter.window_passes == 6 * _passes_for(multi[0])
    for built, single in zip(multi, singles):
        assert built.root.name == single.root.name  # the same key
        assert _files(built.root) == _files(single.root)  # byte-identical shards and token files
        assert _manifest_without_timing(built.root) == _manifest_without_timing(single.root)


def test_the_multi_hook_build_makes_one_pass_and_builds_only_what_is_missing(tmp_path, small_text, monkeypatch):
    counter = PassCounter(monkeypatch)
    cache_dir = tmp_path / "cache"
    single_cfg = site(cache_dir, small_text, 3)
    single = ensure_cache(single_cfg, N_TOKENS, counter.loader(single_cfg), console_print=lambda _: None)

    multi_cfg = site(cache_dir, small_text, [1, 3, 4])
    printed = []
    caches = ensure_caches(multi_cfg, N_TOKENS, counter.loader(multi_cfg), console_print=printed.append)
    assert counter.loads == 2
    assert counter.window_passes == 2 * _passes_for(single)  # layers 1 and 4 from one pass; layer 3 reused
    assert caches[1].root == single.root
    assert any("reusing" in line and single.root.name in line for line in printed)

    ensure_caches(multi_cfg, N_TOKENS, counter.loader(multi_cfg), console_print=lambda _: None)
    assert counter.loads == 2  # everything complete: the model is not even loaded


def test_opening_reads_no_shard_and_a_full_verify_rehashes(tmp_path, small_text, monkeypatch):
    cfg = site(tmp_path / "cache", small_text, 2)
    built = ensure_cache(cfg, N_TOKENS, lambda: load_model(cfg.model, torch.device("cpu")), console_print=lambda _: None)
    hashed = []
    real = fileutil.sha256_file
    monkeypatch.setattr("saekit.cache.sha256_file", lambda path, advance=None: hashed.append(path) or real(path, advance))
    open_cache(built.root)
    assert hashed == []  # sizes and the manifest only
    open_cache(built.root, "full")
    assert len(hashed) == len(built.manifest["files"])


def test_local_model_and_text_are_hashed_once_while_unchanged(tmp_path, small_text, monkeypatch):
    model_dir = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model_dir)
    cfg = site(tmp_path / "cache", small_text, 2, model_dir=model_dir)
    ensure_cache(cfg, N_TOKENS, lambda: load_model(cfg.model, torch.device("cpu")), console_print=lambda _: None)
    assert (tmp_path / "cache" / HASH_MEMO).is_file()

    hashed = []
    real = fileutil.sha256_file
    monkeypatch.setattr(fileutil, "sha256_file", lambda path, advance=None: hashed.append(path.name) or real(path))
    reused = ensure_cache(cfg, N_TOKENS, lambda: pytest.fail("model loaded"), console_print=lambda _: None)
    assert hashed == []  # model weights and text remembered by their stat signature

    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime: hashed again, same key
    again = ensure_cache(cfg, N_TOKENS, lambda: pytest.fail("model loaded"), console_print=lambda _: None)
    assert hashed == ["model.safetensors"] and again.root == reused.root

    config = model_dir / "config.json"
    config.write_text(config.read_text() + "\n")  # a real content change: a new key
    rebuilt_key = ensure_cache(cfg, N_TOKENS, lambda: load_model(cfg.model, torch.device("cpu")),
                               console_print=lambda _: None).root.name
    assert rebuilt_key != reused.root.name


@pytest.mark.parametrize("override, message", [
    ("layer=[0,abc]", "layer="),
    ("layer=[]", "layer=[] is empty"),
    ("layer=[1,1]", "names a hook twice"),
    ("hook=[]", "hook=[] is empty"),
])
def test_bad_hook_lists_are_one_line(tmp_path, override, message):
    result = run_cli("cache", override, f"cache.dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_per_hook_configs_equal_single_layer_configs():
    cfg = SiteConfig(model=ModelConfig(name="gpt2"), data=DataConfig(paths=["x.txt"]), layer=[0, 3])
    parts = cfg.per_hook()
    assert [part.hook_name for part in parts] == ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"]
    assert parts[1] == SiteConfig(model=ModelConfig(name="gpt2"), data=DataConfig(paths=["x.txt"]), layer=3)
    with pytest.raises(ValueError):
        _ = cfg.hook_name
    with pytest.raises(ConfigError, match="layer="):
        SiteConfig(model=ModelConfig(name="gpt2"), data=DataConfig(paths=["x.txt"]), layer=[0, -1])


def test_train_over_two_layers_writes_one_run_folder_per_hook_and_one_table(tmp_path, small_text):
    run_dir = tmp_path / "run"
    common = ["activation=topk", "k=4", "n=64", "n_tokens=16384", "batch_size=1024", "data=text_files",
              f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=1024", f"cache.dir={tmp_path / 'c'}"]
    result = run_cli("train", "layer=[0,3]", *common, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(run_dir / "results.csv")
    assert sorted(table["hook"].unique()) == ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"
    for hook in table["hook"].unique():
        assert (run_dir / hook / "sae.safetensors").is_file()
        assert json.loads((run_dir / hook / "status.json").read_text())["status"] == "done"
        own = pd.read_csv(run_dir / hook / "results.csv")
        assert (own["hook"] == hook).all()

    # Each per-hook folder is a normal run: `saekit eval` reproduces its nmse, and the same single-layer command
    # trains to the same weights (the per-hook config is exactly the single-layer one).
    hook_dir = run_dir / "blocks.3.hook_resid_post"
    evaluated = run_cli("eval", f"ckpt={hook_dir}", "downstream=false", "ablation_positions=0", "refine_tokens=0",
                        f"cache.dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    nmse = lambda frame: float(frame[frame["metric"] == "nmse"]["value"].iloc[0])  # noqa: E731
    assert nmse(pd.read_csv(tmp_path / "eval" / "results.csv")) == pytest.approx(nmse(pd.read_csv(hook_dir / "results.csv")),
                                                                                rel=1e-6)
    single = run_cli("train", "layer=3", *common, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    assert nmse(pd.read_csv(tmp_path / "single" / "results.csv")) == nmse(pd.read_csv(hook_dir / "results.csv"))


def test_cache_verify_exit_codes(tmp_path, small_text):
    cfg = site(tmp_path / "cache", small_text, 1)
    built = ensure_cache(cfg, N_TOKENS, lambda: load_model(cfg.model, torch.device("cpu")), console_print=lambda _: None)
    ok = run_cli("cache", "verify", str(built.root))
    assert ok.returncode == 0, ok.stderr
    assert "match the manifest" in ok.stdout
    shard = built.root / built.manifest["splits"]["eval"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = run_cli("cache", "verify", str(built.root))
    assert bad.returncode == 2
    assert f"{shard.name} has a different sha256" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = run_cli("cache", "verify", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "not a folder" in missing.stderr


def test_streamed_training_of_two_hooks_caches_only_the_held_out_split(tmp_path, small_text):
    run_dir, cache_dir = tmp_path / "run", tmp_path / "c"
    result = run_cli("train", "cache.mode=stream", "layer=[1,2]", "activation=topk", "k=4", "n=64", "n_tokens=16384",
                     "batch_size=1024", "loader.buffer_tokens=4096", "data=text_files", f"data.paths=[{small_text}]",
                     "data.ctx_len=32", "data.n_eval_tokens=1024", f"cache.dir={cache_dir}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(run_dir / "results.csv")
    assert sorted(table["hook"].unique()) == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert (table[table["metric"] == "nmse"]["value"] < 1).all()
    manifests = [json.loads(path.read_text()) for path in cache_dir.glob(f"*/{MANIFEST}")]
    assert len(manifests) == 2 and all(list(m["splits"]) == ["eval"] for m in manifests)  # no training shards on disk
    for hook in table["hook"].unique():
        assert (run_dir / hook / "sae.safetensors").is_file()
