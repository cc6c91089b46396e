"""Downstream metrics, ablation sparsity and refinement: property tests that catch the bugs peers have shipped."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import MODEL_DIR, TRAIN_JSON
from saekit.config import ModelConfig
from saekit.downstream import (ablation_sparsity, ablation_sparsity_score, downstream_metrics, kl_divergence,
                               latent_contributions, loss_recovered)
from saekit.model import load_model
from saekit.refine import refine_codes, refinement_metrics
from saekit.sae import SAESpec, build_sae

HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return load_model(ModelConfig(name=str(MODEL_DIR)), torch.device("cpu"))


@pytest.fixture(scope="module")
def windows(model):
    """Eight 32-token windows of real TinyStories text, each starting with BOS."""
    text = " ".join(json.loads(TRAIN_JSON.read_text())[:20])
    ids = model.tokenizer(text)["input_ids"]
    ids = [i for i in ids if i != model.bos_token_id]
    rows = [[model.bos_token_id] + ids[i * 31:(i + 1) * 31] for i in range(8)]
    return torch.tensor(rows)


def random_sae(d=64, n=256, k=8, normalize="scale", activation="topk"):
    sae = build_sae(SAESpec.build(activation, d=d, n=n, k=k, normalize=normalize, lam=1.0))
    sample = torch.randn(256, d, generator=torch.Generator().manual_seed(0))
    sae.initialize(sample, "zero", tied=True, scale_encoder=True, generator=torch.Generator().manual_seed(0))
    sae.input_scale.fill_(0.5)
    return sae.eval()


def test_splicing_the_exact_activations_back_changes_nothing(model, windows):
    mean = model.run_to_hook(windows, HOOK)[:, 1:].mean(dim=(0, 1))
    metrics = downstream_metrics(model, HOOK, windows, lambda acts: acts.clone(), mean, batch_windows=4)
    assert abs(metrics["delta_ce"]) < 1e-6 and abs(metrics["kl"]) < 1e-9
    assert metrics["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    # SAEBench's scores against zero ablation: a perfect splice scores 1 on both.
    assert metrics["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert 1.0 < metrics["ce_clean"] < 3.0  # stories260k is a real model: about 1.7-2 nats/token here
    assert metrics["ce_zero"] > metrics["ce_mean"] > metrics["ce_clean"]


def test_a_splice_as_bad_as_zero_ablation_recovers_nothing(model, windows):
    metrics = downstream_metrics(model, HOOK, windows, torch.zeros_like, torch.zeros(64), batch_windows=8)
    assert metrics["loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["ce_spliced"] == pytest.approx(metrics["ce_zero"], abs=1e-9)
    assert metrics["kl_div_score"] == pytest.approx(0.0, abs=1e-9) and metrics["ce_loss_score"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["kl"] > 0.1  # zero ablation moves the distribution, so the score's denominator is real


def test_a_reconstruction_costs_loss_and_bos_scoring_changes_the_count(model, windows):
    sae = random_sae()
    splice = lambda acts: sae.reconstruct(acts)[0]  # noqa: E731
    without = downstream_metrics(model, HOOK, windows, splice, torch.zeros(64), score_bos=False)
    with_bos = downstream_metrics(model, HOOK, windows, splice, torch.zeros(64), score_bos=True)
    assert without["delta_ce"] > 0 and without["kl"] > 0 and without["loss_recovered"] < 1
    assert without["ce_clean"] != with_bos["ce_clean"]


def test_kl_is_clean_relative_to_spliced_on_a_hand_made_pair():
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.9, 0.1], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(p || q) = 0.511
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(q || p) = 0.368
    assert float(kl_divergence(p.log(), q.log())) == pytest.approx(expected, rel=1e-9)
    assert float(kl_divergence(p.log() + 3.0, q.log() - 1.0)) == pytest.approx(expected, rel=1e-9)  # logits
    assert abs(expected - reverse) > 0.1


def test_loss_recovered_formula():
    assert loss_recovered(2.0, 2.0, 6.0) == 1.0
    assert loss_recovered(2.0, 6.0, 6.0) == 0.0
    assert loss_recovered(2.0, 3.0, 6.0) == 0.75


def test_ablation_sparsity_score_of_one_logit_is_one_and_constant_shifts_are_free():
    diff = torch.zeros(16, 512)
    diff[3, 17] = 2.5
    assert ablation_sparsity_score(diff) == pytest.approx(1.0)
    shifted = diff + torch.arange(16.0)[:, None]  # a different constant at each position: no probability changes
    assert ablation_sparsity_score(shifted) == pytest.approx(1.0)
    spread = torch.zeros(16, 512)
    spread[0, :4] = 1.0
    spread[5, 10:14] = -1.0
    assert ablation_sparsity_score(spread) == pytest.approx(8.0)  # 8 equal entries: (8/sqrt 8)^2


def test_latent_contributions_keep_the_reconstruction_error(model, windows):
    sae = random_sae()
    x = torch.randn(64) * 3
    active, contributions = latent_contributions(sae, x)
    assert active.numel() == 8
    full, _ = sae.reconstruct(x[None])
    # Removing every active latent's contribution leaves the decoder bias's reconstruction.
    empty = sae.denormalize_output(sae.decode(torch.zeros(1, 256)), None)
    assert torch.allclose(full[0] - contributions.sum(0), empty[0], atol=1e-5)


def test_ablation_sparsity_on_the_real_model(model, windows):
    result = ablation_sparsity(model, HOOK, random_sae(), windows, n_positions=3, horizon=8, seed=0)
    assert result["ablation_n"] == 24  # 3 positions × k = 8 active latents
    assert 1.0 <= result["ablation_sparsity_q10"] <= result["ablation_sparsity"] <= 512 * 8


def _planted(shrink: float):
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(64, 16, generator=generator)
    W = W / W.norm(dim=1, keepdim=True)
    b = torch.randn(16, generator=generator)
    z = torch.zeros(32, 64)
    support = torch.stack([torch.randperm(64, generator=generator)[:4] for _ in range(32)])
    z.scatter_(1, support, torch.rand(32, 4, generator=generator) + 0.5)
    return W, b, z @ W + b, z, z * shrink


def test_refinement_leaves_an_optimal_code_unchanged():
    W, b, x, z, _ = _planted(1.0)
    refined = refine_codes(W, b, x, z)
    assert torch.allclose(refined, z, atol=1e-5)
    assert torch.equal(refined != 0, z != 0)


def test_refinement_raises_a_code_shrunk_on_purpose():
    W, b, x, z, shrunk = _planted(0.5)
    refined = refine_codes(W, b, x, shrunk)
    assert torch.allclose(refined, z, atol=1e-4)  # back to the planted values: ratio 2
    assert float(refined[z != 0].sum() / shrunk[z != 0].sum()) == pytest.approx(2.0, rel=1e-4)
    assert (refined[z == 0] == 0).all()  # the support is fixed


def test_refinement_metrics_ratio_and_gain():
    sae = random_sae(normalize="none", activation="relu")
    metrics = refinement_metrics(sae, torch.randn(256, 64) * 2)
    assert metrics["refine_mse_gain"] >= 0  # never worse than the original code
    assert math.isfinite(metrics["refine_ratio"])
