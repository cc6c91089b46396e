"""Evaluation in bounded memory: no tensor of batch × n latents, chunked paths equal to brute-force answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import MODEL_DIR
from saekit import metrics
from saekit.config import CacheConfig, DataConfig, EvalConfig, ModelConfig, SiteConfig
from saekit.downstream import ablation_sparsity, downstream_metrics
from saekit.evaluate import evaluate_checkpoint, evaluate_reconstruction, spliced
from saekit.latents import latent_table
from saekit.refine import refine_codes, refinement_metrics
from saekit.sae import SAESpec, build_sae
from saekit.tasks import ModelPool, activation_cache

HOOK = "blocks.2.hook_resid_post"
CPU = torch.device("cpu")


class LargestTensors(TorchDispatchMode):
    """Records the largest tensor every op produces, overall and on the CPU."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_on_cpu = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                if tensor.numel() > self.largest:
                    self.largest, self.where = tensor.numel(), (str(func), tuple(tensor.shape))
                if tensor.device.type == "cpu":
                    self.largest_on_cpu = max(self.largest_on_cpu, tensor.numel())
        return out


@pytest.fixture(scope="module")
def site(tmp_path_factory, small_text) -> SiteConfig:
    data = DataConfig(name="small", paths=[str(small_text)], ctx_len=32, n_eval_tokens=2048)
    return SiteConfig(model=ModelConfig(name=str(MODEL_DIR)), data=data,
                      cache=CacheConfig(dir=str(tmp_path_factory.mktemp("eval_memory_cache"))), device="cpu")


@pytest.fixture(scope="module")
def models() -> ModelPool:
    return ModelPool(CPU)


@pytest.fixture(scope="module")
def cache(site, models):
    """The real held-out activations of stories260k at blocks.2 (about 2k tokens in 32-token windows)."""
    return activation_cache(site, 100_000, models, splits=("eval",))


@pytest.fixture(scope="module")
def model(site, models):
    return models.get(site.model)


def eval_rows(cache) -> torch.Tensor:
    return torch.cat(list(cache.iter_split("eval", 4096)))


def sae_for(cache, n: int, k: int = 8, activation: str = "topk", seed: int = 0):
    """An untrained SAE initialized on the real activations (encoder scaled to match reconstruction norms)."""
    sae = build_sae(SAESpec.build(activation, d=64, n=n, k=k, lam=1.0, normalize="scale"))
    x = eval_rows(cache)
    sae.input_scale.fill_(64 ** 0.5 / float(x.norm(dim=1).mean()))
    generator = torch.Generator().manual_seed(seed)
    sae.initialize(x[:512] * sae.input_scale, "zero", tied=True, scale_encoder=True, generator=generator)
    return sae.eval()


def test_a_wide_evaluation_never_makes_a_tensor_of_batch_times_n(cache, model, monkeypatch):
    """Every metric of `saekit eval` on n = 16,384: no op may produce more entries than the SAE's weights hold
    (the chunk is lowered to 2^18 latent entries), while one batch of dense latents would be 30× that."""
    monkeypatch.setattr(metrics, "LATENT_CHUNK", 2 ** 18, raising=False)
    n = 16384
    sae = sae_for(cache, n)
    cfg = EvalConfig(ckpt="<test>", downstream_tokens=256, downstream_batch_windows=4, ablation_positions=2,
                     ablation_horizon=4, refine_tokens=1024, refine_steps=3, k_primes=[16])
    with LargestTensors() as watch:
        evaluation = evaluate_checkpoint(sae, cache, cfg, CPU, model, HOOK)
    weights = sae.W_dec.numel()
    assert cache.n_acts("eval") * n > 30 * weights  # what the dense latents of one batch would hold
    assert watch.largest <= weights, watch.where
    assert evaluation.metrics["l0"] == 8 and evaluation.progressive[0]["l0"] == 16
    assert 0 < evaluation.metrics["delta_ce"] < 20 and evaluation.metrics["ablation_n"] > 0


@pytest.mark.gpu
def test_on_cuda_no_latent_matrix_comes_back_to_the_host(cache):
    """Reconstruction, refinement and per-latent statistics on CUDA: the CPU sees cache batches (batch × d) and
    n-sized vectors, never a (tokens, n) block."""
    device = torch.device("cuda")
    n = 16384
    sae = sae_for(cache, n).to(device)
    cfg = EvalConfig(ckpt="<test>", batch_size=1024, downstream=False, ablation_positions=0, refine_tokens=1024,
                     refine_steps=3)
    with LargestTensors() as watch:
        evaluation = evaluate_checkpoint(sae, cache, cfg, device)
        table = latent_table(evaluation.stats)
    assert evaluation.stats.fire_counts.device.type == "cuda"
    assert watch.largest_on_cpu <= max(cfg.batch_size * 64, n)
    assert int(table["fire_count"].sum()) == 8 * cache.n_acts("eval")


def test_chunked_reconstruction_equals_a_dense_computation(cache, monkeypatch):
    """nmse, l0, dead_frac and the latent table from 7-row chunks of 500-row batches, against one dense pass
    over every token computed here in float64."""
    sae = sae_for(cache, 4096, k=8)
    monkeypatch.setattr(metrics, "LATENT_CHUNK", 4096 * 7, raising=False)
    got, stats = evaluate_reconstruction(sae, cache, CPU, batch_size=500)
    x = eval_rows(cache)
    with torch.no_grad():
        x_hat, z = sae.reconstruct(x)
    x64, z64 = x.double(), z.double()
    nmse = float((x64 - x_hat.double()).pow(2).sum() / (x64 - x64.mean(dim=0)).pow(2).sum())
    fired = (z != 0).sum(dim=0)
    assert got["nmse"] == pytest.approx(nmse, rel=1e-6)
    assert got["l0"] == pytest.approx(float(fired.sum()) / x.shape[0], abs=2 / x.shape[0])
    assert got["dead_frac"] == pytest.approx(float((fired == 0).double().mean()), abs=2 / 4096)
    table = latent_table(stats)
    assert int((torch.tensor(table["fire_count"].to_numpy()) - fired).abs().sum()) <= 2  # ties at the k-th place
    busy = fired > 20
    mean_act = z64.sum(dim=0) / fired.clamp_min(1)
    assert torch.allclose(torch.tensor(table["mean_activation"].to_numpy())[busy], mean_act[busy], rtol=1e-5)


def test_refinement_in_chunks_equals_one_chunk():
    """Codes of uneven support widths (ReLU-like), refined 3 tokens at a time and all 40 at once."""
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(96, 16, generator=generator)
    W = W / W.norm(dim=1, keepdim=True)
    b = torch.randn(16, generator=generator)
    z = torch.relu(torch.randn(40, 96, generator=generator) - 1.3) * 0.7
    z[5] = 0.0  # a token with no active latent
    x = z @ W + b + 0.05 * torch.randn(40, 16, generator=generator)
    whole = refine_codes(W, b, x, z, steps=200, chunk_rows=40)
    chunked = refine_codes(W, b, x, z, steps=200, chunk_rows=3)
    assert torch.allclose(chunked, whole, atol=1e-6, rtol=1e-6)
    assert torch.equal(chunked != 0, (z != 0) & (whole != 0))
    assert (whole[5] == 0).all() and (whole != 0).sum() > 200


def test_refinement_metrics_in_row_chunks_equal_one_pass(cache, monkeypatch):
    sae = sae_for(cache, 1024, activation="relu")
    x = eval_rows(cache)[:300]
    whole = refinement_metrics(sae, x, steps=20)
    monkeypatch.setattr(metrics, "LATENT_CHUNK", 1024 * 16, raising=False)  # 16-row chunks
    chunked = refinement_metrics(sae, x, steps=20)
    assert chunked["refine_ratio"] == pytest.approx(whole["refine_ratio"], rel=1e-9)
    assert chunked["refine_mse_gain"] == pytest.approx(whole["refine_mse_gain"], rel=1e-9)
    assert whole["refine_ratio"] > 1.0  # ReLU codes are shrunk: refinement raises them


def test_ablation_sparsity_in_chunks_equals_one_latent_at_a_time(cache, model):
    windows = cache.tokens("eval")[:8]
    sae = sae_for(cache, 512, k=6)
    one_by_one = ablation_sparsity(model, HOOK, sae, windows, n_positions=3, horizon=6, seed=2, chunk=1)
    chunked = ablation_sparsity(model, HOOK, sae, windows, n_positions=3, horizon=6, seed=2, chunk=4)
    all_at_once = ablation_sparsity(model, HOOK, sae, windows, n_positions=3, horizon=6, seed=2, chunk=1000)
    assert one_by_one["ablation_n"] == 18  # 3 positions × 6 active latents
    for other in (chunked, all_at_once):
        assert other.keys() == one_by_one.keys()
        for key, value in one_by_one.items():
            assert other[key] == pytest.approx(value, rel=1e-5), key


def _reference_losses(model, windows, sae, mean_act) -> dict[str, float]:
    """CE of each variant and KL(clean ‖ spliced), one variant per forward pass, log-softmax in float64."""
    def replace(make):
        def hook(act, hook=None):
            out = act.clone()
            out[:, 1:] = make(act[:, 1:])
            return out
        return hook

    variants = {"clean": None, "spliced": lambda a: sae.reconstruct(a.reshape(-1, 64))[0].reshape(a.shape),
                "zero": torch.zeros_like, "mean": lambda a: mean_act.expand_as(a)}
    log_probs = {}
    for name, make in variants.items():
        hooks = [] if make is None else [(HOOK, replace(make))]
        logits = model.bridge.run_with_hooks(windows, fwd_hooks=hooks)
        log_probs[name] = torch.log_softmax(logits.double(), dim=-1)[:, 1:-1]
    targets = windows[:, 2:, None]
    ce = {name: float(-lp.gather(-1, targets).mean()) for name, lp in log_probs.items()}
    p = log_probs["clean"].exp()
    kl = float((p * (log_probs["clean"] - log_probs["spliced"])).sum(-1).mean())
    return {**{f"ce_{name}": value for name, value in ce.items()}, "kl": kl}


@torch.no_grad()
def test_float32_log_softmax_matches_a_float64_reference(cache, model):
    windows = cache.tokens("eval")[:8].long()
    sae = sae_for(cache, 512, k=4)
    mean_act = eval_rows(cache).mean(dim=0)
    got = downstream_metrics(model, HOOK, windows, spliced(sae), mean_act, batch_windows=3)
    reference = _reference_losses(model, windows, sae, mean_act)
    for key, value in reference.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    assert got["delta_ce"] == pytest.approx(reference["ce_spliced"] - reference["ce_clean"], rel=1e-4)
    assert reference["kl"] > 0.01  # a real difference is being measured


def test_log_probs_of_half_logits_are_float32():
    from saekit.downstream import log_probs_of

    logits = torch.randn(3, 5, 512).to(torch.bfloat16)
    out = log_probs_of(logits)
    assert out.dtype == torch.float32
    assert torch.allclose(out, F.log_softmax(logits.double(), dim=-1).float(), atol=1e-5)


def test_refinement_of_supports_wider_than_d_follows_plain_projected_gradient():
    """Supports of 20 latents in d = 8 (the d × d Gram path), against the SPEC's iteration written out per token
    with the full 20 × 20 Gram matrix."""
    generator = torch.Generator().manual_seed(3)
    W = torch.randn(48, 8, generator=generator, dtype=torch.float64)
    W = W / W.norm(dim=1, keepdim=True)
    b = torch.randn(8, generator=generator, dtype=torch.float64)
    z = torch.zeros(6, 48, dtype=torch.float64)
    for row in range(6):
        z[row, torch.randperm(48, generator=generator)[:20]] = torch.rand(20, generator=generator, dtype=torch.float64)
    x = torch.randn(6, 8, generator=generator, dtype=torch.float64) * 2
    got = refine_codes(W, b, x, z, steps=50)
    for row in range(6):
        support = z[row].nonzero().flatten()
        rows = W[support]
        gram = rows @ rows.T
        step = 1.0 / torch.linalg.eigvalsh(gram)[-1]
        v = z[row, support].clone()
        for _ in range(50):
            v = (v - step * (gram @ v - rows @ (x[row] - b))).clamp_min(0.0)
        assert torch.allclose(got[row, support], v, atol=1e-10)
        assert (got[row][z[row] == 0] == 0).all()
