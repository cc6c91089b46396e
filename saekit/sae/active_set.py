"""Sparse training for the SAEs whose sparsity is a learned penalty: relu, jumprelu, gated, prolu (issue 12).

The TopK family's path (sae/sparse.py) chooses k entries per row; these variants choose nothing, but once
trained their codes are just as sparse: a latent is nonzero on a few dozen of its n entries per token. Every
gradient except the encoder's forward matmul then lives on the *active set* A = {(b, i): z_bi ≠ 0}, plus, for
JumpReLU, the band of entries within ε/2 of θ where its pseudo-gradient is nonzero:

  * the pre-activations are computed without autograd in row chunks (`collect_entries`), and only the entries a
    gradient needs (one threshold per latent, `floor`) are kept, as a row-sorted `SparseCode` of the bias-free
    products m = W_enc (x − b_pre);
  * `preact_values` re-attaches those m to autograd: its backward scatters into W_enc (a CSR product) and
    x − b_pre (an embedding_bag), O(N·d) for N kept entries; each variant adds its biases by gathering, so
    b_enc, b_mag, r_mag, log θ and the learned scale get their gradients by index_add over the N entries;
  * the decoder is an embedding_bag over the kept entries, O(N·d) forward and backward.

Entries outside the kept set carry exactly zero gradient in the dense reference (ReLU'(h) = 0 for h ≤ 0, the
gates are constants, JumpReLU's kernel is 0 outside the band), so the loss and every gradient are the dense
ones up to float summation order; tests/test_active_set.py checks that against `loss_terms` with
`sparse_training = False`.

When codes are dense (early in training, or a small λ) the sparse kernels cost more than the dense path, so
`collect_entries` returns None and the caller takes the dense path: see `MAX_DENSITY`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from saekit.sae.sparse import DeadSet, SparseCode, chunk_rows, decode_code, preact_values

MAX_DENSITY = 0.1
"""Crossover: the sparse path is taken while the kept entries are at most this fraction of the B×n pre-activations.

Measured on the bench configuration (d=512, n=4096, batch 4096, fp32, 2 CPU threads; bench/active_set_crossover.py
is not kept, the numbers are in the issue-12 report): see the module's docstring of `collect_entries`."""

PROBE_ROWS = 2048
"""Rows the density decision looks at (the first chunk, at most this many): a sample of a shuffled batch."""

SQRT_EPS = 1e-8
"""`sqrt_l1`: keeps d/dz sqrt(z + eps) finite at z = 0 (shared with the dense penalty in relu.py)."""


# ---- choosing the entries -------------------------------------------------------------------------------------
@torch.no_grad()
def collect_entries(x_centered: torch.Tensor, W_enc: torch.Tensor, floor: torch.Tensor,
                    dead: Optional[DeadSet] = None, aux_bias: Optional[torch.Tensor] = None, k_aux: int = 0,
                    max_density: float = MAX_DENSITY,
                    chunk: Optional[int] = None) -> Optional[tuple[SparseCode, Optional[SparseCode]]]:
    """The entries with m > floor of m = x_centered W_encᵀ, chunk by chunk; None when the codes are dense.

    x_centered: (B, d); W_enc: (n, d); floor: (n,) per-latent threshold on m (the variant's bias folded in).
    Returns (code, aux): code holds the kept entries, row-sorted, with values m (no bias); aux, with `dead`,
    each row's k_aux largest pre-activations m + aux_bias among the dead candidates (as the dense `auxk_loss`
    ranks them), or None.

    Unlike the TopK path this waits on the device: the first chunk's density decides dense vs sparse for the
    whole batch (a host read, accepted here: the decision must be made before autograd records anything), and
    `nonzero` sizes its output from the device (the active set's size is data-dependent by nature).
    """
    n_rows, n = x_centered.shape[0], W_enc.shape[0]
    chunk = chunk or chunk_rows(n, x_centered.device)
    with_aux = dead is not None and dead.candidates.numel() > 0 and k_aux > 0
    k_aux = min(k_aux, dead.candidates.numel()) if with_aux else 0
    values, latents, rows, aux_values, aux_latents = [], [], [], [], []
    start = 0
    while start < n_rows:
        stop = min(start + (min(chunk, PROBE_ROWS) if start == 0 else chunk), n_rows)
        m = (x_centered[start:stop] @ W_enc.T).float()
        keep = m > floor
        if start == 0 and float(keep.float().mean()) > max_density:
            return None
        flat = keep.view(-1).nonzero().squeeze(1)
        values.append(m.view(-1)[flat])
        chunk_row = torch.div(flat, n, rounding_mode="floor")
        latents.append(flat - chunk_row * n)
        rows.append(chunk_row + start)
        if with_aux:
            scores = dead.scores(m)  # (rows, c): the bias is added to the candidates' columns only
            if aux_bias is not None:
                scores = scores + aux_bias[dead.candidates]
            top, where = scores.topk(k_aux, dim=-1, sorted=False)
            aux_values.append(top)
            aux_latents.append(dead.candidates[where])
        start = stop
    code = SparseCode.from_rows(torch.cat(values), torch.cat(latents), torch.cat(rows), n_rows)
    aux = SparseCode.per_row(torch.cat(aux_values), torch.cat(aux_latents)) if with_aux else None
    return code, aux
