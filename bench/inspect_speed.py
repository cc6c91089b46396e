"""The two targets of `saekit inspect` (issue 16), measured in one run: `python bench/inspect_speed.py`.

1. Speed: collecting a 512-latent SAE (TopK, k=32, stories260k blocks.2.hook_resid_post) over 1M tokens, against one
   plain forward pass of the model (all layers, logits) over the same token windows in the same batches, in the same
   process. The held-out TinyStories windows are cycled to reach --tokens (the text holds fewer). Target: ≤ 2×.
   Writing the site for all 512 latents is timed apart (and added in `total_ratio`).
2. Memory: `saekit inspect`'s task (saekit.inspect.run.inspect, format=html) on an n = 131,072 SAE with 20 top
   contexts and a 20-context quantile reservoir per latent, in a child process whose peak resident memory is read
   from the kernel (wait4's ru_maxrss). Target: < 2 GB. Pages are written for the first --wide-pages latents (the
   index covers all of them); the collection's memory does not depend on the token count, so --wide-tokens is small.

The SAEs are untrained but initialized as training initializes them (saekit.sae init on activations); pass
--ckpt <run folder> to time a trained 512-latent SAE instead. Rows name,value,unit go to --out (bench/inspect.csv).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("SAEKIT_DATA_ROOT", ROOT.parent / "shared" / "data")).resolve()
MODEL_DIR = DATA_ROOT / "stories260k"
TEXT = DATA_ROOT / "tinystories-text"
HOOK = "blocks.2.hook_resid_post"


def train_config(n: int, k: int = 32):
    """The TrainConfig a `saekit train n=<n> k=<k> data.ctx_len=64` on TinyStories would save with its checkpoint."""
    from saekit.config import (CacheConfig, DataConfig, DeadConfig, FinalEvalConfig, InitConfig, LoggerConfig,
                               ModelConfig, OptimizerConfig, TrainConfig)
    from saekit.sae import variant_config

    data = DataConfig(name="tinystories", paths=[str(TEXT / "tinystories_train_first1000.json")],
                      eval_paths=[str(TEXT / "tinystories_validation_head.txt")], ctx_len=64)
    return TrainConfig(model=ModelConfig(name=str(MODEL_DIR)), data=data, activation=variant_config("topk", {}), n=n,
                       k=k, n_tokens=65536, batch_size=4096, device="cpu", init=InitConfig(), cache=CacheConfig(),
                       dead=DeadConfig(), optimizer=OptimizerConfig(), final_eval=FinalEvalConfig(),
                       logger=LoggerConfig())


def write_checkpoint(folder: Path, n: int, model) -> Path:
    """A TopK SAE of width n, initialized on real activations (b_pre, tied encoder, input scale), saved as training
    saves it."""
    from saekit.checkpoint import save_sae
    from saekit.inspect.run import inspected_windows
    from saekit.sae import build_sae
    from saekit.train import spec_from_config

    cfg = train_config(n)
    sae = build_sae(spec_from_config(cfg, model.d_model))
    windows = inspected_windows(cfg.data, model, 8192)
    acts = model.run_to_hook(windows, HOOK)[:, 1:].reshape(-1, model.d_model)
    with torch.no_grad():
        sae.input_scale.fill_(float(model.d_model ** 0.5 / acts.norm(dim=1).mean()))
        sample, _ = sae.normalize_input(acts)
        sae.initialize(sample, cfg.init.b_pre, cfg.init.tied, cfg.init.scale_encoder, torch.Generator().manual_seed(0))
    folder.mkdir(parents=True, exist_ok=True)
    save_sae(folder / "sae.safetensors", sae, {"train_config": dataclasses.asdict(cfg), "step": 1, "finished": True})
    return folder


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def speed(ckpt: Path, tokens: int, model, out_dir: Path) -> dict:
    """Collection (and site writing) vs a plain forward pass over the same windows, in the same batches."""
    from saekit.checkpoint import load_sae, resolve_checkpoint
    from saekit.inspect.collect import batch_windows_for, collect
    from saekit.inspect.config import InspectSettings
    from saekit.inspect.run import inspected_windows, latent_encoder, page_latents, write_outputs
    from saekit.tasks import _trained_config

    sae, meta = load_sae(resolve_checkpoint(str(ckpt)))
    trained = _trained_config(meta)
    held_out = inspected_windows(trained.data, model, 65536)
    repeats = -(-tokens // held_out.numel())
    windows = held_out.repeat(repeats, 1)[:-(-tokens // held_out.shape[1])]
    settings = InspectSettings(tokens=windows.numel())
    step = batch_windows_for(sae.spec.n, windows.shape[1], settings.batch_windows)
    encode = latent_encoder(model, sae, trained.hook_name)
    batches = windows.split(step)

    def forward():
        for batch in batches:
            model.logits_with_hook(batch, trained.hook_name, None)

    def to_hook():
        for batch in batches:
            model.run_to_hook(batch, trained.hook_name)

    result = {}

    def collection():
        result["c"] = collect(windows, encode, sae.spec.n, settings.contexts, settings.reservoir, settings.ctx_left,
                              settings.ctx_right, "cpu", settings.batch_windows, scored_from=1)

    # The first pass over a batch shape is many times slower than the next ones (kernel set-up); both sides are
    # timed warm, alternating, best of two (the machine may be shared).
    cold_forward_s = timed(forward)
    forward_s, collect_s = [], []
    for _ in range(2):
        forward_s.append(timed(forward))
        collect_s.append(timed(collection))
    forward_s, collect_s = min(forward_s), min(collect_s)
    hook_s = timed(to_hook)
    facts = {"model": "stories260k", "hook": trained.hook_name, "hook_out": None, "activation": "topk",
             "n": sae.spec.n, "d": sae.spec.d, "n_tokens": result["c"].n_tokens, "data": "tinystories (cycled)",
             "ckpt": str(ckpt), "ctx_len": int(windows.shape[1])}
    write_s = timed(lambda: write_outputs("html", out_dir, sae, model, result["c"], page_latents(settings, sae.spec.n),
                                          settings, facts))
    return {"speed_tokens": (windows.numel(), "tokens"), "speed_n": (sae.spec.n, "latents"),
            "speed_batch_windows": (step, "windows"), "cold_first_forward_s": (cold_forward_s, "s"),
            "forward_s": (forward_s, "s"),
            "run_to_hook_s": (hook_s, "s"), "collect_s": (collect_s, "s"), "write_site_s": (write_s, "s"),
            "collect_ratio": (collect_s / forward_s, "x forward"),
            "total_ratio": ((collect_s + write_s) / forward_s, "x forward")}


def wide_child(ckpt: str, out: str, tokens: int, pages: int) -> None:
    """The child of the memory measurement: the inspect task itself, as `saekit inspect` runs it."""
    from saekit.inspect.config import InspectConfig, InspectSettings
    from saekit.inspect.run import inspect

    started = time.perf_counter()
    inspect(InspectConfig(ckpt=ckpt, device="cpu", inspect=InspectSettings(tokens=tokens, latents=pages)), Path(out))
    print(f"wall_s={time.perf_counter() - started:.1f}")


def memory(ckpt: Path, out_dir: Path, tokens: int, pages: int) -> dict:
    """Peak RSS of the inspect task on the wide SAE, in a child process."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--wide-child", str(ckpt), str(out_dir), str(tokens), str(pages)],
                             stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    output = child.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the wide inspect child failed (exit {os.waitstatus_to_exitcode(status)})")
    from saekit.inspect.collect import HIST_BINS

    n = _n_of(ckpt)
    slots = n * 20 * (4 + 4 + 4 + 8 + 4 * 17) * 2  # top + reservoir slots at the defaults (ctx 12 + 1 + 4)
    return {"wide_n": (n, "latents"), "wide_tokens": (tokens, "tokens"), "wide_pages": (pages, "latents"),
            "wide_peak_rss_mb": (usage.ru_maxrss / 1024, "MB"), "wide_slots_mb": (slots / 2**20, "MB"),
            "wide_hist_mb": (n * HIST_BINS * 8 / 2**20, "MB"),
            "wide_wall_s": (time.perf_counter() - started, "s"), "wide_child_wall_s": (output.strip().split("=")[-1], "s")}


def _n_of(ckpt: Path) -> int:
    from saekit.checkpoint import read_metadata

    return int(read_metadata(ckpt / "sae.safetensors")["spec"]["n"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--ckpt", type=Path, default=None, help="a trained 512-latent run folder (default: untrained)")
    parser.add_argument("--wide-n", type=int, default=131072)
    parser.add_argument("--wide-tokens", type=int, default=16384)
    parser.add_argument("--wide-pages", type=int, default=256)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "inspect.csv")
    parser.add_argument("--wide-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.wide_child:
        ckpt, out, tokens, pages = args.wide_child
        return wide_child(ckpt, out, int(tokens), int(pages))
    from saekit.config import ModelConfig
    from saekit.model import load_model

    torch.manual_seed(0)
    model = load_model(ModelConfig(name=str(MODEL_DIR)), torch.device("cpu"))
    rows = {"torch_threads": (torch.get_num_threads(), "threads")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_speed:
            ckpt = args.ckpt or write_checkpoint(tmp / "sae512", 512, model)
            rows.update(speed(ckpt, args.tokens, model, tmp / "site512"))
            print({key: value for key, (value, _) in rows.items()}, flush=True)
        wide = write_checkpoint(tmp / "wide", args.wide_n, model)
        rows.update(memory(wide, tmp / "site_wide", args.wide_tokens, args.wide_pages))
    table = pd.DataFrame([{"name": key, "value": value, "unit": unit} for key, (value, unit) in rows.items()])
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
