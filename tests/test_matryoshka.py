"""Matryoshka BatchTopK SAEs, per-prefix rows and the absorption benchmark (issue 12).

Every expected value here comes from an independent computation (explicit loops over latents and tokens) or is
a literal known by construction (hand-built SAEs whose parent latents fire, or not, on child tokens).
"""

from __future__ import annotations

import pytest
import torch

from saekit.absorption import PlantedHierarchy, absorption
from saekit.errors import ConfigError
from saekit.metrics import ReconstructionStats
from saekit.prefix import prefix_metrics
from saekit.sae import SAESpec, build_sae


def random_sae(activation: str, d: int = 12, n: int = 40, seed: int = 0, **knobs):
    """An SAE with random weights away from any special point (nonzero biases, input scale ≠ 1)."""
    sae = build_sae(SAESpec(activation=activation, d=d, n=n, normalize="scale", **knobs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        sae.normalize_decoder_()
        sae.input_scale.fill_(1.7)
    return sae.eval()


# ---- per-prefix rows -------------------------------------------------------------------------------------
@torch.no_grad()
def brute_force_prefix(sae, x_raw: torch.Tensor, m: int) -> tuple[float, float]:
    """nmse and l0 with only latents 0..m−1, token by token and latent by latent."""
    x = x_raw.double()
    scale = float(sae.input_scale)
    z = sae.encode(x_raw * sae.input_scale).double()
    W_dec, b_pre = sae.W_dec.double(), sae.b_pre.double()
    errors, counts = [], []
    for t in range(x.shape[0]):
        x_hat = b_pre.clone()
        count = 0
        for i in range(m):
            if z[t, i] != 0:
                x_hat = x_hat + z[t, i] * W_dec[i]
                count += 1
        errors.append(float(((x[t] - x_hat / scale) ** 2).sum()))
        counts.append(count)
    variance = float(((x - x.mean(dim=0)) ** 2).sum(dim=1).mean())
    return sum(errors) / len(errors) / variance, sum(counts) / len(counts)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_prefix_rows_match_a_brute_force_computation(activation):
    sae = random_sae(activation, k=6)
    x = torch.randn(90, 12, generator=torch.Generator().manual_seed(5)) * 2 + 1
    rows = prefix_metrics(sae, x.split(25), boundaries=[3, 10, 27, 40])
    assert [row["prefix"] for row in rows] == [3, 10, 27, 40]
    for row in rows:
        nmse, l0 = brute_force_prefix(sae, x, row["prefix"])
        assert row["nmse"] == pytest.approx(nmse, rel=1e-5)
        assert row["l0"] == pytest.approx(l0, abs=1e-9)
    assert rows[0]["l0"] < rows[-1]["l0"]  # the prefixes really differ


def test_the_full_prefix_row_is_the_core_reconstruction_row():
    sae = random_sae("relu")
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(6))
    stats = ReconstructionStats(12, 40)
    stats.update(x, *sae.reconstruct(x))
    (row,) = prefix_metrics(sae, [x])  # a non-Matryoshka SAE is read at n only
    assert row["prefix"] == 40
    assert row["nmse"] == pytest.approx(stats.metrics()["nmse"], rel=1e-9)
    assert row["l0"] == stats.metrics()["l0"]


def test_prefix_metrics_restore_training_mode():
    sae = random_sae("relu").train()
    prefix_metrics(sae, [torch.randn(8, 12)], [5])
    assert sae.training


@pytest.mark.parametrize("boundaries", [[], [0, 4], [5, 5], [8, 3], [4, 41], [2.5]])
def test_bad_prefix_boundaries_get_one_line(boundaries):
    with pytest.raises(ConfigError, match="boundaries") as error:
        prefix_metrics(random_sae("relu"), [torch.randn(4, 12)], boundaries)
    assert "\n" not in str(error.value)


# ---- planted hierarchy -----------------------------------------------------------------------------------
def test_children_always_come_with_their_parent_and_parents_also_fire_alone():
    hierarchy = PlantedHierarchy(n_parents=5, children_per_parent=3, parent_frequency=0.3, child_given_parent=0.6)
    x, active = hierarchy.sample(40000, seed=1)
    parents, children = active[:, :5], active[:, 5:].reshape(-1, 5, 3)
    assert x.shape == (40000, 64) and active.shape == (40000, 20)
    assert not (children.any(dim=2) & ~parents).any()  # no child without its parent
    assert children.sum(dim=2).max() == 1  # siblings exclude each other
    present = parents.float().mean()
    with_child = children.any(dim=2).float().sum() / parents.float().sum()
    assert present == pytest.approx(0.3, abs=0.01)
    assert with_child == pytest.approx(0.6, abs=0.01)
    # each child equally likely: 0.3 · 0.6 / 3 of the tokens
    assert children.float().mean(dim=0).flatten() == pytest.approx(torch.full((15,), 0.06), abs=0.006)


def test_activations_are_the_mean_plus_active_directions():
    hierarchy = PlantedHierarchy(d=16, n_parents=3, children_per_parent=2, magnitude_spread=0.0, noise=0.0)
    x, active = hierarchy.sample(500, seed=2)
    expected = hierarchy.mean + active.float() @ hierarchy.directions
    assert torch.allclose(x, expected, atol=1e-5)
    assert torch.allclose(hierarchy.directions.norm(dim=1), torch.ones(9))
    assert hierarchy.pairs.tolist() == [[0, 0, 1, 1, 2, 2], [3, 4, 5, 6, 7, 8]]


# ---- absorption on hand-built SAEs -----------------------------------------------------------------------
def orthogonal_hierarchy() -> PlantedHierarchy:
    """3 parents × 2 children on the first 9 coordinate axes of R^12: feature i is axis i, magnitudes 1."""
    hierarchy = PlantedHierarchy(d=12, n_parents=3, children_per_parent=2, magnitude_spread=0.0, noise=0.0,
                                 mean_norm=0.0)
    hierarchy.directions = torch.eye(12)[:9]
    return hierarchy


def hand_built_sae(absorbing_parents: set[int], order: list[int]):
    """A ReLU SAE whose latent order[i] decodes to axis i (plus three decoy latents, each half-aligned with a
    parent). The latent of an absorbing parent p reads x_p − 10·Σ_children x_c, so it is silent whenever a child
    is active; any other latent reads its own axis and fires whenever its feature is present."""
    n = 12
    sae = build_sae(SAESpec(activation="relu", d=12, n=n))
    W_enc = torch.zeros(n, 12)
    W_dec = torch.zeros(n, 12)
    for axis, latent in enumerate(order):
        W_dec[latent, axis] = 1.0
        W_enc[latent, axis] = 1.0
    for p in absorbing_parents:
        W_enc[order[p], 3 + 2 * p: 5 + 2 * p] = -10.0
    for decoy, p in zip(range(9, 12), range(3)):
        W_dec[order[decoy], p] = W_dec[order[decoy], 9 + p] = 1.0  # cosine 0.71 with the parent, never fires
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.normalize_decoder_()
    return sae.eval()


@pytest.mark.parametrize("absorbing, expected", [(set(), 0.0), ({0, 1, 2}, 1.0), ({1}, 1 / 3)])
def test_absorption_of_hand_built_saes(absorbing, expected):
    hierarchy = orthogonal_hierarchy()
    x, active = hierarchy.sample(6000, seed=3)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()  # latents in no special order
    result = absorption(hand_built_sae(absorbing, order), hierarchy, x, active)
    summary = result.summary()
    assert result.parent_latent.tolist() == order[:3]  # matched by decoder cosine, not by index
    assert summary["absorbed_fraction"] == pytest.approx(expected)
    assert summary["mean_parent_miss"] == pytest.approx(expected)
    assert summary["pairs"] == 6
    assert summary["parent_cosine"] == pytest.approx(1.0)
    assert summary["parent_alone_rate"] == pytest.approx(1.0)  # absorbing or not, the parent fires alone
    expected_rates = [0.0 if p in absorbing else 1.0 for p in (0, 0, 1, 1, 2, 2)]
    assert result.firing_rate.tolist() == expected_rates


def test_partial_absorption_is_counted_against_the_cutoff():
    """Parent 0's latent misses child 0's tokens only: pair (0, child 0) absorbed, pair (0, child 1) not."""
    hierarchy = orthogonal_hierarchy()
    x, active = hierarchy.sample(6000, seed=4)
    order = list(range(12))
    sae = hand_built_sae(set(), order)
    with torch.no_grad():
        sae.W_enc[0, 3] = -10.0  # parent 0's latent is silenced by its first child (feature 3) alone
    summary = absorption(sae, hierarchy, x, active).summary()
    assert summary["absorbed_fraction"] == pytest.approx(1 / 6)
    assert summary["mean_parent_miss"] == pytest.approx(1 / 6)
