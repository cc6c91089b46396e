"""Gemma Scope `params.npz`: a JumpReLU SAE as five numpy arrays, read without pickle.

Arrays: W_enc (d_model, d_sae), W_dec (d_sae, d_model), b_enc (d_sae), b_dec (d_model), threshold (d_sae).
Inference (Gemma Scope's tutorial and SAELens's loader): the input is not centred by b_dec,

    h = x W_enc + b_enc;   z = ReLU(h) · 1[h > threshold];   x̂ = z W_dec + b_dec

which saekit reads as its JumpReLU with b_dec folded into the encoder bias. The file names neither model nor hook:
`model=` and `hook=` say them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from saekit.errors import DataError
from saekit.formats.common import Imported, Provenance, RawAffine, checked_matrix, load_affine

ARRAYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """Every array of an .npz file, with allow_pickle=False: an object array (a pickle) is refused, never run."""
    where = f"ckpt={path}"
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: torch.from_numpy(np.array(archive[name])) for name in archive.files}
    except ValueError as exc:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise DataError(f"{where}: the .npz holds pickled objects ({exc}); saekit reads only plain numeric arrays "
                        f"and never unpickles") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{where}: not a readable .npz archive ({exc})") from exc


def read_gemmascope(path: Path) -> Imported:
    where = f"ckpt={path}"
    arrays = read_npz(path)
    missing = [name for name in ARRAYS if name not in arrays]
    if missing:
        raise DataError(f"{where}: a Gemma Scope params.npz holds {', '.join(ARRAYS)}; missing {', '.join(missing)}")
    d, n = arrays["W_enc"].shape if arrays["W_enc"].dim() == 2 else (0, 0)
    raw = RawAffine(W_enc=checked_matrix(arrays, "W_enc", (d, n), where),
                    b_enc=checked_matrix(arrays, "b_enc", (n,), where),
                    W_dec=checked_matrix(arrays, "W_dec", (n, d), where),
                    b_dec=checked_matrix(arrays, "b_dec", (d,), where), subtract_b_dec=False)
    # ReLU(h)·1[h > θ] = h·1[h > max(θ, 0)]; log 0 = −inf gives saekit's θ = 0 exactly.
    threshold = checked_matrix(arrays, "threshold", (n,), where).clamp_min(0.0)
    sae = load_affine(raw, "jumprelu", extra={"log_threshold": threshold.log()})
    return Imported(sae=sae, format="gemmascope", source=path, provenance=Provenance())
