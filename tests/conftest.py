"""Shared fixtures: the real stories260k model and TinyStories text from ../shared/data, runs in tmp folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("SAEKIT_DATA_ROOT", REPO.parent / "shared" / "data")).resolve()
MODEL_DIR = DATA_ROOT / "stories260k"
TRAIN_JSON = DATA_ROOT / "tinystories-text" / "tinystories_train_first1000.json"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def cli_env() -> dict:
    env = dict(os.environ, SAEKIT_DATA_ROOT=str(DATA_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", COLUMNS="120")
    return env


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`saekit <args>` in a subprocess from the repo root (so the default ../shared/data paths hold)."""
    return subprocess.run([sys.executable, "-m", "saekit.cli", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """One activation-cache folder for the whole session, so runs that share model/hook/data share a cache."""
    return tmp_path_factory.mktemp("activations")


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """The first 60 TinyStories train stories as a .txt (about 12k tokens): quick to cache."""
    stories = json.loads(TRAIN_JSON.read_text())[:60]
    path = tmp_path_factory.mktemp("text") / "stories60.txt"
    path.write_text("\n\n".join(story.strip() for story in stories) + "\n")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_root) -> Path:
    """The issue's reference run: TopK k=8, n=512, 1M training tokens at context 64 on stories260k."""
    run_dir = tmp_path_factory.mktemp("runs") / "topk_k8"
    result = run_cli("train", "activation=topk", "k=8", "n=512", "n_tokens=1000000", "data.ctx_len=64",
                     f"cache.dir={cache_root}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def preflight_error(capsys, overrides: list[str]) -> str:
    """The one stderr line (exit 2) with which `saekit train <overrides>` is refused before Hydra runs."""
    from saekit.cli import _register, preflight

    _register()
    with pytest.raises(SystemExit) as exited:
        preflight("train", overrides)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("saekit: error: "), err
    return err
