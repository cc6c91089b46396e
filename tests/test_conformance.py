"""The contract every SAE variant meets, checked for every name in the registry (today's and any added later).

Adding a variant is one file in saekit/sae/ and one YAML in conf/activation/; this suite is the check that it
is complete: it trains on real stories260k activations with finite loss terms, round-trips through a
checkpoint, lists every per-latent tensor in its table, is revived by resampling, swaps its activation at test
time, takes the same loss and gradients on its fast path as on the dense reference (as an SAE and as a skip
transcoder), is evaluated by `saekit eval`, and refuses a bad setting in one line.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch
from rich.console import Console

import saekit.sae.sparse as sparse
from conftest import MODEL_DIR, TRAIN_JSON, preflight_error, run_cli
from saekit.checkpoint import load_sae, save_sae
from saekit.cli import _register, conf_dir, preflight
from saekit.config import ModelConfig
from saekit.dead import resample_dead_latents
from saekit.model import load_model
from saekit.sae import REGISTRY, SAESpec, build_sae, swap_activation
from saekit.synthetic import synthetic_train_config
from saekit.train import TrainingData, fit, make_optimizer

VARIANTS = sorted(REGISTRY)
HOOK = "blocks.2.hook_resid_post"
D, N, K = 64, 48, 4  # n differs from d, so a latent axis cannot be mistaken for a feature axis


@pytest.fixture(scope="module")
def activations() -> torch.Tensor:
    """About 4k real residual-stream activations of stories260k (layer 2), BOS positions dropped."""
    model = load_model(ModelConfig(name=str(MODEL_DIR)), torch.device("cpu"))
    text = " ".join(json.loads(TRAIN_JSON.read_text())[:60])
    ids = [i for i in model.tokenizer(text)["input_ids"] if i != model.bos_token_id]
    windows = torch.tensor([[model.bos_token_id] + ids[i * 63:(i + 1) * 63] for i in range(64)])
    with torch.no_grad():
        return model.run_to_hook(windows, HOOK)[:, 1:].reshape(-1, D).float().contiguous()


def fresh_sae(activation: str, x: torch.Tensor, **settings):
    """An initialized SAE of `activation` on normalized real activations, moved off its init a little."""
    settings = {"k": K, "lam": 0.3, "dead_method": "auxk", "k_aux": 16, "normalize": "scale", **settings}
    sae = build_sae(SAESpec.build(activation, d=D, n=N, **settings))
    sae.input_scale.fill_(math.sqrt(D) / float(x.norm(dim=1).mean()))
    sample, _ = sae.normalize_input(x[:2048])
    sae.initialize(sample, "geometric_median", tied=True, scale_encoder=True,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return sae.train()


@pytest.mark.parametrize("activation", VARIANTS)
def test_a_short_training_on_stories260k_keeps_every_loss_term_finite(activation, activations, tmp_path):
    cfg = synthetic_train_config(activation, n=N, n_tokens=12 * 256, batch_size=256, k=K, lam=0.3, dead="auxk")
    cfg = dataclasses.replace(cfg, log_every_steps=1)
    data = TrainingData.from_tensor(activations, cfg.batch_size, cfg.seed, key="stories260k-conformance")
    result = fit(cfg, data, tmp_path / "run", torch.device("cpu"), Console(quiet=True))
    steps = pd.read_csv(tmp_path / "run" / "steps.csv")
    assert len(steps) == 12
    for column in ("loss", "mse", "l0", "sparsity_loss", "auxk_loss", "aux_loss"):
        assert steps[column].map(math.isfinite).all(), column
    assert steps["loss"].iloc[-1] < steps["loss"].iloc[0]  # it learns
    assert all(torch.isfinite(p).all() for p in result.sae.parameters())


@pytest.mark.parametrize("activation", VARIANTS)
def test_save_and_load_give_identical_outputs(activation, activations, tmp_path):
    sae = fresh_sae(activation, activations, learned_scale=True)
    optimizer = make_optimizer(sae, synthetic_train_config(activation, n=N, n_tokens=1024, batch_size=256))
    for batch in activations[:1024].split(256):  # some training, so no tensor is at its init value
        x, _ = sae.normalize_input(batch)
        optimizer.zero_grad()
        sae.loss_terms(x)["loss"].backward()
        optimizer.step()
    sae.eval()
    save_sae(tmp_path / "sae.safetensors", sae, {})
    loaded, _ = load_sae(tmp_path / "sae.safetensors")
    assert loaded.spec == sae.spec and type(loaded) is type(sae)
    with torch.no_grad():
        expected, loaded_out = sae.reconstruct(activations[:512]), loaded.reconstruct(activations[:512])
    assert torch.equal(expected[0], loaded_out[0]) and torch.equal(expected[1], loaded_out[1])


@pytest.mark.parametrize("activation", VARIANTS)
def test_every_per_latent_tensor_is_in_the_latent_table(activation, activations):
    sae = fresh_sae(activation, activations, learned_scale=True)
    tensors = {**dict(sae.named_parameters()), **dict(sae.named_buffers())}
    per_latent = {name for name, t in tensors.items() if t.dim() >= 1 and t.shape[0] == N}
    assert per_latent == set(sae.latent_table())


def _kill_latent(sae, latent: int) -> None:
    """Make `latent` dead whatever the variant: no encoder weight, a large negative bias, and every other
    per-latent entry moved far from its reset value (as years of training toward death might leave it)."""
    tensors = {**dict(sae.named_parameters()), **dict(sae.named_buffers())}
    with torch.no_grad():
        sae.W_enc[latent] = 0.0
        sae.b_enc[latent] = -1e3
        for name, entry in sae.latent_table().items():
            if entry.reset is not None and name != "b_enc":
                tensors[name][latent] = entry.reset + 7.0


@pytest.mark.parametrize("activation", VARIANTS)
def test_resampling_revives_a_dead_latent_and_resets_its_table_entries(activation, activations):
    sae = fresh_sae(activation, activations, learned_scale=True)
    x, _ = sae.normalize_input(activations[:2048])
    optimizer = make_optimizer(sae, synthetic_train_config(activation, n=N, n_tokens=1024, batch_size=256))
    optimizer.zero_grad()
    sae.loss_terms(x[:256])["loss"].backward()
    optimizer.step()  # Adam moments exist and are nonzero
    _kill_latent(sae, 5)
    sae.eval()
    with torch.no_grad():
        assert not bool((sae.encode(x)[:, 5] != 0).any())
    dead = torch.zeros(N, dtype=torch.bool)
    dead[5] = True
    revived = resample_dead_latents(sae, optimizer, dead, x, encoder_frac=1.0,
                                    generator=torch.Generator().manual_seed(0))
    assert revived.tolist() == [5]
    tensors = {**dict(sae.named_parameters()), **dict(sae.named_buffers())}
    for name, entry in sae.latent_table().items():
        if entry.reset is not None:
            assert float(tensors[name][5].detach()) == pytest.approx(entry.reset), name
        state = optimizer.state.get(tensors[name], {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                assert bool((state[key][5] == 0).all()), (name, key)
    with torch.no_grad():
        assert bool((sae.encode(x)[:, 5] != 0).any()), "the resampled latent never fires"


def test_a_resampled_jumprelu_latent_gets_its_threshold_back():
    """The bug this suite was written for: JumpReLU kept a dead latent's threshold, so it never fired again."""
    sae = build_sae(SAESpec.build("jumprelu", d=16, n=32, init_threshold=0.1))
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    sae.initialize(x, "zero", tied=True, scale_encoder=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(sae.parameters())
    with torch.no_grad():
        sae.log_threshold[3] = math.log(1e3)  # a latent that died with its threshold far above every input
    dead = torch.zeros(32, dtype=torch.bool)
    dead[3] = True
    resample_dead_latents(sae, optimizer, dead, x, encoder_frac=1.0, generator=torch.Generator().manual_seed(0))
    assert float(sae.log_threshold[3].exp()) == pytest.approx(0.1)
    with torch.no_grad():
        assert int((sae.encode(x)[:, 3] != 0).sum()) > 0


@pytest.mark.parametrize("activation", VARIANTS)
def test_test_time_swap_to_topk_and_jumprelu(activation, activations):
    sae = fresh_sae(activation, activations).eval()
    x, _ = sae.normalize_input(activations[:512])
    before = {name: p.clone() for name, p in sae.state_dict().items()}
    with torch.no_grad():
        _, z_topk = swap_activation(sae, "topk", 3)(x)
        scores = sae.swap_preacts(x)
        _, z_theta = swap_activation(sae, "jumprelu", 0.5)(x)
    assert int((z_topk != 0).sum(dim=1).max()) <= 3 and int((z_topk != 0).sum()) > 0
    assert bool(((z_theta != 0) <= (scores > 0.5)).all())  # fires only above θ
    assert bool((z_theta[scores > 0.5] != 0).any())
    assert all(torch.equal(before[name], t) for name, t in sae.state_dict().items())  # swap changes no weight


@torch.no_grad()
def make_sparse(sae, x: torch.Tensor) -> None:
    """Lower each latent's bias to its 95th-percentile pre-activation on x, so about 5% of entries fire: codes
    sparse enough that a variant whose fast path works on the active set takes it (it falls back to the dense
    path while codes are dense)."""
    h = torch.addmm(sae.b_enc, x - sae.b_pre, sae.W_enc.T)
    sae.b_enc.sub_(h.quantile(0.95, dim=0))


@pytest.mark.parametrize("activation", [name for name in VARIANTS if REGISTRY[name].has_sparse_path])
@pytest.mark.parametrize("learned_scale", [False, True])
def test_fast_path_equals_the_dense_reference(activation, learned_scale, activations, monkeypatch):
    monkeypatch.setattr(sparse, "_CPU_CHUNK_ELEMENTS", 128 * N)  # batches span several chunks
    sae = fresh_sae(activation, activations, learned_scale=learned_scale)
    x, _ = sae.normalize_input(activations[:640])
    make_sparse(sae, x)
    with torch.no_grad():
        assert float((sae.encode(x) != 0).float().mean()) < 0.1  # sparse: no variant falls back to dense here
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    results = {}
    for fast in (False, True):
        sae.sparse_training = fast
        sae.zero_grad(set_to_none=True)
        terms = sae.loss_terms(x, dead)
        terms["loss"].backward()
        results[fast] = (terms, {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None})
    assert_same_terms_and_gradients(results[True], results[False])


def assert_same_terms_and_gradients(fast: tuple[dict, dict], dense: tuple[dict, dict]) -> None:
    """Every loss term (bool masks exactly) and every parameter gradient of the fast path as the dense one's."""
    (fast_terms, fast_grads), (dense_terms, dense_grads) = fast, dense
    assert set(fast_terms) == set(dense_terms)
    for name, value in dense_terms.items():
        if value.dtype == torch.bool:
            assert torch.equal(fast_terms[name], value), name
        else:
            assert torch.allclose(fast_terms[name], value, rtol=1e-5, atol=1e-6), name
    assert set(fast_grads) == set(dense_grads)
    for name, grad in dense_grads.items():
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()) + 1e-12), name


def fresh_skip_transcoder(activation: str, x: torch.Tensor, y: torch.Tensor, **settings):
    """An initialized skip transcoder of `activation` (d_in = 64 → d_out = 40), moved off its init a little."""
    settings = {"k": K, "lam": 0.3, "dead_method": "auxk", "k_aux": 16, **settings}
    sae = build_sae(SAESpec.build(activation, d=D, n=N, d_out=y.shape[1], skip=True, **settings))
    generator = torch.Generator().manual_seed(0)
    sae.initialize(x, "geometric_median", tied=True, scale_encoder=True, generator=generator)
    sae.initialize_output(x, y, "geometric_median", scale_encoder=True)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        sae.W_skip.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))  # so the skip path carries gradient
    return sae.train()


def transcoder_pair(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): normalized real activations and a fixed nonlinear function of them as the target (d_out = 40)."""
    x = activations[:640] * (math.sqrt(D) / float(activations.norm(dim=1).mean()))
    mix = torch.randn(D, 40, generator=torch.Generator().manual_seed(3)) / math.sqrt(D)
    return x, torch.tanh(x @ mix) * 2


@pytest.mark.parametrize("activation", VARIANTS)
def test_every_variant_trains_as_a_skip_transcoder_with_the_same_gradients_on_both_paths(activation, activations,
                                                                                       monkeypatch):
    monkeypatch.setattr(sparse, "_CPU_CHUNK_ELEMENTS", 128 * N)
    x, y = transcoder_pair(activations)
    sae = fresh_skip_transcoder(activation, x, y)
    make_sparse(sae, x)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    results = {}
    for fast in ([False, True] if REGISTRY[activation].has_sparse_path else [False]):
        sae.sparse_training = fast
        sae.zero_grad(set_to_none=True)
        terms = sae.loss_terms(x, dead, y)
        terms["loss"].backward()
        results[fast] = (terms, {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None})
    dense_terms, dense_grads = results[False]
    assert all(bool(torch.isfinite(v).all()) for v in dense_terms.values() if v.dtype != torch.bool)
    assert float(dense_grads["W_skip"].abs().max()) > 0 and float(dense_grads["b_out"].abs().max()) > 0
    if True in results:
        assert_same_terms_and_gradients(results[True], results[False])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Every variant trained briefly by one `saekit sweep`, then the sweep folder evaluated by `saekit eval`."""
    root = tmp_path_factory.mktemp("conformance")
    common = [f"cache.dir={root / 'cache'}", "n=32", "k=4", "lam=0.3", "n_tokens=16384", "batch_size=1024",
              "data.ctx_len=64", "data.n_eval_tokens=2048"]
    sweep = run_cli("sweep", f"activation={','.join(VARIANTS)}", *common, f"hydra.sweep.dir={root / 'sweep'}")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    out = root / "eval"
    result = run_cli("eval", f"ckpt={root / 'sweep'}", f"cache.dir={root / 'cache'}", "downstream_tokens=1024",
                     "ablation_positions=2", "refine_tokens=256", "refine_steps=20", "k_primes=[2]",
                     f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return pd.read_csv(out / "results.csv")


@pytest.mark.parametrize("activation", VARIANTS)
def test_saekit_eval_reports_every_metric(activation, evaluated):
    core = evaluated["k_prime"].isna() & (evaluated["prefix"].isna() if "prefix" in evaluated else True)
    rows = evaluated[(evaluated["activation"] == activation) & core]
    values = rows.set_index("metric")["value"]
    for metric in ("nmse", "l0", "dead_frac", "delta_ce", "kl", "loss_recovered"):
        assert math.isfinite(values[metric]), metric
    assert 0 < values["nmse"] < 1.5 and values["l0"] > 0
    swapped = evaluated[(evaluated["activation"] == activation) & (evaluated["k_prime"] == 2)]
    assert swapped.set_index("metric")["value"]["l0"] <= 2


def test_matryoshka_eval_adds_per_prefix_rows(evaluated):
    rows = evaluated[(evaluated["activation"] == "matryoshka") & evaluated["prefix"].notna()]
    nmse = rows[rows["metric"] == "nmse"].set_index("prefix")["value"].sort_index()
    l0 = rows[rows["metric"] == "l0"].set_index("prefix")["value"].sort_index()
    assert list(nmse.index) == [4, 8, 16, 32]  # n=32, k=4: doubling groups from n/16, those below k dropped
    assert (nmse.diff().dropna() < 0).all(), nmse  # each prefix reconstructs better than the one inside it
    assert (l0.diff().dropna() >= 0).all()
    core = evaluated[(evaluated["activation"] == "matryoshka") & evaluated["prefix"].isna() & evaluated["k_prime"].isna()]
    assert nmse[32] == pytest.approx(core.set_index("metric")["value"]["nmse"], rel=1e-6)  # the full prefix is the SAE
    others = evaluated[(evaluated["activation"] != "matryoshka")]
    assert others["prefix"].isna().all()  # other SAEs get prefix rows only when eval asks (prefixes=[...])


@pytest.mark.parametrize("activation", VARIANTS)
def test_the_variant_has_a_typed_yaml_and_refuses_bad_settings_in_one_line(activation, capsys):
    assert (conf_dir() / "activation" / f"{activation}.yaml").is_file()
    _register()
    composed = preflight("train", [f"activation={activation}"])
    assert isinstance(composed.activation, REGISTRY[activation].Config)
    assert "activation.no_such_knob" in preflight_error(capsys, [f"activation={activation}",
                                                                  "activation.no_such_knob=1"])
    for field in dataclasses.fields(REGISTRY[activation].Config):
        if field.type in ("int", "float", "bool", int, float, bool):
            err = preflight_error(capsys, [f"activation={activation}", f"activation.{field.name}=not_a_number"])
            assert f"activation.{field.name}" in err, err
