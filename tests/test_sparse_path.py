"""The TopK family's sparse training path against the dense reference: same loss terms, same gradients.

Every architecture with a sparse path is run both ways on the same random inputs, with the pre-activations
ranked in several chunks, with AuxK on a set of dead latents and with a learned scale, and every parameter's
gradient is compared to float tolerance.
"""

from __future__ import annotations

import pytest
import torch

import saekit.sae.sparse as sparse
from saekit.sae import REGISTRY, SAESpec, build_sae
from saekit.sae.registry import config_fields
from saekit.sae.sparse import SparseCode, batch_top_entries, rank_preacts, scatter_to_latents

D, N, B = 24, 192, 320
SPARSE_ARCHITECTURES = sorted(name for name, cls in REGISTRY.items() if cls.has_sparse_path)


def batch(seed=1, heavy_rows=0):
    """Random activations with a nonzero mean; `heavy_rows` tokens scaled up so they want many latents."""
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed)) + 0.5
    x[:heavy_rows] *= 6.0
    return x


def make(activation, **spec):
    spec = {"k": 6, "dead_method": "auxk", "k_aux": 12, **spec}
    sae = build_sae(SAESpec.build(activation, d=D, n=N, **spec))
    sae.initialize(batch(seed=0), "geometric_median", tied=False, scale_encoder=True,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # move off the init so that b_enc, b_pre and the scale all matter
        sae.b_enc.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        sae.b_pre.add_(0.1)
        if spec.get("learned_scale"):
            sae.latent_scale.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    return sae.train()


def terms_and_grads(sae, x, dead_mask, sparse_path):
    sae.sparse_training = sparse_path
    sae.zero_grad(set_to_none=True)
    terms = sae.loss_terms(x, dead_mask)
    terms["loss"].backward()
    grads = {name: param.grad.clone() for name, param in sae.named_parameters()}
    return terms, grads


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Rank 64 rows at a time, so a batch spans several chunks (the default is sized for large n)."""
    monkeypatch.setattr(sparse, "_CPU_CHUNK_ELEMENTS", 64 * N)


CASES = [(activation, variant) for activation in SPARSE_ARCHITECTURES
         for variant in ["plain", "relu_ranked", "learned_scale", "no_dead"]
         if variant != "relu_ranked" or "topk_on" in config_fields(activation)]  # ranking by ReLU(h): TopK's knob


@pytest.mark.parametrize("activation,variant", CASES)
def test_sparse_path_matches_the_dense_reference(activation, variant):
    spec = {"relu_ranked": {"topk_on": "relu"}, "learned_scale": {"learned_scale": True}}.get(variant, {})
    sae = make(activation, **spec)
    x = batch(seed=3, heavy_rows=8)
    dead_mask = torch.zeros(N, dtype=torch.bool)
    if variant != "no_dead":
        dead_mask[torch.randperm(N, generator=torch.Generator().manual_seed(4))[:40]] = True
    dense_terms, dense_grads = terms_and_grads(sae, x, dead_mask, sparse_path=False)
    sparse_terms, sparse_grads = terms_and_grads(sae, x, dead_mask, sparse_path=True)

    assert set(sparse_terms) == set(dense_terms)
    for name, value in dense_terms.items():
        if name == "fired":
            assert torch.equal(sparse_terms[name], value)
        else:
            assert torch.allclose(sparse_terms[name], value, rtol=1e-5, atol=1e-6), name
    if variant != "no_dead":
        assert float(dense_terms["auxk"].detach()) > 0  # the AuxK part was exercised
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(sparse_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max())), name


@pytest.mark.parametrize("heavy_rows", [12, 150])
def test_batchtopk_sparse_path_is_exact_when_tokens_want_more_than_their_candidates(heavy_rows):
    """Heavy tokens take more than 2k latents: the rows whose candidates run out are recomputed (with 150 heavy
    rows, in more than one chunk of 64)."""
    sae = make("batchtopk", k=4, dead_method="none")
    x = batch(seed=5, heavy_rows=heavy_rows)
    centered = x - sae.b_pre
    h = (centered @ sae.W_enc.T + sae.b_enc).detach()
    flat = torch.relu(h).flatten()
    values, where = flat.topk(4 * B)
    dense = torch.zeros_like(flat).scatter(0, where, values).view(B, N)
    assert (dense != 0).sum(1).max() > 2 * 4  # the case this test is about occurs

    ranked = rank_preacts(centered, sae.W_enc.detach(), sae.b_enc.detach(), 8, on="relu")
    candidates = torch.relu(ranked.top_values)
    short = int((candidates.min(1).values > candidates.flatten().topk(4 * B).values.min()).sum())
    assert short > (64 if heavy_rows > 64 else 0)
    code = batch_top_entries(centered, sae.W_enc.detach(), sae.b_enc.detach(), ranked, 4 * B)
    rebuilt = torch.zeros(B, N)
    rebuilt[code.rows, code.latents] = code.values
    assert torch.equal(rebuilt, dense)
    assert torch.equal(code.rows, code.rows.sort().values)


def test_scatter_to_latents_is_the_transposed_sparse_product():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randint(0, 50, (200,), generator=generator)
    rows = torch.randint(0, 30, (200,), generator=generator).sort().values
    weights = torch.randn(200, generator=generator)
    source = torch.randn(30, 7, generator=generator)
    expected = torch.zeros(50, 7).index_add_(0, latents, weights[:, None] * source[rows])
    assert torch.allclose(scatter_to_latents(latents, rows, weights, source, 50), expected, atol=1e-5)


def test_codes_with_empty_rows_decode_to_zero():
    code = SparseCode.from_rows(torch.tensor([1.0, 2.0]), torch.tensor([3, 1]), torch.tensor([0, 2]), n_rows=4)
    W_dec = torch.eye(5)
    decoded = sparse.decode_code(code, code.values, W_dec)
    assert torch.equal(decoded, torch.tensor([[0, 0, 0, 1.0, 0], [0] * 5, [0, 2.0, 0, 0, 0], [0] * 5]))


def test_training_mode_takes_the_sparse_path_and_eval_mode_the_dense_one(monkeypatch):
    sae = make("topk")
    calls = []
    monkeypatch.setattr(type(sae), "choose_codes", lambda self, *args: calls.append(1) or (_ for _ in ()).throw(
        RuntimeError("sparse path")))
    with pytest.raises(RuntimeError, match="sparse path"):
        sae.loss_terms(batch())
    sae.eval()
    sae.loss_terms(batch())  # the dense path: no selection call
    assert calls == [1]


def test_encoder_preacts_gradients_match_autograd():
    from saekit.sae.base import encoder_preacts

    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
              for shape in ((7, 5), (5,), (9, 5), (9,))]
    assert torch.autograd.gradcheck(encoder_preacts, inputs)
