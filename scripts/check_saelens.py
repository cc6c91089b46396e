"""Cross-check an exported SAELens folder against SAELens itself.

Run with the separate SAELens environment (NOT saekit's .venv):

    /work/saelens-venv/bin/python scripts/check_saelens.py \
        --folder <exported SAELens folder> --inputs <file.safetensors>

The inputs file must hold float tensors:
    "x"     (N, d_in)   input activations
    "z"     (N, d_sae)  expected feature activations
    "x_hat" (N, d_out)  expected reconstruction (d_out == d_in for SAEs)

The folder is loaded with SAELens's own ``SAE.load_from_disk`` (which dispatches
on cfg.json["architecture"] through SAELens's registry, transcoders included),
in float32 on cpu. ``encode`` and ``decode`` are run on x; for skip transcoders
the skip term ``x @ W_skip.T`` is added to the reconstruction, exactly as
SAELens's ``SkipTranscoder.forward`` does (``decode`` alone does not add it).

Prints the max relative error (max|a-b| / max|b|) of z and x_hat and exits 1 if
either exceeds --tol (default 1e-5); exits 2 on a shape mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.detach().to(torch.float64)
    want = want.detach().to(torch.float64)
    denom = want.abs().max().item()
    num = (got - want).abs().max().item() if want.numel() else 0.0
    if denom == 0.0:
        return num  # expected all zeros: report the absolute error
    return num / denom


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", required=True, help="SAELens folder (cfg.json + sae_weights.safetensors)")
    ap.add_argument("--inputs", required=True, help='safetensors file with "x", "z", "x_hat"')
    ap.add_argument("--tol", type=float, default=1e-5, help="max allowed relative error (default 1e-5)")
    args = ap.parse_args()

    import sae_lens
    from sae_lens import SAE

    torch.set_grad_enabled(False)
    folder = Path(args.folder)
    with open(folder / "cfg.json") as f:
        cfg = json.load(f)
    arch = cfg.get("architecture", "standard (pre-6.0 default)")

    sae = SAE.load_from_disk(folder, device="cpu", dtype="float32")
    sae.eval()

    data = load_file(args.inputs)
    for key in ("x", "z", "x_hat"):
        if key not in data:
            print(f"ERROR: {args.inputs} has no tensor {key!r} (has {sorted(data)})")
            return 2
    x = data["x"].to(torch.float32)
    z_want = data["z"]
    x_hat_want = data["x_hat"]

    z = sae.encode(x)
    if z.is_sparse:
        z = z.to_dense()
    x_hat = sae.decode(z)
    # SkipTranscoder / JumpReLUSkipTranscoder: forward = decode(encode(x)) + x @ W_skip.T
    has_skip = isinstance(getattr(sae, "W_skip", None), torch.nn.Parameter)
    if has_skip:
        x_hat = x_hat + x @ sae.W_skip.T

    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}")
    print(f"folder: {folder}  architecture: {arch}  class: {type(sae).__name__}"
          f"  skip: {has_skip}  normalize_activations: {sae.cfg.normalize_activations}"
          f"  apply_b_dec_to_input: {sae.cfg.apply_b_dec_to_input}")
    print(f"shapes: x {tuple(x.shape)}  z {tuple(z.shape)} (expected {tuple(z_want.shape)})"
          f"  x_hat {tuple(x_hat.shape)} (expected {tuple(x_hat_want.shape)})")
    if z.shape != z_want.shape or x_hat.shape != x_hat_want.shape:
        print("FAIL: shape mismatch")
        return 2

    ez = rel_err(z, z_want)
    ex = rel_err(x_hat, x_hat_want)
    l0_got = (z != 0).sum(-1).to(torch.float64).mean().item()
    l0_want = (z_want != 0).sum(-1).to(torch.float64).mean().item()
    support_mismatch = ((z != 0) != (z_want != 0)).sum().item()
    print(f"z     max rel err: {ez:.3e}   (L0 saelens {l0_got:.3f} vs expected {l0_want:.3f};"
          f" {support_mismatch} support mismatches)")
    print(f"x_hat max rel err: {ex:.3e}")
    ok = ez <= args.tol and ex <= args.tol
    print("PASS" if ok else f"FAIL (tol {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
