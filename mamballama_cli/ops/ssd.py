"""Pure-PyTorch references for the Mamba-2 (SSD) state-space recurrence.

Notation (one SSM head): h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T,  y_t = h_t C_t + D x_t,
with h_t of shape (P, N). Every function here runs on any device and any float dtype; the fast
kernels in :mod:`mamballama_cli.ops.triton_ssd` must compute the same function.

Shapes used throughout:
    x:  (batch, seqlen, nheads, headdim)        values (P = headdim)
    dt: (batch, seqlen, nheads)                  step sizes, already positive (softplus applied)
    A:  (nheads,)                                negative decay rates
    B:  (batch, seqlen, ngroups, dstate)         ngroups divides nheads; head i reads group i // (nheads // ngroups)
    C:  (batch, seqlen, ngroups, dstate)
    D:  (nheads,) or None
    state: (batch, nheads, headdim, dstate)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _expand_groups(t: Tensor, nheads: int) -> Tensor:
    """(batch, seqlen, ngroups, n) -> (batch, seqlen, nheads, n), head i reading group i // (nheads // ngroups)."""
    groups = t.shape[-2]
    if groups == nheads:
        return t
    if nheads % groups:
        raise ValueError(f"nheads={nheads} is not a multiple of ngroups={groups}")
    return t.repeat_interleave(nheads // groups, dim=-2)


def segsum(x: Tensor) -> Tensor:
    """Stable segment sums: out[..., i, j] = sum_{j < k <= i} x[..., k] for i >= j, else -inf.

    x: (..., T) -> (..., T, T)
    """
    T = x.size(-1)
    xx = x[..., None].expand(*x.shape, T)  # (..., T_i, T_j) holding x[i]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    xx = xx.masked_fill(~strict, 0)
    out = torch.cumsum(xx, dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~keep, float("-inf"))


def ssd_sequential_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence. Slow; the ground truth the chunked scan is tested against.

    Returns (y, final_state): y (batch, seqlen, nheads, headdim), final_state (batch, nheads, headdim, dstate).
    """
    b, seqlen, h, p = x.shape
    n = B.shape[-1]
    B, C = _expand_groups(B, h), _expand_groups(C, h)
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(seqlen):
        state, y = ssm_step_ref(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
    return y, state


def ssd_chunk_scan_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64,
                       D: Tensor | None = None, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan: quadratic (attention-like) inside chunks, a linear recurrence of states across them.

    Computes in the dtype of ``x`` (use float32 or float64). Returns (y, final_state) with
    y: (batch, seqlen, nheads, headdim), final_state: (batch, nheads, headdim, dstate).
    """
    b, seqlen, h, p = x.shape
    n = B.shape[-1]
    dtype = x.dtype
    B = _expand_groups(B, h).to(dtype)
    C = _expand_groups(C, h).to(dtype)
    dt = dt.to(dtype)
    A = A.to(dtype)
    pad = (-seqlen) % chunk_size
    if pad:
        # dt = 0 on padding: no decay and no input, so the final state is that of the last real token.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nchunks = x.shape[1] // chunk_size
    T = chunk_size

    X = (x * dt[..., None]).reshape(b, nchunks, T, h, p)  # (b, c, T, h, p) inputs scaled by dt
    Bc = B.reshape(b, nchunks, T, h, n)
    Cc = C.reshape(b, nchunks, T, h, n)
    Adt = (dt * A).reshape(b, nchunks, T, h).permute(0, 3, 1, 2)  # (b, h, c, T)
    Acum = torch.cumsum(Adt, dim=-1)  # (b, h, c, T)

    # 1. Within-chunk outputs (the "attention" form): y_i = sum_{j<=i} (C_i . B_j) exp(sum_{j<k<=i} Adt_k) X_j
    L = torch.exp(segsum(Adt))  # (b, h, c, T, T)
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * L
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, X)

    # 2. Each chunk's contribution to the state at its end.
    decay_to_end = torch.exp(Acum[..., -1:] - Acum)  # (b, h, c, T)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, X)  # (b, c, h, p, n)

    # 3. Recurrence over chunks, starting from the initial state.
    if initial_state is None:
        initial_state = x.new_zeros(b, h, p, n)
    states = torch.cat([initial_state.to(dtype)[:, None], chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(segsum(F.pad(Acum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    prev_states, final_state = states[:, :-1], states[:, -1]  # state entering each chunk; state after the last

    # 4. Contribution of the state entering each chunk to that chunk's outputs.
    decay_from_start = torch.exp(Acum)  # (b, h, c, T)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, prev_states, decay_from_start)

    y = (y_diag + y_off).reshape(b, nchunks * T, h, p)[:, :seqlen]
    if D is not None:
        y = y + x[:, :seqlen] * D.to(dtype)[:, None]
    return y, final_state


def ssm_step_ref(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One recurrent step.

    state: (batch, nheads, headdim, dstate); x: (batch, nheads, headdim); dt: (batch, nheads) (positive);
    B, C: (batch, ngroups, dstate). Returns (new_state, y) with y: (batch, nheads, headdim).
    Arithmetic happens in the state's dtype.
    """
    h = x.shape[1]
    sdtype = state.dtype
    if B.shape[1] != h:
        B = B.repeat_interleave(h // B.shape[1], dim=1)
    if C.shape[1] != h:
        C = C.repeat_interleave(h // C.shape[1], dim=1)
    dt = dt.to(sdtype)
    dA = torch.exp(dt * A.to(sdtype))  # (b, h)
    xs = x.to(sdtype)
    new_state = state * dA[..., None, None] + (dt[..., None] * xs)[..., None] * B.to(sdtype)[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, C.to(sdtype))
    if D is not None:
        y = y + xs * D.to(sdtype)[:, None]
    return new_state, y.to(x.dtype)
