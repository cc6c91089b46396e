"""One record per latent (Neuronpedia-style field names), shared by the HTML site and the JSON export.

docs/inspect.md documents every field. Decoder geometry (logit effects, neighbours) is computed here too.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterator, Optional, Sequence

import torch

from saekit.inspect.collect import Collected, hist_edges, quantile_bins

SPARK_BINS = 12
"""Bins of the index's per-latent sparkline (its activation histogram, coarsened)."""
_ROW_CHUNK = 256  # latents per block of the decoder-cosine and logit products (bounded memory at any n)


def token_strings(tokenizer, d_vocab: int) -> list[str]:
    """Every token id's text as shown on a page: the tokenizer's piece, with its word-start marker as a space."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(d_vocab)))
    shown = []
    for piece in pieces:
        piece = "" if piece is None else str(piece)
        shown.append(piece.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n"))
    return shown


def selected_latents(n: int, latents) -> list[int]:
    """The latents that get a page: all, the first N, or the listed ids (checked against n by the caller)."""
    if latents is None:
        return list(range(n))
    if isinstance(latents, int):
        return list(range(min(n, latents)))
    return sorted(latents)


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_latents(W_dec: torch.Tensor, ids: Sequence[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(ids), k) indices and cosines of each latent's nearest other latents by decoder direction."""
    unit = unit_rows(W_dec.float())
    k = min(k, unit.shape[0] - 1)
    values, indices = [], []
    index = torch.as_tensor(list(ids), dtype=torch.long, device=unit.device)
    for rows in index.split(_ROW_CHUNK):
        cos = unit[rows] @ unit.T
        cos[torch.arange(rows.numel(), device=cos.device), rows] = -math.inf  # not its own neighbour
        top = cos.topk(k, dim=1)
        values.append(top.values.cpu())
        indices.append(top.indices.cpu())
    if not values:
        return torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
    return torch.cat(indices), torch.cat(values)


def logit_effects(directions: torch.Tensor, W_U: torch.Tensor, k: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Per row of directions (m, d): top-k positive and top-k negative entries of direction @ W_U (d, V), as
    (pos indices, pos values, neg indices, neg values), in blocks of rows."""
    k = min(k, W_U.shape[1])
    for block in directions.split(_ROW_CHUNK):
        effects = block.float() @ W_U.float()
        pos = effects.topk(k, dim=1)
        neg = effects.topk(k, dim=1, largest=False)
        for row in range(block.shape[0]):
            yield pos.indices[row].cpu(), pos.values[row].cpu(), neg.indices[row].cpu(), neg.values[row].cpu()


def _rounded(values, digits: int = 4) -> list[float]:
    return [float(f"{float(v):.{digits}g}") for v in values]


class FeatureBuilder:
    """Turns collected slots into records; `vocab` maps token ids to shown text."""

    def __init__(self, collected: Collected, vocab: list[str], quantiles: int):
        self.c, self.vocab, self.quantiles = collected, vocab, quantiles
        self.density = collected.density()
        self.mean = collected.mean_act()
        self.edges = hist_edges()
        top = collected.top
        held = collected.windows[top.window.clamp_min(0).long(), top.pos.long()]
        # (n, contexts) token ids at the top contexts' strongest positions, -1 for empty slots; as lists once, since
        # the index reads them for every latent
        self.top_token_ids = torch.where(top.window >= 0, held, torch.full_like(held, -1)).tolist()
        self.fires_list, self.density_list = collected.fires.tolist(), self.density.tolist()
        self.mean_list, self.max_list = self.mean.tolist(), collected.act_max.tolist()

    def summary(self, i: int) -> dict:
        """The statistics every latent has (the index row), without contexts."""
        fires, density = self.fires_list[i], self.density_list[i]
        return {"index": i, "dead": fires == 0, "fires": fires, "frac_nonzero": density,
                "log10_density": math.log10(density) if fires else None, "mean_value": self.mean_list[i],
                "max_value": self.max_list[i], "top_tokens": self.top_tokens(i)}

    def top_tokens(self, i: int, k: int = 5) -> list[list]:
        """The tokens that most often carry the latent's strongest activation in its top contexts, with counts."""
        tokens = [token for token in self.top_token_ids[i] if token >= 0]
        return [[self.vocab[token], count] for token, count in Counter(tokens).most_common(k)]

    def histogram(self, i: int) -> tuple[list[float], list[int]]:
        """The latent's activation histogram trimmed to its nonzero bins: (bin centres as activation values,
        counts)."""
        counts = self.c.hist[i]
        nonzero = counts.nonzero(as_tuple=True)[0]
        if nonzero.numel() == 0:
            return [], []
        lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
        centres = [10 ** ((self.edges[b] + self.edges[b + 1]) / 2) for b in range(lo, hi)]
        return _rounded(centres), [int(x) for x in counts[lo:hi]]

    def sparklines(self) -> list[list[int]]:
        """Per latent, SPARK_BINS counts of its activation histogram (neighbouring log10 bins summed; the same x
        axis for every latent, so sparklines compare)."""
        counts = self.c.hist
        per = math.ceil(counts.shape[1] / SPARK_BINS)
        padded = torch.nn.functional.pad(counts, (0, per * SPARK_BINS - counts.shape[1]))
        return padded.view(counts.shape[0], SPARK_BINS, per).sum(dim=2).tolist()

    def context(self, slots, i: int, j: int, bin_name: str, bin_min: float, bin_max: float,
                bin_contains: float) -> dict:
        """One shown context: the tokens around slot j's strongest token and the latent's activation on each."""
        window, pos = int(slots.window[i, j]), int(slots.pos[i, j])
        length = self.c.windows.shape[1]
        first = max(0, pos - self.c.ctx_left)
        last = min(length, pos + self.c.ctx_right + 1)
        tokens = self.c.windows[window, first:last].tolist()
        values = slots.ctx[i, j, first - (pos - self.c.ctx_left):last - (pos - self.c.ctx_left)]
        return {"tokens": [self.vocab[t] for t in tokens], "token_ids": tokens, "values": _rounded(values),
                "max_value": float(f"{float(slots.value[i, j]):.6g}"), "qualifying_token_index": pos - first,
                "window": window, "position": pos, "bin": bin_name, "bin_min": float(f"{bin_min:.6g}"),
                "bin_max": float(f"{bin_max:.6g}"), "bin_contains": bin_contains}

    def activations(self, i: int) -> list[dict]:
        """The top contexts (bin "top"), then the reservoir's quantile bins ("q1" lowest … "qQ" highest)."""
        top = self.c.top
        kept = [j for j in range(top.value.shape[1]) if top.window[i, j] >= 0]
        shown = []
        if kept:
            lo, hi = float(top.value[i, kept[-1]]), float(top.value[i, kept[0]])
            share = len(kept) / max(1, int(self.c.windows_fired[i]))
            shown += [self.context(top, i, j, "top", lo, hi, share) for j in kept]
        sample = self.c.sample
        bins = quantile_bins(sample.value[i], sample.window[i], self.quantiles)
        for b, slots in enumerate(bins):
            lo, hi = float(sample.value[i, slots[0]]), float(sample.value[i, slots[-1]])
            share = len(slots) / max(1, sum(len(s) for s in bins))  # of the sample ≈ of the firing windows
            shown += [self.context(sample, i, j, f"q{b + 1}", lo, hi, share) for j in slots]
        return shown


def feature_records(builder: FeatureBuilder, ids: Sequence[int], directions: Optional[torch.Tensor],
                    W_U: Optional[torch.Tensor], n_logits: int, neighbours: tuple[torch.Tensor, torch.Tensor]
                    ) -> Iterator[dict]:
    """Full records of `ids`, in order: summary, histogram, contexts, logit effects and nearest latents."""
    effects = logit_effects(directions, W_U, n_logits) if W_U is not None and n_logits > 0 else None
    near_ids, near_cos = neighbours
    for row, i in enumerate(ids):
        record = builder.summary(i)
        values, heights = builder.histogram(i)
        record.update(freq_hist_data_bar_values=values, freq_hist_data_bar_heights=heights,
                      activations=builder.activations(i), pos_str=[], pos_values=[], neg_str=[], neg_values=[])
        if effects is not None:
            pos_i, pos_v, neg_i, neg_v = next(effects)
            record.update(pos_str=[builder.vocab[t] for t in pos_i.tolist()], pos_values=_rounded(pos_v),
                          neg_str=[builder.vocab[t] for t in neg_i.tolist()], neg_values=_rounded(neg_v))
        record.update(topk_cos_sim_indices=near_ids[row].tolist() if near_ids.numel() else [],
                      topk_cos_sim_values=_rounded(near_cos[row]) if near_cos.numel() else [])
        yield record
