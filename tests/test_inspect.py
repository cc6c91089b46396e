"""`saekit inspect`: the one-pass collection against brute force, the JSON export's fields, one-line errors.

Checkpoints are built here (a random TopK SAE / transcoder on the real stories260k model, saved with a training
config) so the file needs no training run; the model and text are the real ones from ../shared/data.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA_ROOT, MODEL_DIR, TRAIN_JSON
from saekit.checkpoint import save_sae
from saekit.config import (CacheConfig, DataConfig, DeadConfig, FinalEvalConfig, InitConfig, LoggerConfig, ModelConfig,
                           OptimizerConfig, TrainConfig)
from saekit.errors import ConfigError, DataError
from saekit.inspect.collect import HIST_BINS, collect, log10_bins, quantile_bins, sample_keys
from saekit.inspect.config import InspectConfig, InspectSettings
from saekit.inspect.run import inspect, inspected_windows, latent_encoder
from saekit.model import load_model
from saekit.sae import build_sae, variant_config
from saekit.train import spec_from_config

EVAL_TXT = DATA_ROOT / "tinystories-text" / "tinystories_validation_head.txt"
CTX_LEFT, CTX_RIGHT = 5, 2


# ---- brute force ------------------------------------------------------------------------------------------------
def brute_force(z: np.ndarray, contexts: int, reservoir: int, quantiles: int, seed: int = 0) -> dict:
    """Per latent, from the whole (W, T, n) latent tensor at once: the windows of its `contexts` largest window
    maxima, the `reservoir` firing windows with the smallest sample keys, their quantile bins, and statistics."""
    W, T, n = z.shape
    best, where = z.max(axis=1), z.argmax(axis=1)  # (W, n)
    keys = sample_keys(torch.arange(W)[:, None], torch.arange(n)[None, :], n, seed).numpy()
    out = {"top": [], "top_pos": [], "sample": [], "bins": []}
    for latent in range(n):
        fired = np.nonzero(best[:, latent] > 0)[0]
        top = fired[np.argsort(-best[fired, latent], kind="stable")][:contexts]
        out["top"].append(top.tolist())
        out["top_pos"].append(where[top, latent].tolist())
        sample = fired[np.argsort(keys[fired, latent], kind="stable")][:reservoir]
        out["sample"].append(sorted(sample.tolist()))
        ordered = sample[np.argsort(best[sample, latent], kind="stable")]
        cuts = [round(i * len(ordered) / quantiles) for i in range(quantiles + 1)]
        out["bins"].append([sorted(ordered[lo:hi].tolist()) for lo, hi in zip(cuts, cuts[1:]) if hi > lo])
    flat = z.reshape(-1, n)
    out["fires"] = (flat > 0).sum(axis=0)
    out["sum"] = flat.sum(axis=0, dtype=np.float64)
    out["max"] = flat.max(axis=0)
    hist = np.zeros((n, HIST_BINS), dtype=np.int64)
    for latent in range(n):
        values = flat[:, latent][flat[:, latent] > 0]
        np.add.at(hist[latent], log10_bins(torch.from_numpy(values)).numpy(), 1)
    out["hist"] = hist
    return out


def check_against_brute_force(collected, z: np.ndarray, contexts: int, quantiles: int, per_bin: int) -> None:
    expected = brute_force(z, contexts, quantiles * per_bin, quantiles)
    W, T, n = z.shape
    assert collected.n_tokens == W * T
    np.testing.assert_array_equal(collected.fires.numpy(), expected["fires"])
    np.testing.assert_allclose(collected.act_sum.numpy(), expected["sum"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(collected.act_max.numpy(), expected["max"], rtol=1e-6)
    np.testing.assert_array_equal(collected.hist.numpy(), expected["hist"])
    top, sample = collected.top, collected.sample
    for latent in range(n):
        kept = top.window[latent] >= 0
        assert top.window[latent][kept].tolist() == expected["top"][latent], latent
        assert top.pos[latent][kept].tolist() == expected["top_pos"][latent], latent
        np.testing.assert_allclose(top.value[latent][kept].numpy(),
                                   z[expected["top"][latent], expected["top_pos"][latent], latent], rtol=1e-6)
        for j in np.nonzero(kept.numpy())[0]:  # the stored context activations are the latent's, around its token
            w, p = int(top.window[latent, j]), int(top.pos[latent, j])
            for offset in range(-CTX_LEFT, CTX_RIGHT + 1):
                want = z[w, p + offset, latent] if 0 <= p + offset < T else 0.0
                assert float(top.ctx[latent, j, offset + CTX_LEFT]) == pytest.approx(float(want), rel=1e-6, abs=1e-7)
        in_sample = sample.window[latent][sample.window[latent] >= 0]
        assert sorted(in_sample.tolist()) == expected["sample"][latent], latent
        bins = quantile_bins(sample.value[latent], sample.window[latent], quantiles)
        got = [sorted(int(sample.window[latent, j]) for j in slots) for slots in bins]
        assert got == expected["bins"][latent], latent


def synthetic_latents(W: int, T: int, n: int, seed: int) -> np.ndarray:
    """Sparse positive latents with distinct values (no ties), some latents dead, some firing almost everywhere."""
    rng = np.random.default_rng(seed)
    rates = np.concatenate([[0.0, 0.0005], rng.uniform(0.001, 0.6, n - 2)])
    fire = rng.random((W, T, n)) < rates
    values = rng.permutation(W * T * n).reshape(W, T, n).astype(np.float64) / (W * T * n)
    return np.where(fire, np.exp(8 * values - 4), 0.0).astype(np.float32)


@pytest.mark.parametrize("batch_windows", [1, 7, 64])
def test_collection_matches_brute_force_on_synthetic_latents(batch_windows):
    z = synthetic_latents(W=40, T=24, n=33, seed=batch_windows)
    source = torch.from_numpy(z)

    def encode(tokens):  # tokens hold window ids here: the encoder looks the latents up
        return source[tokens[:, 0]]

    windows = torch.arange(40)[:, None].expand(40, 24)
    collected = collect(windows, encode, n=33, contexts=6, reservoir=3 * 4, ctx_left=CTX_LEFT, ctx_right=CTX_RIGHT,
                        device="cpu", batch_windows=batch_windows)
    check_against_brute_force(collected, z, contexts=6, quantiles=3, per_bin=4)
    assert int((collected.fires == 0).sum()) >= 1  # the dead latent is counted as dead


# ---- checkpoints on the real stories260k model ------------------------------------------------------------------
def train_config(**overrides) -> TrainConfig:
    data = DataConfig(name="tinystories", paths=[str(TRAIN_JSON)], eval_paths=[str(EVAL_TXT)], ctx_len=64,
                      normalize="scale", n_eval_tokens=4096)
    settings = dict(model=ModelConfig(name=str(MODEL_DIR)), data=data, activation=variant_config("topk", {}), n=64, k=6,
                    n_tokens=65536, batch_size=1024, device="cpu", init=InitConfig(), cache=CacheConfig(),
                    dead=DeadConfig(), optimizer=OptimizerConfig(), final_eval=FinalEvalConfig(), logger=LoggerConfig())
    return TrainConfig(**{**settings, **overrides})


def make_checkpoint(folder: Path, cfg: TrainConfig, d: int = 64, d_out=None, seed: int = 0) -> Path:
    """A random SAE (unit decoder rows, encoder = decoder^T, an input scale ≠ 1) saved as saekit train would."""
    torch.manual_seed(seed)
    sae = build_sae(spec_from_config(cfg, d, d_out))
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn_like(sae.W_dec), dim=1))
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape) / math.sqrt(d))
        sae.input_scale.fill_(0.5)
        if sae.transcoder:  # its output side has its own scale, the one its decoder directions are read in
            sae.output_scale.fill_(2.0)
    folder.mkdir(parents=True, exist_ok=True)
    save_sae(folder / "sae.safetensors", sae, {"train_config": dataclasses.asdict(cfg), "step": 64, "finished": True})
    return folder


@pytest.fixture(scope="module")
def model():
    return load_model(ModelConfig(name=str(MODEL_DIR)), torch.device("cpu"))


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("inspect") / "topk", train_config())


@pytest.fixture(scope="module")
def transcoder_run(tmp_path_factory) -> Path:
    cfg = train_config(hook="blocks.1.ln2.hook_out", hook_out="blocks.1.hook_mlp_out")
    return make_checkpoint(tmp_path_factory.mktemp("inspect") / "transcoder", cfg, d_out=64, seed=1)


@pytest.mark.parametrize("which, hook", [("sae_run", "blocks.2.hook_resid_post"), ("transcoder_run", "blocks.1.ln2.hook_out")])
def test_collection_matches_brute_force_on_the_real_model(request, model, which, hook):
    """The encoder reads the model at `hook` (a transcoder's input hook too) and the collection over batches equals
    brute force over all the latents of all the windows at once."""
    from saekit.checkpoint import load_sae

    sae, _ = load_sae(request.getfixturevalue(which) / "sae.safetensors")
    windows = inspected_windows(train_config().data, model, 2048)
    encode = latent_encoder(model, sae, hook)
    collected = collect(windows, encode, n=sae.spec.n, contexts=5, reservoir=2 * 3, ctx_left=CTX_LEFT,
                        ctx_right=CTX_RIGHT, device="cpu", batch_windows=5)
    z = encode(windows).numpy()
    acts = model.run_to_hook(windows, hook)
    reference = sae.encode(sae.normalize_input(acts.reshape(-1, 64))[0]).reshape(z.shape)
    np.testing.assert_allclose(z, reference.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert (z > 0).sum() > 0
    check_against_brute_force(collected, z, contexts=5, quantiles=2, per_bin=3)


# ---- the task: JSON export and site files ----------------------------------------------------------------------
FEATURE_FIELDS = {"feature_index", "index", "dead", "fires", "frac_nonzero", "log10_density", "mean_value", "max_value",
                  "top_tokens", "freq_hist_data_bar_values", "freq_hist_data_bar_heights", "activations", "pos_str",
                  "pos_values", "neg_str", "neg_values", "topk_cos_sim_indices", "topk_cos_sim_values"}
CONTEXT_FIELDS = {"tokens", "token_ids", "values", "max_value", "qualifying_token_index", "window", "position", "bin",
                  "bin_min", "bin_max", "bin_contains"}


def run_inspect(ckpt: Path, out: Path, fmt: str, **settings) -> Path:
    cfg = InspectConfig(ckpt=str(ckpt), device="cpu", format=fmt,
                        inspect=InspectSettings(**{"tokens": 4096, "contexts": 4, "quantiles": 2,
                                                   "quantile_contexts": 2, **settings}))
    inspect(cfg, out)
    return out


@pytest.mark.parametrize("which", ["sae_run", "transcoder_run"])
def test_json_export_fields(request, tmp_path, model, which):
    from saekit.checkpoint import load_sae

    run = request.getfixturevalue(which)
    out = run_inspect(run, tmp_path / "json", "json", neighbours=3, logits=4)
    manifest = json.loads((out / "inspect.json").read_text())
    assert manifest["format"] == "saekit-inspect" and manifest["n"] == 64 and manifest["n_tokens"] == 4032
    features = [f for name in manifest["batch_files"] for f in json.loads((out / name).read_text())["features"]]
    assert [f["feature_index"] for f in features] == list(range(64))
    sae, _ = load_sae(run / "sae.safetensors")
    W_dec = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    W_U = model.bridge.unembed.W_U.detach()
    ln = model.bridge.ln_final._original_component.weight.detach()
    for f in features:
        assert set(f) == FEATURE_FIELDS
        assert f["dead"] == (f["fires"] == 0)
        assert f["frac_nonzero"] == pytest.approx(f["fires"] / 4032)
        scale = 2.0 if sae.transcoder else 0.5  # the decoder's output in the model's units (the output side's)
        effects = (sae.W_dec[f["index"]].detach() / scale * ln) @ W_U  # times the final norm's weight
        assert f["pos_values"] == pytest.approx(effects.topk(4).values.tolist(), rel=1e-3)
        assert f["neg_values"] == pytest.approx(effects.topk(4, largest=False).values.tolist(), rel=1e-3)
        cos = W_dec @ W_dec[f["index"]]
        cos[f["index"]] = -2
        assert f["topk_cos_sim_indices"] == cos.topk(3).indices.tolist()
        if f["dead"]:
            assert f["activations"] == []
            continue
        assert sum(f["freq_hist_data_bar_heights"]) == f["fires"]
        top = [a for a in f["activations"] if a["bin"] == "top"]
        assert top and top[0]["max_value"] == pytest.approx(f["max_value"], rel=1e-5)
        for a in f["activations"]:
            assert set(a) == CONTEXT_FIELDS
            assert len(a["tokens"]) == len(a["values"]) == len(a["token_ids"])
            assert a["values"][a["qualifying_token_index"]] == pytest.approx(a["max_value"], rel=1e-3)
            assert a["bin_min"] <= a["max_value"] <= a["bin_max"]
        assert {a["bin"] for a in f["activations"]} <= {"top", "q1", "q2"}


def test_site_files_and_latent_selection(tmp_path, sae_run):
    out = run_inspect(sae_run, tmp_path / "site", "html", latents=[3, 40])
    for name in ("index.html", "latent.html", "data/index.js", "data/latents_00000.js"):
        assert (out / name).is_file(), name
    html = (out / "index.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    index = json.loads((out / "data/index.js").read_text().split("=", 1)[1].strip().rstrip(";"))
    assert index["columns"]["id"] == list(range(64))
    assert [i for i, page in enumerate(index["columns"]["page"]) if page] == [3, 40]
    chunk = (out / "data/latents_00000.js").read_text()
    records = json.loads(chunk.split("Object.assign(window.SAEKIT_LATENTS, ", 1)[1].rsplit(");", 1)[0])
    assert sorted(records) == ["3", "40"]


@pytest.mark.parametrize("settings, words", [
    ({"latents": [64]}, ["inspect.latents", "0..63"]),
    ({"tokens": 10**8}, ["inspect.tokens=100000000"]),
])
def test_bad_inspect_settings_are_one_line_errors(tmp_path, sae_run, settings, words):
    with pytest.raises((ConfigError, DataError)) as caught:
        run_inspect(sae_run, tmp_path / "bad", "json", **settings)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("build, words", [
    (lambda: InspectSettings(contexts=0), ["inspect.contexts=0"]),
    (lambda: InspectSettings(latents=[2, 2]), ["inspect.latents"]),
    (lambda: InspectSettings(latents="all"), ["inspect.latents"]),
    (lambda: InspectSettings(quantiles=3, quantile_contexts=0), ["inspect.quantile_contexts=0"]),
    (lambda: InspectConfig(ckpt="x", format="pdf"), ["format='pdf'", "html, json"]),
])
def test_config_checks_name_the_setting(build, words):
    with pytest.raises(ConfigError) as caught:
        build()
    for word in words:
        assert word in str(caught.value)


def test_missing_checkpoint_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="ckpt="):
        inspect(InspectConfig(ckpt=str(tmp_path / "nowhere"), device="cpu"), tmp_path / "out")


@pytest.mark.parametrize("overrides, latents", [([], None), (["inspect.latents=8"], 8),
                                                (["inspect.latents=[3,17]"], [3, 17])])
def test_conf_inspect_yaml_composes_into_the_schema(overrides, latents):
    """conf/inspect.yaml against InspectConfig, as the CLI composes it (schema registered as `inspect_schema`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from conftest import REPO

    ConfigStore.instance().store(name="inspect_schema", node=InspectConfig)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("inspect", overrides=["ckpt=outputs/train/x", "format=json", "data=tinystories", *overrides])
    built = OmegaConf.to_object(cfg)
    assert isinstance(built, InspectConfig) and isinstance(built.inspect, InspectSettings)
    assert built.inspect.latents == latents and built.format == "json" and built.data.name == "tinystories"
    assert built.inspect == dataclasses.replace(InspectSettings(), latents=latents)  # the YAML's values are the defaults


def test_the_inspect_command(tmp_path, sae_run):
    """`saekit inspect` through the CLI: the site in the run folder, format=json, a bad setting refused in one
    line before any folder is made."""
    from conftest import run_cli

    result = run_cli("inspect", f"ckpt={sae_run}", "inspect.tokens=2048", f"hydra.run.dir={tmp_path / 'site'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"index.html", "latent.html", "data"} <= {p.name for p in (tmp_path / "site").iterdir()}
    result = run_cli("inspect", f"ckpt={sae_run}", "format=json", "inspect.tokens=2048",
                     f"hydra.run.dir={tmp_path / 'json'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "json" / "inspect.json").read_text())["n"] == 64
    result = run_cli("inspect", f"ckpt={sae_run}", "inspect.contexts=0", f"hydra.run.dir={tmp_path / 'bad'}")
    assert result.returncode == 2 and "inspect.contexts=0" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
