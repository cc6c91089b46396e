"""format=json: the dashboard's data as Neuronpedia-style batch files (docs/inspect.md lists every field).

`features/batch-<k>.json` holds up to BATCH latents as {"model_id", "layer", "sae_set", "features": [...]}, the
shape of Neuronpedia's feature batch uploads; `inspect.json` says what was inspected and how the files are laid out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from saekit.config import hook_layer
from saekit.inspect.collect import HIST_BINS, HIST_LOG10_HI, HIST_LOG10_LO

BATCH = 256
"""Features per batch file."""
FORMAT_VERSION = 1


def write_json(run_dir: Path, facts: dict, records: Iterable[dict]) -> Path:
    """features/batch-*.json (records in increasing id order, one batch held at a time) and inspect.json."""
    folder = run_dir / "features"
    folder.mkdir(parents=True, exist_ok=True)
    header = {"model_id": facts["model"], "layer": hook_layer(facts["hook"]), "sae_set": facts["hook"]}
    batch, files = [], []
    for record in records:
        batch.append(record)
        if len(batch) == BATCH:
            files.append(_write_batch(folder, len(files), header, batch))
            batch = []
    if batch:
        files.append(_write_batch(folder, len(files), header, batch))
    manifest = {"format": "saekit-inspect", "version": FORMAT_VERSION, **facts, "batch_files": files,
                "activation_histogram": {"log10_lo": HIST_LOG10_LO, "log10_hi": HIST_LOG10_HI, "bins": HIST_BINS}}
    path = run_dir / "inspect.json"
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False), encoding="utf-8")
    return path


def _write_batch(folder: Path, k: int, header: dict, features: list[dict]) -> str:
    name = f"batch-{k}.json"
    body = {**header, "features": [_neuronpedia(record) for record in features]}
    (folder / name).write_text(json.dumps(body, separators=(",", ":"), allow_nan=False), encoding="utf-8")
    return f"features/{name}"


def _neuronpedia(record: dict) -> dict:
    """A record with Neuronpedia's `feature_index` beside saekit's `index` (both name the latent)."""
    return {"feature_index": record["index"], **record}
