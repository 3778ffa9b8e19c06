"""Fused Triton kernels of the Mamba-2 speculative replay ops ``ssm_replay`` and ``ssm_replay_gated`` (references
:mod:`mamballama_cli.ops.replay`); the Mamba-1 one is in :mod:`mamballama_cli.ops.triton_selective_replay`.

One program owns a (BLOCK_P x dstate) tile of one head of one batch row's state and keeps it in registers for
the whole call. It replays that row's ``n_replay`` accepted steps of the last window (the count is read from
device memory, so a captured CUDA graph serves every accepted count), stores the new checkpoint, then runs the
new steps, writing one output row per step. State traffic is one read and one or two writes per call, whatever
K is; no GEMMs.

The kernel unrolls the window's steps (its sizes are compile-time constants). Steps past a row's count run with
dt = 0, the identity. No step's inputs depend on the state, but a store between two steps keeps the compiler from
moving the next step's loads ahead of it: ``FORM`` 2 keeps FORM 0's per-step loads but issues the new steps' two
steps ahead of their use (steps 0 and 1 during the replay), so that no new step waits on memory behind the last
step's stores. Which tile and form runs at a shape is timed once, in CUDA graphs (:func:`replay_tiles`). On an H100
at the 8B head the first tile (FORM 0) won at every verify shape (docs/device-sessions.md, the seventeenth session);
a chunked form (the window as float32 dots) and whole-head tiles for the gated op were tried there and removed, 1.4x
and 6-18x slower. FORM 2 came after that and has won every verify window timed since, at the default teacher's head
(64 x 64, one program a head: 8.1 against 11.4 us at K = 4 on an H100, the twenty-first session) and at the 8B head
(9.9 us against 11.1 for FORM 0 on the H200, the thirtieth). FORM 1, which loaded the whole window as (steps x
block) tiles before the first step, lost at every shape and was removed in the thirty-second session. ``FORM`` 3
(since the twenty-second session, offered where a head fits one program; at the default teacher's head on an H100,
8.42 us against 10.60 for FORM 2 at K = 6, the twenty-third session) loads the window as (steps x block) tiles,
then computes it in its chunked form, a few float32 dots over the window and one gated norm for all its rows, not a
chain of steps (:mod:`mamballama_cli.ops.triton_replay_math`).

``ssm_replay_gated`` is the same kernel with the Mamba-2 mixer's gated RMSNorm over each head applied to each
output row before it is stored, one program a head (its whole row is then in that program), so a verify window
launches no separate norm kernel. That holds where a head's (headdim x dstate) state fits one program
(:data:`GATED_TILE`: the default teacher's 64 x 64). The 8B shape's 128 x 128 heads keep the tiled kernel, since one
program a head would leave most of the GPU idle there: either the norm op runs after it, or (the split-norm tiles)
each program leaves its gated rows in a scratch and the last of a head's programs to finish normalises the head,
whichever the timing picks.

With ``slot`` the last window's inputs come from one of two slots and the kernel writes the new steps' x, raw dt
and B into the other as it loads them (x and B of a group by its first head's programs, dt by one lane of each
head), so the mixer copies nothing after the call (ops/replay.py says how the slots turn).

Inference only (no autograd): verification never trains. Importing this module registers the kernels on
CUDA; it is skipped (and the references used) when Triton is not installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamballama_cli import ops
from mamballama_cli.ops.common import INTERPRETING as _INTERPRET  # Triton's CPU interpreter
from mamballama_cli.ops.common import (
    _device_guard,
    _gdc_on,
    _grid_launch_dependents,
    _next_pow2,
    _probe,
    _rand,
    _rel,
    count_scratch,
)
from mamballama_cli.ops.graph_timing import chosen
from mamballama_cli.ops.replay import ssm_replay_gated_ref, ssm_replay_ref  # (registers the references first)
from mamballama_cli.ops.replay_tiles import (
    TILE_CHOICES,
    _fastest,
    gated_in_one_program,
    gated_tiles,
    norm_in_kernel,
    replay_tile,
    replay_tiles,
    splits_norm,
    window_rows,
)
from mamballama_cli.ops.triton_replay_math import (
    _chunked_replay,
    _chunked_window,
    _gated_norm,
    _new_step,
    _softplus,
    _tile,
)

# False: the kernel never lets the projection after it start early (TRIGGER below); speculative_verify.py
# --no-replay-trigger, the A/B of that launch over a verify call (gpu_session.sh verifynt, verifyold).
EARLY_TRIGGER = True


def _trigger(t: torch.Tensor) -> bool:
    """Whether the replay kernel on ``t``'s device triggers its dependents early: sm90 or later, and
    :data:`EARLY_TRIGGER` on."""
    return EARLY_TRIGGER and _gdc_on(t)


@triton.jit
def _replay_kernel(
    state_ptr, x_old_ptr, dt_old_ptr, B_old_ptr, n_ptr,
    x_ptr, dt_ptr, B_ptr, C_ptr, A_ptr, dt_bias_ptr, D_ptr,
    y_ptr, state_out_ptr, final_ptr, z_ptr, nw_ptr, eps, slot_ptr, xo_s2, dto_s2, Bo_s2, save_off, y32_ptr, cnt_ptr,
    nheads, headdim, dstate, heads_per_group, heads_per_cgroup,
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
    z_sb, z_st, z_sh, z_sp,
    W: tl.constexpr, T: tl.constexpr,
    HAS_D: tl.constexpr, RETURN_FINAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    GATED: tl.constexpr, HAS_Z: tl.constexpr, SLOTTED: tl.constexpr,
    FORM: tl.constexpr, WP: tl.constexpr, TP: tl.constexpr, SPLIT_NORM: tl.constexpr, HEAD_P: tl.constexpr,
    TRIGGER: tl.constexpr = False,
):
    # Steps past the row's count run with dt = 0 and x = B = 0: the identity. FORM 0: the window's steps unrolled
    # (W and T are compile-time constants), each loading its own inputs after the last step's stores. FORM 2: FORM 0
    # with the new steps' loads two steps ahead (steps 0 and 1 before the replay). FORM 3 loads every input of the
    # window first, as (steps x block) tiles of WP and TP rows (W and T rounded up to powers of two, at least 16),
    # and computes the window in its chunked form. SPLIT_NORM (the gated op where a head
    # spans several programs): each program writes its rows of the gated outputs, in float32, to the y32 scratch
    # (batch x heads, T, headdim) and counts itself in cnt once it is done; the last of a head's programs to count
    # normalises the head's rows of every step (HEAD_P: headdim padded), stores them, and resets the count. No program
    # waits on another, so a CUDA graph replays it as it is. TRIGGER (sm90 and later): as the decode step's kernel
    # does, let the projection after it (the gemv op's pdl launch) start loading its weights while this one runs.
    if TRIGGER:
        _grid_launch_dependents()
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
    if SLOTTED:  # the window's two slots: the old steps in slot 1 - cur, the new ones saved into slot cur
        cur = tl.load(slot_ptr).to(tl.int64)
        x_save = x_old_ptr + cur * xo_s2 + save_off * xo_st
        dt_save = dt_old_ptr + cur * dto_s2 + save_off * dto_st
        B_save = B_old_ptr + cur * Bo_s2 + save_off * Bo_st
        x_old_ptr += (1 - cur) * xo_s2
        dt_old_ptr += (1 - cur) * dto_s2
        B_old_ptr += (1 - cur) * Bo_s2
        # one writer for each value: x and B of a group by its first head (B by its first block of headdim), dt
        # of a head by one lane of its first block
        x_lanes = mask_p & ((offs_p * 0 + h % heads_per_group) == 0)
        B_lanes = mask_n & ((offs_n * 0 + h % heads_per_group + pid_p) == 0)
        dt_lane = (offs_p + pid_p * BLOCK_P) == 0

    r = tl.minimum(tl.load(n_ptr + b).to(tl.int32), W)  # the row's count of steps to replay, read on the device
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)
    if GATED:
        nw = tl.load(nw_ptr + h * headdim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    if FORM == 3:  # the chunked form reads the window as tiles (ops/triton_replay_math.py)
        rw = tl.arange(0, WP)
        on_w = rw < r  # the loads are masked by W alone (no wait on r), the steps past r zeroed after
        xo = tl.load(x_old_ptr + b * xo_sb + rw[:, None] * xo_st + g * xo_sg + offs_p[None, :] * xo_sp,
                     mask=(rw < W)[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        xo = tl.where(on_w[:, None], xo, 0.0)
        dto = tl.load(dt_old_ptr + b * dto_sb + rw * dto_st + h * dto_sh, mask=rw < W, other=0.0).to(tl.float32)
        dto = tl.where(on_w, _softplus(dto + dt_bias), 0.0)
        Bo = tl.load(B_old_ptr + b * Bo_sb + rw[:, None] * Bo_st + g * Bo_sg + offs_n[None, :] * Bo_sn,
                     mask=(rw < W)[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        Bo = tl.where(on_w[:, None], Bo, 0.0)
        rt = tl.arange(0, TP)
        on_t = rt < T
        xn_raw = tl.load(x_ptr + b * x_sb + rt[:, None] * x_st + g * x_sg + offs_p[None, :] * x_sp,
                         mask=on_t[:, None] & mask_p[None, :], other=0.0)
        dtn_raw = tl.load(dt_ptr + b * dt_sb + rt * dt_st + h * dt_sh, mask=on_t, other=0.0)
        Bn_raw = tl.load(B_ptr + b * B_sb + rt[:, None] * B_st + g * B_sg + offs_n[None, :] * B_sn,
                         mask=on_t[:, None] & mask_n[None, :], other=0.0)
        Cn = tl.load(C_ptr + b * C_sb + rt[:, None] * C_st + cg * C_sg + offs_n[None, :] * C_sn,
                     mask=on_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        if HAS_Z:  # only with GATED: the gate is the norm's
            zn = tl.load(z_ptr + b * z_sb + rt[:, None] * z_st + h * z_sh + offs_p[None, :] * z_sp,
                         mask=on_t[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        else:
            zn = Cn  # unread
        if SLOTTED:  # every load is issued: the new steps go into their slot now, each value by one writer
            tl.store(x_save + b * xo_sb + rt[:, None] * xo_st + g * xo_sg + offs_p[None, :] * xo_sp,
                     xn_raw.to(x_save.dtype.element_ty), mask=on_t[:, None] & x_lanes[None, :])
            tl.store(B_save + b * Bo_sb + rt[:, None] * Bo_st + g * Bo_sg + offs_n[None, :] * Bo_sn,
                     Bn_raw.to(B_save.dtype.element_ty), mask=on_t[:, None] & B_lanes[None, :])
            tl.store(dt_save + b * dto_sb + rt * dto_st + h * dto_sh, dtn_raw.to(dt_save.dtype.element_ty),
                     mask=on_t & (rt * 0 + pid_p == 0))
        xn = xn_raw.to(tl.float32)
        dtn = tl.where(on_t, _softplus(dtn_raw.to(tl.float32) + dt_bias), 0.0)
        Bn = Bn_raw.to(tl.float32)

    if FORM == 2:  # the new steps' loads run two steps ahead of their use: steps 0 and 1 now, under the replay
        xb = x_ptr + b * x_sb + g * x_sg + offs_p * x_sp
        dtb = dt_ptr + b * dt_sb + h * dt_sh
        Bb = B_ptr + b * B_sb + g * B_sg + offs_n * B_sn
        Cb = C_ptr + b * C_sb + cg * C_sg + offs_n * C_sn
        zb = z_ptr + b * z_sb + h * z_sh + offs_p * z_sp
        if T > 0:  # T = 0: no new step to read
            n0 = _new_step(xb, dtb, Bb, Cb, zb, 0, x_st, dt_st, B_st, C_st, z_st, mask_p, mask_n, HAS_Z)
            if T > 1:
                n1 = _new_step(xb, dtb, Bb, Cb, zb, 1, x_st, dt_st, B_st, C_st, z_st, mask_p, mask_n, HAS_Z)
            else:
                n1 = n0

    # 1. Replay the accepted steps of the last window (no outputs).
    if FORM == 3:
        s = _chunked_replay(s, xo, dto, Bo, rw, A)
    for t in tl.static_range(0 if FORM == 3 else W):  # t < W: every load is inside the window; only t < r replay
        on_p = mask_p & (offs_p * 0 + t < r)
        on_n = mask_n & (offs_n * 0 + t < r)
        x = tl.load(x_old_ptr + b * xo_sb + t * xo_st + g * xo_sg + offs_p * xo_sp, mask=on_p,
                    other=0.0).to(tl.float32)
        dt = tl.load(dt_old_ptr + b * dto_sb + t * dto_st + h * dto_sh).to(tl.float32)
        dt = tl.where(t < r, _softplus(dt + dt_bias), 0.0)
        Bv = tl.load(B_old_ptr + b * Bo_sb + t * Bo_st + g * Bo_sg + offs_n * Bo_sn, mask=on_n,
                     other=0.0).to(tl.float32)
        s = s * tl.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
    tl.store(_tile(state_out_ptr + b * so_sb + h * so_sh, offs_p, so_sp, offs_n, so_sn),
             s.to(state_out_ptr.dtype.element_ty), mask=mask)

    # 2. The new steps, with outputs.
    if FORM == 3:  # every row at once; s becomes the final state where RETURN_FINAL asks for it
        y, s = _chunked_window(s, xn, dtn, Bn, Cn, rt, A, T, RETURN_FINAL)
        if HAS_D:
            y += Dh * xn
        if GATED:
            y = _gated_norm(y, zn, nw, mask_p, eps, headdim, y_ptr.dtype.element_ty, HAS_Z)
        tl.store(y_ptr + b * y_sb + rt[:, None] * y_st + h * y_sh + offs_p[None, :] * y_sp,
                 y.to(y_ptr.dtype.element_ty), mask=on_t[:, None] & mask_p[None, :])
    for t in tl.static_range(0 if FORM == 3 else T):
        if FORM == 2:  # step t's inputs came two steps ago; step t + 2's loads go out before this step's stores
            x_raw, dt_raw, B_raw, Cv, zt = n0
            n0 = n1
            if t + 2 < T:
                n1 = _new_step(xb, dtb, Bb, Cb, zb, t + 2, x_st, dt_st, B_st, C_st, z_st, mask_p, mask_n, HAS_Z)
        else:
            x_raw = tl.load(x_ptr + b * x_sb + t * x_st + g * x_sg + offs_p * x_sp, mask=mask_p, other=0.0)
            dt_raw = tl.load(dt_ptr + b * dt_sb + t * dt_st + h * dt_sh)
            B_raw = tl.load(B_ptr + b * B_sb + t * B_st + g * B_sg + offs_n * B_sn, mask=mask_n, other=0.0)
        if SLOTTED:
            tl.store(x_save + b * xo_sb + t * xo_st + g * xo_sg + offs_p * xo_sp,
                     x_raw.to(x_save.dtype.element_ty), mask=x_lanes)
            tl.store(B_save + b * Bo_sb + t * Bo_st + g * Bo_sg + offs_n * Bo_sn,
                     B_raw.to(B_save.dtype.element_ty), mask=B_lanes)
            tl.store(dt_save + b * dto_sb + t * dto_st + h * dto_sh + offs_p * 0,
                     (dt_raw + tl.zeros([BLOCK_P], dtype=tl.float32)).to(dt_save.dtype.element_ty),
                     mask=dt_lane)
        x = x_raw.to(tl.float32)
        dt = _softplus(dt_raw.to(tl.float32) + dt_bias)
        Bv = B_raw.to(tl.float32)
        if FORM != 2:
            Cv = tl.load(C_ptr + b * C_sb + t * C_st + cg * C_sg + offs_n * C_sn, mask=mask_n,
                         other=0.0).to(tl.float32)
            if HAS_Z:
                zt = tl.load(z_ptr + b * z_sb + t * z_st + h * z_sh + offs_p * z_sp, mask=mask_p,
                             other=0.0).to(tl.float32)
        s = s * tl.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
        y = tl.sum(s * Cv[None, :], axis=1)
        if HAS_D:
            y += Dh * x
        if GATED:  # the head's whole row is here (one program a head): the gated RMSNorm over it, as ssm_step_gated
            y = _gated_norm(y, zt if HAS_Z else y, nw, mask_p, eps, headdim, y_ptr.dtype.element_ty, HAS_Z)
        if SPLIT_NORM:  # this program's rows of the gated output, the norm left to the head's last program
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
            if HAS_Z:
                y = y * (zt * tl.sigmoid(zt))
            tl.store(y32_ptr + ((b * nheads + h) * T + t) * headdim + offs_p, y, mask=mask_p)
        else:
            tl.store(y_ptr + b * y_sb + t * y_st + h * y_sh + offs_p * y_sp, y.to(y_ptr.dtype.element_ty),
                     mask=mask_p)
    if RETURN_FINAL:
        tl.store(_tile(final_ptr + b * f_sb + h * f_sh, offs_p, f_sp, offs_n, f_sn),
                 s.to(final_ptr.dtype.element_ty), mask=mask)
    if SPLIT_NORM:
        row = b * nheads + h
        tl.debug_barrier()  # every thread's rows stored before the one count (a release, acq_rel) is taken
        if tl.atomic_add(cnt_ptr + row, 1) == tl.num_programs(0) - 1:
            st = tl.arange(0, TP)
            q = tl.arange(0, HEAD_P)
            on = (st < T)[:, None] & (q < headdim)[None, :]
            yh = tl.load(y32_ptr + (row * T + st[:, None]) * headdim + q[None, :], mask=on, other=0.0,
                         cache_modifier=".cg")  # past L1: the other programs' rows
            var = tl.sum(yh * yh, axis=1) / headdim  # each step's whole row, in one order
            w = tl.load(nw_ptr + h * headdim + q, mask=q < headdim, other=0.0).to(tl.float32)
            yh = yh * tl.rsqrt(var + eps)[:, None] * w[None, :]
            tl.store(y_ptr + b * y_sb + st[:, None] * y_st + h * y_sh + q[None, :] * y_sp,
                     yh.to(y_ptr.dtype.element_ty), mask=on)
            tl.atomic_xchg(cnt_ptr + row, 0)  # ready for the next call (and a CUDA graph's next replay)


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
                      return_final=False, state_out=None, final_out=None, slot=None, offset=0, read_old=True,
                      tile=None):
    """Same contract as :func:`mamballama_cli.ops.replay.ssm_replay_ref`. ``tile`` (an entry of
    :func:`replay_tiles`): that tile, not the timed choice (the tests run each)."""
    return _replay_launch(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, dt_bias, D,
                          return_final, state_out, final_out, slots=(slot, offset, read_old), tile=tile)


def ssm_replay_gated_triton(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, dt_bias, D, z,
                            norm_weight, eps, *, return_final=False, state_out=None, final_out=None, slot=None,
                            offset=0, read_old=True, tile=None):
    """Same contract as :func:`mamballama_cli.ops.replay.ssm_replay_gated_ref`: the gated RMSNorm inside the replay
    kernel where a head fits one program (:func:`~mamballama_cli.ops.replay_tiles.gated_in_one_program`), else the
    tiled kernel followed by the ``rmsnorm_gated`` op or normalising by the last of a head's programs (split-norm
    tiles), as timed. ``tile``: one of ``gated_tiles``, not the timed choice."""
    return _replay_launch(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, dt_bias, D,
                          return_final, state_out, final_out, gate=(z, norm_weight, eps),
                          slots=(slot, offset, read_old), tile=tile)


def _replay_launch(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, dt_bias, D, return_final,
                   state_out, final_out, gate=None, slots=(None, 0, True), tile=None):
    b, h, p, n = state.shape
    slot, offset, read_old = slots
    slotted = slot is not None
    if slotted:  # the window's two slots (2, b, L, ...): read slot 1 - slot, write slot ``slot``
        bufs = (x_old, dt_old, B_old)
        assert all(t.shape[0] == 2 for t in bufs) and slot.numel() == 1 and not slot.is_floating_point()
        assert offset + x_new.shape[1] <= x_old.shape[2], (offset, x_new.shape, x_old.shape)
        slot_strides = [t.stride(0) for t in bufs]
        x_old, dt_old, B_old = (t[0] if read_old else t[0, :, :0] for t in bufs)
    W, T = x_old.shape[1], x_new.shape[1]
    g, cg = x_new.shape[2], C_new.shape[2]
    assert x_old.shape == (b, W, g, p) and x_new.shape == (b, T, g, p), (x_old.shape, x_new.shape, state.shape)
    assert dt_old.shape == (b, W, h) and dt_new.shape == (b, T, h), (dt_old.shape, dt_new.shape)
    assert B_old.shape == (b, W, g, n) and B_new.shape == (b, T, g, n), (B_old.shape, B_new.shape)
    assert C_new.shape == (b, T, cg, n) and h % g == 0 and h % cg == 0, C_new.shape
    assert A.shape == (h,) and dt_bias.shape == (h,) and (D is None or D.shape == (h,))
    assert n_replay.numel() == b and not n_replay.is_floating_point()
    assert (state.is_cuda and x_new.is_cuda) or _INTERPRET, "the Triton replay kernel needs CUDA tensors"
    if slotted:  # the buffers themselves (written whatever W is), their per-slot strides
        old_strides = [st for t in bufs for st in t[0].stride()]
        x_old, dt_old, B_old = bufs
    else:
        (x_old, dt_old, B_old), old_strides = _old_window((x_old, dt_old, B_old), (x_new, dt_new, B_new))
        slot_strides, slot = [0, 0, 0], n_replay  # slot: any pointer, unread
    n_replay = n_replay.reshape(b)
    y = torch.empty(b, T, h, p, dtype=x_new.dtype, device=x_new.device)
    out, final, want_final = _state_buffers(state, return_final, state_out, final_out)
    gated = gate is not None
    BLOCK_N = replay_tile(p, n, gated)[1]
    Dt = D if D is not None else A
    z_flat, nw, eps = gate if gate else (None, None, 0.0)
    z = z_flat.unflatten(-1, (h, p)) if z_flat is not None else None  # (b, T, h * p) -> (b, T, h, p), a view

    capturing = state.is_cuda and torch.cuda.is_current_stream_capturing()
    split_ok = gated and not gated_in_one_program(p, n)  # the split-norm tiles' scratch: T rows of y a head
    scratch = count_scratch("ssm_replay", state.device, b * h, T * p, capturing) if split_ok else None

    def run(tile, st, out_, fin_):
        """One launch at ``tile``; the gated op's output (b, T, h * p), normalised by the kernel where the tile holds
        a whole head or (a split-norm tile) by the head's last program, else by the norm op after it; the plain op's
        (b, T, h, p)."""
        whole, split = norm_in_kernel(tile, p, gated)
        assert not split or scratch is not None, "a split-norm replay tile needs its scratch, made outside a capture"
        y32, cnt = scratch if split else (A, n_replay)  # unread unless split
        zt = z if (whole or split) and z is not None else y
        wp, tp = window_rows(W, T, tile[2])
        with _device_guard(st):
            _replay_kernel[(triton.cdiv(p, tile[0]), b * h)](
                st, x_old, dt_old, B_old, n_replay,
                x_new, dt_new, B_new, C_new, A, dt_bias, Dt,
                y, out_, fin_, zt, nw if whole or split else A, float(eps), slot, *slot_strides, int(offset), y32, cnt,
                h, p, n, h // g, h // cg,
                *st.stride(), *old_strides,
                *x_new.stride(), *dt_new.stride(), *B_new.stride(), *C_new.stride(),
                *y.stride(), *out_.stride(), *fin_.stride(), *zt.stride(),
                W=W, T=T,
                HAS_D=D is not None, RETURN_FINAL=want_final, BLOCK_P=tile[0], BLOCK_N=BLOCK_N,
                GATED=whole, HAS_Z=(whole or split) and z is not None, SLOTTED=slotted,
                FORM=int(tile[2]), WP=wp, TP=tp, SPLIT_NORM=split, HEAD_P=_next_pow2(p), TRIGGER=_trigger(st),
                num_warps=tile[1],
            )
        if not gated:
            return y
        if whole or split:
            return y.view(b, T, h * p)
        return ops.dispatch("rmsnorm_gated", x_new.device)[1](y.view(b, T, h * p), z_flat, nw, eps, p)

    if tile is None:  # timed once per shape (in place over copies: the state itself is never touched)
        cands = gated_tiles(p, n) if gated else replay_tiles(p, n, False)
        key = (b, h, p, n, W, T, gated, z is not None, slotted, want_final, D is not None, state.dtype,
               x_new.dtype, state.device.index)
        use = chosen(TILE_CHOICES, key, state,
                     lambda: _fastest(lambda c, st, fin: run(c, st, st, fin if want_final else st), state, cands, key))
        tile = use if isinstance(use, tuple) else cands[0]
    if splits_norm(tile) and scratch is None:  # inside a recording before any scratch was made: the norm op after
        tile = tuple(tile[:3])
    return run(tile, state, out, final), out, (final if want_final else None)


# ================================================================================================
# Probes
# ================================================================================================
def _check_ssm_replay(gen):
    """A verify window (W = T = 5) with counts 0, 2 and W, grouped x/B and C, headdim past one block, in float32,
    against the float64 reference: y, the replayed checkpoint and the final state."""
    b, W, T, h, g, cg, p, n = 3, 5, 5, 4, 2, 1, 48, 16
    state = _rand(gen, b, h, p, n)
    old = (_rand(gen, b, W, g, p), _rand(gen, b, W, h), _rand(gen, b, W, g, n))
    new = (_rand(gen, b, T, g, p), _rand(gen, b, T, h), _rand(gen, b, T, g, n), _rand(gen, b, T, cg, n))
    A, dt_bias, D = -torch.exp(_rand(gen, h)), _rand(gen, h), _rand(gen, h)
    counts = torch.tensor([0, 2, W], device="cuda")
    args = (state, *old, counts, *new, A, dt_bias, D)
    want = ssm_replay_ref(*(t.double() if t.is_floating_point() else t for t in args), return_final=True)
    got = ssm_replay_triton(*args, return_final=True)
    return max(max(_rel(o, w) for o, w in zip(got, want)), _check_slotted(gen, ssm_replay_triton, ssm_replay_ref))


def _check_slotted(gen, fast, ref, gate=()):
    """The window kept in two slots (a verify call, slot 1 written): the new steps written where the reference
    writes them, the other slot untouched, and the outputs. 0.0 or 1.0 for the buffers (exact), then the rel error."""
    b, L, T, h, g, p, n = 2, 5, 5, 4, 2, 48, 16
    bufs = (_rand(gen, 2, b, L, g, p), _rand(gen, 2, b, L, h), _rand(gen, 2, b, L, g, n))
    new = (_rand(gen, b, T, g, p), _rand(gen, b, T, h), _rand(gen, b, T, g, n), _rand(gen, b, T, h, n))
    A, dt_bias, D = -torch.exp(_rand(gen, h)), _rand(gen, h), _rand(gen, h)
    state, counts, slot = _rand(gen, b, h, p, n), torch.tensor([1, 3], device="cuda"), torch.ones(1, dtype=torch.long,
                                                                                                    device="cuda")
    extra = (_rand(gen, b, T, h * p), 1 + 0.1 * _rand(gen, h * p), 1e-5) if gate else ()
    mine, theirs = [t.clone() for t in bufs], [t.clone() for t in bufs]
    got = fast(state, *mine, counts, *new, A, dt_bias, D, *extra, slot=slot, offset=0, read_old=True)
    want = ref(state, *theirs, counts, *new, A, dt_bias, D, *extra, slot=slot, offset=0, read_old=True)
    same = all(torch.equal(a, c) for a, c in zip(mine, theirs)) and all(torch.equal(a[0], c[0])
                                                                         for a, c in zip(mine, bufs))
    return max(0.0 if same else 1.0, *(_rel(o, w) for o, w in zip(got[:2], want[:2])))


def _check_ssm_replay_gated(gen):
    """The gated op in one kernel (headdim 48, dstate 16) and in two (headdim 64, dstate 128), counts 0, 2 and W,
    against the float64 reference: y, the replayed checkpoint and the final state."""
    errs = []
    for p, n in ((48, 16), (64, 128)):
        b, W, T, h, g = 3, 5, 5, 4, 2
        state = _rand(gen, b, h, p, n)
        old = (_rand(gen, b, W, g, p), _rand(gen, b, W, h), _rand(gen, b, W, g, n))
        new = (_rand(gen, b, T, g, p), _rand(gen, b, T, h), _rand(gen, b, T, g, n), _rand(gen, b, T, h, n))
        A, dt_bias, D = -torch.exp(_rand(gen, h)), _rand(gen, h), _rand(gen, h)
        z, nw = _rand(gen, b, T, h * p), 1 + 0.1 * _rand(gen, h * p)
        counts = torch.tensor([0, 2, W], device="cuda")
        args = (state, *old, counts, *new, A, dt_bias, D, z, nw)
        want = ssm_replay_gated_ref(*(t.double() if t.is_floating_point() else t for t in args), 1e-5,
                                    return_final=True)
        got = ssm_replay_gated_triton(*args, 1e-5, return_final=True)
        errs += [_rel(o, w) for o, w in zip(got, want)]
    return max(*errs, _check_slotted(gen, ssm_replay_gated_triton, ssm_replay_gated_ref, gate=True))


ops.register_fast("ssm_replay", "triton", ssm_replay_triton, _probe(_check_ssm_replay, tol=1e-4))
ops.register_fast("ssm_replay_gated", "triton", ssm_replay_gated_triton, _probe(_check_ssm_replay_gated, tol=1e-4))
