"""Matryoshka BatchTopK SAEs, per-prefix rows and the absorption benchmark (issue 12).

Every expected value here comes from an independent computation (explicit loops over latents and tokens) or is
a literal known by construction (hand-built SAEs whose parent latents fire, or not, on child tokens).
"""

from __future__ import annotations

import pytest
import torch

import saekit.sae.sparse as sparse
from saekit.absorption import PlantedHierarchy, absorption
from saekit.checkpoint import load_sae, save_sae
from saekit.errors import ConfigError
from saekit.metrics import ReconstructionStats
from saekit.prefix import prefix_metrics
from saekit.sae import SAESpec, build_sae
from saekit.sae.matryoshka import doubling_prefixes
from saekit.synthetic import synthetic_train_config, train_on


def random_sae(activation: str, d: int = 12, n: int = 40, seed: int = 0, **knobs):
    """An SAE with random weights away from any special point (nonzero biases, input scale ≠ 1)."""
    sae = build_sae(SAESpec.build(activation, d=d, n=n, normalize="scale", **knobs))
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
    sae = build_sae(SAESpec.build("relu", d=12, n=n))
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


# ---- the Matryoshka SAE: loss, sparse path, settings ----------------------------------------------------
def tiny_matryoshka(group_sizes=(2, 3, 5), seed=0, **settings):
    """d = 6, n = 10, k = 2, random weights (unit decoder rows), in training mode."""
    sae = build_sae(SAESpec.build("matryoshka", d=6, n=10, k=2, group_sizes=list(group_sizes), **settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.6)
        sae.normalize_decoder_()
    return sae.train()


@torch.no_grad()
def brute_force_matryoshka_loss(sae, x: torch.Tensor, prefixes: list[int], k: int) -> dict[int, float]:
    """Per prefix m, mean over tokens of ‖x − x̂_{≤m}‖², by loops: h entry by entry, the k·B largest ReLU(h) of
    the batch by sorting a Python list, each prefix decoded latent by latent."""
    B, n = x.shape[0], sae.spec.n
    W_enc, b_enc, W_dec, b_pre = (t.double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre))
    xd = x.double()
    entries = []
    for t in range(B):
        for i in range(n):
            h = float(((xd[t] - b_pre) * W_enc[i]).sum() + b_enc[i])
            entries.append((max(h, 0.0), t, i))
    kept = sorted(entries, reverse=True)[: k * B]
    errors = {}
    for m in prefixes:
        total = 0.0
        for t in range(B):
            x_hat = b_pre.clone()
            for value, row, i in kept:
                if row == t and i < m:
                    x_hat = x_hat + value * W_dec[i]
            total += float(((xd[t] - x_hat) ** 2).sum())
        errors[m] = total / B
    return errors


@pytest.mark.parametrize("sparse_path", [False, True])
def test_loss_is_the_sum_of_the_prefix_reconstruction_errors(sparse_path):
    sae = tiny_matryoshka()
    sae.sparse_training = sparse_path
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1)) + 0.3
    expected = brute_force_matryoshka_loss(sae, x, [2, 5, 10], k=2)
    terms = {name: value.detach() for name, value in sae.loss_terms(x).items()}
    assert set(terms) == {"mse", "prefix_2", "prefix_5", "loss", "l0", "fired"}
    assert float(terms["prefix_2"]) == pytest.approx(expected[2], rel=1e-5)
    assert float(terms["prefix_5"]) == pytest.approx(expected[5], rel=1e-5)
    assert float(terms["mse"]) == pytest.approx(expected[10], rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(sum(expected.values()), rel=1e-5)  # summed, not averaged
    assert min(abs(expected[2] - expected[5]), abs(expected[5] - expected[10])) > 0.1  # the prefixes differ
    assert float(terms["l0"]) == 2.0  # k·B entries over B tokens


def test_full_width_and_auxk_terms_are_batchtopk_with_the_same_weights():
    """AuxK reconstructs the full reconstruction's error; only the inner prefixes are added."""
    matryoshka = tiny_matryoshka(dead_method="auxk", k_aux=3)
    batchtopk = build_sae(SAESpec.build("batchtopk", d=6, n=10, k=2, dead_method="auxk", k_aux=3)).train()
    batchtopk.load_state_dict(matryoshka.state_dict())
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(2))
    dead = torch.tensor([False, True, False, False, True, False, True, False, False, True])
    for sparse_path in (False, True):
        matryoshka.sparse_training = batchtopk.sparse_training = sparse_path
        ours, plain = matryoshka.loss_terms(x, dead), batchtopk.loss_terms(x, dead)
        for name in ("mse", "auxk", "l0"):
            assert torch.allclose(ours[name], plain[name], rtol=1e-6), name
        assert float(ours["auxk"].detach()) > 0
        assert torch.equal(ours["fired"], plain["fired"])
        inner = ours["prefix_2"] + ours["prefix_5"]
        assert torch.allclose(ours["loss"], plain["loss"] + inner, rtol=1e-6)


D, N, B = 24, 192, 320


@pytest.mark.parametrize("group_sizes", [[5, 27, 160], [96, 96], [192]])
@pytest.mark.parametrize("learned_scale", [False, True])
def test_sparse_path_gives_the_dense_loss_and_every_gradient(monkeypatch, group_sizes, learned_scale):
    monkeypatch.setattr(sparse, "_CPU_CHUNK_ELEMENTS", 64 * N)  # rank in several chunks
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=generator) + 0.5
    x[:8] *= 6.0  # heavy tokens that take more than their 2k candidates
    sae = build_sae(SAESpec.build("matryoshka", d=D, n=N, k=6, dead_method="auxk", k_aux=12,
                                  group_sizes=group_sizes, learned_scale=learned_scale))
    sae.initialize(x, "geometric_median", tied=False, scale_encoder=True, generator=generator)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05, generator=generator)
        sae.b_pre.add_(0.1)
        if learned_scale:
            sae.latent_scale.uniform_(0.5, 1.5, generator=generator)
    sae.train()
    dead = torch.zeros(N, dtype=torch.bool)
    dead[torch.randperm(N, generator=generator)[:40]] = True

    def run(sparse_path):
        sae.sparse_training = sparse_path
        sae.zero_grad(set_to_none=True)
        terms = sae.loss_terms(x, dead)
        terms["loss"].backward()
        return terms, {name: param.grad.clone() for name, param in sae.named_parameters()}

    dense_terms, dense_grads = run(False)
    sparse_terms, sparse_grads = run(True)
    assert set(dense_terms) == set(sparse_terms)
    assert len([name for name in dense_terms if name.startswith("prefix_")]) == len(group_sizes) - 1
    for name, value in dense_terms.items():
        if name == "fired":
            assert torch.equal(sparse_terms[name], value)
        else:
            assert torch.allclose(sparse_terms[name], value, rtol=1e-5, atol=1e-6), name
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(sparse_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max())), name


def test_eval_mode_thresholds_every_latent_like_batchtopk():
    sae = tiny_matryoshka().eval()
    sae.threshold.fill_(0.4)
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
        expected = torch.where(h > 0.4, h, torch.zeros_like(h))
        assert torch.allclose(sae.encode(x), expected, atol=1e-6)
    assert (expected[:, 5:] != 0).any()  # later groups fire at inference too


@pytest.mark.parametrize("group_sizes, message", [
    ([3, 3], "sums to 6, not n=10"), ([0, 10], "positive integers"), ([-2, 12], "positive integers"),
    ([2.5, 7.5], "positive integers")])
def test_bad_group_sizes_get_one_line_naming_the_field(group_sizes, message):
    with pytest.raises(ConfigError, match=message) as error:
        build_sae(SAESpec.build("matryoshka", d=6, n=10, k=2, group_sizes=group_sizes))
    assert str(error.value).startswith("activation.group_sizes=") and "\n" not in str(error.value)


def test_group_sizes_are_checked_against_the_run_n():
    with pytest.raises(ConfigError, match="sums to 16, not n=64"):
        synthetic_train_config("matryoshka", n=64, n_tokens=4096, k=3, group_sizes=[8, 8])


@pytest.mark.parametrize("overrides, message", [
    (["activation.group_sizes=[100,400]"], "activation.group_sizes=[100, 400] sums to 500, not n=512"),
    (["activation.group_sizes=[0,512]"], "activation.group_sizes=[0, 512] must hold positive integers")])
def test_the_command_line_refuses_bad_group_sizes_in_one_line(capsys, overrides, message):
    from saekit.cli import _register, preflight

    _register()
    assert preflight("train", ["activation=matryoshka"]).activation.group_sizes == []  # the YAML's default
    with pytest.raises(SystemExit):
        preflight("train", ["activation=matryoshka", *overrides])
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and message in err


@pytest.mark.parametrize("n, k, expected", [(512, 32, [32, 64, 128, 256, 512]), (64, 3, [4, 8, 16, 32, 64]),
                                            (64, 6, [8, 16, 32, 64]), (100, 4, [6, 12, 25, 50, 100]), (8, 6, [8])])
def test_empty_group_sizes_double_the_prefixes_up_to_n(n, k, expected):
    assert doubling_prefixes(n, k) == expected
    assert build_sae(SAESpec.build("matryoshka", d=4, n=n, k=k)).prefixes == expected


def test_checkpoint_keeps_the_groups(tmp_path):
    sae = tiny_matryoshka(group_sizes=(4, 6)).eval()
    sae.threshold.fill_(0.25)
    save_sae(tmp_path / "sae.safetensors", sae, {})
    loaded, _ = load_sae(tmp_path / "sae.safetensors")
    assert loaded.prefixes == [4, 10] and loaded.cfg.group_sizes == [4, 6]
    x = torch.randn(5, 6)
    assert torch.equal(loaded.encode(x), sae.encode(x))


# ---- training on the planted hierarchy ------------------------------------------------------------------
TRAIN_TOKENS = 200_000


@pytest.fixture(scope="module")
def hierarchy_runs():
    """BatchTopK and Matryoshka (default groups: prefixes 4, 8, 16, 32, 64) trained alike on one planted
    hierarchy (n = 64, k = 3 below the true L0 ≈ 3.5), with held-out tokens; about 10 s on 2 CPU cores."""
    hierarchy = PlantedHierarchy(seed=0)
    train_x, _ = hierarchy.sample(2**17, seed=1000)
    eval_x, eval_active = hierarchy.sample(16384, seed=2000)
    saes = {}
    for activation in ("batchtopk", "matryoshka"):
        cfg = synthetic_train_config(activation, n=64, n_tokens=TRAIN_TOKENS, k=3, seed=0, batch_size=1024)
        saes[activation] = train_on(hierarchy, cfg, train_x)
    return hierarchy, eval_x, eval_active, saes


def test_prefix_nmse_decreases_with_the_prefix_after_a_short_training(hierarchy_runs):
    _, eval_x, _, saes = hierarchy_runs
    rows = prefix_metrics(saes["matryoshka"], [eval_x])
    assert [row["prefix"] for row in rows] == [4, 8, 16, 32, 64]
    nmse = [row["nmse"] for row in rows]
    assert all(later < earlier for earlier, later in zip(nmse, nmse[1:])), nmse
    assert nmse[-1] < 0.2
    assert [row["l0"] for row in rows] == sorted(row["l0"] for row in rows)
    # The point of the nested losses: the same first 4 latents of a BatchTopK SAE explain much less.
    (plain,) = prefix_metrics(saes["batchtopk"], [eval_x], [4])
    assert nmse[0] < plain["nmse"] - 0.1


def test_matryoshka_absorbs_fewer_parents_than_batchtopk(hierarchy_runs):
    hierarchy, eval_x, eval_active, saes = hierarchy_runs
    plain = absorption(saes["batchtopk"], hierarchy, eval_x, eval_active).summary()
    nested = absorption(saes["matryoshka"], hierarchy, eval_x, eval_active).summary()
    assert plain["absorbed_fraction"] >= 0.4  # the benchmark does provoke absorption
    assert nested["absorbed_fraction"] < plain["absorbed_fraction"] - 0.2
    assert nested["mean_parent_miss"] < plain["mean_parent_miss"]


def test_prefix_rows_of_a_skip_transcoder_measure_its_target():
    """x̂_{≤m} = b_out + W_skip x + Σ_{i<m} z_i W_dec[i], compared with y (brute force, no normalization)."""
    sae = build_sae(SAESpec.build("relu", d=12, n=40, d_out=7, skip=True))
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    sae.eval()
    x = torch.randn(50, 12, generator=generator)
    y = torch.randn(50, 7, generator=generator) + 0.5
    (row,) = prefix_metrics(sae, [(x[:20], y[:20]), (x[20:], y[20:])], [9])
    with torch.no_grad():
        z = sae.encode(x)
        y_hat = sae.b_out + x @ sae.W_skip.T + z[:, :9] @ sae.W_dec[:9]
        expected = ((y - y_hat) ** 2).sum(1).mean() / ((y - y.mean(0)) ** 2).sum(1).mean()
    assert row["nmse"] == pytest.approx(float(expected), rel=1e-5)
    assert row["l0"] == pytest.approx(float((z[:, :9] != 0).sum(1).float().mean()))
