"""Fused Triton kernel for the speculative replay op (reference: :mod:`mamballama_cli.ops.replay`).

One program owns a (BLOCK_P x dstate) tile of one head's state of one batch row and keeps it in registers
for the whole call: it replays that row's ``n_replay`` accepted steps of the last window (the loop bound
is read from device memory, so a captured CUDA graph serves every accepted count), stores the new
checkpoint, then runs the new steps, writing one output row per step. State traffic is one read and one
or two writes per call, whatever K is; no GEMMs.

Inference only (no autograd): verification never trains. Importing this module registers the kernel for
``ssm_replay`` on CUDA; it is skipped (and the reference used) when Triton is not installed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mamballama_cli import ops
from mamballama_cli.ops.common import _device_guard
from mamballama_cli.ops.replay import ssm_replay_ref  # noqa: F401  (registers the op's reference first)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (kernel debugging)


@triton.jit
def _softplus(x):
    # log1p(exp(x)) to full float32 accuracy for very negative x (the usual log(1 + u) loses it when u is
    # tiny): log1p(u) = log(w) * u / (w - 1) with w = 1 + u (Goldberg); torch uses x itself above 20.
    u = tl.exp(x)
    w = 1.0 + u
    lp = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _tile(ptr, rows, s_row, cols, s_col):
    """Pointers of a (rows x cols) tile at ``ptr``."""
    return ptr + rows[:, None] * s_row + cols[None, :] * s_col


@triton.jit
def _replay_kernel(
    state_ptr, x_old_ptr, dt_old_ptr, B_old_ptr, n_ptr,
    x_ptr, dt_ptr, B_ptr, C_ptr, A_ptr, dt_bias_ptr, D_ptr,
    y_ptr, state_out_ptr, final_ptr,
    T, nheads, headdim, dstate, heads_per_group, heads_per_cgroup,
    s_sb, s_sh, s_sp, s_sn,
    xo_sb, xo_st, xo_sg, xo_sp,
    dto_sb, dto_st, dto_sh,
    Bo_sb, Bo_st, Bo_sg, Bo_sn,
    x_sb, x_st, x_sg, x_sp,
    dt_sb, dt_st, dt_sh,
    B_sb, B_st, B_sg, B_sn,
    C_sb, C_st, C_sg, C_sn,
    y_sb, y_st, y_sh, y_sp,
    so_sb, so_sh, so_sp, so_sn,
    f_sb, f_sh, f_sp, f_sn,
    HAS_D: tl.constexpr, RETURN_FINAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    g = h // heads_per_group
    cg = h // heads_per_cgroup
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask = mask_p[:, None] & mask_n[None, :]

    s = tl.load(_tile(state_ptr + b * s_sb + h * s_sh, offs_p, s_sp, offs_n, s_sn), mask=mask, other=0.0)
    s = s.to(tl.float32)
    A = tl.load(A_ptr + h).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32)

    # 1. Replay the accepted steps of the last window (no outputs).
    r = tl.load(n_ptr + b).to(tl.int32)
    for t in range(r):
        x = tl.load(x_old_ptr + b * xo_sb + t * xo_st + g * xo_sg + offs_p * xo_sp, mask=mask_p, other=0.0)
        dt = _softplus(tl.load(dt_old_ptr + b * dto_sb + t * dto_st + h * dto_sh).to(tl.float32) + dt_bias)
        Bv = tl.load(B_old_ptr + b * Bo_sb + t * Bo_st + g * Bo_sg + offs_n * Bo_sn, mask=mask_n, other=0.0)
        dA = tl.exp(dt * A)
        s = s * dA + (dt * x.to(tl.float32))[:, None] * Bv.to(tl.float32)[None, :]
    tl.store(_tile(state_out_ptr + b * so_sb + h * so_sh, offs_p, so_sp, offs_n, so_sn),
             s.to(state_out_ptr.dtype.element_ty), mask=mask)

    # 2. The new steps, with outputs.
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)
    for t in range(T):
        x = tl.load(x_ptr + b * x_sb + t * x_st + g * x_sg + offs_p * x_sp, mask=mask_p, other=0.0).to(tl.float32)
        dt = _softplus(tl.load(dt_ptr + b * dt_sb + t * dt_st + h * dt_sh).to(tl.float32) + dt_bias)
        Bv = tl.load(B_ptr + b * B_sb + t * B_st + g * B_sg + offs_n * B_sn, mask=mask_n, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + b * C_sb + t * C_st + cg * C_sg + offs_n * C_sn, mask=mask_n, other=0.0).to(tl.float32)
        dA = tl.exp(dt * A)
        s = s * dA + (dt * x)[:, None] * Bv[None, :]
        y = tl.sum(s * Cv[None, :], axis=1)
        if HAS_D:
            y += Dh * x
        tl.store(y_ptr + b * y_sb + t * y_st + h * y_sh + offs_p * y_sp, y.to(y_ptr.dtype.element_ty), mask=mask_p)
    if RETURN_FINAL:
        tl.store(_tile(final_ptr + b * f_sb + h * f_sh, offs_p, f_sp, offs_n, f_sn),
                 s.to(final_ptr.dtype.element_ty), mask=mask)


# ================================================================================================
# Launchers
# ================================================================================================
def _state_buffers(state, return_final, state_out, final_out):
    """Where a replay kernel writes its states, as the ops' contract says: (replayed, final, want_final).
    Without ``return_final`` nor ``final_out`` the kernel stores no final state (``final`` then stands in)."""
    out = state_out if state_out is not None else torch.empty_like(state)
    want_final = return_final or final_out is not None
    final = final_out if final_out is not None else (torch.empty_like(state) if want_final else out)
    return out, final, want_final


def _old_window(old, new):
    """The old window's tensors and their strides, flat. With W == 0 (nothing to replay), empty views of the
    new steps' tensors stand in, so that every pointer is valid; the kernel reads none of them."""
    if old[0].shape[1] == 0:
        old = tuple(t[:, :0] for t in new)
    return old, [st for t in old for st in (t.stride() if t.numel() else (0,) * t.dim())]


def ssm_replay_triton(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, dt_bias, D=None, *,
                      return_final=False, state_out=None, final_out=None):
    """Same contract as :func:`mamballama_cli.ops.replay.ssm_replay_ref`."""
    b, h, p, n = state.shape
    W, T = x_old.shape[1], x_new.shape[1]
    g, cg = x_new.shape[2], C_new.shape[2]
    assert x_old.shape == (b, W, g, p) and x_new.shape == (b, T, g, p), (x_old.shape, x_new.shape, state.shape)
    assert dt_old.shape == (b, W, h) and dt_new.shape == (b, T, h), (dt_old.shape, dt_new.shape)
    assert B_old.shape == (b, W, g, n) and B_new.shape == (b, T, g, n), (B_old.shape, B_new.shape)
    assert C_new.shape == (b, T, cg, n) and h % g == 0 and h % cg == 0, C_new.shape
    assert A.shape == (h,) and dt_bias.shape == (h,) and (D is None or D.shape == (h,))
    assert n_replay.numel() == b and not n_replay.is_floating_point()
    assert (state.is_cuda and x_new.is_cuda) or _INTERPRET, "the Triton replay kernel needs CUDA tensors"
    (x_old, dt_old, B_old), old_strides = _old_window((x_old, dt_old, B_old), (x_new, dt_new, B_new))
    n_replay = n_replay.reshape(b)
    y = torch.empty(b, T, h, p, dtype=x_new.dtype, device=x_new.device)
    out, final, want_final = _state_buffers(state, return_final, state_out, final_out)
    BLOCK_N = triton.next_power_of_2(n)
    BLOCK_P = min(triton.next_power_of_2(p), max(1, 4096 // BLOCK_N), 32)
    grid = (triton.cdiv(p, BLOCK_P), b * h)
    Dt = D if D is not None else A
    with _device_guard(state):
        _replay_kernel[grid](
            state, x_old, dt_old, B_old, n_replay,
            x_new, dt_new, B_new, C_new, A, dt_bias, Dt,
            y, out, final,
            T, h, p, n, h // g, h // cg,
            *state.stride(), *old_strides,
            *x_new.stride(), *dt_new.stride(), *B_new.stride(), *C_new.stride(),
            *y.stride(), *out.stride(), *final.stride(),
            HAS_D=D is not None, RETURN_FINAL=want_final, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
            num_warps=4,
        )
    return y, out, (final if want_final else None)


# ================================================================================================
# Probes
# ================================================================================================
def _ssm_replay_probe() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "ok"


ops.register_fast("ssm_replay", "triton", ssm_replay_triton, _ssm_replay_probe)
