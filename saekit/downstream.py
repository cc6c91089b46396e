"""Downstream metrics (SPEC 4): splice a reconstruction into the model at the hook and score next-token loss.

The four variants of each batch of windows (clean, spliced, zero, mean) run as one forward pass over a
4×-stacked batch, with one hook that rewrites the activation of each quarter. When the cache drops the BOS
position (the SAE never saw it), BOS keeps its clean activation in every variant; `score_bos` decides whether
the prediction made at the first position counts.

Transcoders (`hook_out`): the model runs clean up to `hook_out`, whose activation is replaced by the prediction
ŷ made from the clean activation x read at `hook` earlier in the same pass; zero and mean variants replace
`hook_out`'s activation too. Ablation sparsity likewise removes a latent's contribution at `hook_out`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from saekit.errors import ConfigError

VARIANTS = ("clean", "spliced", "zero", "mean")
Splice = Callable[[torch.Tensor], torch.Tensor]  # (N, d) raw activations → (N, d) what goes back in


def log_probs_of(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary (..., V) in float32 (float64 stays float64; half precision is raised).

    float32 keeps the (positions, V) copy the size of the logits; the per-position CE and KL it gives are summed
    in float64 (`DownstreamTotals`).
    """
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) per position. (..., V) → (...)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position, from logits (..., V) → (...)."""
    return kl_from_log_probs(log_probs_of(logits_p), log_probs_of(logits_q))


def nll_from_log_probs(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """−log p(token_{t+1} | ≤ t) at each position t < T−1. log_probs (B, T, V), tokens (B, T) → (B, T−1)."""
    return -log_probs[:, :-1].gather(-1, tokens[:, 1:, None].long()).squeeze(-1)



def loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(ce_zero − ce_spliced) / (ce_zero − ce_clean): 1 for a perfect splice, 0 for one as bad as zeroing."""
    gap = ce_zero - ce_clean
    return (ce_zero - ce_spliced) / gap if gap != 0 else float("nan")


@dataclass
class DownstreamTotals:
    """Running sums over scored positions (float64)."""

    positions: int = 0
    kl: float = 0.0
    kl_zero: float = 0.0
    """KL(clean ‖ zero-ablated): SAEBench's kl_div_score compares the splice's KL with it."""

    def __post_init__(self) -> None:
        self.ce = {name: 0.0 for name in VARIANTS}

    def metrics(self) -> dict[str, float]:
        count = max(self.positions, 1)
        ce = {name: total / count for name, total in self.ce.items()}
        return {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"], "ce_mean": ce["mean"],
                "delta_ce": ce["spliced"] - ce["clean"],
                "loss_recovered": loss_recovered(ce["clean"], ce["spliced"], ce["zero"]),
                "kl": self.kl / count,
                # SAEBench's scores (zero ablation as its baseline): ce_loss_score is loss_recovered under its name.
                "kl_div_score": (self.kl_zero - self.kl) / self.kl_zero if self.kl_zero > 0 else float("nan"),
                "ce_loss_score": loss_recovered(ce["clean"], ce["spliced"], ce["zero"])}


def _variant_hook(splice: Splice, mean_act: torch.Tensor, batch: int, keep_first: bool,
                  source: Optional[Callable[[], torch.Tensor]] = None):
    """Rewrite quarters 1..3 of a (4B, T, d) activation: spliced, zero, mean; quarter 0 stays clean.

    The splice reads the clean quarter of this activation, or (a transcoder) `source()`: the clean quarter's
    (B, T', d_in) input read earlier in the pass."""

    def hook(act: torch.Tensor, hook=None) -> torch.Tensor:
        start = 1 if keep_first else 0
        out = act.clone()
        clean = act[:batch, start:] if source is None else source()
        flat = clean.reshape(-1, clean.shape[-1])
        # The model's dtype goes back in (a bfloat16 model rejects float32 activations).
        out[batch:2 * batch, start:] = splice(flat).reshape(out[batch:2 * batch, start:].shape).to(act.dtype)
        out[2 * batch:3 * batch, start:] = 0.0
        out[3 * batch:, start:] = mean_act.to(act.dtype)
        return out

    return hook


def _transcoder_hooks(hook: str, hook_out: str, splice: Splice, mean_act: torch.Tensor, batch: int,
                      keep_first: bool) -> list[tuple[str, Callable]]:
    """(hook, read x), (hook_out, write the variants): x is the clean quarter's activation at `hook`."""
    start = 1 if keep_first else 0
    held: dict[str, torch.Tensor] = {}

    def read(act: torch.Tensor) -> torch.Tensor:
        held["x"] = act[:batch, start:]
        return act

    def taken() -> torch.Tensor:
        if "x" not in held:  # hook_out ran first: the pair was never checked (check_transcoder_hooks)
            raise ConfigError(f"hook_out={hook_out} runs before hook={hook}; a transcoder predicts a later activation "
                              f"from an earlier one")
        return held.pop("x")

    return [(hook, read), (hook_out, _variant_hook(splice, mean_act, batch, keep_first, taken))]


@torch.no_grad()
def downstream_metrics(model, hook: str, windows: torch.Tensor, splice: Splice, mean_act: torch.Tensor,
                       batch_windows: int = 16, keep_first: bool = True, score_bos: bool = False,
                       progress: Optional[Callable[[int], None]] = None,
                       hook_out: Optional[str] = None) -> dict[str, float]:
    """ce_clean, ce_spliced, ce_zero, ce_mean, delta_ce, loss_recovered, kl over `windows` (N, T) of tokens.

    With `hook_out` (a transcoder) `splice` maps the activations at `hook` to predictions at `hook_out`, where
    they (and the zero and mean variants, `mean_act` being hook_out's mean) go in."""
    totals = DownstreamTotals()
    first_scored = 0 if score_bos else 1
    for start in range(0, windows.shape[0], batch_windows):
        tokens = windows[start:start + batch_windows].to(model.device).long()
        batch = tokens.shape[0]
        stacked = tokens.repeat(len(VARIANTS), 1)
        # logits_with_hook(s) holds the model's lock: a stream's background fill must not run hooks meanwhile.
        if hook_out is None:
            logits = model.logits_with_hook(stacked, hook, _variant_hook(splice, mean_act, batch, keep_first))
        else:
            logits = model.logits_with_hooks(stacked, _transcoder_hooks(hook, hook_out, splice, mean_act, batch,
                                                                        keep_first))
        _score_variants(logits, stacked, batch, first_scored, totals)
        del logits
        if progress:
            progress(batch * tokens.shape[1])
    return totals.metrics()


def _score_variants(logits: torch.Tensor, stacked: torch.Tensor, batch: int, first_scored: int,
                    totals: DownstreamTotals) -> None:
    """Add one forward pass's CE per variant and KL(clean ‖ spliced) to `totals`. One quarter's log-softmax is made
    at a time and only clean's is kept for the KL: at most half the logits' size in float32 copies."""
    clean = None
    for index, name in enumerate(VARIANTS):
        rows = slice(index * batch, (index + 1) * batch)
        log_probs = log_probs_of(logits[rows])
        totals.ce[name] += float(nll_from_log_probs(log_probs, stacked[rows])[:, first_scored:].double().sum())
        if name == "clean":
            clean = log_probs[:, first_scored:-1]
        elif name == "spliced":
            totals.kl += float(kl_from_log_probs(clean, log_probs[:, first_scored:-1]).double().sum())
        elif name == "zero":
            totals.kl_zero += float(kl_from_log_probs(clean, log_probs[:, first_scored:-1]).double().sum())
    totals.positions += max(stacked.shape[1] - 1 - first_scored, 0) * batch


# ---- ablation sparsity --------------------------------------------------------------------------------------
def ablation_sparsity_score(diff: torch.Tensor) -> float:
    """(‖v‖₁/‖v‖₂)² of the median-centered logit differences diff (T, V), flattened to v (SPEC 4).

    1 when one logit at one position moves; a constant shift of a position's logits contributes nothing.
    """
    centered = diff.double() - diff.double().median(dim=-1, keepdim=True).values
    v = centered.flatten()
    norm = v.norm()
    return float((v.abs().sum() / norm) ** 2) if norm > 0 else float("nan")


ABLATION_CHUNK = 16
"""Ablations per forward pass (and per dense decode): memory stays one chunk's, whatever the L0."""


@torch.no_grad()
def latent_contributions(sae, x_raw: torch.Tensor, chunk: int = ABLATION_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """For one activation x_raw (d,): the active latents and each one's contribution to x̂ in raw space (A, d)
    (a transcoder's: to ŷ, in hook_out's space, (A, d_out)).

    Ablating latent i while keeping the reconstruction error means x_raw − contribution_i goes back in. The
    ablated codes are decoded `chunk` at a time, so A dense (n,) codes never exist at once.
    """
    x, state = sae.normalize_input(x_raw[None])
    z = sae.encode(x)[0]
    active = z.nonzero().flatten()
    full = sae.denormalize_output(sae.decode(z[None], x), state)
    parts = []
    for latents in active.split(chunk):
        ablated = z.repeat(latents.numel(), 1)
        ablated[torch.arange(latents.numel()), latents] = 0.0
        expanded_state = None if state is None else tuple(s.expand(latents.numel(), -1) for s in state)
        decoded = sae.decode(ablated, x.expand(latents.numel(), -1))
        parts.append(full - sae.denormalize_output(decoded, expanded_state))
    return active, torch.cat(parts) if parts else full[:0]


def _capture(store: dict):
    def grab(act, hook=None):
        store["act"] = act.detach().clone()
        return act

    return grab


def _ablation(pos: int, contributions: torch.Tensor):
    """Hook: row j of the batch gets contribution j removed at position `pos` (in the model's dtype)."""

    def ablate(act, hook=None):
        out = act.clone()
        out[:, pos] = out[:, pos] - contributions.to(act.dtype)
        return out

    return ablate


@torch.no_grad()
def ablation_sparsity(model, hook: str, sae, windows: torch.Tensor, n_positions: int = 32, horizon: int = 16,
                      seed: int = 0, first_position: int = 1, chunk: int = ABLATION_CHUNK,
                      hook_out: Optional[str] = None) -> dict[str, float]:
    """Mean and quantiles of the ablation sparsity over every active latent at `n_positions` sampled positions.

    The active latents of a position are ablated `chunk` per forward pass. A transcoder reads x at `hook` and
    its latents' contributions are removed from the clean activation at `hook_out` (its prediction error kept).
    """
    ablated_at = hook_out or hook
    generator = torch.Generator().manual_seed(seed)
    ctx = windows.shape[1]
    last = max(first_position, ctx - horizon)
    weights = next(sae.parameters())
    scores: list[float] = []
    for _ in range(n_positions):
        row = int(torch.randint(windows.shape[0], (1,), generator=generator))
        pos = int(torch.randint(first_position, last + 1, (1,), generator=generator))
        tokens = windows[row:row + 1].to(model.device).long()
        captured: dict = {}
        clean_logits = model.logits_with_hook(tokens, hook, _capture(captured))[0]
        x_raw = captured["act"][0, pos].to(weights.device, weights.dtype)  # the SAE takes float32 from any model
        _, contributions = latent_contributions(sae, x_raw, chunk)
        if contributions.shape[0] == 0:  # no latent fires here (threshold SAEs): nothing to ablate
            continue
        end = min(pos + horizon, ctx)
        clean = clean_logits[pos:end].float()
        for part in contributions.to(model.device).split(chunk):
            logits = model.logits_with_hook(tokens.repeat(part.shape[0], 1), ablated_at, _ablation(pos, part))
            for diff in logits[:, pos:end].float() - clean:
                score = ablation_sparsity_score(diff)
                if score == score:  # a latent with no effect at all has no direction to score
                    scores.append(score)
    if not scores:
        return {"ablation_sparsity": float("nan"), "ablation_n": 0.0}
    values = torch.tensor(scores, dtype=torch.float64)
    return {"ablation_sparsity": float(values.mean()), "ablation_sparsity_q10": float(values.quantile(0.1)),
            "ablation_sparsity_q50": float(values.quantile(0.5)), "ablation_sparsity_q90": float(values.quantile(0.9)),
            "ablation_n": float(len(scores))}
