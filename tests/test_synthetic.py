"""Every architecture recovers a planted dictionary (issue 3's benchmark with a known answer).

All architectures are trained once (module fixture, ~30 s on 2 cores) through the same `fit` as
`saekit train`; the table is printed with `pytest -s`.
"""

from __future__ import annotations

import pytest

from saekit.synthetic import ARCHITECTURES, PlantedDictionary, expected_l0, run_benchmark


@pytest.fixture(scope="module")
def table():
    frame = run_benchmark(n_tokens=500_000, seed=0).set_index("architecture")
    print("\n" + frame.round(3).to_string())
    return frame


def test_planted_dictionary_has_power_law_frequencies_and_a_nonzero_mean():
    planted = PlantedDictionary()
    x = planted.sample(20000, seed=0)
    assert expected_l0(planted) == pytest.approx(4.0, rel=0.01)
    assert (planted.frequencies[:-1] >= planted.frequencies[1:]).all()
    assert planted.frequencies[0] > 10 * planted.frequencies[-1]
    assert (x.mean(0) - planted.mean).norm() < 0.5 * planted.mean.norm()  # the mean is far from 0 ...
    assert (x.mean(0) - planted.mean - planted.frequencies @ planted.directions).norm() < 0.1  # ... and as planted


def test_topk_recovers_the_frequent_half(table):
    assert table.loc["topk", "recovered_frequent"] >= 0.8


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_beats_a_random_dictionary_by_a_wide_margin(table, architecture):
    row = table.loc[architecture]
    assert row["recovered"] >= table.loc["random", "recovered"] + 0.5
    assert row["recovered_frequent"] >= 0.75
    assert row["nmse"] < 0.5 and row["l0"] <= 12  # at a comparable L0 (planted: 4 per token)


def test_l1_shrinks_reconstructions_and_topk_does_not(table):
    # ‖x̂ − μ‖ / ‖x − μ‖: L1 pays for magnitude, so ReLU reconstructions are short; TopK pays nothing for it.
    assert table.loc["relu", "norm_ratio"] < 0.7
    assert table.loc["topk", "norm_ratio"] > 0.85
    assert table.loc["relu", "norm_ratio"] < table.loc["topk", "norm_ratio"] - 0.2
