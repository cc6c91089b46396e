"""Skip transcoders vs plain transcoders on stories260k (issue 12): `python bench/transcoders.py [n_tokens]`.

Paulo et al. 2025 ("Transcoders beat sparse autoencoders for interpretability") report that a transcoder with a
linear skip path (ŷ = W_dec z + b_out + W_skip x) predicts an MLP's output better than one without, at equal
k and n. This runs both through `saekit train` (TopK, n = 512, k ∈ {8, 32}, two seeds each, layer 2's MLP:
x = blocks.2.ln2.hook_out, the MLP's input, y = blocks.2.hook_mlp_out, its output) and, for context, a TopK SAE
reconstructing the MLP output itself. Every run's final evaluation splices its prediction in at the MLP output
on the held-out split (final_eval.downstream=true), so nmse is measured against y and delta_ce/kl against the
clean model. Writes bench/transcoders.csv (one row per run) and prints the per-config means.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HOOK = "blocks.2.ln2.hook_out"
HOOK_OUT = "blocks.2.hook_mlp_out"
KS = (8, 32)
SEEDS = (0, 1)
N = 512
METRICS = ("nmse", "delta_ce", "kl", "loss_recovered", "l0", "dead_frac", "ce_clean", "ce_spliced")
COMMON = ("activation=topk", f"n={N}", "data.ctx_len=64", "final_eval.downstream=true",
          "final_eval.downstream_tokens=32768")


def configs() -> list[dict]:
    """(name, overrides) of every run: plain and skip transcoders per k and seed, and the SAE baseline."""
    runs = []
    for k in KS:
        for seed in SEEDS:
            for kind, extra in (("transcoder", ()), ("skip_transcoder", ("skip=true",))):
                runs.append({"config": kind, "k": k, "seed": seed,
                             "overrides": (f"hook={HOOK}", f"hook_out={HOOK_OUT}", *extra)})
            runs.append({"config": "sae_on_mlp_out", "k": k, "seed": seed, "overrides": (f"hook={HOOK_OUT}",)})
    return runs


def train(run: dict, n_tokens: int, work: Path) -> dict:
    """One `saekit train` in a subprocess; returns the run's facts and its held-out metrics."""
    name = f"{run['config']}_k{run['k']}_s{run['seed']}"
    command = [sys.executable, "-m", "saekit.cli", "train", *COMMON, *run["overrides"], f"k={run['k']}",
               f"seed={run['seed']}", f"n_tokens={n_tokens}", f"cache.dir={work / 'activations'}",
               f"hydra.run.dir={work / name}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    table = pd.read_csv(work / name / "results.csv")
    values = dict(zip(table["metric"], table["value"]))
    return {"config": run["config"], "hook": table["hook"].iloc[0],
            "hook_out": table["hook_out"].iloc[0] if "hook_out" in table else None, "n": N, "k": run["k"],
            "seed": run["seed"], "tokens": n_tokens, **{metric: values.get(metric) for metric in METRICS},
            "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    n_tokens = int(float(sys.argv[1])) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory(prefix="saekit-transcoders-") as folder:
        rows = []
        for run in configs():
            rows.append(train(run, n_tokens, Path(folder)))
            print({key: rows[-1][key] for key in ("config", "k", "seed", "nmse", "delta_ce", "kl", "l0")}, flush=True)
    table = pd.DataFrame(rows)
    out = Path(__file__).resolve().parent / "transcoders.csv"
    table.to_csv(out, index=False)
    summary = table.groupby(["k", "config"])[["nmse", "delta_ce", "kl", "l0", "dead_frac"]].mean()
    print(summary.round(4).to_string())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
