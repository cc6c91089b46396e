"""The SAE family beyond TopK/ReLU: synthetic gradients checked against independent computations, loss
decompositions, weight sharing, BatchTopK's threshold, resampling, test-time swaps and checkpoint round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saekit.checkpoint import load_sae, save_sae
from saekit.dead import resample_dead_latents
from saekit.sae import REGISTRY, SAESpec, build_sae, swap_activation
from saekit.sae.jumprelu import jumprelu, step
from saekit.sae.prolu import prolu

D, N = 16, 64


def sample(rows=512, seed=1):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed)) * 2 + 1.0


def make(activation, **spec):
    spec = {"k": 4, "lam": 0.3, **spec}
    sae = build_sae(SAESpec.build(activation, d=D, n=N, **spec))
    sae.initialize(sample(), "geometric_median", tied=True, scale_encoder=True, generator=torch.Generator().manual_seed(0))
    return sae


def train_steps(sae, steps=5, lr=1e-2, dead_mask=None):
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    for i in range(steps):
        optimizer.zero_grad()
        sae.loss_terms(sample(256, seed=10 + i), dead_mask)["loss"].backward()
        sae.project_decoder_grad_()
        optimizer.step()
        sae.normalize_decoder_()
    return optimizer


# ---- synthetic gradients ------------------------------------------------------------------------------
def _prolu_inputs():
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(64, 32, generator=generator, dtype=torch.float64)
    b = torch.randn(32, generator=generator, dtype=torch.float64)
    upstream = torch.randn(64, 32, generator=generator, dtype=torch.float64)
    return m, b, upstream


@pytest.mark.parametrize("grad_mode", ["relu", "ste"])
def test_prolu_synthetic_gradients_match_the_formulas(grad_mode):
    m, b, upstream = _prolu_inputs()
    m1, b1 = m.clone().requires_grad_(), b.clone().requires_grad_()
    z = prolu(m1, b1, grad_mode)
    (z * upstream).sum().backward()

    gate = ((m > 0) & (m + b > 0)).double()
    assert torch.equal(z.detach(), m * gate)  # the bias gates without shifting
    # Independent computations through ordinary autograd: for m, the gate is a constant; for b, `relu` is the
    # gradient of ReLU(m + b) on the gate, `ste` that of m·(m + b) (the step's derivative taken as 1) on the gate.
    m2, b2 = m.clone().requires_grad_(), b.clone().requires_grad_()
    (upstream * m2 * gate).sum().backward()
    if grad_mode == "relu":
        (upstream * F.relu(m + b2) * (m > 0)).sum().backward()
    else:
        (upstream * m * (m + b2) * gate).sum().backward()
    assert torch.allclose(m1.grad, m2.grad) and torch.allclose(b1.grad, b2.grad)
    assert b1.grad.abs().sum() > 0


def test_prolu_bias_gradient_modes_differ_by_the_factor_m():
    m, b, upstream = _prolu_inputs()
    grads = {}
    for mode in ("relu", "ste"):
        bias = b.clone().requires_grad_()
        (prolu(m, bias, mode) * upstream).sum().backward()
        grads[mode] = bias.grad
    gate = ((m > 0) & (m + b > 0)).double()
    assert torch.allclose(grads["relu"], (upstream * gate).sum(0))
    assert torch.allclose(grads["ste"], (upstream * gate * m).sum(0))


def test_jumprelu_pseudo_gradients_match_the_rectangle_kernel_formulas():
    eps = 0.3
    generator = torch.Generator().manual_seed(0)
    h = torch.rand(200, 8, generator=generator, dtype=torch.float64) * 2 - 0.5
    theta = torch.rand(8, generator=generator, dtype=torch.float64) * 0.8 + 0.1
    upstream = torch.randn(200, 8, generator=generator, dtype=torch.float64)
    h1, t1 = h.clone().requires_grad_(), theta.clone().requires_grad_()
    (jumprelu(h1, t1, eps) * upstream).sum().backward()
    h2, t2 = h.clone().requires_grad_(), theta.clone().requires_grad_()
    (step(h2, t2, eps) * upstream).sum().backward()

    # Written out element by element (SPEC 2; Rajamanoharan et al. 2024, eqs. 11-12), independent of the code.
    expected_h, expected_t_jump, expected_t_step = torch.zeros_like(h), torch.zeros(8, dtype=h.dtype), torch.zeros(8, dtype=h.dtype)
    for row in range(h.shape[0]):
        for col in range(h.shape[1]):
            x, t, g = float(h[row, col]), float(theta[col]), float(upstream[row, col])
            inside = abs((x - t) / eps) < 0.5
            expected_h[row, col] = g if x > t else 0.0
            expected_t_jump[col] += -(t / eps) * g if inside else 0.0
            expected_t_step[col] += -(1 / eps) * g if inside else 0.0
    assert torch.allclose(h1.grad, expected_h) and torch.allclose(t1.grad, expected_t_jump)
    assert torch.equal(h2.grad, torch.zeros_like(h)) and torch.allclose(t2.grad, expected_t_step)
    assert expected_t_step.abs().sum() > 0  # some pre-activations fell inside the kernel


def test_jumprelu_loss_is_mse_plus_lambda_l0_and_trains_log_threshold():
    sae = make("jumprelu", lam=0.7)
    x = sample(128, seed=5)
    terms = sae.loss_terms(x)
    h = sae.pre_acts(x)
    theta = sae.log_threshold.exp()
    z = h * (h > theta)
    assert torch.allclose(terms["sparsity"], 0.7 * (h > theta).double().sum(1).mean().float())
    assert torch.allclose(terms["mse"], (x - (z @ sae.W_dec + sae.b_pre)).pow(2).sum(1).mean())
    terms["loss"].backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0


@pytest.mark.parametrize("activation", ["topk", "multi_topk", "batchtopk"])
def test_topk_family_passes_gradient_only_through_kept_entries(activation):
    sae = make(activation)
    h = sae.pre_acts(sample(32)).detach().requires_grad_()
    z = sae.activate(h)
    (z * torch.randn_like(z)).sum().backward()
    assert torch.equal(h.grad != 0, z.detach() != 0)


def test_multi_topk_loss_is_its_two_terms():
    sae = make("multi_topk", k=3, dead_method="none")
    x = sample(64, seed=3)
    h = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc

    def mse_topk(j):
        values, indices = h.topk(j, dim=1)
        z = torch.zeros_like(h).scatter(1, indices, F.relu(values))
        return (x - (z @ sae.W_dec + sae.b_pre)).pow(2).sum(1).mean()

    terms = sae.loss_terms(x)
    assert torch.allclose(terms["mse"], mse_topk(3))
    assert torch.allclose(terms["multi_topk"], mse_topk(12) / 8)
    assert torch.allclose(terms["loss"], mse_topk(3) + mse_topk(12) / 8)


def test_gated_weight_sharing_holds_after_training_and_frozen_term_spares_the_decoder():
    sae = make("gated", lam=0.3, dead_method="none")
    train_steps(sae, steps=10)
    assert {name for name, _ in sae.named_parameters()} == {"W_enc", "b_enc", "W_dec", "b_pre", "r_mag", "b_mag"}
    assert sae.r_mag.abs().max() > 0  # training moved the magnitude scales: the sharing is not trivial
    x = sample(64, seed=7)
    centered = x - sae.b_pre
    W_mag = torch.exp(sae.r_mag)[:, None] * sae.W_enc
    expected = (centered @ sae.W_enc.T + sae.b_enc > 0) * F.relu(centered @ W_mag.T + sae.b_mag)
    assert torch.allclose(sae.encode(x), expected)
    # The auxiliary term trains the gate only: no gradient reaches the decoder or b_pre through it.
    sae.zero_grad()
    sae.loss_terms(x)["gate_aux"].backward()
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().sum() == 0
    assert sae.W_enc.grad.abs().sum() > 0


# ---- BatchTopK ------------------------------------------------------------------------------------------
def test_batchtopk_keeps_k_per_token_on_average_and_learns_its_threshold():
    sae = make("batchtopk", k=4)
    x = sample(256, seed=2)
    terms = sae.loss_terms(x)
    assert float(terms["l0"]) == pytest.approx(4.0)  # k·B kept over the batch
    per_token = (sae.encode_for_training(x).z != 0).sum(1)
    assert per_token.min() != per_token.max()  # ... unevenly across tokens
    assert float(sae.threshold) > 0 and int(sae.threshold_updates) == 2
    sae.eval()
    h = sae.pre_acts(x)
    assert torch.equal(sae.encode(x), h * (h > sae.threshold))  # inference: the threshold, not the batch


# ---- resampling ---------------------------------------------------------------------------------------------
def test_resampled_latents_fire_again_and_their_adam_moments_are_reset():
    sae = make("relu", lam=0.1)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[:12] = True
    with torch.no_grad():
        sae.b_enc[dead] = -1e3  # these latents cannot fire
    optimizer = train_steps(sae, steps=3)
    x = sample(1024, seed=9)
    assert (sae.encode(x)[:, dead] == 0).all()
    before = {name: {key: optimizer.state[p][key].clone() for key in ("exp_avg", "exp_avg_sq")}
              for name, p in sae.named_parameters()}
    revived = resample_dead_latents(sae, optimizer, dead, x, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(revived, dead.nonzero().flatten())
    assert (sae.encode(x)[:, dead] != 0).any(dim=0).all()  # every resampled latent fires again
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(N))
    for name in ("W_enc", "b_enc", "W_dec"):
        state = optimizer.state[dict(sae.named_parameters())[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert (state[key][dead] == 0).all(), (name, key)
            assert torch.equal(state[key][~dead], before[name][key][~dead])  # alive latents untouched


# ---- test-time activation swap ----------------------------------------------------------------------------
@pytest.mark.parametrize("activation", sorted(REGISTRY))
def test_test_time_swap_changes_only_the_activation(activation):
    sae = make(activation)
    train_steps(sae, steps=2)
    sae.eval()
    weights = {name: p.detach().clone() for name, p in sae.named_parameters()}
    x = sample(128, seed=4)
    z3 = swap_activation(sae, "topk", 3).encode(x)
    assert ((z3 != 0).sum(1) <= 3).all() and (z3 != 0).sum(1).max() == 3
    l0 = [float((swap_activation(sae, "jumprelu", theta).encode(x) != 0).sum(1).float().mean())
          for theta in (0.0, 0.5, 1.0, 2.0)]
    assert l0 == sorted(l0, reverse=True) and l0[0] > l0[-1]
    x_hat, _ = swap_activation(sae, "topk", N).reconstruct(x)
    assert x_hat.shape == x.shape
    for name, p in sae.named_parameters():
        assert torch.equal(p, weights[name])


def test_swap_rejects_bad_values():
    sae = make("topk")
    with pytest.raises(Exception, match="k_prime"):
        swap_activation(sae, "topk", N + 1)
    with pytest.raises(Exception, match="not supported"):
        swap_activation(sae, "relu", 1)


# ---- round trips ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", sorted(REGISTRY))
@pytest.mark.parametrize("normalize", ["none", "scale", "layer_norm"])
def test_every_architecture_round_trips_bit_for_bit(tmp_path, activation, normalize):
    sae = make(activation, normalize=normalize, learned_scale=activation == "topk", dead_method="auxk")
    with torch.no_grad():
        sae.input_scale.fill_(0.37)
    train_steps(sae, steps=3)
    sae.eval()
    x = sample(100, seed=8) * 3
    before, z_before = sae.reconstruct(x)
    save_sae(tmp_path / "sae.safetensors", sae, {})
    loaded, meta = load_sae(tmp_path / "sae.safetensors")
    after, z_after = loaded.reconstruct(x)
    assert not loaded.training
    assert torch.equal(before, after) and torch.equal(z_before, z_after)
    assert meta["spec"]["activation"] == activation
