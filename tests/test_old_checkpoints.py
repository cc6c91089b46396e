"""Checkpoints written by saekit 0.1 (before per-variant configs) load, compute the same outputs and evaluate
to the same numbers (tests/fixtures/checkpoints_v0_1/README.md says how they were made)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import DATA_ROOT, run_cli
from saekit.checkpoint import load_sae

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_v0_1"
VARIANTS = ["topk", "batchtopk", "jumprelu", "gated"]


@pytest.mark.parametrize("activation", VARIANTS)
def test_old_checkpoint_reproduces_its_outputs_bit_for_bit(activation):
    reference = load_file(str(FIXTURES / "reference_outputs.safetensors"))
    sae, meta = load_sae(FIXTURES / activation / "sae.safetensors")
    assert sae.spec.activation == activation and sae.cfg.name == activation
    with torch.no_grad():
        x_hat, z = sae.reconstruct(reference["x"])
    assert torch.equal(x_hat, reference[f"{activation}.x_hat"])
    assert torch.equal(z, reference[f"{activation}.z"])


def _relocated(source: Path, target: Path) -> None:
    """The same tensors with the saved model and text paths pointed at this machine's shared data (the files
    record absolute paths of the machine that trained them)."""
    with safe_open(str(source), framework="pt") as handle:
        meta = json.loads(handle.metadata()["saekit"])
    data = meta["train_config"]["data"]
    meta["train_config"]["model"]["name"] = str(DATA_ROOT / "stories260k")
    data["paths"] = [str(DATA_ROOT / "tinystories-text" / Path(p).name) for p in data["paths"]]
    data["eval_paths"] = [str(DATA_ROOT / "tinystories-text" / Path(p).name) for p in data["eval_paths"]]
    target.parent.mkdir(parents=True)
    save_file(load_file(str(source)), str(target), metadata={"saekit": json.dumps(meta)})


def test_old_checkpoints_evaluate_to_the_numbers_they_had(tmp_path):
    expected = json.loads((FIXTURES / "expected_metrics.json").read_text())
    for activation in VARIANTS:
        _relocated(FIXTURES / activation / "sae.safetensors", tmp_path / "runs" / activation / "sae.safetensors")
    out = tmp_path / "eval"
    result = run_cli("eval", f"ckpt={tmp_path / 'runs'}", *expected["eval_overrides"],
                     f"cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out / "results.csv")
    for activation, metrics in expected["metrics"].items():
        rows = table[table["run_id"] == activation].set_index("metric")["value"]
        for metric, value in metrics.items():
            assert rows[metric] == pytest.approx(value, rel=1e-5, abs=1e-9), (activation, metric)
