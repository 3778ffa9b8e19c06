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
the reference. Importing this module registers the kernel for ``causal_conv1d`` on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamballama_cli import ops
from mamballama_cli.ops.conv import causal_conv1d_ref
from mamballama_cli.ops.common import _device_guard

BLOCK_T = 64
BLOCK_C = 64


@triton.jit
def _conv_fwd_kernel(X, W, BIAS, Y, L, dim,
                     x_sb, x_sc, x_st, y_sb, y_sc, y_st,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr):
    pb = tl.program_id(0)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    c = tl.program_id(2) * BC + tl.arange(0, BC)
    mc = c < dim
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=mc, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(WIDTH):
        tt = t - (WIDTH - 1) + j
        m = ((tt >= 0) & (tt < L))[:, None] & mc[None, :]
        xv = tl.load(X + pb * x_sb + tt[:, None] * x_st + c[None, :] * x_sc, mask=m, other=0.0)
        w = tl.load(W + c * WIDTH + j, mask=mc, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * w[None, :]
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
        pre = tl.zeros([BT, BC], dtype=tl.float32)
        if HAS_BIAS:
            pre += tl.load(BIAS + c, mask=mc, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(WIDTH):
            tt = t - (WIDTH - 1) + j
            mm = ((tt >= 0) & (tt < L))[:, None] & mc[None, :]
            xv = tl.load(X + pb * x_sb + tt[:, None] * x_st + c[None, :] * x_sc, mask=mm, other=0.0)
            w = tl.load(W + c * WIDTH + j, mask=mc, other=0.0).to(tl.float32)
            pre += xv.to(tl.float32) * w[None, :]
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


def _probe() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 96, 70, generator=gen, device="cuda")
    w, bias = torch.randn(96, 4, generator=gen, device="cuda"), torch.randn(96, generator=gen, device="cuda")
    y, s = causal_conv1d_triton(x, w, bias, None, "silu")
    y_ref, s_ref = causal_conv1d_ref(x.double(), w.double(), bias.double(), None, "silu")
    err = float((y.double() - y_ref).norm() / y_ref.norm())
    if not err < 1e-5 or not torch.equal(s, x[..., -3:]):
        return False, f"wrong result on a probe input (relative error {err:.2e})"
    return True, f"ok (probe relative error {err:.1e})"


ops.register_fast("causal_conv1d", "mamballama-triton", causal_conv1d_triton, _probe)
