"""Half-precision models (model.dtype=bfloat16/float16): the SAE stays float32 and gets float32 input, what is
spliced back is in the model's dtype, and cache → train → eval → downstream works end to end."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from conftest import MODEL_DIR, run_cli
from saekit.config import CacheConfig, DataConfig, EvalConfig, ModelConfig, SiteConfig
from saekit.downstream import ablation_sparsity, downstream_metrics
from saekit.evaluate import evaluate_checkpoint, spliced
from saekit.sae import SAESpec, build_sae
from saekit.tasks import ModelPool, activation_cache

HOOK = "blocks.2.hook_resid_post"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models() -> ModelPool:
    return ModelPool(CPU)


def site(small_text, cache_dir, dtype: str) -> SiteConfig:
    data = DataConfig(name="small", paths=[str(small_text)], ctx_len=32, n_eval_tokens=1024)
    return SiteConfig(model=ModelConfig(name=str(MODEL_DIR), dtype=dtype), data=data,
                      cache=CacheConfig(dir=str(cache_dir)), device="cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("half_cache")


def sae_on(x: torch.Tensor, n: int = 256, k: int = 8):
    sae = build_sae(SAESpec.build("topk", d=64, n=n, k=k, normalize="scale"))
    sae.input_scale.fill_(8.0 / float(x.norm(dim=1).mean()))
    sae.initialize(x[:512] * sae.input_scale, "zero", tied=True, scale_encoder=True,
                   generator=torch.Generator().manual_seed(0))
    return sae.eval()


def test_the_splice_takes_half_activations_and_gives_them_back_in_half():
    sae = sae_on(torch.randn(512, 64) * 3)
    acts = (torch.randn(40, 64) * 3).to(torch.bfloat16)
    out = spliced(sae)(acts)
    assert out.dtype == torch.bfloat16 and sae.W_dec.dtype == torch.float32
    expected = sae.reconstruct(acts.float())[0]
    assert torch.allclose(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_metric_runs_on_a_half_precision_model(dtype, small_text, cache_dir, models):
    """Cache from the half model (stored float32), the float32 SAE evaluated with downstream splices and ablation
    sparsity through that model; the clean loss agrees with the float32 model's to 0.05 nats."""
    cfg = site(small_text, cache_dir, dtype)
    cache = activation_cache(cfg, 100_000, models, splits=("eval",))
    model = models.get(cfg.model)
    assert next(model.bridge.parameters()).dtype == getattr(torch, dtype)
    x = torch.cat(list(cache.iter_split("eval", 4096)))
    assert x.dtype == torch.float32
    sae = sae_on(x)
    settings = EvalConfig(ckpt="<test>", downstream_tokens=256, downstream_batch_windows=4, ablation_positions=2,
                          ablation_horizon=4, refine_tokens=256, refine_steps=10)
    metrics = evaluate_checkpoint(sae, cache, settings, CPU, model, HOOK).metrics
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    assert metrics["ablation_n"] == 16 and 0 < metrics["nmse"] < 1 and metrics["delta_ce"] > 0

    reference = models.get(ModelConfig(name=str(MODEL_DIR)))
    windows = cache.tokens("eval")[:8]
    clean = lambda model: downstream_metrics(model, HOOK, windows, lambda a: a.clone(), x.mean(0))  # noqa: E731
    assert clean(model)["ce_clean"] == pytest.approx(clean(reference)["ce_clean"], abs=0.05)
    result = ablation_sparsity(model, HOOK, sae, windows, n_positions=2, horizon=4)
    assert result["ablation_n"] == 16 and math.isfinite(result["ablation_sparsity"])


@pytest.mark.slow
def test_bfloat16_model_through_train_and_eval_from_the_cli(tmp_path, small_text):
    run = tmp_path / "run"
    trained = run_cli("train", "model.dtype=bfloat16", "data=text_files", f"data.paths=[{small_text}]",
                      "data.ctx_len=32", "data.n_eval_tokens=1024", "n=64", "k=4", "n_tokens=16384",
                      "batch_size=1024", f"cache.dir={tmp_path / 'cache'}", "final_eval.downstream=true",
                      "final_eval.downstream_tokens=512", "device=cpu", f"hydra.run.dir={run}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_cli("eval", f"ckpt={run}", f"cache.dir={tmp_path / 'cache'}", "device=cpu",
                        "downstream_tokens=512", "ablation_positions=2", "refine_tokens=256",
                        f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    for folder in (run, tmp_path / "eval"):
        values = pd.read_csv(folder / "results.csv").set_index("metric")["value"]
        assert math.isfinite(values["delta_ce"]) and values["delta_ce"] > 0
        assert 0 < values["nmse"] < 1 and values["l0"] == pytest.approx(4.0)
    assert (tmp_path / "eval" / "latents.parquet").is_file()
