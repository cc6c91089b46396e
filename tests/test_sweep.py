"""Sweep presets, launchers and `saekit report` (issue 5)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from saekit.sweep_report import fit_power_law, pareto_front, write_report

PRESET_JOBS = {"frontier": 9, "dead_latents": 4, "progressive": 2, "shrinkage": 3}


@pytest.mark.parametrize("preset, jobs", sorted(PRESET_JOBS.items()))
def test_every_preset_composes(preset, jobs):
    result = run_cli("sweep", f"sweep={preset}", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("# job ") == jobs
    assert "activation:" in result.stdout and "final_eval:" in result.stdout


def test_unknown_preset_is_one_line():
    result = run_cli("sweep", "sweep=nope")
    assert result.returncode == 2
    assert result.stderr.strip() == ("saekit: error: sweep=nope is not a preset; use one of: dead_latents, frontier, "
                                     "progressive, shrinkage")


def test_pareto_front_keeps_only_undominated_points():
    points = pd.DataFrame({"l0": [4, 8, 8, 16, 32], "nmse": [0.3, 0.2, 0.25, 0.22, 0.1]})
    front = pareto_front(points, "l0", "nmse")
    assert list(zip(front["l0"], front["nmse"])) == [(4, 0.3), (8, 0.2), (32, 0.1)]


def test_power_law_fit_recovers_planted_parameters():
    n = np.array([256, 512, 1024, 2048, 4096], dtype=float)
    fit = fit_power_law(n, 3.0 * n ** -0.5 + 0.05)
    assert fit["b"] == pytest.approx(0.5, abs=0.02) and fit["c"] == pytest.approx(0.05, abs=0.005)
    assert fit_power_law(n[:2], n[:2]) is None  # two widths cannot pin three parameters


def _fake_sweep(folder):
    rows = []
    for activation, k, lam, n, l0, nmse, dce in [("topk", 8, None, 256, 8, 0.20, 0.4), ("topk", 8, None, 512, 8, 0.15, 0.3),
                                                 ("topk", 8, None, 1024, 8, 0.12, 0.25), ("relu", None, 3.0, 512, 14, 0.35, 1.0)]:
        run_id = f"{activation}-{n}-{lam}"
        for metric, value in (("l0", l0), ("nmse", nmse), ("delta_ce", dce)):
            rows.append(dict(run_id=run_id, activation=activation, k=k, lam=lam, n=n, metric=metric, value=value,
                             status="ok", error=None, k_prime=None))
        if activation == "topk" and n == 512:
            for kp, value in ((4, 0.3), (16, 0.12)):
                rows += [dict(run_id=run_id, activation=activation, k=k, lam=lam, n=n, metric="nmse", value=value,
                              status="ok", k_prime=kp),
                         dict(run_id=run_id, activation=activation, k=k, lam=lam, n=n, metric="l0", value=kp,
                              status="ok", k_prime=kp)]
    rows.append(dict(run_id="bad", activation="topk", k=600, n=512, metric=None, value=None, status="failed",
                     error="k=600 must be in 1..n"))
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)


def test_report_writes_plots_fit_and_markdown(tmp_path):
    _fake_sweep(tmp_path)
    report = write_report(tmp_path).read_text()
    for png in ("pareto_nmse_l0.png", "pareto_delta_ce_l0.png", "progressive.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in report
    assert "5 jobs: 4 finished, 1 failed." in report and "k=600 must be in 1..n" in report
    assert "- topk, k=8: a = " in report and "(3 runs, n = 256, 512, 1024)" in report


def test_report_links_the_runs_latent_dashboards(tmp_path):
    _fake_sweep(tmp_path)
    (tmp_path / "topk-512-None" / "inspect").mkdir(parents=True)
    (tmp_path / "topk-512-None" / "inspect" / "index.html").write_text("<html></html>")
    report = write_report(tmp_path).read_text()
    assert "- [topk-512-None](topk-512-None/inspect/index.html)" in report
    assert "- [topk-256-None]" not in report  # no dashboard there: only the command to make one
    assert "3 run(s) have none yet" in report and "saekit inspect ckpt=" in report


def test_report_cli_errors_are_one_line(tmp_path):
    result = run_cli("report", str(tmp_path / "missing"))
    assert result.returncode == 2 and "is not a folder" in result.stderr
    empty = run_cli("report", str(tmp_path))
    assert empty.returncode == 2 and "no results.csv and no sweep jobs" in empty.stderr


def test_local_parallel_launcher_runs_jobs_side_by_side_with_one_cache(tmp_path, small_text):
    cache_dir, sweep_dir = tmp_path / "cache", tmp_path / "sweep"
    result = run_cli("sweep", "hydra/launcher=local_parallel", "k=4,8", "n=256", "data=text_files",
                     f"data.paths=[{small_text}]", "data.ctx_len=32", "data.n_eval_tokens=2048", "n_tokens=20480",
                     "batch_size=2048", f"cache.dir={cache_dir}", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(sweep_dir / "results.csv")
    assert (table["status"] == "ok").all() and sorted(table.loc[table["metric"] == "l0", "value"]) == [4.0, 8.0]
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 1  # parallel jobs waited on one build
    assert "JoblibLauncher" in (sweep_dir / "multirun.yaml").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESET_JOBS))
def test_each_preset_runs_reduced_and_reports(preset, tmp_path, cache_root):
    folder = tmp_path / preset
    result = run_cli("sweep", f"sweep={preset}", "n_tokens=204800", f"cache.dir={cache_root}",
                     f"hydra.sweep.dir={folder}", timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(folder / "results.csv")
    assert (table["status"] == "ok").all() and table["run_id"].nunique() == PRESET_JOBS[preset]
    reported = run_cli("report", str(folder))
    assert reported.returncode == 0, reported.stderr[-2000:]
    assert (folder / "report.md").is_file() and (folder / "pareto_nmse_l0.png").is_file()
