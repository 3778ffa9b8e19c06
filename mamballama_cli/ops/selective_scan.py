"""Pure-PyTorch references for the Mamba-1 selective scan (per-channel diagonal state).

Notation, per channel c (one of ``dim``), with a state h of ``dstate`` numbers:
    h_t[c, :] = exp(dt_t[c] * A[c, :]) * h_{t-1}[c, :] + dt_t[c] * x_t[c] * B_t[g(c), :]
    y_t[c]    = h_t[c, :] . C_t[g(c), :] + D[c] * x_t[c]
Channels are grouped: channel c reads group g(c) = c // (dim // ngroups) of B and C (contiguous blocks
of channels share B and C, as in mamba_ssm's selective scan).

Shapes used throughout:
    x:     (batch, seqlen, dim)
    dt:    (batch, seqlen, dim)             step sizes, already positive (softplus applied)
    A:     (dim, dstate)                    negative decay rates
    B, C:  (batch, seqlen, ngroups, dstate)  ngroups divides dim
    D:     (dim,) or None
    state: (batch, dim, dstate)

Every function here runs on any device and float dtype and computes in the dtype of ``x`` (the op
wrappers below promote to at least float32). The fast implementations registered in
:mod:`mamballama_cli.ops.cuda_mamba1` (scan, step) and :mod:`mamballama_cli.ops.triton_selective_replay` (replay) must
compute the same function.

Ops registered here (see :mod:`mamballama_cli.ops`):
    selective_scan(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None) -> (y, final_state)
    selective_state_step(state, x, dt, A, B, C, D=None) -> (new_state, y)     (state is not modified)
    selective_replay(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, D=None, *,
                     return_final=False, state_out=None, final_out=None) -> (y, replayed_state, final_state)
        speculative verification (see :func:`selective_replay_ref`)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mamballama_cli import ops
from mamballama_cli.ops.replay import hand_out


def check_scan_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                      state: Tensor | None) -> tuple[int, int, int, int, int]:
    """Assert the shapes documented in the module docstring; returns (batch, seqlen, dim, ngroups, dstate)."""
    b, seqlen, dim = x.shape
    if dt.shape != x.shape:
        raise ValueError(f"dt {tuple(dt.shape)} must have the shape of x {tuple(x.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A {tuple(A.shape)} must be (dim={dim}, dstate)")
    n = A.shape[1]
    g = B.shape[2]
    if B.shape != (b, seqlen, g, n) or C.shape != B.shape:
        raise ValueError(f"B {tuple(B.shape)} and C {tuple(C.shape)} must both be (batch, seqlen, ngroups, {n})")
    if dim % g:
        raise ValueError(f"dim={dim} is not a multiple of ngroups={g}")
    if D is not None and D.shape != (dim,):
        raise ValueError(f"D {tuple(D.shape)} must be ({dim},)")
    if state is not None and state.shape != (b, dim, n):
        raise ValueError(f"state {tuple(state.shape)} must be ({b}, {dim}, {n})")
    return b, seqlen, dim, g, n


def selective_state_step_ref(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One recurrent step; ``state`` is left untouched.

    state: (batch, dim, dstate); x, dt: (batch, dim) (dt positive); A: (dim, dstate); B, C: (batch, ngroups,
    dstate); D: (dim,) or None. Returns (new_state, y): new_state (batch, dim, dstate) in the state's dtype,
    y (batch, dim) in x's dtype. Arithmetic happens in the state's dtype.
    """
    b, dim, n = state.shape
    g = B.shape[1]
    cg = dim // g
    sdtype = state.dtype
    dt = dt.to(sdtype)
    xs = x.to(sdtype)
    dA = torch.exp(dt[..., None] * A.to(sdtype))  # (b, dim, n)
    dBx = ((dt * xs).view(b, g, cg)[..., None] * B.to(sdtype)[:, :, None, :]).reshape(b, dim, n)
    new_state = state * dA + dBx
    y = torch.einsum("bgcn,bgn->bgc", new_state.view(b, g, cg, n), C.to(sdtype)).reshape(b, dim)
    if D is not None:
        y = y + xs * D.to(sdtype)
    return new_state, y.to(x.dtype)


def selective_scan_sequential_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                                  initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence: the ground truth the chunked scan is tested against.

    Returns (y, final_state): y (batch, seqlen, dim), final_state (batch, dim, dstate), in x's dtype.
    """
    b, seqlen, dim, _, n = check_scan_shapes(x, dt, A, B, C, D, initial_state)
    state = x.new_zeros(b, dim, n) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(seqlen):
        state, y = selective_state_step_ref(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, dim)
    return y, state


def _inclusive_linear_scan(a: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """h_t = a_t * h_{t-1} + u_t along dim 1 with h_{-1} = 0, in log2(T) doubling steps (Hillis-Steele).

    a, u: (batch, T, ...). Returns (h, a_cum) with a_cum_t = prod_{s<=t} a_s. Only products of decays appear
    (no division by a cumulative decay), so the scan is stable however strong the decay is.
    """
    T = a.shape[1]
    k = 1
    while k < T:
        # After this step, position t holds the composition of the 2k steps ending at t.
        u = torch.cat([u[:, :k], torch.addcmul(u[:, k:], a[:, k:], u[:, :-k])], dim=1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    return u, a


def _scan_chunk(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk of T steps from ``state``: x, dt (b, T, dim); B, C (b, T, g, n); state (b, dim, n).

    Returns (y without the D term (b, T, dim), state after the chunk (b, dim, n)).
    """
    b, T, dim = x.shape
    g, n = B.shape[2], B.shape[3]
    cg = dim // g
    dA = torch.exp(dt[..., None] * A)  # (b, T, dim, n)
    dBx = ((dt * x).view(b, T, g, cg)[..., None] * B[:, :, :, None, :]).reshape(b, T, dim, n)
    h_local, decay = _inclusive_linear_scan(dA, dBx)  # states from a zero start; decay since chunk start
    h = torch.addcmul(h_local, decay, state[:, None])  # (b, T, dim, n): every state of the chunk
    y = torch.einsum("btgcn,btgn->btgc", h.view(b, T, g, cg, n), C).reshape(b, T, dim)
    return y, h[:, -1]


def selective_scan_chunked_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64,
                               D: Tensor | None = None, initial_state: Tensor | None = None,
                               checkpoint_chunks: bool = False) -> tuple[Tensor, Tensor]:
    """Chunked selective scan: a log-depth parallel scan inside each chunk of ``chunk_size`` steps, the state
    carried from chunk to chunk.

    Computes in the dtype of ``x`` (use float32 or float64). Every per-step state of a chunk,
    (batch, chunk_size, dim, dstate), is materialised at once but never the whole sequence's. With
    ``checkpoint_chunks`` (and autograd on), each chunk is recomputed in the backward pass instead of keeping
    its states, so training memory grows with seqlen / chunk_size states rather than seqlen.
    Returns (y, final_state): y (batch, seqlen, dim), final_state (batch, dim, dstate).
    """
    b, seqlen, dim, _, n = check_scan_shapes(x, dt, A, B, C, D, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    dtype = x.dtype
    dt, A, B, C = dt.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    state = x.new_zeros(b, dim, n) if initial_state is None else initial_state.to(dtype)
    use_checkpoint = checkpoint_chunks and torch.is_grad_enabled()
    ys = []
    for start in range(0, seqlen, chunk_size):
        sl = slice(start, min(start + chunk_size, seqlen))
        args = (x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], state)
        if use_checkpoint:
            y, state = checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y, state = _scan_chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(b, 0, dim)
    if D is not None:
        y = y + x * D.to(dtype)
    return y, state


def selective_replay_ref(state: Tensor, x_old: Tensor, dt_old: Tensor, B_old: Tensor, n_replay: Tensor, x_new: Tensor,
                         dt_new: Tensor, B_new: Tensor, C_new: Tensor, A: Tensor, D: Tensor | None = None, *,
                         return_final: bool = False, state_out: Tensor | None = None,
                         final_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Speculative verification for Mamba-1 state (the Mamba-1 twin of ``ops.replay.ssm_replay_ref``).

    1. Replays the first ``n_replay[row]`` steps of the old window from ``state`` (the checkpoint): steps past
       a row's count get dt = 0, which makes them the identity (exp(0 * A) = 1, nothing written).
    2. Runs the new steps from the replayed state, producing their outputs.

    state: (batch, dim, dstate); x_old, dt_old: (batch, W, dim); B_old: (batch, W, ngroups, dstate);
    n_replay: (batch,) integers in [0, W]; x_new, dt_new: (batch, T, dim); B_new, C_new: (batch, T, ngroups,
    dstate); A: (dim, dstate); D: (dim,) or None. dt is positive (softplus applied).
    Returns (y, replayed_state, final_state): y (batch, T, dim) in x_new's dtype, the states in ``state``'s
    dtype; final_state is None unless ``return_final`` or ``final_out``. ``state_out`` / ``final_out``, when
    given, receive the states in place (either may alias ``state``) and are what is returned. Only elementwise
    recurrences, no sync with the host: usable inside CUDA graphs.
    """
    sdtype = _work_dtype(state.dtype)
    s = state.to(sdtype)
    W, T = x_old.shape[1], x_new.shape[1]
    A = A.to(sdtype)
    if W:
        counts = n_replay.to(device=state.device, dtype=torch.long).reshape(-1, 1)
        live = torch.arange(W, device=state.device)[None, :] < counts  # (batch, W)
        dt_old = torch.where(live[..., None], dt_old.to(sdtype), torch.zeros((), dtype=sdtype, device=s.device))
        # C is not needed for the state; B_old stands in for it and the outputs are discarded.
        _, s = _scan_chunk(x_old.to(sdtype), dt_old, A, B_old.to(sdtype), B_old.to(sdtype), s)
    replayed = s
    if T:
        y, s = _scan_chunk(x_new.to(sdtype), dt_new.to(sdtype), A, B_new.to(sdtype), C_new.to(sdtype), s)
        if D is not None:
            y = y + x_new.to(sdtype) * D.to(sdtype)
        y = y.to(x_new.dtype)
    else:
        y = x_new.new_zeros(x_new.shape)
    return y, *hand_out(replayed, s, return_final, state_out, final_out)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _selective_scan_ref(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None):
    # Accumulate in at least float32 whatever the activations' dtype (bf16 training); y comes back in x's dtype.
    y, state = selective_scan_chunked_ref(
        x.to(_work_dtype(x.dtype)), dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=initial_state
    )
    return y.to(x.dtype), state


def _selective_state_step_ref(state, x, dt, A, B, C, D=None):
    new_state, y = selective_state_step_ref(state.to(_work_dtype(state.dtype)), x, dt, A, B, C, D)
    return new_state.to(state.dtype), y


ops.register_reference("selective_scan", _selective_scan_ref)
ops.register_reference("selective_state_step", _selective_state_step_ref)
ops.register_reference("selective_replay", selective_replay_ref)


def selective_scan(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None):
    """Dispatching entry point (reference on CPU; mamba_ssm's CUDA scan or the chunked scan on CUDA)."""
    return ops.dispatch("selective_scan", x.device)[1](
        x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=initial_state
    )


def selective_state_step(state, x, dt, A, B, C, D=None):
    """Dispatching entry point (reference on CPU; mamba_ssm's Triton selective_state_update on CUDA)."""
    return ops.dispatch("selective_state_step", x.device)[1](state, x, dt, A, B, C, D)


def selective_replay(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, D=None, *,
                     return_final=False, state_out=None, final_out=None):
    """Dispatching entry point of the speculative replay for Mamba-1 layers (the fused Triton kernel of
    :mod:`mamballama_cli.ops.triton_selective_replay` on CUDA when usable, else the reference)."""
    return ops.dispatch("selective_replay", x_new.device)[1](
        state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, D,
        return_final=return_final, state_out=state_out, final_out=final_out,
    )
