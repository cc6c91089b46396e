"""The TopK family's fast training path: the encoder matmul is the only dense B×n work (issue 6).

A TopK-style SAE needs its pre-activations h = W_enc (x − b_pre) + b_enc only to *choose* which latents fire.
So h is computed without autograd, in row chunks that are ranked while they are still in cache, and only the
chosen entries re-enter the autograd graph, through `preact_values`, whose backward scatters their gradients
straight into W_enc, b_enc and x: O(N·d) for N chosen entries, with no dense B×n gradient and no second B×n×d
matmul. The decoder is an embedding_bag over the chosen latents, O(N·d) forward and backward.

The dense implementation in `base.py` is the reference: `tests/test_sparse_path.py` checks that both give the
same loss and gradients, and `bench/speed.py` that both reach the same held-out nmse.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

_CPU_CHUNK_ELEMENTS = 2**21
"""Pre-activation entries ranked per chunk on CPU (8 MB of fp32: ranked while in L2/L3, measured fastest)."""
_CUDA_CHUNK_ELEMENTS = 2**28
"""On CUDA one chunk is a whole batch unless B×n would pass 1 GB of fp32 (GPT-2-small batches of 131k tokens)."""


def chunk_rows(n: int, device: torch.device) -> int:
    """Batch rows per chunk of pre-activations."""
    budget = _CUDA_CHUNK_ELEMENTS if device.type == "cuda" else _CPU_CHUNK_ELEMENTS
    return max(64, budget // n)


@dataclass
class SparseCode:
    """N chosen (row, latent) entries of a batch of B rows, sorted by row.

    `values` are differentiable pre-activations (before σ); `offsets` (B,) is where each row's entries start,
    the layout `embedding_bag` takes.
    """

    values: torch.Tensor
    latents: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def per_row(cls, values: torch.Tensor, latents: torch.Tensor) -> "SparseCode":
        """From (B, m) tensors: m entries in every row."""
        n_rows, m = latents.shape
        return cls(values.reshape(-1), latents.reshape(-1), row_of_each(n_rows, m, latents.device),
                   torch.arange(0, n_rows * m, m, device=latents.device))

    @classmethod
    def from_rows(cls, values: torch.Tensor, latents: torch.Tensor, rows: torch.Tensor, n_rows: int) -> "SparseCode":
        """From flat entries already sorted by row (rows may hold any number of entries, none included)."""
        offsets = torch.searchsorted(rows, torch.arange(n_rows, device=rows.device))
        return cls(values, latents, rows, offsets)

    def with_values(self, values: torch.Tensor) -> "SparseCode":
        return SparseCode(values, self.latents, self.rows, self.offsets)


def row_of_each(n_rows: int, m: int, device: torch.device) -> torch.Tensor:
    """(n_rows·m,) row index of each entry of an (n_rows, m) block: 0,…,0, 1,…,1, … (no host read, unlike
    repeat_interleave)."""
    return torch.arange(n_rows, device=device)[:, None].expand(n_rows, m).reshape(-1)


def scatter_to_latents(code_latents: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
                       source: torch.Tensor, n: int) -> torch.Tensor:
    """out[i] = Σ over entries e with latent i of weights[e] · source[rows[e]]; (N,), (N,), (N,), (B, d) → (n, d).

    A CSR (n × B) sparse matrix times `source`: measured 2× faster than embedding_bag's backward and 25× faster
    than a chunked index_add on 2 CPU cores; it runs on cuSPARSE on CUDA.
    """
    order = torch.argsort(code_latents, stable=True)
    # index_add, not bincount: bincount reads the largest index back to the host to size its output.
    counts = torch.zeros(n, dtype=torch.long, device=source.device).index_add_(0, code_latents,
                                                                                 torch.ones_like(code_latents))
    crow = torch.zeros(n + 1, dtype=torch.long, device=source.device)
    crow[1:] = counts.cumsum(0)
    with warnings.catch_warnings():  # torch calls CSR tensors "beta"; a product of one is long stable
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(crow, rows[order], weights[order].to(source.dtype), (n, source.shape[0]),
                                         device=source.device, check_invariants=False)
    return matrix @ source


class _PreactValues(torch.autograd.Function):
    """Chosen pre-activation values h[rows, latents], with the gradients the dense h would give them."""

    @staticmethod
    def forward(ctx, values, latents, rows, offsets, x_centered, W_enc, b_enc):
        ctx.save_for_backward(latents, rows, offsets, x_centered, W_enc)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        latents, rows, offsets, x_centered, W_enc = ctx.saved_tensors
        n = W_enc.shape[0]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[4]:  # ∂h[b, i]/∂x_c[b] = W_enc[i]
            grad_x = F.embedding_bag(latents, W_enc, offsets, mode="sum", per_sample_weights=grad.to(W_enc.dtype))
        if ctx.needs_input_grad[5]:  # ∂h[b, i]/∂W_enc[i] = x_c[b]
            grad_W = scatter_to_latents(latents, rows, grad, x_centered, n).to(W_enc.dtype)
        if ctx.needs_input_grad[6]:
            grad_b = torch.zeros(n, dtype=grad.dtype, device=grad.device).index_add_(0, latents, grad)
        return None, None, None, None, grad_x, grad_W, grad_b


def preact_values(code: SparseCode, x_centered: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> SparseCode:
    """The code with its values attached to the autograd graph of (x_centered, W_enc, b_enc)."""
    values = _PreactValues.apply(code.values.float(), code.latents, code.rows, code.offsets, x_centered, W_enc, b_enc)
    return code.with_values(values)


def decode_code(code: SparseCode, activations: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_e activations[e] · W_dec[latents[e]] per row (no bias); (N,) → (B, d), O(N·d) forward and backward."""
    return F.embedding_bag(code.latents, W_dec, code.offsets, mode="sum", per_sample_weights=activations.to(W_dec.dtype))


@dataclass
class DeadSet:
    """The latents AuxK may use, in a form a training step reads without waiting on the device.

    mask: (n,) bool, the latents dead now (on the device). candidates: (c,) indices of every latent that can be
    dead now, a superset of the mask's whose size c is known on the host: AuxK ranks B × c scores, so no shape
    depends on a device value, and c is small while few latents are close to dying.
    """

    mask: torch.Tensor
    candidates: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "DeadSet":
        """Every latent a candidate (what a plain dead mask means)."""
        return cls(mask, torch.arange(mask.shape[0], device=mask.device))

    @classmethod
    def of(cls, dead: "torch.Tensor | DeadSet | None") -> Optional["DeadSet"]:
        """A DeadSet from a mask, a DeadSet or None; None when no latent can be dead."""
        if dead is None:
            return None
        dead = dead if isinstance(dead, DeadSet) else cls.from_mask(dead)
        return dead if dead.candidates.numel() > 0 else None

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """(B, c) pre-activations of the candidates, −inf where a candidate is not dead (it then decodes to 0)."""
        return h[:, self.candidates].masked_fill(~self.mask[self.candidates], float("-inf"))

    def gate(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` where some latent is dead, exactly 0 otherwise (decided on the device)."""
        return torch.where(self.mask[self.candidates].any(), loss, torch.zeros_like(loss))


@dataclass
class Ranked:
    """What one chunked pass over the pre-activations found, all detached.

    top: (B, m) values and latents of each row's m largest scores; aux: the same for the k_aux largest among
    dead latents (AuxK), or None.
    """

    top_values: torch.Tensor
    top_latents: torch.Tensor
    aux_values: Optional[torch.Tensor] = None
    aux_latents: Optional[torch.Tensor] = None


@torch.no_grad()
def rank_preacts(x_centered: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, m: int, on: str = "preact",
                 sorted: bool = False, dead: Optional[DeadSet] = None, k_aux: int = 0,
                 chunk: Optional[int] = None) -> Ranked:
    """Each row's m largest pre-activations (ranked by h, or by ReLU(h) with on="relu"), chunk by chunk.

    With `dead` also each row's k_aux largest pre-activations among its candidates (those not dead now score
    −inf and decode to nothing); that work is B × (candidates), and nothing without candidates.
    """
    n_rows, n = x_centered.shape[0], W_enc.shape[0]
    chunk = chunk or chunk_rows(n, x_centered.device)
    top_values = torch.empty(n_rows, m, device=x_centered.device)
    top_latents = torch.empty(n_rows, m, dtype=torch.long, device=x_centered.device)
    with_aux = dead is not None and dead.candidates.numel() > 0 and k_aux > 0
    aux_values = aux_latents = None
    if with_aux:
        k_aux = min(k_aux, dead.candidates.numel())
        aux_values = torch.empty(n_rows, k_aux, device=x_centered.device)
        aux_latents = torch.empty(n_rows, k_aux, dtype=torch.long, device=x_centered.device)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        h = torch.addmm(b_enc, x_centered[start:stop], W_enc.T).float()
        score = h if on == "preact" else F.relu(h)
        # ReLU-ranked values are ReLU(h): where they differ from h both give latent 0 after σ, so nothing changes.
        torch.topk(score, m, dim=-1, sorted=sorted, out=(top_values[start:stop], top_latents[start:stop]))
        if with_aux:
            values, where = dead.scores(h).topk(k_aux, dim=-1, sorted=False)
            aux_values[start:stop] = values
            aux_latents[start:stop] = dead.candidates[where]
    return Ranked(top_values, top_latents, aux_values, aux_latents)


@torch.no_grad()
def overflowing_rows(ranked: Ranked, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(floors, overflowing), both (B,): each row's smallest candidate ReLU value, and whether it exceeds the
    n_keep-th largest candidate of the batch (the row may hold more than its candidates among the n_keep largest)."""
    candidates = F.relu(ranked.top_values)
    threshold = candidates.flatten().topk(min(n_keep, candidates.numel()), sorted=False).values.min()
    floors = candidates.min(dim=1).values
    return floors, floors > threshold


@torch.no_grad()
def batch_top_entries(x_centered: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, ranked: Ranked,
                      n_keep: int, capacity: Optional[int] = None,
                      overflow: Optional[torch.Tensor] = None) -> SparseCode:
    """The n_keep largest entries of ReLU(h) over the whole batch (BatchTopK), from per-row candidates, with no
    shape that depends on a device value (so no host read).

    `ranked` holds each row's m largest ReLU(h). Entries a row did not offer are ≤ its smallest offered value
    (its floor). The n_keep-th largest candidate t is a lower bound of the true batch threshold, so the candidates
    hold the answer unless a row's floor exceeds t: such rows (tokens that want more than m latents) are
    recomputed in full and their other entries join the candidates. Each such row has m candidates above t, so
    fewer than n_keep / m rows can be one: recomputing that many (`capacity=None`) is always exact. A smaller
    `capacity` recomputes the rows with the highest floors up to it: exact while no more rows overflow; the rows
    beyond it keep only their candidates, and their number is added to `overflow`.
    """
    n_rows, m = ranked.top_latents.shape
    n = W_enc.shape[0]
    candidates = F.relu(ranked.top_values)
    n_keep = min(n_keep, candidates.numel())
    floors, overflowing = overflowing_rows(ranked, n_keep)
    most = 0 if m >= n else min(n_rows, (n_keep - 1) // m)
    recomputed_rows = most if capacity is None else min(capacity, most)
    pool = [candidates.flatten()]
    recomputed = None
    if recomputed_rows > 0:
        recomputed = torch.where(overflowing, floors, float("-inf")).topk(recomputed_rows, sorted=False).indices
        wanted = overflowing[recomputed]
        chunk = chunk_rows(n, x_centered.device)
        for start in range(0, recomputed_rows, chunk):
            block = recomputed[start:start + chunk]
            h = F.relu(torch.addmm(b_enc, x_centered[block], W_enc.T).float())
            # Candidates keep their first-pass values (a recompute in another GEMM shape may round differently),
            # and a row that does not overflow adds nothing: both score −inf, never kept, since the candidates
            # alone number at least n_keep.
            h.scatter_(1, ranked.top_latents[block], float("-inf"))
            h.masked_fill_(~wanted[start:start + chunk, None], float("-inf"))
            pool.append(h.flatten())
    values, chosen = torch.cat(pool).topk(n_keep, sorted=False)
    n_candidates = n_rows * m
    rows, latents = chosen // m, ranked.top_latents.flatten()[chosen.clamp_max(n_candidates - 1)]
    if recomputed is not None:
        extra = (chosen - n_candidates).clamp_min(0)
        from_candidates = chosen < n_candidates
        rows = torch.where(from_candidates, rows, recomputed[extra // n])
        latents = torch.where(from_candidates, latents, extra % n)
    if overflow is not None:
        overflow.add_((overflowing.sum() - recomputed_rows).clamp_min(0))
    order = torch.argsort(rows * n + latents)  # row-major order, as embedding_bag needs
    return SparseCode.from_rows(values[order], latents[order], rows[order], n_rows)


@dataclass
class ChosenCodes:
    """A variant's choice for one batch (detached): the code it reconstructs with, extra codes whose
    reconstruction error is added with a weight (Multi-TopK's L(4k)), and the AuxK code of dead latents."""

    main: SparseCode
    extra: dict[str, tuple[SparseCode, float]]
    aux: Optional[SparseCode] = None


def aux_code(ranked: Ranked) -> Optional[SparseCode]:
    if ranked.aux_values is None:
        return None
    return SparseCode.per_row(ranked.aux_values, ranked.aux_latents)
