"""`saekit inspect`'s task: load the SAE and its model, collect in one pass, write the site or the JSON export."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from saekit.cache import excludes_bos
from saekit.config import DataConfig
from saekit.errors import DataError, require
from saekit.inspect.collect import Collected, collect
from saekit.inspect.config import InspectConfig, InspectSettings
from saekit.inspect.features import (SPARK_BINS, FeatureBuilder, feature_records, nearest_latents, selected_latents,
                                     token_strings)
from saekit.model import LoadedModel, load_model, resolve_device

log = logging.getLogger(__name__)

DENSITY_BINS = 40
"""Bins of the index's SAE-wide histogram of log10 feature density."""


def inspect(cfg: InspectConfig, run_dir: Path) -> None:
    """Collect every latent's statistics and contexts over inspect.tokens held-out tokens in one pass, then write
    index.html + latent.html + data/ (format=html) or features/*.json (format=json) into run_dir."""
    from saekit.formats import open_checkpoint
    from saekit.tasks import _evaluation_data, _trained_config, single_checkpoint

    device = resolve_device(cfg.device)
    ckpt = single_checkpoint(cfg.ckpt, "inspect")
    sae, meta = open_checkpoint(ckpt, cfg, device)

    trained = _trained_config(meta, f"ckpt={ckpt}")
    settings = cfg.inspect
    ids = page_latents(settings, sae.spec.n)
    data = _evaluation_data(cfg.data, trained.data)
    model = load_model(trained.model, device)
    _check_hooks(model, trained.hook_name, trained.hook_out)
    windows = inspected_windows(data, model, settings.tokens)
    started = time.perf_counter()
    collected = collect(windows, latent_encoder(model, sae, trained.hook_name), sae.spec.n, settings.contexts,
                        settings.reservoir, settings.ctx_left, settings.ctx_right, device, settings.batch_windows,
                        scored_from=1 if excludes_bos(data) else 0, seed=settings.seed,
                        progress=_progress_log(windows.numel()))
    log.info("collected %d latents over %s tokens in %.1f s", sae.spec.n, f"{collected.n_tokens:,}",
             time.perf_counter() - started)
    facts = {"model": trained.model.short_name, "hook": trained.hook_name, "hook_out": trained.hook_out,
             "activation": sae.spec.activation, "n": sae.spec.n, "d": sae.spec.d, "n_tokens": collected.n_tokens,
             "data": data.name, "ckpt": str(ckpt), "ctx_len": int(windows.shape[1])}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(cfg.format, run_dir, sae, model, collected, ids, settings, facts)


def write_outputs(fmt: str, run_dir: Path, sae, model: LoadedModel, collected: Collected, ids: list[int],
                  settings: InspectSettings, facts: dict) -> Path:
    """The records of `ids` (plus every latent's summary) as the site or the JSON export; returns the main file."""
    builder = FeatureBuilder(collected, token_strings(model.tokenizer, model.d_vocab), settings.quantiles)
    W_U, directions, logit_note = logit_inputs(sae, model, ids)
    facts = {**facts, "logits": logit_note, "dead": int((collected.fires == 0).sum())}
    with torch.no_grad():
        neighbours = nearest_latents(sae.W_dec.detach(), ids, settings.neighbours)
    records = feature_records(builder, ids, directions, W_U, settings.logits, neighbours)
    if fmt == "json":
        from saekit.inspect.export_json import write_json

        out = write_json(run_dir, facts, records)
    else:
        from saekit.inspect.site import CHUNK, write_site

        out = write_site(run_dir, index_data(builder, ids, facts, CHUNK), records)
    log.info("inspect: %s (%d latent pages of %d latents)", out, len(ids), collected.n)
    return out


def _progress_log(total: int) -> Callable[[int], None]:
    """A progress callback that logs at every tenth of the tokens (the pass can take minutes on a CPU)."""
    done, next_mark = [0], [total / 10]

    def advance(tokens: int) -> None:
        done[0] += tokens
        if done[0] >= next_mark[0] and done[0] < total:
            log.info("inspect: %s of %s tokens", f"{done[0]:,}", f"{total:,}")
            next_mark[0] += total / 10

    return advance


def page_latents(settings: InspectSettings, n: int) -> list[int]:
    """The latents that get a page; ConfigError for an id the SAE does not have."""
    ids = selected_latents(n, settings.latents)
    bad = [i for i in ids if i >= n]
    require(not bad, f"inspect.latents names latent {bad[0] if bad else 0}, but the SAE has {n} latents "
                     f"(ids 0..{n - 1}); pick ids in that range")
    return ids


def _check_hooks(model: LoadedModel, hook: str, hook_out: Optional[str]) -> None:
    if hook_out is not None:
        model.check_transcoder_hooks(hook, hook_out)
    else:
        model.check_hook(hook)


def inspected_windows(data: DataConfig, model: LoadedModel, tokens: int) -> torch.Tensor:
    """Whole held-out windows holding at least `tokens` tokens (fewer only when the text ends first)."""
    from saekit.data import load_windows

    # One training window only: the held-out split is what is inspected.
    asked = dataclasses.replace(data, n_train_tokens=data.ctx_len, n_eval_tokens=tokens)
    try:
        windows = load_windows(asked, model.tokenizer, model.bos_token_id, tokens).eval
    except DataError as exc:
        if "data.n_eval_tokens" not in str(exc):  # missing files and the like: their own message says it
            raise
        raise DataError(f"inspect.tokens={tokens}: {str(exc).splitlines()[0]} (lower inspect.tokens, or pass more "
                        f"text with data=...)") from exc
    return windows[:math.ceil(tokens / data.ctx_len)]


def latent_encoder(model: LoadedModel, sae, hook: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """tokens (w, T) → latents (w, T, n): the model run up to `hook` (the encoder's input, for a transcoder too),
    normalized as in training, encoded."""

    @torch.no_grad()
    def encode(tokens: torch.Tensor) -> torch.Tensor:
        acts = model.run_to_hook(tokens, hook)
        x, _ = sae.normalize_input(acts.reshape(-1, acts.shape[-1]).float())
        return sae.encode(x).reshape(tokens.shape[0], tokens.shape[1], -1)

    return encode


def unembedding(model: LoadedModel) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The model's W_U (d_model, d_vocab) and its final norm's learned scale (d_model,), each None when not found."""
    bridge = model.bridge
    W_U = getattr(getattr(bridge, "unembed", None), "W_U", None)
    if W_U is None:
        W_U = getattr(bridge, "W_U", None)
    scale = None
    ln_final = getattr(bridge, "ln_final", None)
    if ln_final is not None:
        for name, param in ln_final.named_parameters():
            if name.split(".")[-1] in ("weight", "w") and param.ndim == 1 and param.shape[0] == model.d_model:
                scale = param
                break
    return (W_U.detach() if W_U is not None else None), (scale.detach() if scale is not None else None)


def logit_inputs(sae, model: LoadedModel, ids: list[int]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], str]:
    """(W_U, directions (len(ids), d_model), a note on what was accounted for) for the logit effects; W_U None (and
    the note says why) when the decoder's output is not d_model wide or the model has no unembedding."""
    W_U, ln_scale = unembedding(model)
    if W_U is None:
        return None, None, "not computed: the model exposes no unembedding (unembed.W_U)"
    if sae.spec.d_output != W_U.shape[0]:
        return None, None, (f"not computed: the decoder writes {sae.spec.d_output} dimensions, the residual stream "
                            f"has {W_U.shape[0]}")
    with torch.no_grad():
        directions = sae.W_dec.detach()[torch.as_tensor(ids, dtype=torch.long, device=sae.W_dec.device)].float()
        directions = directions / _output_scale(sae)
        note = "decoder direction (model's activation scale) @ W_U"
        if ln_scale is not None:
            directions = directions * ln_scale.float().to(directions.device)
            note = "decoder direction (model's activation scale) × final norm's learned weight @ W_U"
    return W_U.to(directions.device), directions, note + "; the final norm's per-token 1/rms is not applied"


def _output_scale(sae) -> float:
    """What the SAE's normalization multiplied its target by (undone to read directions in the model's units);
    1 for normalize=layer_norm, whose per-token scale does not exist outside a token."""
    if sae.spec.normalize != "scale":
        return 1.0
    return float(sae.output_scale if sae.transcoder else sae.input_scale)


def index_data(builder: FeatureBuilder, ids: list[int], facts: dict, chunk: int) -> dict:
    """data/index.js: facts, every latent's summary as columns, the SAE-wide density histogram."""
    n = builder.c.n
    with_page = set(ids)
    columns = {"id": [], "log10_density": [], "mean": [], "max": [], "dead": [], "top_tokens": [], "spark": [],
               "page": []}
    sparklines = builder.sparklines()
    for i in range(n):
        summary = builder.summary(i)
        columns["id"].append(i)
        columns["log10_density"].append(None if summary["dead"] else round(summary["log10_density"], 4))
        columns["mean"].append(float(f"{summary['mean_value']:.4g}"))
        columns["max"].append(float(f"{summary['max_value']:.4g}"))
        columns["dead"].append(summary["dead"])
        columns["top_tokens"].append(" ".join(json.dumps(token) for token, _ in summary["top_tokens"]))
        columns["spark"].append(sparklines[i])
        columns["page"].append(i in with_page)
    return {"meta": facts, "columns": columns, "density_hist": density_histogram(builder.c), "chunk": chunk,
            "page_size": 1000, "spark_bins": SPARK_BINS}


def density_histogram(collected: Collected) -> dict:
    """DENSITY_BINS bins of log10 firing rate over the live latents, from 1/n_tokens to 1; dead ones counted apart."""
    density = collected.density()
    alive = density > 0
    lo = math.log10(1 / max(1, collected.n_tokens))
    edges = torch.linspace(lo, 0.0, DENSITY_BINS + 1, dtype=torch.float64)
    counts = torch.histc(density[alive].log10(), bins=DENSITY_BINS, min=lo, max=0.0) if alive.any() else \
        torch.zeros(DENSITY_BINS, dtype=torch.float64)
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts],
            "dead": int((~alive).sum())}
