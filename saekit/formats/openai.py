"""OpenAI's GPT-2 SAEs (openai/sparse_autoencoder): a state-dict `.pt`, read with `torch.load(weights_only=True)`.

weights_only=True unpickles only tensors, numbers, strings and plain containers, so a crafted file cannot run code;
anything else is refused. Keys: pre_bias (d), encoder.weight (n, d), latent_bias (n), decoder.weight (d, n),
`activation` ("TopK" or "ReLU") with `activation_state_dict` {k, postact_fn}, and statistics buffers
(stats_last_nonzero, latents_activation_frequency, latents_mean_square) saekit ignores. Inference (model.py):

    x' = LN(x) when the activation is TopK (its loader's rule), with LN(x) = (x − μ) / (std + 1e-5), std unbiased
    z  = TopK_k(W_enc (x' − pre_bias) + latent_bias), ReLU on the kept values (or ReLU of it all)
    x̂ = (z W_decᵀ + pre_bias) · std + μ

which is saekit's own form (b_pre = pre_bias) with normalize=layer_norm, ln_style=openai. The file names neither
model nor hook: `model=` and `hook=` say them.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from saekit.errors import DataError
from saekit.formats.common import Imported, Provenance, RawAffine, checked_matrix, load_affine


def read_state_dict(path: Path) -> dict:
    where = f"ckpt={path}"
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it was not written with; the refusal says enough
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unsafe_part(str(exc))
        raise DataError(f"{where}: refused: the file holds more than tensors and plain values ({reason}); saekit "
                        f"never unpickles arbitrary objects") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{where}: not a readable torch state dict ({reason})") from exc
    if not isinstance(state, dict):
        raise DataError(f"{where}: holds a {type(state).__name__}, not a state dict")
    return state


def _unsafe_part(message: str) -> str:
    """The short reason in torch's long weights_only refusal (e.g. `Unsupported global: GLOBAL posix.system`)."""
    match = re.search(r"Unsupported (?:global|operand)[^.\n]*", message)
    if match:
        return match.group(0).strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[0] if lines else "unsafe content"


def read_openai(path: Path) -> Imported:
    where = f"ckpt={path}"
    state = read_state_dict(path)
    if "encoder.weight" not in state or not torch.is_tensor(state["encoder.weight"]) or state["encoder.weight"].dim() != 2:
        raise DataError(f"{where}: no 2-d encoder.weight; is it one of OpenAI's sparse_autoencoder state dicts?")
    n, d = state["encoder.weight"].shape
    activation = state.get("activation", "ReLU")
    options = state.get("activation_state_dict") or {}
    if activation not in ("TopK", "ReLU") or not isinstance(options, dict):
        raise DataError(f"{where}: activation={activation!r}: saekit reads OpenAI's TopK and ReLU SAEs")
    postact = options.get("postact_fn", "ReLU")
    if activation == "TopK" and postact != "ReLU":
        raise DataError(f"{where}: TopK with postact_fn={postact!r}: saekit reads TopK followed by ReLU only")
    raw = RawAffine(W_enc=checked_matrix(state, "encoder.weight", (n, d), where).T,
                    b_enc=checked_matrix(state, "latent_bias", (n,), where),
                    W_dec=checked_matrix(state, "decoder.weight", (d, n), where).T,
                    b_dec=checked_matrix(state, "pre_bias", (d,), where), subtract_b_dec=True)
    if activation == "TopK":
        k = options.get("k")
        if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= n:
            raise DataError(f"{where}: activation_state_dict has k={k!r}; it must be an integer in 1..{n}")
        # OpenAI's loader turns the input layer norm on exactly for TopK SAEs.
        sae = load_affine(raw, "topk", k=k, normalize="layer_norm", ln_style="openai")
    else:
        sae = load_affine(raw, "relu")
    return Imported(sae=sae, format="openai", source=path, provenance=Provenance())
