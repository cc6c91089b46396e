"""The command line end to end on stories260k: training quality, the results contract, eval, errors, packaging."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pandas as pd
import pytest

from conftest import REPO, cli_env, run_cli

REQUIRED_COLUMNS = ["run_id", "model", "hook", "layer", "activation", "n", "k", "lam", "tokens", "metric", "value"]
CORE_METRICS = ["mse", "nmse", "explained_variance", "l0", "dead_frac"]


def metrics_of(folder) -> dict[str, float]:
    table = pd.read_csv(folder / "results.csv")
    return dict(zip(table["metric"], table["value"]))


def test_topk_k8_reaches_low_held_out_nmse_with_the_full_results_table(trained_run):
    table = pd.read_csv(trained_run / "results.csv")
    assert all(column in table.columns for column in REQUIRED_COLUMNS)
    metrics = metrics_of(trained_run)
    assert set(CORE_METRICS) <= set(metrics)
    assert metrics["nmse"] <= 0.15  # the mean predictor scores 1.0
    assert abs(metrics["explained_variance"] - (1 - metrics["nmse"])) < 1e-9
    assert metrics["l0"] == pytest.approx(8.0)
    assert 0 <= metrics["dead_frac"] <= 1
    row = table.iloc[0]
    assert (row["model"], row["hook"], row["layer"], row["activation"], row["n"], row["k"]) == \
        ("stories260k", "blocks.2.hook_resid_post", 2, "topk", 512, 8)
    assert row["tokens"] >= 990_000
    parquet = pd.read_parquet(trained_run / "results.parquet")
    assert list(parquet["metric"]) == list(table["metric"]) and list(parquet["value"]) == pytest.approx(list(table["value"]))
    steps = pd.read_csv(trained_run / "steps.csv")
    for column in ("step", "tokens", "loss", "mse", "l0", "dead_frac", "lr", "tokens_per_s"):
        assert column in steps.columns
    assert steps["loss"].iloc[-1] < steps["loss"].iloc[0]


@pytest.mark.parametrize("target", ["folder", "file"])
def test_eval_on_a_run_folder_or_checkpoint_reproduces_the_metrics(trained_run, cache_root, tmp_path, target):
    ckpt = trained_run if target == "folder" else trained_run / "sae.safetensors"
    result = run_cli("eval", f"ckpt={ckpt}", f"cache.dir={cache_root}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reusing activation cache" in result.stdout  # same model/hook/data as training: no rebuild
    trained, evaluated = metrics_of(trained_run), metrics_of(tmp_path / "eval")
    for metric in CORE_METRICS:
        assert evaluated[metric] == pytest.approx(trained[metric], rel=1e-6, abs=1e-9)
    assert list(pd.read_csv(tmp_path / "eval" / "results.csv").columns[:11]) == REQUIRED_COLUMNS


def test_rerunning_a_finished_run_does_not_train_again(trained_run, cache_root):
    before = (trained_run / "sae.safetensors").read_bytes()
    result = run_cli("train", "activation=topk", "k=8", "n=512", "n_tokens=1000000", "data.ctx_len=64",
                     f"cache.dir={cache_root}", f"hydra.run.dir={trained_run}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 0 steps" in result.stdout
    assert (trained_run / "sae.safetensors").read_bytes() == before


@pytest.mark.parametrize("args, expected", [
    (["activation=nope"], "activation=nope is not an option; use one of:"),
    (["bogus_key=1"], "bogus_key is not a saekit setting"),
    (["k=0"], "k=0 must be in 1..n"),
    (["k=600", "n=512"], "k=600 must be in 1..n (n=512)"),
    (["k=abc"], "k: Value 'abc'"),
    (["device=tpu"], "device='tpu' is not valid; use one of: auto, cpu, cuda"),
    (["layer=7"], "layer=7 (hook blocks.7.hook_resid_post) is outside stories260k, which has layers 0..4"),
    (["hook=blocks.1.hook_nothing"], "hook=blocks.1.hook_nothing is not a hook point of stories260k"),
    (["model.name=/no/such/model"], "model.name=/no/such/model: no model folder there"),
    (["data=text_files", "data.paths=[/no/such/text.txt]"], "data.paths: file /no/such/text.txt not found"),
    (["data.n_train_tokens=50000000"], "data.n_train_tokens=50000000 but the training text (data.paths) holds only"),
    (["data.n_eval_tokens=50000000"], "data.n_eval_tokens=50000000 but the held-out text holds only"),
    (["activation=prolu", "activation.grad_mode=foo"], "activation.grad_mode='foo' is not valid; use one of: relu, ste"),
    (["dead=resample", "dead.resample_steps=[5000]"], "dead.resample_steps=[5000] has steps at or past the run's end"),
    (["dead=revive"], "dead=revive is not an option; use one of: auxk, none, resample"),
])
def test_bad_input_is_one_line_naming_the_setting(tmp_path, cache_root, args, expected):
    run_dir = tmp_path / "run"
    result = run_cli("train", *args, f"cache.dir={cache_root}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [errors[-1]] and errors[0].startswith("saekit: error: "), result.stderr
    assert expected in errors[0]
    assert not run_dir.exists()  # nothing is left behind


def test_eval_errors_are_one_line(tmp_path):
    missing = run_cli("eval", f"ckpt={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path / 'e1'}")
    assert missing.returncode == 2 and "no such run folder or checkpoint file" in missing.stderr
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    corrupt = run_cli("eval", f"ckpt={broken}", f"hydra.run.dir={tmp_path / 'e2'}")
    assert corrupt.returncode == 2 and "corrupt or truncated" in corrupt.stderr
    required = run_cli("eval")
    assert required.returncode == 2 and "ckpt is required" in required.stderr


def test_cache_whose_files_do_not_match_the_manifest_is_refused(tmp_path, small_text):
    args = ["data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=1024",
            f"cache.dir={tmp_path / 'cache'}"]
    built = run_cli("cache", *args, f"hydra.run.dir={tmp_path / 'c'}")
    assert built.returncode == 0, built.stderr[-2000:]
    shard = next((tmp_path / "cache").glob("*/train_00000.safetensors"))
    original = shard.read_bytes()
    shard.write_bytes(original[:-8] + b"\x00" * 8)
    # Opening checks sizes only (a cache is hashed once, when built); cache.verify=full re-hashes on open.
    result = run_cli("train", *args, "cache.verify=full", "n_tokens=20000", "batch_size=1024",
                     f"hydra.run.dir={tmp_path / 't'}")
    assert result.returncode == 2
    assert "train_00000.safetensors has a different sha256 than the manifest" in result.stderr
    shard.write_bytes(original[:-8])
    truncated = run_cli("train", *args, "n_tokens=20000", "batch_size=1024", f"hydra.run.dir={tmp_path / 't2'}")
    assert truncated.returncode == 2
    assert "train_00000.safetensors has" in truncated.stderr and "bytes, manifest says" in truncated.stderr


def test_help_and_cfg_job_compose_the_documented_overrides():
    helped = run_cli("train", "--help")
    listed = next(line for line in helped.stdout.splitlines() if line.startswith("activation: "))
    assert helped.returncode == 0 and set(listed[len("activation: "):].split(", ")) >= {
        "batchtopk", "gated", "jumprelu", "matryoshka", "multi_topk", "prolu", "relu", "topk"}
    job = run_cli("train", "activation=relu", "lam=3e-3", "n=4096", "layer=3", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    for line in ("name: relu", "lam: 0.003", "'n': 4096", "layer: 3"):
        assert line in job.stdout
    card = run_cli("train", "activation=topk", "k=32", "--cfg", "job")
    assert card.returncode == 0 and "k: 32" in card.stdout and "name: topk" in card.stdout
    usage = run_cli()
    assert usage.returncode == 0 and "train" in usage.stdout and "eval" in usage.stdout


def test_wheel_ships_conf_and_runs_from_it(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("saekit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "saekit/conf/train.yaml" in names and "saekit/conf/activation/topk.yaml" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = dict(cli_env(), PYTHONPATH=str(target))
    job = subprocess.run([sys.executable, "-c", "import sys; from saekit.cli import conf_dir, main; "
                          "print(conf_dir()); sys.argv=['saekit','train','k=4','--cfg','job']; main()"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr[-2000:]
    assert str(target / "saekit" / "conf") in job.stdout and "k: 4" in job.stdout


def test_sweep_runs_one_job_per_combination(tmp_path, small_text, cache_root):
    result = run_cli("sweep", "k=4,8", "data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32",
                     "data.n_eval_tokens=1024", "n=64", "n_tokens=20480", "batch_size=1024", f"cache.dir={cache_root}",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr[-2000:]
    l0 = {}
    for job in (tmp_path / "sweep").iterdir():
        if (job / "results.csv").exists():
            l0[job.name] = metrics_of(job)["l0"]
    assert sorted(l0.values()) == pytest.approx([4.0, 8.0]) and len(l0) == 2
    # `saekit eval` on the sweep folder evaluates every run in it into one table.
    evaluated = run_cli("eval", f"ckpt={tmp_path / 'sweep'}", f"cache.dir={cache_root}", "downstream=false",
                        "ablation_positions=0", f"hydra.run.dir={tmp_path / 'sweep_eval'}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    table = pd.read_csv(tmp_path / "sweep_eval" / "results.csv")
    assert sorted(table.loc[table["metric"] == "l0", "value"]) == pytest.approx([4.0, 8.0])
    assert table["run_id"].nunique() == 2
    assert len(list((tmp_path / "sweep_eval").glob("*/latents.parquet"))) == 2


def test_eval_refuses_the_training_state_file_with_one_line(trained_run, tmp_path):
    result = run_cli("eval", f"ckpt={trained_run / 'checkpoints' / 'state.safetensors'}", f"hydra.run.dir={tmp_path / 'e'}")
    assert result.returncode == 2 and "not the training state" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("activation", ["batchtopk", "multi_topk", "jumprelu", "prolu", "gated", "relu", "topk"])
@pytest.mark.parametrize("dead", ["auxk", "resample", "none"])
def test_every_activation_and_dead_remedy_composes(activation, dead):
    from saekit.cli import _register, preflight

    _register()
    cfg = preflight("train", [f"activation={activation}", f"dead={dead}", "activation.learned_scale=true"])
    assert cfg.activation.name == activation and cfg.dead.method == dead and cfg.activation.learned_scale


def test_batchtopk_with_resampling_trains_and_eval_reproduces_it(tmp_path, small_text, cache_root):
    run_dir = tmp_path / "btk"
    args = ["data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=2048",
            f"cache.dir={cache_root}"]
    trained = run_cli("train", "activation=batchtopk", "k=8", "n=256", "dead=resample", "dead.resample_steps=[20,40]",
                      "n_tokens=204800", "batch_size=2048", *args, f"hydra.run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "step 20: resampled" in trained.stdout and "step 40: resampled" in trained.stdout
    evaluated = run_cli("eval", f"ckpt={run_dir}", f"cache.dir={cache_root}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    before, after = metrics_of(run_dir), metrics_of(tmp_path / "eval")
    for metric in CORE_METRICS:
        assert after[metric] == pytest.approx(before[metric], rel=1e-6, abs=1e-9)
    assert 2 < before["l0"] < 32  # the inference threshold gives an L0 near the trained k
    assert pd.read_csv(run_dir / "results.csv")["k"].iloc[0] == 8


EVAL_CONTRACT = ["ce_clean", "ce_spliced", "ce_zero", "ce_mean", "delta_ce", "loss_recovered", "kl", "ablation_sparsity",
                 "refine_ratio", "refine_mse_gain"]


def test_eval_writes_every_metric_on_other_data_with_progressive_rows(trained_run, cache_root, tmp_path):
    out = tmp_path / "ood"
    result = run_cli("eval", f"ckpt={trained_run}", "data=tinyshakespeare", "data.ctx_len=64", "data.n_eval_tokens=8192",
                     "downstream_tokens=4096", "ablation_positions=4", "k_primes=[4,16]", "thetas=[1.0]",
                     "refine_tokens=1024", f"cache.dir={cache_root}", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(out / "results.csv")
    main = table[table["k_prime"].isna() & table["theta"].isna()]
    metrics = dict(zip(main["metric"], main["value"]))
    assert set(CORE_METRICS + EVAL_CONTRACT) <= set(metrics)
    assert (table["eval_data"] == "tinyshakespeare").all()
    assert 0 < metrics["loss_recovered"] <= 1 and metrics["delta_ce"] > 0 and metrics["kl"] > 0
    assert metrics["ce_zero"] > metrics["ce_spliced"] > metrics["ce_clean"]
    assert metrics["ablation_n"] > 0
    progressive = table[table["k_prime"].notna()]
    l0_by_k = dict(zip(progressive.loc[progressive["metric"] == "l0", "k_prime"],
                       progressive.loc[progressive["metric"] == "l0", "value"]))
    assert l0_by_k == {4.0: pytest.approx(4.0), 16.0: pytest.approx(16.0)}
    assert set(table.loc[table["theta"].notna(), "metric"]) == {"nmse", "l0"}
    latents = pd.read_parquet(out / "latents.parquet")
    assert len(latents) == 512 and set(latents.columns) >= {"latent", "density", "mean_activation"}
    assert latents["density"].sum() == pytest.approx(metrics["l0"], rel=1e-6)  # densities add up to L0
    assert (out / "feature_density.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_of_a_checkpoint_whose_hook_is_not_in_the_model_is_one_line(trained_run, tmp_path):
    from saekit.checkpoint import load_sae, save_sae

    sae, meta = load_sae(trained_run / "sae.safetensors")
    meta["train_config"]["hook"] = "blocks.1.hook_nothing"
    save_sae(tmp_path / "sae.safetensors", sae, {key: value for key, value in meta.items() if key != "spec"})
    result = run_cli("eval", f"ckpt={tmp_path / 'sae.safetensors'}", f"hydra.run.dir={tmp_path / 'e'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "hook=blocks.1.hook_nothing is not a hook point of stories260k" in result.stderr
    assert not (tmp_path / "e" / "results.csv").exists()


def test_evaluation_during_training_fills_the_step_log(tmp_path, small_text, cache_root):
    run_dir = tmp_path / "evaltrain"
    result = run_cli("train", "activation=topk", "k=8", "n=256", "data=text_files", f"data.paths=[{small_text}]",
                     "data.ctx_len=32", "data.n_eval_tokens=2048", "n_tokens=81920", "batch_size=2048",
                     "eval_every_steps=10", "log_every_steps=5", f"cache.dir={cache_root}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    steps = pd.read_csv(run_dir / "steps.csv")
    evaluated = steps.dropna(subset=["eval_nmse"])
    assert list(evaluated["step"]) == [10, 20, 30, 40]
    assert evaluated["eval_nmse"].iloc[-1] < evaluated["eval_nmse"].iloc[0]
    assert evaluated["eval_nmse"].iloc[-1] == pytest.approx(metrics_of(run_dir)["nmse"], rel=1e-6)  # same code path


def test_path_overrides_with_equals_and_commas_are_quoted_for_hydra():
    from saekit.cli import quote_path_values

    assert quote_path_values(["ckpt=outputs/train/activation=topk,k=32", "k=8,16", "hydra.run.dir=/tmp/a b"]) == \
        ["ckpt='outputs/train/activation=topk,k=32'", "k=8,16", "hydra.run.dir='/tmp/a b'"]
    assert quote_path_values(["ckpt='already=quoted'"]) == ["ckpt='already=quoted'"]


def test_eval_of_a_checkpoint_for_another_hook_width_is_one_line(trained_run, cache_root, tmp_path):
    from saekit.checkpoint import load_sae, save_sae

    sae, meta = load_sae(trained_run / "sae.safetensors")
    meta["train_config"]["hook"] = "blocks.2.mlp.hook_post"  # the MLP's hidden width, not d_model = 64
    meta["train_config"]["data"]["n_train_tokens"] = 4096  # keep the cache that eval builds small
    save_sae(tmp_path / "sae.safetensors", sae, {key: value for key, value in meta.items() if key != "spec"})
    result = run_cli("eval", f"ckpt={tmp_path / 'sae.safetensors'}", f"cache.dir={cache_root}",
                     f"hydra.run.dir={tmp_path / 'e'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "expects activations of width 64" in result.stderr and "blocks.2.mlp.hook_post has width" in result.stderr
    assert not (tmp_path / "e" / "results.csv").exists()


def test_checkpoint_whose_tensors_disagree_with_its_spec_is_one_line(trained_run, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from saekit.checkpoint import read_metadata

    meta = read_metadata(trained_run / "sae.safetensors")
    meta["spec"]["n"] = 256
    save_file(load_file(str(trained_run / "sae.safetensors")), str(tmp_path / "sae.safetensors"),
              metadata={"saekit": json.dumps(meta)})
    result = run_cli("eval", f"ckpt={tmp_path / 'sae.safetensors'}", f"hydra.run.dir={tmp_path / 'e'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "its tensors do not match its own spec" in result.stderr


def test_sweep_table_records_failures_and_a_rerun_trains_nothing(tmp_path, small_text):
    cache_dir, sweep_dir = tmp_path / "cache", tmp_path / "sweep"
    args = ["k=4,8,16,600", "n=512", "data=text_files", f"data.paths=[{small_text}]", "data.ctx_len=32",
            "data.n_eval_tokens=2048", "n_tokens=40960", "batch_size=2048", f"cache.dir={cache_dir}",
            f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli("sweep", *args)
    assert first.returncode == 2 and "1 sweep job(s) failed" in first.stderr  # k=600 > n fails; the others finish
    table = pd.read_csv(sweep_dir / "results.csv")
    jobs = table.drop_duplicates("run_id").set_index("k")
    assert sorted(jobs.index) == [4, 8, 16, 600]
    assert list(jobs.loc[[4, 8, 16], "status"]) == ["ok"] * 3 and jobs.loc[600, "status"] == "failed"
    assert "k=600 must be in 1..n" in jobs.loc[600, "error"]
    assert set(table.loc[table["status"] == "ok", "metric"]) >= {"nmse", "l0", "dead_frac"}
    assert (table.columns[:11] == REQUIRED_COLUMNS).all() and "status" in table.columns
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 1  # 4 jobs, one shared activation cache

    second = run_cli("sweep", *args)
    assert second.returncode == 2
    assert second.stdout.count("trained 0 steps") == 3  # finished jobs are not trained again
    assert pd.read_csv(sweep_dir / "results.csv").equals(table)
    assert pd.read_parquet(sweep_dir / "results.parquet")["status"].tolist() == table["status"].tolist()


def test_eval_on_an_empty_eval_set_is_one_line_and_writes_nothing(trained_run, cache_root, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_cli("eval", f"ckpt={trained_run}", "data=text_files", f"data.paths=[{empty}]",
                     f"data.eval_paths=[{empty}]", f"cache.dir={cache_root}", f"hydra.run.dir={tmp_path / 'e'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds no complete window of tokens" in result.stderr
    assert not (tmp_path / "e").exists()
