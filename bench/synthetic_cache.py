"""A synthetic activation cache of any size, laid out as `saekit.cache.write_cache` lays one out (issue 11 benches).

`write_synthetic_cache(root, n_rows, d)` writes `root/{manifest.json, train_00000.safetensors, …,
eval_00000.safetensors, tokens_train.safetensors, tokens_eval.safetensors}` with every file's size and sha256 in
the manifest, so `saekit.cache.open_cache(root)` accepts it. Rows are a seeded low-rank Gaussian signal plus a
mean and dense noise (x = μ + z·U + ε), generated a chunk at a time. The token windows are placeholders
(`ctx_len` zeros per window, enough windows to cover the rows); no model made these activations.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from saekit import __version__
from saekit.cache import CACHE_FORMAT, MANIFEST
from saekit.fileutil import sha256_file

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RANK = 32
CHUNK_ROWS = 65_536


def write_synthetic_cache(root: Path, n_rows: int, d: int, dtype: str = "float32", shard_mb: int = 256, seed: int = 0,
                          eval_rows: int | None = None, ctx_len: int = 128) -> Path:
    """Write a cache of `n_rows` training rows of width `d` (and `eval_rows`, default n_rows // 50 but at least
    one window, held-out rows) into the folder `root`; returns `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch_dtype = _DTYPES[dtype]
    element = torch.empty(0, dtype=torch_dtype).element_size()
    shard_rows = max(1, shard_mb * 2**20 // (d * element))
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(RANK, d, generator=generator) / RANK**0.5
    mean = torch.randn(d, generator=generator)
    eval_rows = eval_rows if eval_rows is not None else max(ctx_len, n_rows // 50)
    started = time.perf_counter()
    files, splits = [], {}
    for split, rows in (("train", n_rows), ("eval", eval_rows)):
        shards, sum_norm = [], 0.0
        for index, first in enumerate(range(0, rows, shard_rows)):
            shard = _rows(min(shard_rows, rows - first), basis, mean, generator).to(torch_dtype)
            sum_norm += float(shard.float().norm(dim=1).double().sum())
            name = f"{split}_{index:05d}.safetensors"
            files.append(_write(root / name, "acts", shard))
            shards.append({"file": name, "n_acts": int(shard.shape[0])})
        n_windows = -(-rows // ctx_len)
        files.append(_write(root / f"tokens_{split}.safetensors", "tokens", torch.zeros(n_windows, ctx_len,
                                                                                        dtype=torch.int32)))
        splits[split] = {"n_acts": rows, "n_tokens": n_windows * ctx_len, "n_windows": n_windows, "shards": shards,
                         "mean_norm": sum_norm / max(rows, 1)}
    elapsed = time.perf_counter() - started
    manifest = {
        "format": CACHE_FORMAT, "saekit_version": __version__, "key": root.name,
        "model": {"synthetic": True, "seed": seed, "rank": RANK}, "model_name": "synthetic", "hook": "synthetic",
        "d": d, "dtype": dtype, "normalization": "none (synthetic activations)", "ctx_len": ctx_len,
        "prepend_bos": False, "exclude_bos": False, "data": {"synthetic": True, "n_rows": n_rows, "seed": seed},
        "data_name": "synthetic", "splits": splits, "files": sorted(files, key=lambda entry: entry["file"]),
        "build_seconds": round(elapsed, 3), "build_tokens_per_s": round((n_rows + eval_rows) / max(elapsed, 1e-9), 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return root


def _rows(count: int, basis: torch.Tensor, mean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x = μ + z·U + 0.1·ε, a chunk of rows at a time (so the signal never needs a second full-size buffer)."""
    out = torch.empty(count, basis.shape[1])
    for first in range(0, count, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, count - first)
        block = out[first:first + rows]
        torch.randn(rows, basis.shape[1], generator=generator, out=block)
        block.mul_(0.1).add_(mean).addmm_(torch.randn(rows, basis.shape[0], generator=generator), basis)
    return out


def _write(path: Path, name: str, tensor: torch.Tensor) -> dict:
    save_file({name: tensor.contiguous()}, str(path))
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
