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
"""Crossover: the sparse path is taken while the kept entries are at most this fraction ρ of the B×n
pre-activations (decided per batch on its first chunk); above it the sparse path gains little, then loses.

Measured at the bench configuration (d=512, n=4096, batch 4096, fp32, 2 CPU threads, min of 5 interleaved steps,
matmul 150–185 GFLOP/s), sparse step time / dense step time at ρ = 0.01, 0.05, 0.1, 0.15, 0.2:
relu 0.26, 0.60, 0.89, ~0.9, 1.7–2.1; jumprelu 0.20, 0.43, 0.70, 0.86, 1.15; gated (0.12), 0.33, 0.58, 0.76, 1.01;
prolu (at 0.1/0.15/0.2) 0.69, 0.92, 1.17. The sparse cost grows about linearly in ρ (memory-bound scatters) and
the dense one does not, so parity lies near ρ ≈ 0.13 (relu) to 0.2 (gated); 0.1 stays below all of them.
"""

PROBE_ROWS = 2048
"""Rows the density decision looks at (the first chunk, at most this many): a sample of a shuffled batch."""

SQRT_EPS = 1e-8
"""`sqrt_l1`: keeps d/dz sqrt(z + eps) finite at z = 0 (shared with the dense penalty in relu.py)."""


# ---- choosing the entries -------------------------------------------------------------------------------------
@torch.no_grad()
def collect_entries(x_centered: torch.Tensor, W_enc: torch.Tensor, floor: torch.Tensor,
                    dead: Optional[DeadSet] = None, aux_bias: Optional[torch.Tensor] = None, k_aux: int = 0,
                    max_density: Optional[float] = None,
                    chunk: Optional[int] = None) -> Optional[tuple[SparseCode, Optional[SparseCode]]]:
    """The entries with m > floor of m = x_centered W_encᵀ, chunk by chunk; None when the codes are dense.

    x_centered: (B, d); W_enc: (n, d); floor: (n,) per-latent threshold on m (the variant's bias folded in).
    Returns (code, aux): code holds the kept entries, row-sorted, with values m (no bias); aux, with `dead`,
    each row's k_aux largest pre-activations m + aux_bias among the dead candidates (as the dense `auxk_loss`
    ranks them), or None.

    Unlike the TopK path this waits on the device, once per chunk: `nonzero` sizes its output from the device
    (the active set's size is data-dependent by nature), and the first chunk's size decides dense vs sparse for
    the whole batch (accepted here: the decision must be made before autograd records anything).
    """
    n_rows, n = x_centered.shape[0], W_enc.shape[0]
    max_density = MAX_DENSITY if max_density is None else max_density
    chunk = chunk or chunk_rows(n, x_centered.device)
    with_aux = dead is not None and dead.candidates.numel() > 0 and k_aux > 0
    k_aux = min(k_aux, dead.candidates.numel()) if with_aux else 0
    values, latents, rows, aux_values, aux_latents = [], [], [], [], []
    start = 0
    while start < n_rows:
        stop = min(start + (min(chunk, PROBE_ROWS) if start == 0 else chunk), n_rows)
        m = (x_centered[start:stop] @ W_enc.T).float()
        flat = (m > floor).view(-1).nonzero().squeeze(1)
        if start == 0 and flat.numel() > max_density * m.numel():
            return None
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


@dataclass
class ActiveBatch:
    """One batch on the sparse path: its kept entries attached to autograd, and what AuxK needs.

    x, x_centered: (B, d), x_centered = x − b_pre (attached to b_pre); target: (B, d_output) what the output is
    compared with (x, or a transcoder's y); offset: what the decoder adds to z W_dec (`decoder_offset`: b_pre, or
    a transcoder's b_out and skip path); code: the kept entries, `values` (N,) the differentiable products
    m = W_enc[i]·x_centered[b] (no bias); aux: the detached AuxK code or None; dead: the DeadSet it was ranked
    from; aux_bias: (n,) the bias of what AuxK ranks (None: m itself).
    """

    x: torch.Tensor
    target: torch.Tensor
    offset: torch.Tensor
    x_centered: torch.Tensor
    code: SparseCode
    aux: Optional[SparseCode]
    dead: Optional[DeadSet]
    aux_bias: Optional[torch.Tensor]

    @property
    def n_rows(self) -> int:
        return self.x.shape[0]

    @property
    def latents(self) -> torch.Tensor:
        return self.code.latents

    @property
    def m(self) -> torch.Tensor:
        return self.code.values


def begin(sae, x: torch.Tensor, dead, y: Optional[torch.Tensor], floor: torch.Tensor,
          aux_bias: Optional[torch.Tensor]) -> Optional[ActiveBatch]:
    """Collect a batch's entries with m > floor (see `collect_entries`) and attach them; None when dense.

    x: (B, d) normalized inputs; dead: None, a (n,) mask or a DeadSet (used when dead_method=auxk); y: a
    transcoder's target (B, d_out) or None; floor: (n,); aux_bias: (n,) or None, the bias of the
    pre-activations AuxK ranks (the dense `pre_acts`).
    """
    spec = sae.spec
    target = sae._target(x, y)
    x_centered = x - sae.b_pre
    dead = DeadSet.of(dead) if spec.dead_method == "auxk" else None
    found = collect_entries(x_centered.detach(), sae.W_enc.detach(), floor.detach(), dead,
                            None if aux_bias is None else aux_bias.detach(), spec.effective_k_aux)
    if found is None:
        return None
    code, aux = found
    offset = sae.decoder_offset(x)
    # A constant zero bias: b_enc (and any other bias) is added by the variant, so its gradient is an index_add
    # over the N entries of exactly the entries that use it.
    no_bias = torch.zeros(sae.W_enc.shape[0], device=x.device)
    code = preact_values(code, x_centered, sae.W_enc, no_bias)
    return ActiveBatch(x, target, offset, x_centered, code, aux, dead, aux_bias)


def finish(sae, batch: ActiveBatch, z: torch.Tensor, penalties: dict[str, torch.Tensor],
           extra: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The `loss_terms` dictionary from the entries' latents z (N,): the same keys, in the same order, as the
    dense path (mse, penalties, extra, auxk, loss, l0, fired)."""
    x_hat = decode_code(batch.code, z, sae.W_dec) + batch.offset
    terms = {"mse": (batch.target - x_hat).pow(2).sum(dim=-1).mean()}
    terms.update(penalties)
    terms.update(extra or {})
    if sae.spec.dead_method == "auxk":
        terms["auxk"] = auxk_term(sae, batch, x_hat)
    terms["loss"] = sum(terms.values())
    active = z.detach() != 0
    terms["l0"] = active.float().sum() / batch.n_rows
    # Counted with index_add, as the TopK path does: no boolean-mask indexing (no further host read).
    fired = torch.zeros(sae.spec.n, dtype=torch.int32, device=z.device)
    terms["fired"] = fired.index_add_(0, batch.latents, active.int()) > 0
    return terms


def auxk_term(sae, batch: ActiveBatch, x_hat: torch.Tensor) -> torch.Tensor:
    """The dense `auxk_loss` from the AuxK code ranked during collection (Gao et al. 2024, A.2): its values
    re-attached to (x − b_pre, W_enc, aux_bias), so gradients reach the encoder as in the dense path."""
    if batch.aux is None:
        return torch.zeros((), device=x_hat.device)
    bias = batch.aux_bias if batch.aux_bias is not None else torch.zeros(sae.W_enc.shape[0], device=x_hat.device)
    aux = preact_values(batch.aux, batch.x_centered, sae.W_enc, bias)
    error_hat = decode_code(aux, F.relu(aux.values), sae.W_dec)
    return batch.dead.gate(sae._auxk_from((batch.target - x_hat).detach(), error_hat))


def scaled(sae, z: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """z ← s ⊙ z on entries, with the optional learned per-latent scale s (`scale_latents`); (N,), (N,) → (N,)."""
    return z * sae.latent_scale[latents] if sae.cfg.learned_scale else z


# ---- penalties on entries ---------------------------------------------------------------------------------------
def entry_penalty(z: torch.Tensor, latents: torch.Tensor, W_dec: torch.Tensor, kind: str,
                  n_rows: int) -> torch.Tensor:
    """The ReLU family's penalty (relu.py `penalty`) of a batch whose only nonzero latents are z (N,) at `latents`:
    `l1` Σ z·||W_dec[i]|| (Anthropic, April 2024 update) or `sqrt_l1` Σ sqrt(z), per token (÷ n_rows)."""
    if kind == "l1":
        return (z * W_dec.norm(dim=1)[latents]).sum() / n_rows
    return torch.sqrt(z + SQRT_EPS).sub(SQRT_EPS ** 0.5).sum() / n_rows


# ---- activations on entries, with the dense path's (pseudo-)gradients -------------------------------------------
def rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1[|u| < 1/2], the rectangle kernel (Rajamanoharan et al. 2024, eq. 11); jumprelu.py's too."""
    return (u.abs() < 0.5).to(u.dtype)


class _EntryJumpReLU(torch.autograd.Function):
    """h·H(h − θ_i) on entries; ∂/∂h = H(h − θ), ∂/∂θ_i = Σ −(θ_i/ε) K((h − θ_i)/ε) (jumprelu.py, paper eq. 11).

    The θ gradient is nonzero for entries within ε/2 of θ_i, active or not: the kept set includes that band."""

    @staticmethod
    def forward(ctx, h, latents, threshold, bandwidth):
        theta = threshold[latents]
        ctx.save_for_backward(h, latents, threshold)
        ctx.bandwidth = bandwidth
        return h * (h > theta)

    @staticmethod
    def backward(ctx, grad):
        h, latents, threshold = ctx.saved_tensors
        theta, eps = threshold[latents], ctx.bandwidth
        grad_theta = -(theta / eps) * rectangle((h - theta) / eps) * grad
        return (grad * (h > theta), None,
                torch.zeros_like(threshold).index_add_(0, latents, grad_theta), None)


class _EntryStep(torch.autograd.Function):
    """H(h − θ_i) on entries; no gradient w.r.t. h, ∂/∂θ_i = Σ −(1/ε) K((h − θ_i)/ε) (paper eq. 12): the L0 term
    needs the band's count per latent and nothing of W."""

    @staticmethod
    def forward(ctx, h, latents, threshold, bandwidth):
        theta = threshold[latents]
        ctx.save_for_backward(h, latents, threshold)
        ctx.bandwidth = bandwidth
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        h, latents, threshold = ctx.saved_tensors
        theta, eps = threshold[latents], ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((h - theta) / eps) * grad
        return None, None, torch.zeros_like(threshold).index_add_(0, latents, grad_theta), None


class _EntryProLU(torch.autograd.Function):
    """m·1[m > 0 ∧ m + b_i > 0] on entries, with prolu.py's synthetic bias gradient: Σ 1[gate]·g (`relu`) or
    Σ m·1[gate]·g (`ste`); ∂/∂m = 1[gate] in both modes."""

    @staticmethod
    def forward(ctx, m, latents, bias, ste):
        gate = (m > 0) & (m + bias[latents] > 0)
        ctx.save_for_backward(m, latents, gate, bias)
        ctx.ste = ste
        return m * gate

    @staticmethod
    def backward(ctx, grad):
        m, latents, gate, bias = ctx.saved_tensors
        gated = grad * gate
        grad_bias = torch.zeros_like(bias).index_add_(0, latents, gated * m if ctx.ste else gated)
        return gated, None, grad_bias, None


# ---- the four variants ------------------------------------------------------------------------------------------
def relu_terms(sae, x: torch.Tensor, dead, y: Optional[torch.Tensor], penalty: str) -> Optional[dict]:
    """ReLU SAE (relu.py): z = s·ReLU(h), loss MSE + λ·penalty (+ AuxK). Kept: h > 0, i.e. m > −b_enc; exactly
    the active set (ReLU'(h) = 0 elsewhere, and the penalty is zero there). None: codes too dense."""
    batch = begin(sae, x, dead, y, floor=-sae.b_enc, aux_bias=sae.b_enc)
    if batch is None:
        return None
    z = scaled(sae, F.relu(batch.m + sae.b_enc[batch.latents]), batch.latents)
    sparsity = sae.spec.lam * entry_penalty(z, batch.latents, sae.W_dec, penalty, batch.n_rows)
    return finish(sae, batch, z, {"sparsity": sparsity})


def jumprelu_floor(threshold: torch.Tensor, b_enc: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """(n,) a bound on m below every entry that is active (h > θ) or in the band |h − θ| < ε/2.

    The margin beyond ε/2 (1% of ε plus a few float32 roundings of h) keeps entries that the dense rectangle test,
    on its own rounding of h, might still count; extra entries are harmless (they carry zero in every term)."""
    margin = 0.01 * bandwidth + 1e-5 * (1.0 + b_enc.abs() + threshold)
    return threshold - 0.5 * bandwidth - margin - b_enc


def jumprelu_terms(sae, x: torch.Tensor, dead, y: Optional[torch.Tensor], bandwidth: float) -> Optional[dict]:
    """JumpReLU SAE (jumprelu.py): z = s·h·H(h − θ), loss MSE + λ·L0 (+ AuxK), with straight-through θ gradients.

    Kept: the active entries and the band within ε/2 of θ (inactive band entries decode to 0, but their
    ∂L/∂z = s·W_dec[i]·∂L/∂x̂ feeds θ's pseudo-gradient)."""
    threshold = sae.log_threshold.exp()
    batch = begin(sae, x, dead, y, floor=jumprelu_floor(threshold, sae.b_enc, bandwidth), aux_bias=sae.b_enc)
    if batch is None:
        return None
    h = batch.m + sae.b_enc[batch.latents]
    z = scaled(sae, _EntryJumpReLU.apply(h, batch.latents, threshold, bandwidth), batch.latents)
    l0 = _EntryStep.apply(h, batch.latents, threshold, bandwidth).sum() / batch.n_rows
    return finish(sae, batch, z, {"sparsity": sae.spec.lam * l0})


def gated_terms(sae, x: torch.Tensor, dead, y: Optional[torch.Tensor]) -> Optional[dict]:
    """Gated SAE (gated.py): z = s·1[π_gate > 0]·ReLU(π_mag), loss MSE + λ·L1(ReLU(π_gate)) + the frozen-decoder
    MSE of ReLU(π_gate) (+ AuxK on π_gate); Rajamanoharan et al. 2024, eqs. 6–9.

    Kept: π_gate > 0, the gate path's support (z's support is within it). Both paths share the products m:
    π_gate = m + b_gate and π_mag = exp(r_mag)·m + b_mag (W_mag = exp(r_mag) ⊙ W_gate, eq. 5)."""
    batch = begin(sae, x, dead, y, floor=-sae.b_enc, aux_bias=sae.b_enc)
    if batch is None:
        return None
    latents, m = batch.latents, batch.m
    pi_gate = m + sae.b_enc[latents]
    pi_mag = sae.r_mag.exp()[latents] * m + sae.b_mag[latents]
    z = scaled(sae, (pi_gate > 0) * F.relu(pi_mag), latents)
    gate_acts = F.relu(pi_gate)
    sparsity = sae.spec.lam * entry_penalty(gate_acts, latents, sae.W_dec, "l1", batch.n_rows)
    frozen = decode_code(batch.code, gate_acts, sae.W_dec.detach()) + batch.offset.detach()  # the whole decoder
    gate_aux = (batch.target - frozen).pow(2).sum(dim=-1).mean()
    return finish(sae, batch, z, {"sparsity": sparsity}, {"gate_aux": gate_aux})


def prolu_terms(sae, x: torch.Tensor, dead, y: Optional[torch.Tensor], penalty: str,
                grad_mode: str) -> Optional[dict]:
    """ProLU SAE (prolu.py): z = s·m·1[m > 0 ∧ m + b > 0], loss as relu (+ AuxK on m, its `pre_acts`).
    Kept: the gate's support m > max(0, −b); the synthetic bias gradient lives there too."""
    batch = begin(sae, x, dead, y, floor=F.relu(-sae.b_enc), aux_bias=None)
    if batch is None:
        return None
    z = scaled(sae, _EntryProLU.apply(batch.m, batch.latents, sae.b_enc, grad_mode == "ste"), batch.latents)
    sparsity = sae.spec.lam * entry_penalty(z, batch.latents, sae.W_dec, penalty, batch.n_rows)
    return finish(sae, batch, z, {"sparsity": sparsity})
