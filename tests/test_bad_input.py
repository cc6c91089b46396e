"""Issue 13, bad input and honest settings: refusals in one line before anything is written, an honest resume
fingerprint, evaluation on another corpus, file-system failures, an offline hub name, no process-wide side effects."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import DATA_ROOT, MODEL_DIR, TRAIN_JSON, run_cli
from saekit.synthetic import synthetic_train_config
from saekit.train import config_fingerprint

SHAKESPEARE = DATA_ROOT / "tinyshakespeare" / "input.txt"


# ---- item 12: the resume fingerprint covers only what determines the trained weights -------------------
def _base_cfg():
    return synthetic_train_config("topk", n=64, n_tokens=512, batch_size=512, k=4)


def _with(cfg, section: str, **changes):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def test_the_fingerprint_is_pinned_to_a_literal():
    assert config_fingerprint(_base_cfg(), "key") == "b1006eb1cdd1e4e3"


@pytest.mark.parametrize("change", [
    lambda c: _with(c, "final_eval", downstream=True),
    lambda c: _with(c, "final_eval", downstream_tokens=c.final_eval.downstream_tokens * 2),
    lambda c: dataclasses.replace(c, eval_tokens=c.eval_tokens * 2),
    lambda c: _with(c, "data", paths=["/moved/repository/text.txt"]),
    lambda c: _with(c, "data", eval_paths=["/moved/repository/held_out.txt"]),
    lambda c: _with(c, "data", name="renamed"),
    lambda c: _with(c, "model", display_name="shown-as"),
    lambda c: _with(c, "model", name="/moved/repository/model"),
], ids=["final_eval.downstream", "final_eval.downstream_tokens", "eval_tokens", "data.paths", "data.eval_paths",
        "data.name", "model.display_name", "model.name"])
def test_names_paths_and_evaluation_settings_keep_the_fingerprint(change):
    cfg = _base_cfg()
    assert config_fingerprint(change(cfg), "key") == config_fingerprint(cfg, "key")


@pytest.mark.parametrize("change", [
    lambda c: dataclasses.replace(c, n=128),
    lambda c: dataclasses.replace(c, k=8),
    lambda c: dataclasses.replace(c, lam=c.lam * 2),
    lambda c: dataclasses.replace(c, seed=c.seed + 1),
    lambda c: _with(c, "optimizer", lr=0.123),
    lambda c: _with(c, "activation", learned_scale=not c.activation.learned_scale),
    lambda c: _with(c, "data", normalize="none"),
], ids=["n", "k", "lam", "seed", "optimizer.lr", "activation.learned_scale", "data.normalize"])
def test_what_decides_the_weights_changes_the_fingerprint(change):
    cfg = _base_cfg()
    assert config_fingerprint(change(cfg), "key") != config_fingerprint(cfg, "key")


def test_other_activations_change_the_fingerprint():
    assert config_fingerprint(_base_cfg(), "key") != config_fingerprint(_base_cfg(), "other-key")


# ---- item 4: a window longer than the model's positions ------------------------------------------------
def test_ctx_len_beyond_the_models_positions_is_one_line_and_leaves_no_run_folder(tmp_path):
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    result = run_cli("train", "n_tokens=8192", "data.ctx_len=1024", f"cache.dir={cache_dir}",
                     f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.ctx_len=1024" in lines[0] and "512 positions" in lines[0], result.stderr
    assert not run_dir.exists() and not cache_dir.exists()


def test_the_context_limit_is_read_from_a_local_models_config_without_loading_it(tmp_path):
    from saekit.config import ModelConfig
    from saekit.errors import ConfigError
    from saekit.model import check_context_length, context_limit

    assert context_limit(ModelConfig(name=str(MODEL_DIR))) == 512
    assert context_limit(ModelConfig(name="gpt2")) is None  # a hub name: checked once loaded
    check_context_length("stories260k", 512, 512)
    with pytest.raises(ConfigError, match="data.ctx_len=513"):
        check_context_length("stories260k", 513, 512)


# ---- item 5: `+key=value` with a misspelled key -----------------------------------------------------------
def test_a_misspelled_added_key_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", "+n_tokns=1000000", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "n_tokns is not a saekit setting; drop the +" in lines[0], result.stderr
    assert not run_dir.exists()


def test_added_keys_that_the_schema_has_are_accepted():
    from saekit.cli import refuse_unknown_additions
    from saekit.errors import ConfigError

    cfg = _base_cfg()
    refuse_unknown_additions(cfg, ["+data.hf_data_files=[a.txt]", "++k=16", "+hydra.job.chdir=false", "k=8",
                                   "+activation=topk", "+activation.learned_scale=true"])
    for bad in ("+n_tokns=1", "++data.ctxlen=64", "+activation.kk=3"):
        with pytest.raises(ConfigError, match="not a saekit setting"):
            refuse_unknown_additions(cfg, [bad])


# ---- item 10: a hub name on a machine without the Hub --------------------------------------------------
@pytest.fixture
def no_boot(monkeypatch):
    """transformers must not be asked (its retries are what took 45 s)."""
    from transformer_lens.model_bridge import TransformerBridge

    def refuse(*args, **kwargs):
        raise AssertionError("booted a model the Hub cannot provide")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", refuse)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)


def test_an_unreachable_hub_fails_at_once_in_one_line(monkeypatch, no_boot):
    import huggingface_hub
    from huggingface_hub import constants

    from saekit.config import ModelConfig
    from saekit.errors import DataError
    from saekit.model import load_model

    asked = []

    def unreachable(self, name, **kwargs):
        asked.append(kwargs.get("timeout"))
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(DataError) as caught:
        load_model(ModelConfig(name="gpt2"), torch.device("cpu"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("model.name=gpt2") and "local model folder" in message
    assert len(asked) == 1 and asked[0] is not None  # one request, with a timeout


def test_offline_mode_without_a_cached_copy_fails_without_asking_the_hub(monkeypatch, no_boot):
    import huggingface_hub
    from huggingface_hub import constants

    from saekit.config import ModelConfig
    from saekit.errors import DataError
    from saekit.model import load_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("asked the Hub"))
    with pytest.raises(DataError, match="model.name=gpt2 is not in the local HuggingFace cache"):
        load_model(ModelConfig(name="gpt2"), torch.device("cpu"))


# ---- item 17: no process-wide side effects from library code -------------------------------------------
def test_loading_a_local_model_leaves_the_environment_alone(monkeypatch):
    from saekit.config import ModelConfig
    from saekit.model import load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = load_model(ModelConfig(name=str(MODEL_DIR)), torch.device("cpu"))
    assert "HF_HUB_OFFLINE" not in os.environ
    assert model.n_ctx == 512


def test_plots_leave_the_matplotlib_backend_and_pyplot_alone(monkeypatch, tmp_path):
    import matplotlib
    import pandas as pd

    from saekit.latents import plot_density_histogram
    from saekit.sweep_report import plot_pareto

    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("matplotlib.use called by library code"))
    table = pd.DataFrame({"density": [0.0, 0.01, 0.2, 0.5]})
    assert plot_density_histogram(table, 1000, tmp_path, "t").stat().st_size > 0
    runs = pd.DataFrame({"activation": ["topk"] * 3, "l0": [4.0, 8.0, 16.0], "nmse": [0.3, 0.2, 0.1]})
    plot_pareto(runs, "nmse", tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()


def test_main_gives_back_sys_argv_and_the_warning_filters(tmp_path):
    from saekit.cli import main

    argv, filters = list(sys.argv), list(warnings.filters)
    with pytest.raises(SystemExit) as stopped:
        # Passes the preflight, then fails inside the Hydra run (the context check), so Hydra itself has run.
        main(["train", "n_tokens=8192", "data.ctx_len=1024", f"data.paths=[{TRAIN_JSON}]",
              f"model.name={MODEL_DIR}", f"cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert stopped.value.code == 2
    assert sys.argv == argv
    assert warnings.filters == filters


# ---- item 11: evaluation on a corpus the SAE never saw uses all of it ----------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_text) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_cli("train", "activation=topk", "k=4", "n=64", "n_tokens=8192", "data=text_files",
                     f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=1024", "final_eval.downstream=false",
                     f"cache.dir={tmp_path_factory.mktemp('cache')}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _evaluated_tokens(stdout: str) -> int:
    match = re.search(r"\(([\d,]+) tokens, ", stdout)
    assert match, stdout[-2000:]
    return int(match.group(1).replace(",", ""))


def test_eval_on_another_corpus_uses_all_of_it_and_caps_at_n_eval_tokens(tmp_path, tiny_run):
    from saekit.data import make_windows, read_text_documents
    from transformers import AutoTokenizer

    other = tmp_path / "other.txt"
    other.write_text(SHAKESPEARE.read_text()[:30000])
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    docs = read_text_documents(other, "\n\n")
    whole = make_windows(docs, tokenizer, tokenizer.bos_token_id, 32, True).shape[0] * 31  # BOS excluded
    common = ["eval", f"ckpt={tiny_run}", "downstream=false", "ablation_positions=0", "refine_tokens=0",
              "data=text_files", f"data.paths=[{other}]", "data.ctx_len=32", f"cache.dir={tmp_path / 'cache'}"]
    # The default data.n_eval_tokens (65536) is larger than this text: a cap, not a refusal.
    result = run_cli(*common, f"hydra.run.dir={tmp_path / 'all'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _evaluated_tokens(result.stdout) == whole  # all of it, not its last 10% of documents
    capped = run_cli(*common, "data.n_eval_tokens=1024", f"hydra.run.dir={tmp_path / 'capped'}")
    assert capped.returncode == 0, capped.stderr[-2000:]
    assert _evaluated_tokens(capped.stdout) == 1024 // 32 * 31


def test_eval_on_the_training_corpus_keeps_to_its_held_out_split(tmp_path, tiny_run, small_text):
    from saekit.config import DataConfig
    from saekit.data import evaluates_whole_corpus, same_corpus

    trained = DataConfig(paths=[str(small_text)], ctx_len=32)
    copy = tmp_path / "copy.txt"
    copy.write_bytes(small_text.read_bytes())
    assert same_corpus(DataConfig(paths=[str(copy)], ctx_len=32), trained)  # by content, wherever it lies
    result = run_cli("eval", f"ckpt={tiny_run}", "downstream=false", "ablation_positions=0", "refine_tokens=0",
                     "data=text_files", f"data.paths=[{copy}]", "data.ctx_len=32", "data.n_eval_tokens=1024",
                     f"cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'same'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out metrics" in result.stdout and _evaluated_tokens(result.stdout) == 1024 // 32 * 31
    assert not evaluates_whole_corpus(trained)


# ---- item 6: a full or read-only file system ------------------------------------------------------------
def _site(tmp_path, text):
    from saekit.config import CacheConfig, DataConfig, ModelConfig, SiteConfig

    data = DataConfig(name="small", paths=[str(text)], ctx_len=32, n_eval_tokens=1024)
    return SiteConfig(model=ModelConfig(name=str(MODEL_DIR)), data=data,
                      cache=CacheConfig(dir=str(tmp_path / "cache"), shard_mb=1), device="cpu")


def _build(cfg):
    from saekit.cache import ensure_cache
    from saekit.model import load_model

    return ensure_cache(cfg, 100_000, lambda: load_model(cfg.model, torch.device("cpu")), console_print=lambda _: None)


def test_a_full_disk_during_the_build_is_one_line_and_frees_its_temporary_folder(tmp_path, small_text, monkeypatch):
    from saekit import cache as cache_mod
    from saekit.errors import DataError

    written = []

    def fills_the_disk(tensors, path):  # half a file, then the disk is full (safetensors reports it as text)
        Path(path).write_bytes(b"\0" * 4096)
        written.append(path)
        if len(written) > 1:
            raise Exception(f"Error while serializing: I/O error: No space left on device (os error 28) at {path}")

    monkeypatch.setattr(cache_mod, "save_file", fills_the_disk)
    cfg = _site(tmp_path, small_text)
    with pytest.raises(DataError) as caught:
        _build(cfg)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cache.dir={tmp_path / 'cache'}")
    assert "No space left on device" in message and "free space" in message
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if ".tmp" in p.name or not p.name.startswith(".")]
    assert leftovers == []  # no .tmp-PID folder holding the space, no half cache


def test_a_read_only_cache_folder_is_one_line(tmp_path, small_text, monkeypatch):
    from saekit.errors import DataError

    cache_dir = tmp_path / "cache"
    real_mkdir, real_open = Path.mkdir, open

    def read_only_mkdir(self, *args, **kwargs):  # tests run as root, where chmod does not stop writes: simulate
        if str(self).startswith(str(cache_dir)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    with pytest.raises(DataError) as caught:
        _build(_site(tmp_path, small_text))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cache.dir={cache_dir}")
    assert "Read-only file system" in message and "folder you can write to" in message


def test_the_free_space_check_counts_the_token_files(monkeypatch, tmp_path):
    from saekit import cache as cache_mod
    from saekit.errors import DataError

    rows, width, token_bytes = 1000, 64, 10**6
    activations = rows * width * 4
    monkeypatch.setattr(cache_mod.shutil, "disk_usage",
                        lambda _: shutil._ntuple_diskusage(10**12, 10**12 - activations - 10, activations + 10))
    with pytest.raises(DataError, match="cache.dir=.*free space"):
        cache_mod._check_space(lambda _: None, {"h": tmp_path / "key"}, rows, {"h": width}, "float32", token_bytes)
