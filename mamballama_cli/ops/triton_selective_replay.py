"""Fused Triton kernel of the Mamba-1 speculative replay op ``selective_replay`` (reference
:func:`mamballama_cli.ops.selective_scan.selective_replay_ref`); the Mamba-2 ones are in
:mod:`mamballama_cli.ops.triton_replay`, whose launch helpers it shares.

One program owns a (BLOCK_D x dstate) tile of a block of one batch row's channels and keeps it in registers for
the whole call. It replays that row's ``n_replay`` accepted steps of the last window (a loop over the count read
from device memory, so a captured CUDA graph serves every accepted count), stores the new checkpoint, then runs
the new steps, writing one output row per step. The kernel computes in float32; autograd and float64 states take
the reference. Importing this module registers the kernel on CUDA; it is skipped (and the reference used) when
Triton is not installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamballama_cli import ops
from mamballama_cli.ops.common import INTERPRETING as _INTERPRET  # Triton's CPU interpreter
from mamballama_cli.ops.common import _device_guard, _needs_grad, _probe, _rand, _rel
from mamballama_cli.ops.selective_scan import check_scan_shapes, selective_replay_ref
from mamballama_cli.ops.triton_replay import _old_window, _state_buffers
from mamballama_cli.ops.triton_replay_math import _tile


@triton.jit
def _grouped(ptr, groups, s_g, offs_n, s_n, mask):
    """B or C of one step for a block of channels: row ``groups[i]`` (the group of channel i) of a
    (ngroups, dstate) matrix, as a float32 (channels x dstate) tile."""
    return tl.load(_tile(ptr, groups, s_g, offs_n, s_n), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _selective_step(s, A, x_row, s_x, dt_row, s_dt, B_row, s_bg, s_bn, offs_d, groups, offs_n, mask_d, mask):
    """One step of the Mamba-1 recurrence on a (channels x dstate) tile: returns (new state, x as float32)."""
    x = tl.load(x_row + offs_d * s_x, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_row + offs_d * s_dt, mask=mask_d, other=0.0).to(tl.float32)
    Bv = _grouped(B_row, groups, s_bg, offs_n, s_bn, mask)
    return s * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv, x


@triton.jit
def _selective_replay_kernel(
    state_ptr, x_old_ptr, dt_old_ptr, B_old_ptr, n_ptr,
    x_ptr, dt_ptr, B_ptr, C_ptr, A_ptr, D_ptr,
    y_ptr, state_out_ptr, final_ptr,
    W, T, dim, dstate, channels_per_group, n_s,
    s_sb, s_sd, s_sn,
    xo_sb, xo_st, xo_sd, dto_sb, dto_st, dto_sd, Bo_sb, Bo_st, Bo_sg, Bo_sn,
    x_sb, x_st, x_sd, dt_sb, dt_st, dt_sd, B_sb, B_st, B_sg, B_sn, C_sb, C_st, C_sg, C_sn,
    A_sd, A_sn, D_s,
    y_sb, y_st, y_sd,
    so_sb, so_sd, so_sn,
    f_sb, f_sd, f_sn,
    HAS_D: tl.constexpr, RETURN_FINAL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(1)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask = mask_d[:, None] & (offs_n < dstate)[None, :]
    groups = offs_d // channels_per_group  # the B / C group of each channel

    s = tl.load(_tile(state_ptr + row * s_sb, offs_d, s_sd, offs_n, s_sn), mask=mask, other=0.0)
    s = s.to(tl.float32)
    A = tl.load(_tile(A_ptr, offs_d, A_sd, offs_n, A_sn), mask=mask, other=0.0).to(tl.float32)

    # 1. Replay the row's accepted steps of the last window (the count read from memory; at most W, as the
    #    reference, whose steps past the count are the identity).
    r = tl.minimum(tl.load(n_ptr + row * n_s).to(tl.int32), W)
    for t in range(r):
        s, x = _selective_step(s, A, x_old_ptr + row * xo_sb + t * xo_st, xo_sd,
                               dt_old_ptr + row * dto_sb + t * dto_st, dto_sd,
                               B_old_ptr + row * Bo_sb + t * Bo_st, Bo_sg, Bo_sn,
                               offs_d, groups, offs_n, mask_d, mask)
    tl.store(_tile(state_out_ptr + row * so_sb, offs_d, so_sd, offs_n, so_sn),
             s.to(state_out_ptr.dtype.element_ty), mask=mask)

    # 2. The new steps: y = s . C + D * x per channel.
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d * D_s, mask=mask_d, other=0.0).to(tl.float32)
    for t in range(T):
        s, x = _selective_step(s, A, x_ptr + row * x_sb + t * x_st, x_sd,
                               dt_ptr + row * dt_sb + t * dt_st, dt_sd,
                               B_ptr + row * B_sb + t * B_st, B_sg, B_sn,
                               offs_d, groups, offs_n, mask_d, mask)
        y = tl.sum(s * _grouped(C_ptr + row * C_sb + t * C_st, groups, C_sg, offs_n, C_sn, mask), axis=1)
        if HAS_D:
            y += Dv * x
        tl.store(y_ptr + row * y_sb + t * y_st + offs_d * y_sd, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    if RETURN_FINAL:
        tl.store(_tile(final_ptr + row * f_sb, offs_d, f_sd, offs_n, f_sn), s.to(final_ptr.dtype.element_ty),
                 mask=mask)



def selective_replay_triton(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, D=None, *,
                            return_final=False, state_out=None, final_out=None):
    """Same contract as :func:`mamballama_cli.ops.selective_scan.selective_replay_ref`. The kernel computes in
    float32; autograd and float64 states take the reference."""
    if (_needs_grad(state, x_old, dt_old, B_old, x_new, dt_new, B_new, C_new, A, D)
            or torch.promote_types(state.dtype, torch.float32) != torch.float32):
        return selective_replay_ref(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, D,
                                    return_final=return_final, state_out=state_out, final_out=final_out)
    b, T, dim, ngroups, n = check_scan_shapes(x_new, dt_new, A, B_new, C_new, D, state)
    W = check_scan_shapes(x_old, dt_old, A, B_old, B_old, None, state)[1]
    assert B_old.shape[2] == ngroups, (B_old.shape, B_new.shape)
    assert n_replay.numel() == b and not n_replay.is_floating_point()
    assert (state.is_cuda and x_new.is_cuda) or _INTERPRET, "the Triton replay kernel needs CUDA tensors"
    (x_old, dt_old, B_old), old_strides = _old_window((x_old, dt_old, B_old), (x_new, dt_new, B_new))
    n_replay = n_replay.to(device=state.device).reshape(b)
    y = torch.empty(b, T, dim, dtype=x_new.dtype, device=x_new.device)
    out, final, want_final = _state_buffers(state, return_final, state_out, final_out)
    BLOCK_N = triton.next_power_of_2(n)
    BLOCK_D = min(triton.next_power_of_2(dim), max(1, 512 // BLOCK_N))  # 32 channels at dstate 16
    with _device_guard(state):
        _selective_replay_kernel[(triton.cdiv(dim, BLOCK_D), b)](
            state, x_old, dt_old, B_old, n_replay,
            x_new, dt_new, B_new, C_new, A, D if D is not None else A,
            y, out, final,
            W, T, dim, n, dim // ngroups, n_replay.stride(0),
            *state.stride(), *old_strides,
            *x_new.stride(), *dt_new.stride(), *B_new.stride(), *C_new.stride(),
            *A.stride(), D.stride(0) if D is not None else 0,
            *y.stride(), *out.stride(), *final.stride(),
            HAS_D=D is not None, RETURN_FINAL=want_final, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
            num_warps=2,
        )
    return y, out, (final if want_final else None)



def _check_selective_replay(gen):
    """Counts 0, 2 and W, two groups that a block of channels straddles, bfloat16 window inputs and a float32
    state and outputs, against the float64 reference."""
    b, W, T, dim, g, n = 3, 4, 3, 80, 2, 16
    bf = torch.bfloat16
    state = _rand(gen, b, dim, n)
    x_old, x_new = _rand(gen, b, W, dim, dtype=bf), _rand(gen, b, T, dim)
    dt_old, dt_new = (torch.nn.functional.softplus(_rand(gen, b, k, dim) - 2.0) for k in (W, T))
    B_old, B_new = _rand(gen, b, W, g, n, dtype=bf), _rand(gen, b, T, g, n, dtype=bf)
    C_new = _rand(gen, b, T, g, n)
    A, D = -torch.exp(_rand(gen, dim, n) * 0.5), _rand(gen, dim)
    counts = torch.tensor([0, 2, W], device="cuda")
    args = (state, x_old, dt_old, B_old, counts, x_new, dt_new, B_new, C_new, A, D)
    want = selective_replay_ref(*(t.double() if t.is_floating_point() else t for t in args),
                                return_final=True)
    got = selective_replay_triton(*args, return_final=True)
    return max(_rel(o, w) for o, w in zip(got, want))



ops.register_fast("selective_replay", "mamballama-triton", selective_replay_triton,
                  _probe(_check_selective_replay))
