"""SAE geometry: TopK sparsity, decoder norms and gradient projection, geometric median, AuxK, round trips."""

from __future__ import annotations

import math

import pytest
import torch

from saekit.checkpoint import load_sae, save_sae
from saekit.sae import SAESpec, build_sae, geometric_median
from saekit.sae.relu import l1_penalty
from saekit.sae.topk import topk_activation


def make_sae(activation="topk", d=16, n=64, k=4, **kw):
    sae = build_sae(SAESpec.build(activation, d=d, n=n, k=k, **kw))
    sample = torch.randn(512, d, generator=torch.Generator().manual_seed(1)) + 3.0
    sae.initialize(sample, "geometric_median", tied=True, scale_encoder=True, generator=torch.Generator().manual_seed(0))
    return sae


@pytest.mark.parametrize("on", ["preact", "relu"])
def test_topk_keeps_exactly_k_largest(on):
    h = torch.randn(256, 100, generator=torch.Generator().manual_seed(0)) + 2.0  # nearly all positive
    z = topk_activation(h, 7, on)
    assert ((z != 0).sum(dim=1) == 7).all()
    kept_min = torch.where(z != 0, h, torch.full_like(h, float("inf"))).min(dim=1).values
    dropped_max = torch.where(z == 0, h, torch.full_like(h, float("-inf"))).max(dim=1).values
    assert (kept_min >= dropped_max).all()
    assert torch.equal(z[z != 0], h[z != 0])  # kept values are unchanged (positive here)


def test_topk_never_exceeds_k_and_clamps_negative():
    h = -torch.rand(8, 20)
    h[:, 0] = 1.0
    z = topk_activation(h, 5, "preact")
    assert ((z != 0).sum(dim=1) == 1).all()  # negative winners are ReLU'd to zero
    assert (z >= 0).all()


def test_topk_gradient_flows_only_through_kept_entries():
    h = torch.randn(4, 30, requires_grad=True)
    z = topk_activation(h, 3, "preact")
    z.sum().backward()
    kept = z.detach() > 0
    assert torch.equal(h.grad != 0, kept)


def test_decoder_rows_unit_norm_after_steps_and_gradient_projection_orthogonal():
    sae = make_sae(n=64)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(128, 16) * 4
    for _ in range(5):
        optimizer.zero_grad()
        sae.loss_terms(x)["loss"].backward()
        raw = sae.W_dec.grad.clone()
        sae.project_decoder_grad_()
        unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
        assert (sae.W_dec.grad * unit).sum(dim=1).abs().max() < 1e-5  # no component along each row
        assert not torch.allclose(raw, sae.W_dec.grad)  # the projection did remove something
        optimizer.step()
        sae.normalize_decoder_()
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


def test_geometric_median_symmetric_points_is_center():
    center = torch.tensor([1.0, -2.0, 0.5])
    offsets = torch.cat([torch.eye(3), -torch.eye(3)]) * torch.tensor([1.0, 5.0, 0.3])
    assert torch.allclose(geometric_median(center + offsets), center, atol=1e-4)


def test_geometric_median_1d_is_the_median_not_the_mean():
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0], [100.0]])
    assert abs(float(geometric_median(points)) - 2.0) < 1e-3  # the mean would be 22.6


def test_geometric_median_fermat_point_of_triangle():
    # For a triangle with all angles < 120°, the median is the Fermat point: each side seen at 120°.
    a, b, c = torch.tensor([0.0, 0.0]), torch.tensor([4.0, 0.0]), torch.tensor([1.0, 3.0])
    m = geometric_median(torch.stack([a, b, c]), max_iter=1000, tol=1e-10)
    units = [(p - m) / (p - m).norm() for p in (a, b, c)]
    for u, v in ((units[0], units[1]), (units[1], units[2]), (units[0], units[2])):
        assert abs(float(u @ v) - math.cos(2 * math.pi / 3)) < 1e-3


def test_auxk_is_exactly_zero_when_nothing_is_dead():
    sae = make_sae(dead_method="auxk")
    x = torch.randn(64, 16)
    assert float(sae.loss_terms(x, torch.zeros(64, dtype=torch.bool))["auxk"]) == 0.0
    assert float(sae.loss_terms(x, None)["auxk"]) == 0.0


def test_auxk_with_dead_latents_is_positive_and_moves_their_decoder_rows():
    sae = make_sae(dead_method="auxk", n=64, k=4)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:20] = True
    x = torch.randn(256, 16) * 3
    terms = sae.loss_terms(x, dead)
    assert float(terms["auxk"].detach()) > 0
    terms["auxk"].backward()
    assert sae.W_dec.grad[:20].abs().sum(dim=1).gt(0).any()  # dead rows get a signal from AuxK alone
    assert sae.W_dec.grad[20:].abs().sum() == 0  # AuxK touches only dead latents


def test_relu_l1_penalty_matches_formula():
    sae = make_sae("relu", lam=0.5)
    x = torch.randn(32, 16)
    terms = sae.loss_terms(x)
    z = sae.encode(x)
    expected = 0.5 * (z * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
    assert torch.allclose(terms["sparsity"], expected)
    assert torch.allclose(l1_penalty(z, sae.W_dec), (z * sae.W_dec.norm(dim=1)).sum(1).mean())


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_tied_init_and_unit_decoder(activation):
    sae = make_sae(activation, n=32)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)
    scale = sae.W_enc.norm() / sae.W_dec.norm()
    assert torch.allclose(sae.W_enc, scale * sae.W_dec, atol=1e-6)  # encoder = decoder^T up to the init scale


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_encoder_scale_matches_reconstruction_norms(activation):
    sae = make_sae(activation, d=16, n=64, k=8)
    sample = torch.randn(512, 16, generator=torch.Generator().manual_seed(1)) + 3.0
    x_hat = sae.decode(sae.encode(sample)).detach()
    ratio = ((x_hat - sae.b_pre).norm(dim=1).mean() / (sample - sae.b_pre).norm(dim=1).mean()).detach()
    assert abs(float(ratio) - 1.0) < 1e-4


@pytest.mark.parametrize("activation", ["topk", "relu"])
@pytest.mark.parametrize("normalize", ["none", "scale", "layer_norm"])
def test_save_load_round_trip_is_bit_exact(tmp_path, activation, normalize):
    sae = make_sae(activation, normalize=normalize, lam=0.1)
    sae.input_scale.fill_(0.37)
    x = torch.randn(100, 16) * 5 + 1
    before, _ = sae.reconstruct(x)
    save_sae(tmp_path / "sae.safetensors", sae, {"note": "test"})
    loaded, meta = load_sae(tmp_path / "sae.safetensors")
    after, _ = loaded.reconstruct(x)
    assert torch.equal(before, after)
    assert meta["note"] == "test" and meta["spec"]["normalize"] == normalize


def test_scale_normalization_is_undone_in_reconstruct():
    sae = make_sae("topk", normalize="scale", k=16, n=64)
    sae.input_scale.fill_(0.25)
    x = torch.randn(10, 16)
    x_hat_raw, _ = sae.reconstruct(x)
    x_hat_norm, _ = sae(x * 0.25)
    assert torch.allclose(x_hat_raw, x_hat_norm / 0.25)
