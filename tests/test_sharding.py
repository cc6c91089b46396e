"""Latent sharding (issue 14): a TopK SAE's latents split over 2 gloo ranks trains like one process."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from test_distributed import nmse, settings, torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_text):
    run_dir = tmp_path_factory.mktemp("single-shard") / "run"
    cache = tmp_path_factory.mktemp("shard-cache")
    result = run_cli("train", *settings(small_text, cache), f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, cache


def codes(sae_path, rows: torch.Tensor) -> torch.Tensor:
    """The latents a checkpoint picks for each row: (rows, k) indices, sorted."""
    from saekit.checkpoint import load_sae

    sae = load_sae(sae_path)[0].eval()
    with torch.no_grad():
        _, z = sae(sae.normalize_input(rows)[0])
    return z.topk(sae.spec.k, dim=1).indices.sort(dim=1).values


@pytest.mark.parametrize("grid", ["shards=2", "shards=2 x data=2"])
def test_two_shards_train_the_same_topk_sae_as_one_process(tmp_path, small_text, one_process, grid):
    single, cache = one_process
    ranks = 2 if grid == "shards=2" else 4
    run_dir = tmp_path / "sharded"
    result = torchrun("train", *settings(small_text, cache), "shard_latents=2", f"hydra.run.dir={run_dir}",
                      ranks=ranks)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "this rank holds latents 0..511" in result.stdout
    one, sharded = load_file(single / "sae.safetensors"), load_file(run_dir / "sae.safetensors")
    assert one.keys() == sharded.keys() and one["W_enc"].shape == sharded["W_enc"].shape  # a whole, ordinary SAE
    # 50 Adam steps with sums in another order: a pre-activation that sits within float noise of the k-th largest
    # can pick another latent in one process than in the other, and that latent's rows then drift a little.
    # Measured on this data: most rows agree to 1e-7; the largest difference was 4e-4 (W_dec).
    for name in one:
        difference = (one[name] - sharded[name]).abs()
        assert difference.max().item() < 2e-3 and difference.mean().item() < 2e-5, (name, difference.max())
    rows = torch.randn(512, one["W_enc"].shape[1]) * 3 + one["b_pre"]
    picks_one, picks_sharded = codes(single / "sae.safetensors", rows), codes(run_dir / "sae.safetensors", rows)
    assert (picks_one == picks_sharded).all(dim=1).float().mean() > 0.98  # the same latents for (nearly) every row
    assert nmse(run_dir) == pytest.approx(nmse(single), abs=1e-4)
    steps_one, steps_sharded = pd.read_csv(single / "steps.csv"), pd.read_csv(run_dir / "steps.csv")
    assert steps_sharded["loss"].tolist() == pytest.approx(steps_one["loss"].tolist(), rel=1e-4)
    assert steps_sharded["dead_frac"].tolist() == steps_one["dead_frac"].tolist()
    assert (steps_one["auxk_loss"] > 0).any()  # AuxK was on and had dead latents


def test_a_sharded_checkpoint_is_an_ordinary_sae_that_evaluates_in_one_process(tmp_path, small_text, one_process):
    _, cache = one_process
    run_dir = tmp_path / "sharded"
    first = torchrun("train", *settings(small_text, cache), "shard_latents=2", "n_tokens=12800",
                     f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    evaluated = run_cli("eval", f"ckpt={run_dir}", f"cache.dir={cache}", "downstream=false", "ablation_positions=0",
                        f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    table = pd.read_csv(tmp_path / "eval" / "results.csv")
    assert float(table.loc[table["metric"] == "nmse", "value"].iloc[0]) == pytest.approx(nmse(run_dir), abs=1e-5)


def test_what_sharding_does_not_cover_is_one_line(tmp_path, small_text, one_process):
    _, cache = one_process
    for extra, words in ((["activation=relu"], "supports activation=topk"),
                         (["n=1001"], "n=1001 latents do not split over shard_latents=2")):
        result = torchrun("train", *settings(small_text, cache), "shard_latents=2", *extra,
                          f"hydra.run.dir={tmp_path / 'x'}")
        ours = [line for line in result.stderr.splitlines() if line.startswith("saekit: error:")]
        assert result.returncode != 0 and ours and words in ours[0], result.stderr[-2000:]
    alone = run_cli("train", *settings(small_text, cache), "shard_latents=2", f"hydra.run.dir={tmp_path / 'y'}")
    assert alone.returncode == 2 and "shard_latents=2 needs 2 ranks" in alone.stderr


def test_the_readmes_memory_formula_for_a_million_latents():
    from saekit.sharding import memory_per_rank_bytes

    # 4 copies (weights, gradients, two Adam moments) x 4 bytes x (2 * 131072 * 768 + 131072 + 768) values
    assert memory_per_rank_bytes(2**20, 768, 8) == 3_223_334_912
    assert memory_per_rank_bytes(2**20, 768, 1) == 25_786_593_280
