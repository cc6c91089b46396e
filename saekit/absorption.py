"""Feature absorption on planted hierarchies (SPEC 4): a benchmark whose right answer is known.

Absorption (Chanin et al. 2024, "A is for Absorption"): when a child feature c always co-occurs with its parent
p, a sparse SAE can save one active latent per token by folding p's direction into c's latent (decoder ≈ c + p)
and letting p's latent fire only where p appears *without* its children. Reconstruction stays good, but the
"parent" latent is no longer a parent detector: it has holes exactly where the children fire. Matryoshka SAEs
(Bussmann et al. 2025) are meant to prevent this: an early prefix must reconstruct every token without the later
(child) latents, so the parent latent has to fire on child tokens too.

Generator (`PlantedHierarchy`): `n_parents` parents, each with `children_per_parent` children, all random unit
directions in d dims (as `saekit.synthetic.PlantedDictionary`). Per token each parent is present with
probability `parent_frequency`; a present parent has one of its children active with probability
`child_given_parent` (siblings exclude each other, like "starts with S" and its tokens) and fires alone
otherwise; a child never fires without its parent. Active features get magnitudes 1 + spread·(Exp(1) − 1)
(mean 1, independent for parent and child), plus a nonzero mean and small dense noise.

Measure (`absorption`), in the SPEC's terms: the latent that best matches parent p is the one with the largest
decoder cosine with p's direction; on the held-out tokens where child c is active (so p is present), the pair's
*parent firing rate* is the fraction of those tokens on which that latent is nonzero (eval-mode encoding).
A pair (p, c) counts as **absorbed when its parent firing rate is below `cutoff` = 0.5**; the reported
`absorbed_fraction` is the share of absorbed pairs over all (parent, child) pairs. Why 0.5: a faithful parent
latent fires on (nearly) every child token; an absorbing one still fires on some, where the parent's magnitude
is large next to the child's (with varied magnitudes absorption is partial), and in the bench's SAEs the rates
sit near 1 for intact pairs and at 0.1–0.45 for absorbing ones, so a cutoff in the gap is needed and 0.5 is
the one that reads "the parent latent misses most of this child's tokens" without favouring either side. The
continuous companion `mean_parent_miss` (mean over pairs of 1 − firing rate) is reported beside it, so the
count does not hide partial absorption or depend on the cutoff alone.

Diagnostics: `parent_cosine` (how well the matched latents align with the parents at all: absorption of an
unlearned parent means little) and `parent_alone_rate` (the matched latent's firing rate where the parent is
present without children, which should stay high in both architectures).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from saekit.metrics import row_chunks
from saekit.synthetic import planted_geometry

ABSORPTION_CUTOFF = 0.5


@dataclass
class PlantedHierarchy:
    """The generating process. Features are indexed parents first (0..P−1), then children: child j of parent p is
    feature P + p·C + j. Defaults: 8 parents × 4 children in d = 64, about 2 parents present per token."""

    d: int = 64
    n_parents: int = 8
    children_per_parent: int = 4
    parent_frequency: float = 0.25
    """Probability that a parent is present on a token (alone or with one child)."""
    child_given_parent: float = 0.75
    """Probability that a present parent has one of its children active (chosen uniformly)."""
    magnitude_spread: float = 0.2
    """Active magnitudes are 1 + spread·(Exp(1) − 1): 0 gives all ones, 1 gives Exp(1)."""
    noise: float = 0.01
    """Standard deviation of the dense Gaussian noise per dimension."""
    mean_norm: float = 2.0
    """‖μ‖ of the nonzero mean."""
    seed: int = 0
    directions: torch.Tensor = field(init=False)
    mean: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.directions, self.mean = planted_geometry(self.n_features, self.d, self.mean_norm, self.seed)

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.children_per_parent)

    @property
    def pairs(self) -> torch.Tensor:
        """(2, P·C) long: row 0 the parent feature, row 1 the child feature of every (parent, child) pair."""
        parents = torch.arange(self.n_parents).repeat_interleave(self.children_per_parent)
        children = self.n_parents + torch.arange(self.n_parents * self.children_per_parent)
        return torch.stack([parents, children])

    def sample_active(self, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
        """(n_tokens, F) bool: which planted features are active on each token."""
        P, C = self.n_parents, self.children_per_parent
        present = torch.rand(n_tokens, P, generator=generator) < self.parent_frequency
        with_child = present & (torch.rand(n_tokens, P, generator=generator) < self.child_given_parent)
        which = torch.randint(0, C, (n_tokens, P), generator=generator)
        children = torch.zeros(n_tokens, P, C, dtype=torch.bool)
        children.scatter_(2, which[..., None], with_child[..., None])
        return torch.cat([present, children.reshape(n_tokens, P * C)], dim=1)

    def sample(self, n_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n_tokens, d) activations and active (n_tokens, F) bool, the features present on each token."""
        generator = torch.Generator().manual_seed(seed)
        active = self.sample_active(n_tokens, generator)
        exponential = torch.empty(n_tokens, self.n_features).exponential_(generator=generator)
        magnitudes = 1.0 + self.magnitude_spread * (exponential - 1.0)
        noise = self.noise * torch.randn(n_tokens, self.d, generator=generator)
        return self.mean + (active * magnitudes) @ self.directions + noise, active


@dataclass
class Absorption:
    """The measure for one SAE. Per pair (P·C,): `firing_rate` of the matched parent latent on the child's
    tokens (nan where the child never fired in the sample). Per parent (P,): `parent_latent`, its decoder
    `cosine` with the parent, and `alone_rate`, its firing rate where the parent is present without a child."""

    firing_rate: torch.Tensor
    parent_latent: torch.Tensor
    cosine: torch.Tensor
    alone_rate: torch.Tensor
    cutoff: float = ABSORPTION_CUTOFF

    def summary(self) -> dict[str, float]:
        measured = ~torch.isnan(self.firing_rate)
        rates = self.firing_rate[measured]
        return {
            "absorbed_fraction": float((rates < self.cutoff).float().mean()),
            "mean_parent_miss": float((1 - rates).mean()),
            "parent_cosine": float(self.cosine.mean()),
            "parent_alone_rate": float(self.alone_rate.nanmean()),
            "pairs": int(measured.sum()),
        }


def matched_latents(decoder: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each planted unit direction (F, d), the decoder row (of (n, d)) with the largest cosine: (F,) latent
    indices and (F,) cosines."""
    rows = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosines, latents = (directions @ rows.T).max(dim=1)
    return latents, cosines


@torch.no_grad()
def latents_fire(sae, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """(N, L) bool: whether each of `latents` (L,) is nonzero on each raw token of x (N, d), in eval mode."""
    was_training = sae.training
    sae.eval()
    try:
        pieces = []
        for chunk in row_chunks(x, sae.spec.n):
            z = sae.encode(sae.normalize_input(chunk)[0])
            pieces.append(z[:, latents] != 0)
    finally:
        sae.train(was_training)
    return torch.cat(pieces)


@torch.no_grad()
def absorption(sae, hierarchy: PlantedHierarchy, x: torch.Tensor, active: torch.Tensor,
               cutoff: float = ABSORPTION_CUTOFF) -> Absorption:
    """The absorption measure (module docstring) of `sae` on held-out tokens x (N, d) with their planted
    features `active` (N, F), both from `hierarchy.sample`."""
    P = hierarchy.n_parents
    weights = sae.W_dec.detach().float().cpu()
    latents, cosines = matched_latents(weights, hierarchy.directions[:P])
    fires = latents_fire(sae, x, latents.to(sae.W_dec.device)).cpu().float()  # (N, P)
    parents, children = hierarchy.pairs
    child_tokens = active[:, children].float()  # (N, pairs)
    # Σ over tokens of fire[token, parent(pair)] · child_active[token, pair] / #child tokens
    hits = (fires[:, parents] * child_tokens).sum(dim=0)
    counts = child_tokens.sum(dim=0)
    firing_rate = torch.where(counts > 0, hits / counts.clamp_min(1), float("nan"))
    alone = active[:, :P] & ~active[:, P:].reshape(-1, P, hierarchy.children_per_parent).any(dim=2)
    alone_counts = alone.float().sum(dim=0)
    alone_rate = torch.where(alone_counts > 0, (fires * alone).sum(dim=0) / alone_counts.clamp_min(1), float("nan"))
    return Absorption(firing_rate, latents, cosines, alone_rate, cutoff)
