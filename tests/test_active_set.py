"""The active-set path of relu, jumprelu, gated and prolu (sae/active_set.py) against the dense reference.

Each SAE is set up with sparse codes (about 5% of entries active, so the path is taken), run on the same batch
through `loss_terms` with `sparse_training` on and off, and every loss term, `l0`, `fired` and every
parameter's gradient are compared, with the pre-activations collected in several chunks, with AuxK on a set of
dead latents (and with none dead, and off), with and without a learned scale, for both ReLU penalties, both
ProLU gradient modes, and as transcoders.
"""

from __future__ import annotations

import pytest
import torch

import saekit.sae.sparse as sparse
from saekit.sae import SAESpec, active_set, build_sae
from saekit.sae.sparse import DeadSet

D, N, B = 24, 192, 320
D_OUT = 20
ACTIVE_FRACTION = 0.05

VARIANTS = {
    "relu_l1": ("relu", {"penalty": "l1"}),
    "relu_sqrt_l1": ("relu", {"penalty": "sqrt_l1"}),
    "jumprelu": ("jumprelu", {"bandwidth": 0.2}),
    "gated": ("gated", {}),
    "prolu_relu": ("prolu", {"grad_mode": "relu"}),
    "prolu_ste_sqrt_l1": ("prolu", {"grad_mode": "ste", "penalty": "sqrt_l1"}),
}


def batch(seed=1):
    """Random activations with a nonzero mean; row 0 is b_pre's neighbourhood (set by `sparse_setup`)."""
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed)) + 0.5


def target(seed):
    """A transcoder's targets: another activation, D_OUT wide."""
    return torch.randn(B, D_OUT, generator=generator(seed + 100)) - 0.3


def generator(seed):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def sparse_setup(sae, x):
    """Biases chosen so that about ACTIVE_FRACTION of the batch's entries are active (the path's regime)."""
    m = (x - sae.b_pre) @ sae.W_enc.T
    cut = torch.quantile(m.flatten(), 1 - ACTIVE_FRACTION)
    noise = 0.2 * float(cut) * torch.randn(N, generator=generator(1))
    if sae.name == "jumprelu":
        sae.log_threshold.add_(0.3 * torch.randn(N, generator=generator(7)))
        sae.b_enc.copy_(sae.log_threshold.exp() - cut + noise)  # h − θ = m − cut + noise
    else:
        sae.b_enc.copy_(-cut + noise)
    if sae.name == "gated":  # the magnitude path differs from the gate's, and is closed on some open gates
        sae.r_mag.normal_(0, 0.3, generator=generator(5))
        sae.b_mag.copy_(-cut * (0.3 + torch.rand(N, generator=generator(6))))
    if sae.cfg.learned_scale:
        sae.latent_scale.uniform_(0.5, 1.5, generator=generator(2))


def make(name, learned_scale=False, dead_method="auxk", lam=0.3, **transcoder):
    activation, knobs = VARIANTS[name]
    spec = SAESpec.build(activation, d=D, n=N, lam=lam, dead_method=dead_method, k_aux=12,
                         learned_scale=learned_scale, **knobs, **transcoder)
    sae = build_sae(spec)
    sae.initialize(batch(seed=0), "geometric_median", tied=False, scale_encoder=True, generator=generator(0))
    with torch.no_grad():
        sae.b_pre.add_(0.1)  # off the init, so that b_pre's gradient is not special
        if sae.transcoder:
            sae.initialize_output(batch(seed=0), target(seed=0), "geometric_median", scale_encoder=True)
            if sae.spec.skip:
                sae.W_skip.normal_(0, 0.1, generator=generator(8))
    sparse_setup(sae, batch(seed=3))
    return sae.train()


def dead_latents(kind):
    mask = torch.zeros(N, dtype=torch.bool)
    if kind == "none_dead":
        return mask
    mask[torch.randperm(N, generator=generator(4))[:40]] = True
    if kind == "candidates":  # a DeadSet whose candidates are a strict superset of the dead latents
        return DeadSet(mask, torch.cat([mask.nonzero().squeeze(1), torch.arange(5)]).unique())
    return mask


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Collect 64 rows at a time, so a batch spans five chunks (the default is sized for large n)."""
    monkeypatch.setattr(sparse, "_CPU_CHUNK_ELEMENTS", 64 * N)


@pytest.fixture
def taken(monkeypatch):
    """Records, per sparse-path call, whether the active set was used (False: it handed over to the dense path)."""
    calls, real = [], active_set.begin

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(active_set, "begin", recording)
    return calls


def terms_and_grads(sae, x, dead, sparse_path, y=None):
    sae.sparse_training = sparse_path
    sae.zero_grad(set_to_none=True)
    terms = sae.loss_terms(x, dead) if y is None else sae.loss_terms(x, dead, y)
    terms["loss"].backward()
    grads = {name: param.grad.clone() for name, param in sae.named_parameters()}
    return terms, grads


def assert_same(sparse_result, dense_result):
    (sparse_terms, sparse_grads), (dense_terms, dense_grads) = sparse_result, dense_result
    assert list(sparse_terms) == list(dense_terms)
    for name, value in dense_terms.items():
        if name == "fired":
            assert torch.equal(sparse_terms[name], value)
        else:
            assert torch.allclose(sparse_terms[name], value, rtol=1e-5, atol=1e-6), (name, sparse_terms[name], value)
    assert set(sparse_grads) == set(dense_grads)
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name  # every parameter's gradient is exercised
        tolerance = 1e-5 * float(grad.abs().max())
        assert torch.allclose(sparse_grads[name], grad, rtol=1e-4, atol=tolerance), (name, sparse_grads[name] - grad)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("learned_scale", [False, True], ids=["plain", "learned_scale"])
@pytest.mark.parametrize("dead", ["dead", "candidates", "none_dead", "no_auxk"])
def test_active_set_path_matches_the_dense_reference(name, learned_scale, dead, taken):
    sae = make(name, learned_scale, dead_method="none" if dead == "no_auxk" else "auxk")
    x = batch(seed=3)
    with torch.no_grad():
        x[0] = sae.b_pre  # a token with no active latent at all (an empty row of the code)
    dead_arg = None if dead == "no_auxk" else dead_latents(dead)
    dense = terms_and_grads(sae, x, dead_arg, sparse_path=False)
    assert taken == []
    fast = terms_and_grads(sae, x, dead_arg, sparse_path=True)
    assert taken == [True]
    assert 0 < float(dense[0]["l0"]) < 2 * ACTIVE_FRACTION * N
    if dead in ("dead", "candidates"):
        assert float(dense[0]["auxk"].detach()) > 0  # the AuxK part was exercised
    assert_same(fast, dense)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip_transcoder"])
def test_transcoders_match_the_dense_reference(name, skip, taken):
    """A transcoder decodes to y's width with b_out (and W_skip x): the same path, measured against y."""
    sae = make(name, d_out=D_OUT, skip=skip)
    x, y = batch(seed=3), target(seed=3)
    dense = terms_and_grads(sae, x, dead_latents("dead"), sparse_path=False, y=y)
    fast = terms_and_grads(sae, x, dead_latents("dead"), sparse_path=True, y=y)
    assert taken == [True]
    assert float(dense[0]["auxk"].detach()) > 0
    assert_same(fast, dense)


def test_jumprelu_band_includes_inactive_entries_near_the_threshold(taken):
    """The threshold's pseudo-gradient uses ∂L/∂z of entries just below θ: the case is present, and the θ
    gradient still matches (a path that kept only active entries would miss those terms)."""
    sae = make("jumprelu", dead_method="none")
    x = batch(seed=3)
    with torch.no_grad():
        h = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
        theta, eps = sae.log_threshold.exp(), sae.cfg.bandwidth
    below_in_band = (h <= theta) & ((h - theta) / eps).abs().lt(0.5)
    assert int(below_in_band.sum()) > 50
    dense = terms_and_grads(sae, x, None, sparse_path=False)
    fast = terms_and_grads(sae, x, None, sparse_path=True)
    assert taken == [True]
    assert_same(fast, dense)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_dense_codes_take_the_dense_path(name, taken):
    """Above the crossover density the batch is handed to the dense path: the very same terms."""
    sae = make(name, dead_method="auxk")
    with torch.no_grad():
        sae.b_enc.fill_(5.0 if name.startswith("prolu") else 0.0)  # about half of all entries active
        if name == "jumprelu":
            sae.log_threshold.fill_(-5.0)
    x = batch(seed=3)
    dense = terms_and_grads(sae, x, dead_latents("dead"), sparse_path=False)
    fast = terms_and_grads(sae, x, dead_latents("dead"), sparse_path=True)
    assert taken == [False]
    assert float(dense[0]["l0"]) > active_set.MAX_DENSITY * N
    for key, value in dense[0].items():
        assert torch.equal(fast[0][key], value), key


def test_collect_entries_keeps_exactly_the_entries_above_the_floor():
    gen = generator(0)
    x, W = torch.randn(300, 16, generator=gen), torch.randn(40, 16, generator=gen)
    floor = torch.rand(40, generator=gen) + 1.5
    code, aux = active_set.collect_entries(x, W, floor, max_density=1.0, chunk=64)
    expected = x @ W.T > floor
    rebuilt = torch.zeros(300, 40, dtype=torch.bool)
    rebuilt[code.rows, code.latents] = True
    assert aux is None and torch.equal(rebuilt, expected)
    assert torch.equal(code.rows, code.rows.sort().values)  # row-major, as embedding_bag's offsets need
    assert torch.allclose(code.values, (x @ W.T)[code.rows, code.latents])
    assert active_set.collect_entries(x, W, floor, max_density=0.5 * float(expected.float().mean())) is None
