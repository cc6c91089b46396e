"""The ecosystem's formats (issue 15): every exported file is read back by an independent implementation of its
format's documented inference written here (numpy, float64), never by saekit's loader; import fixtures are built
from the documented layouts; round trips give back saekit's outputs.

Activations are real: stories260k's residual stream (and an MLP's input/output for transcoders) on held-out
TinyStories text.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file

from conftest import DATA_ROOT, MODEL_DIR, run_cli
from saekit.config import ForeignSite, ModelConfig
from saekit.errors import ConfigError, DataError
from saekit.formats import detect_format, open_checkpoint
from saekit.formats.gemmascope import read_gemmascope
from saekit.formats.openai import read_openai
from saekit.formats.saelens import read_saelens, write_saelens
from saekit.formats.sparsify import hook_of, hookpoint_of, read_sparsify, write_sparsify
from saekit.model import load_model
from saekit.sae import SAESpec, build_sae

HOOK, MLP_IN, MLP_OUT = "blocks.2.hook_resid_post", "blocks.2.ln2.hook_out", "blocks.2.hook_mlp_out"
TOLERANCE = 1e-5
"""The issue's target: relative error max|a − b| / max|b| of latents and reconstructions."""


@pytest.fixture(scope="module")
def acts() -> dict[str, torch.Tensor]:
    """Held-out activations at three hooks of stories260k: 30 validation stories in 64-token windows."""
    model = load_model(ModelConfig(name=str(MODEL_DIR)), torch.device("cpu"))
    text = (DATA_ROOT / "tinystories-text" / "tinystories_validation_head.txt").read_text().split("\n\n")[:30]
    ids = [model.tokenizer(story)["input_ids"] for story in text]
    flat = [token for story in ids for token in story]
    windows = torch.tensor(flat[: len(flat) // 64 * 64]).view(-1, 64)[:24]
    out = model.run_to_hooks(windows, [HOOK, MLP_IN, MLP_OUT])
    return {name: tensor[:, 1:].reshape(-1, tensor.shape[-1]).float() for name, tensor in out.items()}


def make_sae(activation: str, x: torch.Tensor, y: torch.Tensor | None = None, *, normalize: str = "scale",
             ln_style: str = "saekit", learned_scale: bool = False, skip: bool = False, n: int = 96, k: int = 8,
             seed: int = 0):
    """A saekit SAE initialized on real activations, then perturbed so every parameter matters (biases, thresholds,
    magnitudes, scales away from their initial values); eval mode."""
    generator = torch.Generator().manual_seed(seed)
    spec = SAESpec.build(activation, d=x.shape[1], n=n, k=k, normalize=normalize, ln_style=ln_style,
                         learned_scale=learned_scale, d_out=None if y is None else y.shape[1], skip=skip)
    sae = build_sae(spec)
    with torch.no_grad():
        if normalize == "scale":
            sae.input_scale.fill_(math.sqrt(x.shape[1]) / float(x.norm(dim=1).mean()))
            if y is not None:
                sae.output_scale.fill_(math.sqrt(y.shape[1]) / float(y.norm(dim=1).mean()))
        xn = sae.normalize_input(x)[0]
        sae.initialize(xn, "geometric_median", tied=True, scale_encoder=True, generator=generator)
        if y is not None:
            sae.initialize_output(xn, sae.normalize_target(y), "geometric_median", scale_encoder=True)
            if skip:
                sae.W_skip.copy_(0.05 * torch.randn(sae.W_skip.shape, generator=generator))
        sae.W_enc.add_(0.1 * torch.randn(sae.W_enc.shape, generator=generator) * sae.W_enc.abs().mean())
        sae.b_enc.copy_(0.2 * torch.randn(n, generator=generator))
        if activation == "jumprelu":
            sae.log_threshold.copy_(torch.log(0.05 + 0.3 * torch.rand(n, generator=generator)))
        if activation in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.15)
        if activation == "gated":
            sae.r_mag.copy_(0.3 * torch.randn(n, generator=generator))
            sae.b_mag.copy_(0.2 * torch.randn(n, generator=generator))
        if learned_scale:
            sae.latent_scale.copy_(0.5 + torch.rand(n, generator=generator))
    return sae.eval()


def saekit_outputs(sae, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        x_hat, z = sae.reconstruct(x)
    return z.double().numpy(), x_hat.double().numpy()


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def assert_close(got, want, what: str) -> None:
    error = relative_error(np.asarray(got), np.asarray(want))
    assert error <= TOLERANCE, f"{what}: relative error {error:.2e} > {TOLERANCE}"


# ---- independent readers: each format's documented inference, in numpy float64 --------------------------------
def relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0.0)


def topk_relu(h: np.ndarray, k: int) -> np.ndarray:
    """The k largest pre-activations per row kept, ReLU applied to them (SAELens's TopK, OpenAI's TopK)."""
    keep = np.argsort(-h, axis=1)[:, :k]
    z = np.zeros_like(h)
    rows = np.arange(h.shape[0])[:, None]
    z[rows, keep] = relu(h[rows, keep])
    return z


def sample_layer_norm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenAI's LN and SAELens's layer_norm: (x − μ)/(std + 1e-5) with the sample std; (normed, μ, std)."""
    mu = x.mean(axis=-1, keepdims=True)
    std = (x - mu).std(axis=-1, ddof=1, keepdims=True)
    return (x - mu) / (std + 1e-5), mu, std


def saelens_reference(folder: Path, x_raw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """SAELens's SAE.encode / decode from cfg.json and sae_weights.safetensors (sae_lens/saes/*.py)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {name: value.astype(np.float64) for name, value in load_numpy(str(folder / "sae_weights.safetensors")).items()}
    x = x_raw.double().numpy()
    inp, mu, std = sample_layer_norm(x) if cfg["normalize_activations"] == "layer_norm" else (x, 0.0, 1.0)
    sae_in = inp - w["b_dec"] if cfg["apply_b_dec_to_input"] else inp
    arch = cfg["architecture"]
    if arch == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"]) > 0
        z = gate * relu(sae_in @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"])
    else:
        h = sae_in @ w["W_enc"] + w["b_enc"]
        if arch.startswith("topk"):
            z = topk_relu(h, cfg["k"])
        elif arch.startswith("jumprelu"):
            z = relu(h) * (h > w["threshold"])
        else:
            assert arch in ("standard", "transcoder", "skip_transcoder"), arch
            z = relu(h)
    out = (z @ w["W_dec"] + w["b_dec"]) * std + mu
    if "W_skip" in w:
        out = out + x @ w["W_skip"].T
    return z, out


def sparsify_reference(hook_dir: Path, x_raw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """sparsify's SparseCoder: ReLU(encoder(x − b_dec)) (x itself when transcoding), top k, decode + b_dec."""
    cfg = json.loads((hook_dir / "cfg.json").read_text())
    w = {name: value.astype(np.float64) for name, value in load_numpy(str(hook_dir / "sae.safetensors")).items()}
    x = x_raw.double().numpy()
    sae_in = x if cfg.get("transcode") else x - w["b_dec"]
    pre = relu(sae_in @ w["encoder.weight"].T + w["encoder.bias"])
    z = topk_relu(pre, cfg["k"])
    out = z @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        out = out + x @ w["W_skip"].T
    return z, out


SITE = {"model_name": "stories260k", "hook_name": HOOK, "hook_name_out": None, "context_size": 64,
        "prepend_bos": True, "dataset_path": "tinystories"}

SAELENS_CASES = {
    # name: (activation, options, expected architecture)
    "relu": ("relu", {}, "standard"),
    "relu_learned_scale": ("relu", {"learned_scale": True}, "standard"),
    "relu_no_normalize": ("relu", {"normalize": "none"}, "standard"),
    "topk": ("topk", {}, "topk"),
    "multi_topk": ("multi_topk", {}, "topk"),
    "batchtopk": ("batchtopk", {}, "jumprelu"),
    "matryoshka": ("matryoshka", {}, "jumprelu"),
    "jumprelu": ("jumprelu", {}, "jumprelu"),
    "jumprelu_learned_scale": ("jumprelu", {"learned_scale": True}, "jumprelu"),
    "prolu": ("prolu", {}, "jumprelu"),
    "gated": ("gated", {}, "gated"),
    "gated_learned_scale": ("gated", {"learned_scale": True}, "gated"),
    "topk_layer_norm": ("topk", {"normalize": "layer_norm", "ln_style": "openai"}, "topk"),
    "relu_layer_norm": ("relu", {"normalize": "layer_norm", "ln_style": "openai"}, "standard"),
}


@pytest.mark.parametrize("case", sorted(SAELENS_CASES))
def test_saelens_export_reproduces_saekit_under_saelens_inference(tmp_path, acts, case):
    activation, options, architecture = SAELENS_CASES[case]
    x = acts[HOOK]
    sae = make_sae(activation, x, **options)
    z, x_hat = saekit_outputs(sae, x)
    assert 0 < (z != 0).sum(axis=1).mean() < sae.spec.n, "the SAE must fire some latents, not all"
    write_saelens(tmp_path, sae, SITE, {"spec": sae.spec.to_dict()}, density=None)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["d_in"] == 64 and cfg["d_sae"] == 96
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "stories260k"
    assert cfg["metadata"]["sae_lens_version"] >= "6"  # else SAELens reads it as a pre-6.0 cfg and drops metadata
    z_ref, x_hat_ref = saelens_reference(tmp_path, x)
    assert_close(z_ref, z, f"{case} latents")
    assert_close(x_hat_ref, x_hat, f"{case} reconstructions")
    # Round trip: the folder read back by saekit gives the same outputs.
    back = read_saelens(tmp_path)
    z_back, x_hat_back = saekit_outputs(back.sae, x)
    assert_close(z_back, z, f"{case} round-trip latents")
    assert_close(x_hat_back, x_hat, f"{case} round-trip reconstructions")


@pytest.mark.parametrize("activation,skip,architecture", [("relu", False, "transcoder"),
                                                          ("relu", True, "skip_transcoder"),
                                                          ("jumprelu", True, "jumprelu_skip_transcoder")])
def test_saelens_transcoder_export(tmp_path, acts, activation, skip, architecture):
    x, y = acts[MLP_IN], acts[MLP_OUT]
    sae = make_sae(activation, x, y, skip=skip)
    z, y_hat = saekit_outputs(sae, x)
    write_saelens(tmp_path, sae, {**SITE, "hook_name": MLP_IN, "hook_name_out": MLP_OUT}, {}, density=None)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["d_out"] == 64 and not cfg["apply_b_dec_to_input"]
    assert cfg["metadata"]["hook_name_out"] == MLP_OUT
    z_ref, y_ref = saelens_reference(tmp_path, x)
    assert_close(z_ref, z, "transcoder latents")
    assert_close(y_ref, y_hat, "transcoder predictions")
    back = read_saelens(tmp_path)
    assert back.sae.transcoder and back.sae.spec.skip == skip
    assert_close(saekit_outputs(back.sae, x)[1], y_hat, "transcoder round trip")


def test_saekit_layer_norm_exports_within_its_documented_bound(tmp_path, acts, caplog):
    """saekit's own layer norm (population std, clamped) is not SAELens's (sample std + 1e-5): the weights absorb the
    std ratio and the export warns; what remains is the 1e-5 added to each token's std, a relative error of at most
    1e-5/std per token."""
    x = acts[HOOK]
    sae = make_sae("relu", x, normalize="layer_norm")
    z, x_hat = saekit_outputs(sae, x)
    with caplog.at_level("WARNING"):
        write_saelens(tmp_path, sae, SITE, {}, density=None)
    assert "sample std" in caplog.text
    z_ref, x_hat_ref = saelens_reference(tmp_path, x)
    xn = x.double().numpy()
    bound = 1e-5 / (xn - xn.mean(1, keepdims=True)).std(1, ddof=1).min()
    assert relative_error(z_ref, z) <= 2 * bound + TOLERANCE
    assert relative_error(x_hat_ref, x_hat) <= 2 * bound + TOLERANCE


def test_saelens_sparsity_file_holds_log10_firing_rates(tmp_path, acts):
    sae = make_sae("topk", acts[HOOK])
    density = torch.tensor([0.5, 0.0, 1e-3] + [0.25] * 93)
    write_saelens(tmp_path, sae, SITE, {}, density=density)
    stored = load_numpy(str(tmp_path / "sparsity.safetensors"))["sparsity"]
    assert stored.shape == (96,)
    assert stored[0] == pytest.approx(math.log10(0.5), abs=1e-6)
    assert stored[1] == pytest.approx(-10.0, abs=1e-6)   # log10(0 + 1e-10): dead
    assert stored[2] == pytest.approx(-3.0, abs=1e-6)


def test_saelens_refuses_what_it_cannot_hold(tmp_path, acts):
    sae = make_sae("topk", acts[HOOK], learned_scale=True)
    with pytest.raises(ConfigError, match="learned_scale"):
        write_saelens(tmp_path, sae, SITE, {}, density=None)
    transcoder = make_sae("topk", acts[MLP_IN], acts[MLP_OUT])
    with pytest.raises(ConfigError, match="format=sparsify"):
        write_saelens(tmp_path, transcoder, SITE, {}, density=None)
    assert not any(tmp_path.iterdir())


def test_saelens_topk_with_decoder_norm_rescaling_imports(tmp_path, acts):
    """SAELens's TopK with rescale_acts_by_decoder_norm ranks h·‖d_i‖ and decodes z/‖d_i‖ (sae_lens/saes/topk_sae.py)."""
    x = acts[HOOK]
    write_saelens(tmp_path, make_sae("topk", x, normalize="none"), SITE, {}, density=None)
    weights = load_numpy(str(tmp_path / "sae_weights.safetensors"))
    weights["W_dec"] = weights["W_dec"] * np.linspace(0.5, 2.0, 96, dtype=np.float32)[:, None]
    save_file({key: torch.from_numpy(value) for key, value in weights.items()}, str(tmp_path / "sae_weights.safetensors"))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": True}))
    w = {key: value.astype(np.float64) for key, value in weights.items()}
    norms = np.linalg.norm(w["W_dec"], axis=1)
    h = (x.double().numpy() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    z_ref = topk_relu(h * norms, 8)
    x_hat_ref = (z_ref / norms) @ w["W_dec"] + w["b_dec"]
    z, x_hat = saekit_outputs(read_saelens(tmp_path).sae, x)
    assert_close(z, z_ref, "rescaled topk latents")
    assert_close(x_hat, x_hat_ref, "rescaled topk reconstructions")


@pytest.mark.parametrize("activation,transcoder,skip", [("topk", False, False), ("multi_topk", False, False),
                                                        ("topk", True, True)])
def test_sparsify_export_reproduces_saekit_under_sparsify_inference(tmp_path, acts, activation, transcoder, skip):
    x = acts[MLP_IN] if transcoder else acts[HOOK]
    sae = make_sae(activation, x, acts[MLP_OUT] if transcoder else None, skip=skip)
    z, x_hat = saekit_outputs(sae, x)
    hook_dir = write_sparsify(tmp_path, "layers.2", sae, {})
    cfg = json.loads((hook_dir / "cfg.json").read_text())
    assert hook_dir.name == "layers.2" and cfg["k"] == 8 and cfg["num_latents"] == 96
    assert cfg["multi_topk"] == (activation == "multi_topk") and cfg["transcode"] == transcoder
    z_ref, x_hat_ref = sparsify_reference(hook_dir, x)
    assert_close(z_ref, z, "sparsify latents")
    assert_close(x_hat_ref, x_hat, "sparsify reconstructions")
    back = read_sparsify(hook_dir)
    assert back.sae.spec.activation == activation and back.provenance.hook == HOOK
    z_back, x_hat_back = saekit_outputs(back.sae, x)
    assert_close(z_back, z, "sparsify round-trip latents")
    assert_close(x_hat_back, x_hat, "sparsify round-trip reconstructions")


def test_sparsify_hookpoint_names():
    assert hookpoint_of("blocks.3.hook_resid_post", "llama") == "layers.3"
    assert hookpoint_of("blocks.3.hook_resid_post", "gpt2") == "h.3"
    assert hookpoint_of("blocks.0.hook_mlp_out", None) == "layers.0.mlp"
    assert hook_of("layers.11") == "blocks.11.hook_resid_post"
    assert hook_of("h.4.mlp") == "blocks.4.hook_mlp_out"
    assert hook_of("embed_tokens") is None
    with pytest.raises(ConfigError, match="hookpoint="):
        hookpoint_of("blocks.3.attn.hook_z", None)


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk", "relu"])
def test_sparsify_refuses_non_topk(tmp_path, acts, activation):
    with pytest.raises(ConfigError, match="format=saelens"):
        write_sparsify(tmp_path, "layers.2", make_sae(activation, acts[HOOK]), {})
    assert not any(tmp_path.iterdir())


# ---- import fixtures built from the documented layouts --------------------------------------------------------
def test_gemmascope_npz_import_matches_its_documented_inference(tmp_path, acts):
    x = acts[HOOK]
    rng = np.random.default_rng(1)
    d, n = 64, 80
    W_enc = rng.normal(0, 0.3, (d, n)).astype(np.float32)
    threshold = np.abs(rng.normal(0.5, 0.5, n)).astype(np.float32)
    threshold[0] = 0.0
    arrays = {"W_enc": W_enc, "W_dec": rng.normal(0, 0.2, (n, d)).astype(np.float32),
              "b_enc": rng.normal(0, 0.5, n).astype(np.float32), "b_dec": rng.normal(0, 0.5, d).astype(np.float32),
              "threshold": threshold}
    path = tmp_path / "layer_2" / "width_80" / "average_l0_20" / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **arrays)
    assert detect_format(path) == "gemmascope"
    # Gemma Scope's tutorial: pre = x W_enc + b_enc (no b_dec subtraction), mask = pre > threshold.
    xn = x.double().numpy()
    w = {key: value.astype(np.float64) for key, value in arrays.items()}
    pre = xn @ w["W_enc"] + w["b_enc"]
    z_ref = (pre > w["threshold"]) * relu(pre)
    x_hat_ref = z_ref @ w["W_dec"] + w["b_dec"]
    assert 0 < (z_ref != 0).sum(1).mean() < n
    imported = read_gemmascope(path)
    z, x_hat = saekit_outputs(imported.sae, x)
    assert_close(z, z_ref, "gemma scope latents")
    assert_close(x_hat, x_hat_ref, "gemma scope reconstructions")


def openai_state_dict(d: int, n: int, activation: str, k: int, seed: int = 2) -> dict:
    """What openai/sparse_autoencoder's Autoencoder.state_dict() holds (model.py): its parameters and buffers, the
    activation's class name and, for TopK, its own state {k, postact_fn}."""
    gen = torch.Generator().manual_seed(seed)
    state = {"pre_bias": 0.3 * torch.randn(d, generator=gen), "latent_bias": 0.2 * torch.randn(n, generator=gen),
             "encoder.weight": 0.4 * torch.randn(n, d, generator=gen),
             "decoder.weight": 0.2 * torch.randn(d, n, generator=gen),
             "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
             "latents_activation_frequency": torch.ones(n), "latents_mean_square": torch.zeros(n),
             "activation": activation}
    if activation == "TopK":
        state["activation_state_dict"] = {"k": k, "postact_fn": "ReLU"}
    return state


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_openai_pt_import_matches_its_documented_inference(tmp_path, acts, activation):
    x = acts[HOOK]
    state = openai_state_dict(64, 80, activation, k=12)
    path = tmp_path / "8.pt"
    torch.save(state, path)
    assert detect_format(path) == "openai"
    xn = x.double().numpy()
    w = {key: value.double().numpy() for key, value in state.items() if torch.is_tensor(value)}
    # model.py: TopK SAEs normalize (LN) the input; encode = act(W_enc(x − pre_bias) + latent_bias);
    # decode = W_dec z + pre_bias, then · std + μ.
    inp, mu, std = sample_layer_norm(xn) if activation == "TopK" else (xn, 0.0, 1.0)
    pre = (inp - w["pre_bias"]) @ w["encoder.weight"].T + w["latent_bias"]
    z_ref = topk_relu(pre, 12) if activation == "TopK" else relu(pre)
    x_hat_ref = (z_ref @ w["decoder.weight"].T + w["pre_bias"]) * std + mu
    imported = read_openai(path)
    z, x_hat = saekit_outputs(imported.sae, x)
    assert_close(z, z_ref, f"openai {activation} latents")
    assert_close(x_hat, x_hat_ref, f"openai {activation} reconstructions")


class _Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_pt_is_refused_without_running_anything(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"encoder.weight": torch.zeros(4, 4), "activation": _Exploit(marker)}, handle)
    with pytest.raises(DataError, match="refused"):
        read_openai(path)
    assert not marker.exists()
    # The same through the command line: one line, exit 2, nothing run, nothing written.
    out = tmp_path / "imported"
    result = run_cli("import", str(path), f"out={out}", "model=stories260k", f"hook={HOOK}", "data=tinystories")
    assert result.returncode == 2 and "refused" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not marker.exists() and not out.exists()


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "params.npz"
    np.savez(path, W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="never unpickles"):
        read_gemmascope(path)


def test_older_flat_saelens_cfg_with_topk_activation_fn(tmp_path, acts):
    """SAELens 3–5 kept run facts at the top level and wrote TopK as architecture standard, activation_fn topk."""
    x = acts[HOOK]
    sae = make_sae("topk", x, normalize="none")
    write_saelens(tmp_path, sae, SITE, {}, density=None)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    flat = {**cfg.pop("metadata"), **cfg, "architecture": "standard", "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": cfg["k"]}}
    del flat["k"]
    (tmp_path / "cfg.json").write_text(json.dumps(flat))
    back = read_saelens(tmp_path)
    assert back.sae.spec.activation == "topk" and back.sae.spec.k == 8 and back.provenance.hook == HOOK
    assert_close(saekit_outputs(back.sae, x)[1], saekit_outputs(sae, x)[1], "flat-cfg topk")


def test_foreign_file_without_hook_needs_hook_override(tmp_path):
    path = tmp_path / "8.pt"
    torch.save(openai_state_dict(64, 80, "TopK", k=12), path)
    with pytest.raises(DataError, match="hook="):
        open_checkpoint(path, ForeignSite(model=ModelConfig(name=str(MODEL_DIR))))
    with pytest.raises(DataError, match="model="):
        open_checkpoint(path, ForeignSite(hook=HOOK))


# ---- the commands ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jumprelu_run(tmp_path_factory, small_text) -> tuple[Path, Path]:
    run_dir = tmp_path_factory.mktemp("runs") / "jr"
    cache = tmp_path_factory.mktemp("cache")
    result = run_cli("train", "activation=jumprelu", "lam=0.01", "n=64", "n_tokens=16384", "batch_size=1024",
                     "data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=2048",
                     "final_eval.downstream=false", f"cache.dir={cache}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, cache


def _metrics(folder: Path) -> dict:
    import pandas as pd

    table = pd.read_csv(folder / "results.csv")
    return dict(zip(table["metric"], table["value"]))


def test_eval_of_an_exported_folder_equals_eval_of_the_run(tmp_path, jumprelu_run):
    run_dir, cache = jumprelu_run
    exported = tmp_path / "saelens"
    result = run_cli("export", f"ckpt={run_dir}", "format=saelens", f"out={exported}", f"cache.dir={cache}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in exported.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    evaluations = {}
    for name, ckpt in (("run", run_dir), ("saelens", exported)):
        result = run_cli("eval", f"ckpt={ckpt}", f"cache.dir={cache}", "downstream=false", "ablation_positions=0",
                         "refine_tokens=0", f"hydra.run.dir={tmp_path / ('eval_' + name)}")
        assert result.returncode == 0, result.stderr[-3000:]
        evaluations[name] = _metrics(tmp_path / f"eval_{name}")
    for metric in ("nmse", "l0", "mse", "dead_frac"):
        assert evaluations["saelens"][metric] == pytest.approx(evaluations["run"][metric], rel=1e-5, abs=1e-9), metric
    # The sparsity file holds the same held-out firing rates the eval measured (log10).
    import pandas as pd

    density = pd.read_parquet(tmp_path / "eval_run" / "latents.parquet")["density"].to_numpy()
    stored = load_numpy(str(exported / "sparsity.safetensors"))["sparsity"]
    np.testing.assert_allclose(stored, np.log10(density + 1e-10), rtol=1e-5, atol=1e-6)


def test_export_refusals_change_nothing(tmp_path, jumprelu_run):
    run_dir, cache = jumprelu_run
    result = run_cli("export", f"ckpt={run_dir}", "format=sparsify", f"out={tmp_path / 'sp'}", f"cache.dir={cache}")
    assert result.returncode == 2 and "format=saelens" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "sp").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = run_cli("export", f"ckpt={run_dir}", f"out={busy}", f"cache.dir={cache}")
    assert result.returncode == 2 and "overwrite=true" in result.stderr, result.stderr[-2000:]
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"
    result = run_cli("export", f"ckpt={run_dir}", "format=onnx", f"out={tmp_path / 'x'}")
    assert result.returncode == 2 and "format=" in result.stderr and not (tmp_path / "x").exists()


def test_import_then_eval_equals_eval_of_the_foreign_file(tmp_path, jumprelu_run, small_text):
    """A Gemma Scope-style file imported with model/hook/data given, evaluated from the checkpoint and directly."""
    _, cache = jumprelu_run
    rng = np.random.default_rng(3)
    d, n = 64, 48
    path = tmp_path / "params.npz"
    np.savez(path, W_enc=rng.normal(0, 0.3, (d, n)).astype(np.float32),
             W_dec=rng.normal(0, 0.2, (n, d)).astype(np.float32), b_enc=rng.normal(0, 0.5, n).astype(np.float32),
             b_dec=rng.normal(0, 0.5, d).astype(np.float32), threshold=np.full(n, 0.5, dtype=np.float32))
    site = ["model=stories260k", f"hook={HOOK}", "data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32",
            "data.n_eval_tokens=2048"]
    result = run_cli("import", str(path), f"out={tmp_path / 'imported'}", *site)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "imported" / "sae.safetensors").is_file()
    common = [f"cache.dir={cache}", "downstream=false", "ablation_positions=0", "refine_tokens=0"]
    result = run_cli("eval", f"ckpt={tmp_path / 'imported'}", *common, f"hydra.run.dir={tmp_path / 'e1'}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("eval", f"ckpt={path}", *site, *common, f"hydra.run.dir={tmp_path / 'e2'}")
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = _metrics(tmp_path / "e1"), _metrics(tmp_path / "e2")
    assert first["nmse"] == pytest.approx(second["nmse"], rel=1e-9) and first["l0"] == second["l0"]
    assert 0 < first["l0"] < n
    # Without a hook the file says nothing about, the import is refused in one line and writes nothing.
    result = run_cli("import", str(path), f"out={tmp_path / 'nohook'}", "model=stories260k", "data=tinystories")
    assert result.returncode == 2 and "hook=" in result.stderr and not (tmp_path / "nohook").exists()


def test_hand_written_saelens_folders_read_as_documented(tmp_path, acts):
    """SAELens folders written here from the documented layout (not by saekit's exporter): a standard SAE that does
    not subtract b_dec from its input, and a JumpReLU with some negative thresholds (ReLU(h)·1[h > θ])."""
    x = acts[HOOK]
    rng = np.random.default_rng(5)
    d, n = 64, 72
    base = {"W_enc": rng.normal(0, 0.3, (d, n)), "b_enc": rng.normal(0, 0.5, n), "W_dec": rng.normal(0, 0.2, (n, d)),
            "b_dec": rng.normal(0, 0.5, d)}
    cases = {"standard": ({}, {"apply_b_dec_to_input": False}),
             "jumprelu": ({"threshold": np.where(np.arange(n) % 5 == 0, -0.3, 0.4)}, {"apply_b_dec_to_input": True})}
    for architecture, (extra, options) in cases.items():
        folder = tmp_path / architecture
        folder.mkdir()
        tensors = {key: torch.tensor(value, dtype=torch.float32) for key, value in {**base, **extra}.items()}
        save_file(tensors, str(folder / "sae_weights.safetensors"))
        cfg = {"architecture": architecture, "d_in": d, "d_sae": n, "dtype": "float32", "device": "cpu",
               "normalize_activations": "none", **options,
               "metadata": {"sae_lens_version": "6.54.12", "model_name": "gpt2-small", "hook_name": HOOK,
                            "context_size": 128, "prepend_bos": True, "dataset_path": "Skylion007/openwebtext"}}
        (folder / "cfg.json").write_text(json.dumps(cfg))
        z_ref, x_hat_ref = saelens_reference(folder, x)
        imported = read_saelens(folder)
        assert imported.provenance.model_name == "gpt2-small" and imported.provenance.dataset_path
        z, x_hat = saekit_outputs(imported.sae, x)
        assert 0 < (z_ref != 0).sum(1).mean() < n
        assert_close(z, z_ref, f"hand-written {architecture} latents")
        assert_close(x_hat, x_hat_ref, f"hand-written {architecture} reconstructions")


def test_foreign_metadata_names_the_hub_model_and_dataset(tmp_path, acts):
    """A SAELens file's transformer-lens model name maps to its Hub name; its dataset becomes data=hf."""
    write_saelens(tmp_path, make_sae("topk", acts[HOOK]), {**SITE, "model_name": "gpt2-small",
                                                             "dataset_path": "Skylion007/openwebtext"}, {}, None)
    _, meta = open_checkpoint(tmp_path, ForeignSite())
    trained = meta["train_config"]
    assert trained["model"]["name"] == "gpt2" and trained["model"]["display_name"] == "gpt2-small"
    assert trained["data"]["source"] == "hf" and trained["data"]["hf_path"] == "Skylion007/openwebtext"
    assert trained["data"]["ctx_len"] == 64 and trained["hook"] == HOOK and meta["imported"]["format"] == "saelens"


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory, small_text, jumprelu_run) -> Path:
    _, cache = jumprelu_run
    run_dir = tmp_path_factory.mktemp("runs") / "topk"
    result = run_cli("train", "activation=topk", "k=4", "n=64", "n_tokens=16384", "batch_size=1024",
                     "data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=2048",
                     "final_eval.downstream=false", f"cache.dir={cache}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_eval_of_a_sparsify_export_and_of_an_openai_file(tmp_path, topk_run, jumprelu_run, small_text):
    _, cache = jumprelu_run
    common = [f"cache.dir={cache}", "downstream=false", "ablation_positions=0", "refine_tokens=0"]
    exported = tmp_path / "sparsify"
    result = run_cli("export", f"ckpt={topk_run}", "format=sparsify", f"out={exported}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (exported / "layers.2").iterdir()) == ["cfg.json", "sae.safetensors"]
    for name, ckpt in (("run", topk_run), ("sparsify", exported)):
        result = run_cli("eval", f"ckpt={ckpt}", *common, f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
    run, sparsify = _metrics(tmp_path / "run"), _metrics(tmp_path / "sparsify")
    assert sparsify["nmse"] == pytest.approx(run["nmse"], rel=1e-5) and sparsify["l0"] == pytest.approx(run["l0"])
    assert sparsify["cossim"] == pytest.approx(run["cossim"], rel=1e-6)
    # An OpenAI state dict, evaluated directly with model, hook and data named on the command line.
    path = tmp_path / "2.pt"
    torch.save(openai_state_dict(64, 80, "TopK", k=12), path)
    result = run_cli("eval", f"ckpt={path}", "model=stories260k", f"hook={HOOK}", "data=text_files",
                     f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=2048", *common,
                     f"hydra.run.dir={tmp_path / 'openai'}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(tmp_path / "openai")
    assert 6 < metrics["l0"] <= 12 and 0 < metrics["frac_alive"] <= 1
