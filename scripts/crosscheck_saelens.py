"""Export saekit runs to SAELens folders and load each with the real sae-lens package (a separate environment).

sae-lens needs transformer-lens < 4, so it cannot live in saekit's environment. Make one, then run this with
saekit's Python:

    python3 -m venv /work/saelens-venv
    /work/saelens-venv/bin/pip install torch==2.13.0 sae-lens
    .venv/bin/python scripts/crosscheck_saelens.py <sweep or run folder> --saelens-python /work/saelens-venv/bin/python

For every run below the folder: `saekit export format=saelens`, then held-out activations x from the run's own
cache with saekit's latents z and reconstructions x̂, then scripts/check_saelens.py in the sae-lens environment,
which loads the folder with `SAE.load_from_disk` and compares its encode/decode with z and x̂ (1e-5 relative).
Prints one line per run and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from saekit.checkpoint import resolve_checkpoints
from saekit.config import CacheConfig, ExportConfig, ForeignSite
from saekit.formats import open_checkpoint
from saekit.formats.run import export
from saekit.tasks import ModelPool, _trained_config, held_out_cache

HERE = Path(__file__).resolve().parent


def inputs_file(run: Path, cache_dir: str, rows: int, target: Path) -> None:
    """x (rows of the held-out split), z and x̂ as saekit computes them, for check_saelens.py."""
    sae, meta = open_checkpoint(run, ForeignSite())
    trained = _trained_config(meta)
    _, cache = held_out_cache(trained, None, CacheConfig(dir=cache_dir), "cpu", ModelPool(torch.device("cpu")))
    x = cache.split(next(cache.iter_split("eval", rows)).float())[0]  # a transcoder's cache rows are [x | y]
    with torch.no_grad():
        x_hat, z = sae.reconstruct(x)
    save_file({"x": x.contiguous(), "z": z.contiguous(), "x_hat": x_hat.contiguous()}, str(target))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a saekit run folder or a sweep folder")
    parser.add_argument("--saelens-python", required=True, help="python of the environment with sae-lens installed")
    parser.add_argument("--cache-dir", default="outputs/activations", help="the runs' cache.dir")
    parser.add_argument("--rows", type=int, default=4096, help="held-out activations compared per run")
    args = parser.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        for ckpt in resolve_checkpoints(args.folder):
            run = ckpt.parent
            out = Path(scratch) / run.name
            export(ExportConfig(ckpt=str(run), format="saelens", out=str(out), cache=CacheConfig(dir=args.cache_dir),
                                device="cpu"))
            inputs = Path(scratch) / f"{run.name}.safetensors"
            inputs_file(run, args.cache_dir, args.rows, inputs)
            result = subprocess.run([args.saelens_python, str(HERE / "check_saelens.py"), "--folder", str(out),
                                     "--inputs", str(inputs)], capture_output=True, text=True)
            print(f"== {run.name} (exit {result.returncode})\n{result.stdout.strip()}\n{result.stderr.strip()[-2000:]}")
            failures += result.returncode != 0
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
