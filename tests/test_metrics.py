"""Core metrics: definitions checked on cases with known answers, and streaming == whole-set."""

from __future__ import annotations

import pytest
import torch

from saekit.metrics import ReconstructionStats, dead_frac, explained_variance, l0, mse, nmse


def test_mean_predictor_explains_nothing():
    x = torch.randn(1000, 8, dtype=torch.float64) * torch.arange(1, 9) + 5
    x_hat = x.mean(dim=0, keepdim=True).expand_as(x)
    assert abs(explained_variance(x, x_hat)) < 1e-9
    assert abs(nmse(x, x_hat) - 1.0) < 1e-9


def test_perfect_reconstruction_and_known_mse():
    x = torch.randn(50, 4, dtype=torch.float64)
    assert mse(x, x) == 0 and nmse(x, x) == 0 and explained_variance(x, x) == 1
    assert abs(mse(x, x + torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)) - 5.0) < 1e-9  # ||(1,2,0,0)||² = 5 per token


def test_l0_and_dead_fraction():
    z = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    assert l0(z) == 1.5
    assert dead_frac((z != 0).sum(dim=0)) == 0.5  # latents 0 and 3 never fire


def test_streaming_stats_equal_whole_set_metrics():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(999, 6, generator=generator, dtype=torch.float64) * 3 + 1
    x_hat = x + 0.3 * torch.randn(999, 6, generator=generator, dtype=torch.float64)
    z = torch.relu(torch.randn(999, 10, generator=generator) - 1)
    stats = ReconstructionStats(6, 10)
    for start in range(0, 999, 128):
        stats.update(x[start:start + 128], x_hat[start:start + 128], z[start:start + 128])
    got = stats.metrics()
    assert abs(got["mse"] - mse(x, x_hat)) < 1e-9
    assert abs(got["nmse"] - nmse(x, x_hat)) < 1e-9
    assert abs(got["l0"] - l0(z)) < 1e-9
    assert got["dead_frac"] == dead_frac((z != 0).sum(dim=0))


# ---- SAEBench's core metrics (sae_bench/evals/core/main.py), on hand-computed examples ---------------------------
def test_saebench_reconstruction_metrics_on_a_hand_example():
    from saekit.metrics import ReconstructionStats

    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    x_hat = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.5]])
    stats = ReconstructionStats(2, 3)
    stats.update(x[:1], x_hat[:1], z[:1])   # two batches: the totals must not depend on the split
    stats.update(x[1:], x_hat[1:], z[1:])
    metrics = stats.metrics()
    assert metrics["cossim"] == pytest.approx((9 / 15 + 2 / 2) / 2)            # per-token cosines 0.6 and 1
    assert metrics["l2_ratio"] == pytest.approx((3 / 5 + 1 / 2) / 2)           # ‖x̂‖/‖x‖ per token
    assert metrics["relative_reconstruction_bias"] == pytest.approx((9 + 1) / (9 + 2))  # mean ‖x̂‖² / mean x·x̂
    assert metrics["l1"] == pytest.approx((3 + 0.5) / 2)
    assert metrics["frac_alive"] == pytest.approx(2 / 3)
    assert metrics["frac_alive"] == pytest.approx(1 - metrics["dead_frac"])


def test_l2_ratio_treats_a_near_zero_input_norm_as_one():
    from saekit.metrics import ReconstructionStats

    stats = ReconstructionStats(2, 1)
    stats.update(torch.tensor([[0.0, 1e-5]]), torch.tensor([[0.0, 0.5]]), torch.ones(1, 1))
    assert stats.metrics()["l2_ratio"] == pytest.approx(0.5)


def test_decoder_cosine_metrics_in_row_chunks():
    from saekit.metrics import decoder_cosine_metrics

    W_dec = torch.tensor([[2.0, 0.0], [0.6, 0.8], [0.0, 3.0]])  # pairwise cosines 0.6, 0.0, 0.8
    for chunk in (1, 2, 3):
        metrics = decoder_cosine_metrics(W_dec, rows_per_chunk=chunk)
        assert metrics["max_pairwise_decoder_cosine_sim"] == pytest.approx(0.8)
        assert metrics["average_max_decoder_cosine_sim"] == pytest.approx((0.6 + 0.8 + 0.8) / 3)
