"""Transcoders and skip transcoders (issue 12): read x at `hook`, predict y at `hook_out`.

Expected values come from independent computations (explicit formulas in float64, the model's own forward pass
with hand-written hooks) or are literals known by construction (a zero skip path, a silent transcoder).
"""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
from rich.console import Console

from conftest import MODEL_DIR, REPO, preflight_error, run_cli
from saekit.cache import cache_keys, ensure_cache
from saekit.checkpoint import load_sae, save_sae
from saekit.config import CacheConfig, DataConfig, ModelConfig, SiteConfig
from saekit.downstream import downstream_metrics, log_probs_of, nll_from_log_probs
from saekit.errors import ConfigError
from saekit.evaluate import spliced
from saekit.model import load_model
from saekit.refine import refinement_metrics
from saekit.sae import REGISTRY, SAESpec, build_sae, geometric_median
from saekit.synthetic import synthetic_train_config
from saekit.train import Trainer, TrainingData, fit, initialize

HOOK = "blocks.2.ln2.hook_out"  # the MLP's input in stories260k (RMSNorm output, weight applied)
HOOK_OUT = "blocks.2.hook_mlp_out"  # the MLP's output
D = 64
SPARSE_VARIANTS = sorted(name for name, cls in REGISTRY.items() if cls.has_sparse_path)


@pytest.fixture(scope="module")
def model():
    return load_model(ModelConfig(name=str(MODEL_DIR)), torch.device("cpu"))


def pair_site(cache_dir, text, hook_out=HOOK_OUT) -> SiteConfig:
    data = DataConfig(name="small", paths=[str(text)], ctx_len=32, n_eval_tokens=1024)
    return SiteConfig(model=ModelConfig(name=str(MODEL_DIR)), data=data, cache=CacheConfig(dir=str(cache_dir)),
                      hook=HOOK, hook_out=hook_out, device="cpu")


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory, small_text, model):
    site = pair_site(tmp_path_factory.mktemp("pairs"), small_text)
    return ensure_cache(site, 100_000, lambda: model, console_print=lambda _: None)


def random_transcoder(activation: str = "topk", d: int = 5, d_out: int = 3, n: int = 7, seed: int = 0,
                      **settings):
    """A transcoder with random weights away from any special point (nonzero biases and skip path)."""
    settings = {"k": 2, "skip": True, **settings}
    sae = build_sae(SAESpec.build(activation, d=d, n=n, d_out=d_out, **settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return sae


# ---- the cache --------------------------------------------------------------------------------------------------
def test_the_cache_holds_pairs_of_the_two_hooks(pair_cache, model):
    manifest = pair_cache.manifest
    assert (manifest["hook"], manifest["hook_out"]) == (HOOK, HOOK_OUT)
    assert (pair_cache.d_in, pair_cache.d_out, pair_cache.d) == (D, D, 2 * D)
    windows = pair_cache.tokens("eval")
    captured = {}

    def grab(name):
        def hook(act, hook=None):
            captured[name] = act.detach().clone()
            return act
        return hook

    # The model's own full forward pass, hooked by hand (the cache stops after block 2 and batches differently).
    model.bridge.run_with_hooks(windows, fwd_hooks=[(HOOK, grab(HOOK)), (HOOK_OUT, grab(HOOK_OUT))])
    x_true = captured[HOOK][:, 1:].reshape(-1, D)  # BOS positions are not cached
    y_true = captured[HOOK_OUT][:, 1:].reshape(-1, D)
    x, y = pair_cache.split(torch.cat(list(pair_cache.iter_split("eval", 4096))))
    torch.testing.assert_close(x, x_true, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_true, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x, y)  # two different activations, not one twice
    facts = manifest["splits"]["eval"]
    assert facts["mean_norm"] == pytest.approx(float(x_true.norm(dim=1).mean()), rel=1e-5)
    assert facts["mean_norm_out"] == pytest.approx(float(y_true.norm(dim=1).mean()), rel=1e-5)


def test_pair_caches_have_their_own_key(tmp_path, small_text, pair_cache):
    keys = {name: cache_keys(pair_site(tmp_path, small_text, hook_out), 100_000)[HOOK]
            for name, hook_out in (("sae", None), ("mlp", HOOK_OUT), ("resid", "blocks.2.hook_resid_post"))}
    assert len(set(keys.values())) == 3
    assert keys["mlp"] == pair_cache.root.name


# ---- the loss -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_the_loss_is_the_error_of_the_predicted_output(activation):
    sae = random_transcoder(activation, lam=0.3).train()
    sae.sparse_training = False
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 5, generator=generator), torch.randn(10, 3, generator=generator)
    terms = sae.loss_terms(x, None, y)
    # Independently, in float64: h = W_enc (x − b_pre) + b_enc, σ, ŷ = W_dec z + b_out + W_skip x.
    p = {name: t.detach().double() for name, t in sae.named_parameters()}
    h = (x.double() - p["b_pre"]) @ p["W_enc"].T + p["b_enc"]
    if activation == "topk":
        z = torch.zeros_like(h)
        for row in range(h.shape[0]):
            kept = h[row].argsort(descending=True)[:2]
            z[row, kept] = h[row, kept].clamp_min(0)
        penalty = 0.0
    else:
        z = h.clamp_min(0)
        penalty = 0.3 * float((z * p["W_dec"].norm(dim=1)).sum(dim=1).mean())
    y_hat = z @ p["W_dec"] + p["b_out"] + x.double() @ p["W_skip"].T
    mse = float(((y.double() - y_hat) ** 2).sum(dim=1).mean())
    assert float(terms["mse"].detach()) == pytest.approx(mse, rel=1e-5)
    assert float(terms["loss"].detach()) == pytest.approx(mse + penalty, rel=1e-5)


def test_b_pre_is_on_the_input_side_only():
    """With every latent off, ŷ = b_out: the loss cannot depend on b_pre (an SAE's would, through x̂ = b_pre)."""
    sae = random_transcoder("relu", skip=False).train()
    sae.sparse_training = False
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 5, generator=generator), torch.randn(16, 3, generator=generator)
    terms = sae.loss_terms(x, None, y)
    terms["loss"].backward()
    assert float(terms["l0"]) == 0.0
    assert torch.equal(sae.b_pre.grad, torch.zeros(5))
    expected = float(((y - sae.b_out.detach()) ** 2).sum(dim=1).mean())
    assert float(terms["mse"].detach()) == pytest.approx(expected, rel=1e-6)


def test_the_skip_path_starts_at_zero_and_gets_the_least_squares_gradient():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 12, generator=generator) * 3 + 1
    y = x[:, :8] @ torch.randn(8, 10, generator=generator) + 2
    cfg = synthetic_train_config("topk", n=32, n_tokens=4096, batch_size=512, k=4)
    cfg.skip = True
    data = TrainingData.from_tensor(x, cfg.batch_size, cfg.seed, "pairs", y=y)
    sae = build_sae(SAESpec.build("topk", d=12, n=32, k=4, d_out=10, skip=True, normalize="scale"))
    with torch.no_grad():
        sae.W_skip.fill_(1.0)  # initialization must zero it
    initialize(sae, cfg, data)
    assert torch.equal(sae.W_skip.detach(), torch.zeros(10, 12))
    assert float(sae.output_scale) == pytest.approx(math.sqrt(10) / float(y.norm(dim=1).mean()), rel=1e-6)
    assert float(sae.input_scale) == pytest.approx(math.sqrt(12) / float(x.norm(dim=1).mean()), rel=1e-6)
    rows = data.batches.sample(cfg.init.n_sample_tokens, seed=cfg.seed)
    torch.testing.assert_close(sae.b_out.detach(), geometric_median(rows[:, 12:] * sae.output_scale))

    sae.train()
    sae.sparse_training = False
    xn, _ = sae.normalize_input(x[:256])
    yn = sae.normalize_target(y[:256])
    terms = sae.loss_terms(xn, None, yn)
    terms["loss"].backward()
    with torch.no_grad():
        error = (yn - sae(xn)[0]).double()
    # d/dW_skip mean_b ||y_b − ŷ_b||² = −(2/B) Σ_b (y_b − ŷ_b) x_bᵀ; likewise for b_out.
    torch.testing.assert_close(sae.W_skip.grad.double(), -2 / 256 * error.T @ xn.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sae.b_out.grad.double(), -2 / 256 * error.sum(dim=0), rtol=1e-4, atol=1e-6)
    assert float(sae.W_skip.grad.abs().max()) > 0


@pytest.mark.parametrize("activation", SPARSE_VARIANTS)
def test_sparse_path_equals_dense_reference_as_a_skip_transcoder(activation):
    """Loss terms and every gradient, with AuxK on (some latents dead), for every variant with a sparse path."""
    settings = {"k": 4, "lam": 0.05, "dead_method": "auxk", "k_aux": 6}
    sparse = random_transcoder(activation, d=16, d_out=12, n=40, seed=4, **settings).train()
    with torch.no_grad():
        # Codes sparse enough (about 2% of entries) for the active-set variants to take their sparse path.
        sparse.b_enc.fill_(-0.5 if REGISTRY[activation].topk_family else -4.0)
        sparse.normalize_decoder_()
    dense = copy.deepcopy(sparse)
    dense.sparse_training = False
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(96, 16, generator=generator), torch.randn(96, 12, generator=generator)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    assert copy.deepcopy(sparse).sparse_loss_terms(x, dead, y) is not None  # the sparse path is really taken
    sparse_terms, dense_terms = sparse.loss_terms(x, dead, y), dense.loss_terms(x, dead, y)
    assert sparse_terms.keys() == dense_terms.keys()
    for name in dense_terms:
        if dense_terms[name].dtype == torch.bool:
            assert torch.equal(sparse_terms[name], dense_terms[name]), name
        else:
            torch.testing.assert_close(sparse_terms[name], dense_terms[name], rtol=1e-5, atol=1e-6, msg=name)
    assert float(dense_terms["auxk"].detach()) > 0
    sparse_terms["loss"].backward()
    dense_terms["loss"].backward()
    for (name, p_sparse), p_dense in zip(sparse.named_parameters(), dense.parameters()):
        assert p_dense.grad is not None, name
        torch.testing.assert_close(p_sparse.grad, p_dense.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert float(dense.W_skip.grad.abs().max()) > 0 and float(dense.b_out.grad.abs().max()) > 0


@pytest.mark.parametrize("activation", sorted(REGISTRY))
def test_every_variant_learns_to_predict_the_mlp_output(activation, pair_cache, tmp_path):
    rows = torch.cat(list(pair_cache.iter_split("eval", 4096)))
    x, y = pair_cache.split(rows)
    lam = {"relu": 0.3, "prolu": 0.3, "gated": 0.3, "jumprelu": 0.01}.get(activation, 1.0)
    cfg = synthetic_train_config(activation, n=64, n_tokens=60 * 256, batch_size=256, k=8, lam=lam)
    cfg.skip, cfg.log_every_steps = True, 1
    data = TrainingData.from_tensor(x, cfg.batch_size, cfg.seed, "mlp-pairs", y=y)
    result = fit(cfg, data, tmp_path, torch.device("cpu"), Console(quiet=True))
    sae = result.sae.eval()
    assert sae.transcoder and sae.spec.skip and sae.spec.d_out == D
    log = pd.read_csv(tmp_path / "steps.csv")
    assert log["loss"].notna().all() and (log["loss"].abs() < 1e6).all()
    with torch.no_grad():
        y_hat, _ = sae.reconstruct(x)
    nmse = float(((y - y_hat) ** 2).sum(dim=1).mean() / ((y - y.mean(dim=0)) ** 2).sum(dim=1).mean())
    assert nmse < 0.9, nmse  # predicts the MLP's output well beyond its mean, after 60 steps


def test_refinement_fits_the_codes_to_the_target():
    """Targets made from twice the transcoder's own code: refining towards y doubles every value (ratio 2) and
    removes the whole error (gain 1); the skip path and b_out are part of what the code need not explain."""
    sae = random_transcoder("topk", d=6, d_out=4, n=9, k=2, normalize="scale").eval()
    with torch.no_grad():
        sae.input_scale.fill_(0.8)
        sae.output_scale.fill_(1.5)
        sae.normalize_decoder_()
        x_raw = torch.randn(50, 6, generator=torch.Generator().manual_seed(9))
        x, _ = sae.normalize_input(x_raw)
        z = sae.encode(x)
        y_raw = sae.decode(2 * z, x) / 1.5
    metrics = refinement_metrics(sae, x_raw, steps=3000, y_raw=y_raw)
    assert metrics["refine_ratio"] == pytest.approx(2.0, rel=1e-4)
    assert metrics["refine_mse_gain"] == pytest.approx(1.0, abs=1e-6)


# ---- checkpoints --------------------------------------------------------------------------------------------------
def test_a_transcoder_checkpoint_round_trips_bit_for_bit(tmp_path):
    sae = random_transcoder("batchtopk", d=16, d_out=12, n=40, k=4, normalize="scale").eval()
    with torch.no_grad():
        sae.output_scale.fill_(0.37)
        sae.input_scale.fill_(2.5)
        sae.threshold.fill_(0.2)
    save_sae(tmp_path / "sae.safetensors", sae, {"step": 3})
    loaded, meta = load_sae(tmp_path / "sae.safetensors")
    assert loaded.spec.to_dict() == sae.spec.to_dict()
    assert (loaded.spec.d_out, loaded.spec.skip) == (12, True)
    saved = sae.state_dict()
    assert {"b_out", "W_skip", "output_scale"} <= set(saved)
    assert set(loaded.state_dict()) == set(saved)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(6))
    assert torch.equal(loaded.reconstruct(x)[0], sae.reconstruct(x)[0])


def test_a_stopped_transcoder_run_resumes_to_the_same_weights(pair_cache, tmp_path):
    x, y = pair_cache.split(torch.cat(list(pair_cache.iter_split("eval", 4096))))
    cfg = synthetic_train_config("topk", n=48, n_tokens=8 * 256, batch_size=256, k=4)
    cfg.skip, cfg.ckpt_every_steps = True, 4
    data = TrainingData.from_tensor(x, cfg.batch_size, cfg.seed, "mlp-pairs", y=y)
    quiet = Console(quiet=True)
    whole = fit(cfg, data, tmp_path / "whole", torch.device("cpu"), quiet)
    with Trainer(cfg, data, tmp_path / "stopped", torch.device("cpu")) as trainer:
        for step in range(4):  # stopped after the step-4 checkpoint
            trainer.step(step, data.batches.batch(step))
    resumed = fit(cfg, data, tmp_path / "stopped", torch.device("cpu"), quiet)
    assert resumed.resumed_from == 4
    expected = whole.sae.state_dict()
    assert {"b_out", "W_skip", "output_scale"} <= set(expected)
    for name, tensor in resumed.sae.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_v0_1_checkpoints_still_load_as_plain_saes():
    for ckpt in sorted((REPO / "tests" / "fixtures" / "checkpoints_v0_1").glob("*/sae.safetensors")):
        sae, _ = load_sae(ckpt)
        assert not sae.transcoder and sae.spec.d_out is None and not sae.spec.skip
        assert not hasattr(sae, "b_out") and not hasattr(sae, "W_skip")
        assert tuple(sae.W_dec.shape) == (sae.spec.n, sae.spec.d)


# ---- the downstream splice ----------------------------------------------------------------------------------------
@torch.no_grad()
def _splice_by_hand(model, sae, windows: torch.Tensor, output) -> tuple[float, float]:
    """Mean CE (positions 1..T−2 predicting 2..T−1) and KL(clean ‖ spliced), from two passes hooked by hand:
    a clean one that reads x at HOOK, and one whose HOOK_OUT activation (BOS kept clean) is `output(x)`."""
    captured = {}

    def read(act, hook=None):
        captured["x"] = act.detach().clone()
        return act

    def write(act, hook=None):
        out = act.clone()
        out[:, 1:] = output(captured["x"][:, 1:])
        return out

    clean = model.bridge.run_with_hooks(windows, fwd_hooks=[(HOOK, read)])
    changed = model.bridge.run_with_hooks(windows, fwd_hooks=[(HOOK, read), (HOOK_OUT, write)])
    log_clean, log_changed = log_probs_of(clean).double(), log_probs_of(changed).double()
    ce = float(nll_from_log_probs(log_changed, windows)[:, 1:].mean())
    kl = float((log_clean.exp() * (log_clean - log_changed)).sum(dim=-1)[:, 1:-1].mean())
    return ce, kl


def test_downstream_splices_the_prediction_at_hook_out(model, pair_cache):
    sae = random_transcoder("topk", d=D, d_out=D, n=96, k=8, normalize="scale", seed=7).eval()
    with torch.no_grad():
        sae.W_dec.mul_(0.05)
        sae.W_skip.mul_(0.02)
        sae.b_out.mul_(0.05)
        sae.output_scale.fill_(2.0)
    windows = pair_cache.tokens("eval")[:8]
    mean_y = torch.randn(D, generator=torch.Generator().manual_seed(8)) * 0.1
    metrics = downstream_metrics(model, HOOK, windows, spliced(sae), mean_y, batch_windows=3, hook_out=HOOK_OUT)

    def predicted(x):
        return sae.reconstruct(x.reshape(-1, D))[0].reshape(x.shape)

    ce_spliced, kl = _splice_by_hand(model, sae, windows, predicted)
    ce_zero, _ = _splice_by_hand(model, sae, windows, lambda x: torch.zeros_like(x))
    ce_mean, _ = _splice_by_hand(model, sae, windows, lambda x: mean_y.expand_as(x))
    with torch.no_grad():
        clean_logits = model.bridge(windows)
    ce_clean = float(nll_from_log_probs(log_probs_of(clean_logits).double(), windows)[:, 1:].mean())
    assert metrics["ce_clean"] == pytest.approx(ce_clean, rel=1e-5)
    assert metrics["ce_spliced"] == pytest.approx(ce_spliced, rel=1e-5)
    assert metrics["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)
    assert metrics["ce_mean"] == pytest.approx(ce_mean, rel=1e-5)
    assert metrics["kl"] == pytest.approx(kl, rel=1e-4)
    assert metrics["delta_ce"] > 0.01  # the random prediction really changed the model


def test_a_silent_transcoder_is_the_zero_ablation(model, pair_cache):
    sae = random_transcoder("topk", d=D, d_out=D, n=32, k=4, skip=False).eval()
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_out.zero_()
    windows = pair_cache.tokens("eval")[:4]
    metrics = downstream_metrics(model, HOOK, windows, spliced(sae), torch.zeros(D), hook_out=HOOK_OUT)
    assert metrics["ce_spliced"] == pytest.approx(metrics["ce_zero"], rel=1e-7)
    assert metrics["loss_recovered"] == pytest.approx(0.0, abs=1e-6)


# ---- the CLI ------------------------------------------------------------------------------------------------------
def test_cli_trains_and_evaluates_a_skip_transcoder(tmp_path, small_text, cache_root):
    common = ["data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=1024",
              f"cache.dir={cache_root}"]
    run_dir = tmp_path / "tc"
    trained = run_cli("train", *common, "activation=topk", "k=4", "n=64", "n_tokens=16384", "batch_size=1024",
                      f"hook={HOOK}", f"hook_out={HOOK_OUT}", "skip=true", "final_eval.downstream=true",
                      "final_eval.downstream_tokens=512", f"hydra.run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_cli("eval", f"ckpt={run_dir}", "downstream_tokens=512", "ablation_positions=2",
                        "refine_tokens=256", f"cache.dir={cache_root}", f"hydra.run.dir={tmp_path / 'ev'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    train_table, eval_table = pd.read_csv(run_dir / "results.csv"), pd.read_csv(tmp_path / "ev" / "results.csv")
    for table in (train_table, eval_table):
        assert (table["hook"] == HOOK).all() and (table["hook_out"] == HOOK_OUT).all() and table["skip"].all()
        assert list(table.columns[:3]) == ["run_id", "model", "hook"]
    train_values = train_table.set_index("metric")["value"]
    eval_values = eval_table.drop_duplicates("metric").set_index("metric")["value"]
    for metric in ("nmse", "l0", "dead_frac", "delta_ce", "kl", "ce_spliced"):
        assert eval_values[metric] == pytest.approx(train_values[metric], rel=1e-9), metric
    assert 0 < eval_values["nmse"] < 1 and eval_values["delta_ce"] > 0
    for metric in ("ablation_sparsity", "refine_ratio", "refine_mse_gain"):
        assert math.isfinite(eval_values[metric]), metric
    loaded, _ = load_sae(run_dir / "sae.safetensors")
    assert (loaded.spec.d, loaded.spec.d_out, loaded.spec.skip) == (D, D, True)


# ---- one-line errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    ([f"hook={HOOK}", f"hook_out={HOOK}"], ["hook_out=", "the hook the transcoder reads"]),
    (["layer=2", "hook_out=blocks.2.hook_resid_post"], ["hook_out=", "the hook the transcoder reads"]),
    (["skip=true"], ["skip=true", "hook_out"]),
    (["layer=[1,2]", f"hook_out={HOOK_OUT}"], ["hook_out=", "single hook"]),
    ([f"hook={HOOK}", f"hook_out={HOOK_OUT}", "cache.mode=stream"], ["cache.mode=stream", "cache.mode=disk"]),
    ([f"hook={HOOK}", f"hook_out={HOOK_OUT}", "data.normalize=layer_norm"], ["data.normalize=layer_norm"]),
    ([f"hook={HOOK}", f"hook_out={HOOK_OUT}", "dead=resample"], ["dead=resample", "dead=auxk"]),
])
def test_bad_transcoder_settings_fail_in_one_line(capsys, overrides, words):
    err = preflight_error(capsys, overrides)
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("hook, hook_out, words", [
    (HOOK, "blocks.2.hook_no_such_thing", ["hook_out=blocks.2.hook_no_such_thing", "not a hook point"]),
    (HOOK, "blocks.9.hook_mlp_out", ["hook_out=blocks.9.hook_mlp_out", "layers 0..4"]),
    (HOOK_OUT, HOOK, ["runs before", "swap"]),
    ("blocks.2.mlp.hook_out", HOOK_OUT, ["the same hook point"]),
])
def test_hook_pairs_the_model_cannot_serve_fail_in_one_line(model, hook, hook_out, words):
    with pytest.raises(ConfigError) as raised:
        model.check_transcoder_hooks(hook, hook_out)
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    for word in words:
        assert word in message, message


def test_an_unknown_hook_out_fails_in_one_line_on_the_command_line(tmp_path, small_text):
    result = run_cli("cache", "data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32",
                     f"hook={HOOK}", "hook_out=blocks.2.mlp_out", f"cache.dir={tmp_path / 'c'}",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hook_out=blocks.2.mlp_out is not a hook point" in lines[0], result.stderr
