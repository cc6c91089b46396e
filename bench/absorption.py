"""Feature absorption, BatchTopK vs Matryoshka BatchTopK, on a planted hierarchy (issue 12).

`python bench/absorption.py [n_tokens] [n_seeds]` (defaults 500k, 5) trains BatchTopK, Matryoshka with its
default groups (prefixes 4, 8, 16, 32, 64) and Matryoshka with a first group of 8 = the number of parents
(`matryoshka_g8`), each with the same n = 64, k = 3, training tokens and seeds, through `saekit.train.fit` on
activations from `saekit.absorption.PlantedHierarchy` (8 parents × 4 children in d = 64, true L0 ≈ 3.5, a fresh
hierarchy per seed), and measures on held-out tokens the absorbed fraction of (parent, child) pairs
(`saekit.absorption`: the parent's best-matching latent fires on < 50% of the child's tokens) and the per-prefix
nmse (`saekit.prefix`, every SAE read as ordered at the same boundaries).

k = 3 sits just below the true L0: sparsity then pays for folding a parent into its children (one latent per
child token instead of two), the pressure under which absorption appears (Chanin et al. 2024).

Writes bench/absorption.csv (name, value, unit): per architecture the mean over seeds and each seed's value of
`absorption_<arch>`, `parent_miss_<arch>`, `parent_cosine_<arch>`, `nmse_<arch>`, `l0_<arch>`, and
`prefix_nmse_<arch>_m<m>` per boundary m.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from statistics import mean

from saekit.absorption import PlantedHierarchy, absorption
from saekit.prefix import prefix_metrics
from saekit.synthetic import synthetic_train_config, train_on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import merge_rows  # noqa: E402  (the bench scripts' shared CSV writer)

N, K, BATCH = 64, 3, 1024
BOUNDARIES = [4, 8, 16, 32, 64]
"""Where every SAE is read: the default Matryoshka prefixes for n = 64, k = 3 (doubling from n/16)."""
ARCHITECTURES: dict[str, dict] = {
    "batchtopk": {"activation": "batchtopk"},
    "matryoshka": {"activation": "matryoshka"},  # default groups: prefixes 4, 8, 16, 32, 64
    # First group as large as the number of parents: what one would pick knowing the hierarchy.
    "matryoshka_g8": {"activation": "matryoshka", "group_sizes": [8, 8, 16, 32]},
}


def run_one(hierarchy: PlantedHierarchy, knobs: dict, seed: int, n_tokens: int, data) -> dict[str, float]:
    """Train one SAE and measure it: absorption summary, full-width nmse and l0, per-prefix nmse."""
    train_x, eval_x, eval_active = data
    knobs = dict(knobs)
    cfg = synthetic_train_config(knobs.pop("activation"), n=N, n_tokens=n_tokens, k=K, seed=seed,
                                 batch_size=BATCH, **knobs)
    sae = train_on(hierarchy, cfg, train_x)
    result = absorption(sae, hierarchy, eval_x, eval_active).summary()
    prefixes = prefix_metrics(sae, eval_x.split(8192), BOUNDARIES)
    row = {"absorption": result["absorbed_fraction"], "parent_miss": result["mean_parent_miss"],
           "parent_cosine": result["parent_cosine"], "nmse": prefixes[-1]["nmse"], "l0": prefixes[-1]["l0"]}
    row.update({f"prefix_nmse_m{p['prefix']}": p["nmse"] for p in prefixes})
    return row


UNITS = {"absorption": "fraction of pairs", "parent_miss": "fraction of child tokens", "parent_cosine": "cosine",
         "l0": "latents per token"}


def unit(metric: str) -> str:
    return UNITS.get(metric, "fraction of variance")  # nmse and the per-prefix nmse


def row_name(metric: str, label: str, seed: int | None = None) -> str:
    """`absorption_matryoshka`, `prefix_nmse_matryoshka_m8`, …, with `_seed<s>` for one seed's value."""
    if metric.startswith("prefix_nmse_"):
        name = f"prefix_nmse_{label}_{metric[len('prefix_nmse_'):]}"
    else:
        name = f"{metric}_{label}"
    return name if seed is None else f"{name}_seed{seed}"


def main() -> None:
    n_tokens = int(float(sys.argv[1])) if len(sys.argv) > 1 else 500_000
    n_seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    started = time.perf_counter()
    rows: list[tuple[str, float, str]] = []
    for label, knobs in ARCHITECTURES.items():
        per_seed: dict[str, list[float]] = {}
        for seed in range(n_seeds):
            hierarchy = PlantedHierarchy(seed=seed)  # a fresh hierarchy (directions, mean) per seed
            train_x, _ = hierarchy.sample(2**18, seed=1000 + seed)
            eval_x, eval_active = hierarchy.sample(32768, seed=2000 + seed)
            measured = run_one(hierarchy, knobs, seed, n_tokens, (train_x, eval_x, eval_active))
            for metric, value in measured.items():
                per_seed.setdefault(metric, []).append(value)
                rows.append((row_name(metric, label, seed), round(value, 6), unit(metric)))
            print(label, seed, {key: round(value, 3) for key, value in measured.items()}, flush=True)
        rows += [(row_name(metric, label), round(mean(values), 6), unit(metric)) for metric, values in per_seed.items()]
    out = Path(__file__).resolve().parent / "absorption.csv"
    merge_rows(out, rows)
    print(f"{n_tokens:,} training tokens per SAE, {n_seeds} seeds, {time.perf_counter() - started:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
