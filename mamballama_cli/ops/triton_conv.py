"""Causal depthwise conv for training and prefill on CUDA: Triton forward and backward.

Reference: :func:`mamballama_cli.ops.conv.causal_conv1d_ref` (``F.conv1d`` with left padding, then SiLU). On
the GPU machine causal-conv1d's CUDA extension is absent (building it takes longer than a session), and the
cuDNN depthwise conv, its backward and the layout copies around it were about 5% of a SmolLM2-shape
distillation step. These kernels read the conv input where ``in_proj`` wrote it (channel-last, a column slice
of the projection), write the output channel-last (so the mixer's later transposes and splits are views), and
compute the backward in two passes:

1. ``g = dy * act'(pre)`` (the pre-activation recomputed from x), plus per-tile partial sums of the weight and
   bias gradients (reduced by one ``sum`` afterwards);
2. ``dx[t] = sum_j w[j] * g[t + W - 1 - j]``.

Only the from-zeros case (no carried state) runs here; a call with an initial state (continuing a prefill) uses
the reference.

``spec_conv`` is the conv of a speculative verify window: one kernel reads the buffered conv prefix (at a
per-row device-side shift) and the T new inputs, writes the causal depthwise conv + activation of the new
positions and stores the sequence back into the conv buffer. A program owns whole channels and loads
everything it reads before its first store, so the in-place update has no hazard. Inference only.

Importing this module registers the kernels for ``causal_conv1d`` and ``spec_conv`` on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamballama_cli import ops
from mamballama_cli.ops.common import _device_guard, _needs_grad, _next_pow2, _probe, _rand, _rel
from mamballama_cli.ops.conv import causal_conv1d_ref
from mamballama_cli.ops.verify_ref import spec_conv_ref  # also registers the verify ops' references

BLOCK_T = 64
BLOCK_C = 64


@triton.jit
def _conv_pre(XB, W, BIAS, t, c, mc, L, x_sc, x_st, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
              BT: tl.constexpr, BC: tl.constexpr):
    # The pre-activation conv of one sequence XB at positions t, channels c: float32 (BT, BC).
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=mc, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(WIDTH):
        tt = t - (WIDTH - 1) + j
        m = ((tt >= 0) & (tt < L))[:, None] & mc[None, :]
        xv = tl.load(XB + tt[:, None] * x_st + c[None, :] * x_sc, mask=m, other=0.0)
        w = tl.load(W + c * WIDTH + j, mask=mc, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * w[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(X, W, BIAS, Y, L, dim,
                     x_sb, x_sc, x_st, y_sb, y_sc, y_st,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr):
    pb = tl.program_id(0)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    c = tl.program_id(2) * BC + tl.arange(0, BC)
    mc = c < dim
    acc = _conv_pre(X + pb * x_sb, W, BIAS, t, c, mc, L, x_sc, x_st, WIDTH, HAS_BIAS, BT, BC)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    m = (t < L)[:, None] & mc[None, :]
    tl.store(Y + pb * y_sb + t[:, None] * y_st + c[None, :] * y_sc, acc.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _conv_bwd_g_kernel(X, W, BIAS, DY, G, DWP, DBP, L, dim, n_tb,
                       x_sb, x_sc, x_st, dy_sb, dy_sc, dy_st,
                       WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr):
    # G (b, L, dim) float32: dy times the activation's derivative; DWP (b * n_tb, WIDTH, dim) and DBP (b * n_tb,
    # dim): this tile's share of the weight and bias gradients.
    pb = tl.program_id(0)
    ptb = tl.program_id(1)
    t = ptb * BT + tl.arange(0, BT)
    c = tl.program_id(2) * BC + tl.arange(0, BC)
    mc = c < dim
    mt = t < L
    m = mt[:, None] & mc[None, :]
    dy = tl.load(DY + pb * dy_sb + t[:, None] * dy_st + c[None, :] * dy_sc, mask=m, other=0.0).to(tl.float32)
    if SILU:
        pre = _conv_pre(X + pb * x_sb, W, BIAS, t, c, mc, L, x_sc, x_st, WIDTH, HAS_BIAS, BT, BC)
        sig = tl.sigmoid(pre)
        g = dy * sig * (1.0 + pre * (1.0 - sig))
    else:
        g = dy
    g = tl.where(m, g, 0.0)
    tl.store(G + (pb * L + t[:, None]) * dim + c[None, :], g, mask=m)
    row = pb * n_tb + ptb
    for j in tl.static_range(WIDTH):
        tt = t - (WIDTH - 1) + j
        mm = ((tt >= 0) & (tt < L))[:, None] & mc[None, :]
        xv = tl.load(X + pb * x_sb + tt[:, None] * x_st + c[None, :] * x_sc, mask=mm, other=0.0).to(tl.float32)
        tl.store(DWP + (row * WIDTH + j) * dim + c, tl.sum(g * xv, axis=0), mask=mc)
    if HAS_BIAS:
        tl.store(DBP + row * dim + c, tl.sum(g, axis=0), mask=mc)


@triton.jit
def _conv_bwd_dx_kernel(G, W, DX, L, dim, dx_sb, dx_sc, dx_st,
                        WIDTH: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    pb = tl.program_id(0)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    c = tl.program_id(2) * BC + tl.arange(0, BC)
    mc = c < dim
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        tt = t + (WIDTH - 1) - j  # output position that input t feeds through tap j
        mm = (tt < L)[:, None] & mc[None, :]
        g = tl.load(G + (pb * L + tt[:, None]) * dim + c[None, :], mask=mm, other=0.0)
        w = tl.load(W + c * WIDTH + j, mask=mc, other=0.0).to(tl.float32)
        acc += g * w[None, :]
    m = (t < L)[:, None] & mc[None, :]
    tl.store(DX + pb * dx_sb + t[:, None] * dx_st + c[None, :] * dx_sc, acc.to(DX.dtype.element_ty), mask=m)


def _grid(b: int, L: int, dim: int):
    return (b, triton.cdiv(L, BLOCK_T), triton.cdiv(dim, BLOCK_C))


def _channel_last(b: int, dim: int, L: int, dtype, device) -> torch.Tensor:
    """An uninitialised (b, dim, L) tensor whose memory is (b, L, dim): the mixer transposes it back for free."""
    return torch.empty(b, L, dim, dtype=dtype, device=device).transpose(1, 2)


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu: bool):
        b, dim, L = x.shape
        width = weight.shape[-1]
        w = weight.contiguous()
        y = _channel_last(b, dim, L, x.dtype, x.device)
        with _device_guard(x):
            _conv_fwd_kernel[_grid(b, L, dim)](
                x, w, bias if bias is not None else w, y, L, dim, *x.stride(), *y.stride(),
                WIDTH=width, HAS_BIAS=bias is not None, SILU=silu, BT=BLOCK_T, BC=BLOCK_C, num_warps=4,
            )
        ctx.save_for_backward(x, w, bias)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, bias = ctx.saved_tensors
        b, dim, L = x.shape
        width = w.shape[-1]
        n_tb = triton.cdiv(L, BLOCK_T)
        g = torch.empty(b, L, dim, dtype=torch.float32, device=x.device)
        dwp = torch.empty(b * n_tb, width, dim, dtype=torch.float32, device=x.device)
        dbp = torch.empty(b * n_tb, dim, dtype=torch.float32, device=x.device) if bias is not None else dwp
        dx = _channel_last(b, dim, L, x.dtype, x.device)
        with _device_guard(x):
            _conv_bwd_g_kernel[_grid(b, L, dim)](
                x, w, bias if bias is not None else w, dy, g, dwp, dbp, L, dim, n_tb, *x.stride(), *dy.stride(),
                WIDTH=width, HAS_BIAS=bias is not None, SILU=ctx.silu, BT=BLOCK_T, BC=BLOCK_C, num_warps=4,
            )
            _conv_bwd_dx_kernel[_grid(b, L, dim)](
                g, w, dx, L, dim, *dx.stride(), WIDTH=width, BT=BLOCK_T, BC=BLOCK_C, num_warps=4,
            )
        dw = dwp.sum(0).t().to(w.dtype)  # (dim, width)
        db = dbp.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dw, db, None


def causal_conv1d_triton(x, weight, bias=None, initial_state=None, activation=None):
    """Same contract as :func:`causal_conv1d_ref`; the output is laid out channel-last in memory."""
    b, dim, L = x.shape
    width = weight.shape[-1]
    if initial_state is not None or activation not in (None, "identity", "silu", "swish") or L < width - 1:
        return causal_conv1d_ref(x, weight, bias, initial_state, activation)
    weight = weight.to(x.dtype)  # as the reference: the conv runs in x's dtype (autocast leaves conv alone)
    bias = bias.to(x.dtype) if bias is not None else None
    y = _CausalConv.apply(x, weight, bias, activation in ("silu", "swish"))
    return y, x[..., L - (width - 1):]


def _check_causal_conv(gen):
    x = _rand(gen, 2, 96, 70)
    w, bias = _rand(gen, 96, 4), _rand(gen, 96)
    y, s = causal_conv1d_triton(x, w, bias, None, "silu")
    y_ref, _ = causal_conv1d_ref(x.double(), w.double(), bias.double(), None, "silu")
    return _rel(y, y_ref) if torch.equal(s, x[..., -3:]) else float("inf")


# ================================================================================================
# The verify call's conv: T new inputs after a buffered prefix (reference: ops/verify_ref.py spec_conv_ref)
# ================================================================================================
@triton.jit
def _spec_conv_block(x_row, x_st, buf_row, b_st, src, offset, T, W, BIAS, o_row, o_st, d, md, w_sd, w_sw,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    # The conv of one sequence's channels d (live where md): x_row, buf_row, o_row are (BLOCK_D, 1) pointers at each
    # channel's new inputs, buffer and outputs, time at strides x_st, b_st, o_st; src: the buffer index of seq[0].
    # seq[i] = buf[src + i] for i < WIDTH - 1, else x[i - (WIDTH - 1)]; out[t] = act(bias + sum_j W[j] seq[t + j]);
    # then buf[offset + i] = seq[i]. Also the epilogue of the verify window's in_proj (ops/triton_gemv_conv.py).
    # The whole sequence, for the buffer: loaded with the conv's own inputs, ahead of the output's store (a load
    # after a store waits a round trip of its own; every position of these channels belongs to this program).
    s = tl.arange(0, BLOCK_S)
    ms = s < WIDTH - 1 + T
    s_buf = s < WIDTH - 1
    sb = tl.load(buf_row + (src + s)[None, :] * b_st, mask=md[:, None] & s_buf[None, :], other=0.0)
    sx = tl.load(x_row + (s - (WIDTH - 1))[None, :] * x_st, mask=md[:, None] & (ms & ~s_buf)[None, :], other=0.0)
    t = tl.arange(0, BLOCK_T)
    mt = t < T
    acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        i = t + j
        from_buf = i < WIDTH - 1
        vb = tl.load(buf_row + (src + i)[None, :] * b_st, mask=md[:, None] & (mt & from_buf)[None, :], other=0.0)
        vx = tl.load(x_row + (i - (WIDTH - 1))[None, :] * x_st, mask=md[:, None] & (mt & ~from_buf)[None, :],
                     other=0.0)
        val = tl.where(from_buf[None, :], vb.to(tl.float32), vx.to(tl.float32))
        wj = tl.load(W + d * w_sd + j * w_sw, mask=md, other=0.0).to(tl.float32)
        acc += wj[:, None] * val
    if HAS_BIAS:
        acc += tl.load(BIAS + d, mask=md, other=0.0).to(tl.float32)[:, None]
    out_ty = o_row.dtype.element_ty
    out = acc.to(out_ty)  # the conv rounds to the activation dtype, then the activation
    if SILU:
        of = out.to(tl.float32)
        out = (of * tl.sigmoid(of)).to(out_ty)
    tl.store(o_row + t[None, :] * o_st, out, mask=md[:, None] & mt[None, :])
    # The whole sequence back into the buffer, every thread's reads done first (the prefix may overlap the
    # destination when shift > 0).
    seq = tl.where(s_buf[None, :], sb, sx.to(sb.dtype))
    tl.debug_barrier()
    tl.store(buf_row + (offset + s)[None, :] * b_st, seq.to(buf_row.dtype.element_ty),
             mask=md[:, None] & ms[None, :])


@triton.jit
def _spec_conv_kernel(X, BUF, SHIFT, W, BIAS, OUT, T, dim, offset,
                      x_sb, x_st, x_sd, b_sb, b_sd, b_st, w_sd, w_sw, o_sb, o_st, o_sd,
                      WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    # Program (sequence, block of channels): the conv of T new inputs after the buffer's prefix (_spec_conv_block).
    pb = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < dim
    src = offset + tl.load(SHIFT + pb).to(tl.int32)  # buffer index of seq[0]
    _spec_conv_block(X + pb * x_sb + d[:, None] * x_sd, x_st, BUF + pb * b_sb + d[:, None] * b_sd, b_st, src, offset,
                     T, W, BIAS, OUT + pb * o_sb + d[:, None] * o_sd, o_st, d, md, w_sd, w_sw, WIDTH, HAS_BIAS, SILU,
                     BLOCK_D, BLOCK_T, BLOCK_S)


SPEC_CONV_BLOCK_D = 64


def spec_conv_triton(xbc, conv_buf, shift, offset, weight, bias=None, activation=None):
    """Same contract as :func:`mamballama_cli.ops.verify_ref.spec_conv_ref`."""
    if _needs_grad(xbc, weight, bias) or activation not in (None, "identity", "silu", "swish"):
        return spec_conv_ref(xbc, conv_buf, shift, offset, weight, bias, activation)
    b, T, dim = xbc.shape
    width = weight.shape[-1]
    assert weight.shape == (dim, width) and width >= 2, (weight.shape, xbc.shape)
    assert conv_buf.shape[:2] == (b, dim) and offset + width - 1 + T <= conv_buf.shape[2], (conv_buf.shape, offset, T)
    assert shift.numel() == b and not shift.is_floating_point()
    shift = shift.reshape(b)
    out = torch.empty(b, T, dim, dtype=xbc.dtype, device=xbc.device)
    with _device_guard(xbc):
        _spec_conv_kernel[(b, triton.cdiv(dim, SPEC_CONV_BLOCK_D))](
            xbc, conv_buf, shift, weight, bias if bias is not None else weight, out, T, dim, int(offset),
            *xbc.stride(), *conv_buf.stride(), weight.stride(0), weight.stride(1), *out.stride(),
            WIDTH=width, HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"),
            BLOCK_D=SPEC_CONV_BLOCK_D, BLOCK_T=_next_pow2(T), BLOCK_S=_next_pow2(width - 1 + T), num_warps=2,
        )
    return out


def _check_spec_conv(gen):
    b, T, dim, width, window = 3, 5, 200, 4, 5
    full = _rand(gen, b, T, dim + 16)
    xbc = full[..., 8 : 8 + dim]  # a strided column slice, as in the replay layer
    buf = _rand(gen, b, dim, width - 1 + window)
    w, bias = _rand(gen, dim, width), _rand(gen, dim)
    shift = torch.tensor([0, 2, 5], device="cuda")
    got_buf, ref_buf = buf.clone(), buf.clone()
    out = spec_conv_triton(xbc, got_buf, shift, 0, w, bias, "silu")
    ref = spec_conv_ref(xbc, ref_buf, shift, 0, w, bias, "silu")
    if not torch.equal(got_buf, ref_buf):
        return float("inf")  # the buffer update is a copy: exact
    return _rel(out, ref)


ops.register_fast("causal_conv1d", "mamballama-triton", causal_conv1d_triton, _probe(_check_causal_conv, tol=1e-5))
ops.register_fast("spec_conv", "mamballama-triton", spec_conv_triton, _probe(_check_spec_conv))
