"""Rotary position embedding of q and k for training and prefill on CUDA: one Triton kernel each way.

Reference: :func:`mamballama_cli.ops.rope_ops.rotary_ref` (``apply_rotary`` with the result in q's dtype). With
``x = [x1, x2]`` split at half the head dimension and the tables ``cos = [c1, c2]``, ``sin = [s1, s2]``:

    y1 = x1 c1 - x2 s1        y2 = x2 c2 + x1 s2                        (forward)
    dx1 = g1 c1 + g2 s2       dx2 = g2 c2 - g1 s1                       (backward: the transposed rotation)

so the backward is the forward with ``(s1, s2) -> (-s2, -s1)``. In PyTorch the reference is about ten
elementwise kernels and a concatenation per tensor, forward and backward, plus a float32 copy of q and k under
autocast (the tables are float32 there); here one kernel reads each of q and k once and writes the rotated
tensors in their own dtype. Arithmetic follows the reference: in float32 when it would promote to float32
(autocast), with floating-point contraction off so no FMA changes a rounding; with each product and the sum
rounded to the 16-bit type when q and the tables share it (plain bf16 inference), as PyTorch's elementwise
kernels do. The backward rounds once (the reference rounds each of its two branches): the gradient is, if
anything, closer to exact.

Any strides with a unit last stride (q is usually a transposed view of the projection's output); the output has
q's strides. Partial rotary (tables narrower than the head) is left to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamballama_cli import ops
from mamballama_cli.ops.common import _device_guard
from mamballama_cli.ops.rope_ops import rotary_ref


@triton.jit
def _rotate_heads(X, Y, b, pos, H, x_sb, x_sh, x_sl, y_sb, y_sh, y_sl, c1, c2, s1, s2, d, dm,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, ROUND: tl.constexpr):
    """Rotate the H heads of token (b, pos) of X into Y."""
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = (h < H)[:, None] & dm[None, :]
        src = X + b * x_sb + pos * x_sl + h[:, None] * x_sh + d[None, :]
        dst = Y + b * y_sb + pos * y_sl + h[:, None] * y_sh + d[None, :]
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        if ROUND:  # a 16-bit computation: every product and the sum rounded, as PyTorch's kernels do
            y1 = (x1 * c1[None, :]).to(X.dtype.element_ty).to(tl.float32) - \
                (x2 * s1[None, :]).to(X.dtype.element_ty).to(tl.float32)
            y2 = (x2 * c2[None, :]).to(X.dtype.element_ty).to(tl.float32) + \
                (x1 * s2[None, :]).to(X.dtype.element_ty).to(tl.float32)
        else:
            y1 = x1 * c1[None, :] - x2 * s1[None, :]
            y2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(dst, y1.to(Y.dtype.element_ty), mask=m)
        tl.store(dst + HALF, y2.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, L, HQ, HK,
                 q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, qo_sb, qo_sh, qo_sl, ko_sb, ko_sh, ko_sl, c_sb, c_sl,
                 HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr,
                 ROUND: tl.constexpr):
    tok = tl.program_id(0)
    b = tok // L
    pos = tok % L
    d = tl.arange(0, BLOCK_D)
    dm = d < HALF
    tab = b * c_sb + pos * c_sl + d
    c1 = tl.load(COS + tab, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(COS + tab + HALF, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + tab, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + tab + HALF, mask=dm, other=0.0).to(tl.float32)
    if BACKWARD:  # the transposed rotation: (s1, s2) -> (-s2, -s1)
        s1, s2 = -s2, -s1
    _rotate_heads(Q, QO, b, pos, HQ, q_sb, q_sh, q_sl, qo_sb, qo_sh, qo_sl, c1, c2, s1, s2, d, dm,
                  HALF, BLOCK_H, ROUND)
    _rotate_heads(K, KO, b, pos, HK, k_sb, k_sh, k_sl, ko_sb, ko_sh, ko_sl, c1, c2, s1, s2, d, dm,
                  HALF, BLOCK_H, ROUND)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, cos, sin, backward: bool, round_products: bool):
    """Rotate q and k (batch, heads, seqlen, head_dim) with tables (1 or batch, seqlen, head_dim)."""
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # same strides as the inputs (dense views)
    b, hq, L, D = q.shape
    hk = k.shape[1]
    if b * L == 0:
        return qo, ko
    c_sb = 0 if cos.shape[0] == 1 else cos.stride(0)
    half = D // 2
    block_h = min(triton.next_power_of_2(max(hq, hk)), max(1, 4096 // triton.next_power_of_2(half)))
    with _device_guard(q):
        _rope_kernel[(b * L,)](
            q, k, qo, ko, cos, sin, L, hq, hk,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2), c_sb, cos.stride(1),
            HALF=half, BLOCK_D=triton.next_power_of_2(half), BLOCK_H=block_h, BACKWARD=backward,
            ROUND=round_products, num_warps=1 if block_h * half <= 256 else (2 if block_h * half <= 1024 else 4),
            enable_fp_fusion=False,
        )
    return qo, ko


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, round_products: bool):
        ctx.save_for_backward(cos, sin)
        ctx.round_products = round_products
        return _launch(q, k, cos, sin, False, round_products)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq, gk):  # an output that does not reach the loss arrives as zeros (materialized grads)
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(gq, gk, cos, sin, True, ctx.round_products)
        return dq, dk, None, None, None


def rotary_triton(q, k, cos, sin):
    """Same contract as :func:`rotary_ref`: (q, k) rotated, each in q's dtype."""
    if (cos.shape[-1] != q.shape[-1] or q.shape[-1] % 2 or k.dtype != q.dtype or k.shape[-1] != q.shape[-1]
            or cos.shape != sin.shape or cos.stride(-1) != 1 or sin.stride() != cos.stride()
            or cos.shape[0] not in (1, q.shape[0]) or cos.requires_grad or sin.requires_grad):
        return rotary_ref(q, k, cos, sin)  # partial rotary, odd layouts, trainable tables: the reference
    compute = torch.promote_types(q.dtype, cos.dtype)
    round_products = compute in (torch.bfloat16, torch.float16)
    return _Rotary.apply(q, k, cos, sin, round_products)


def _check_rotary(gen):
    """Largest relative error against the reference: float32 math (autocast) and bf16 math, with gradients."""
    from mamballama_cli.ops.common import _rel

    errs = []
    for q_dtype, tab_dtype in ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                               (torch.float32, torch.float32)):
        b, hq, hk, L, D = 2, 6, 2, 37, 64
        q = torch.randn(b, L, hq, D, generator=gen, device="cuda").to(q_dtype).transpose(1, 2)
        k = torch.randn(b, L, hk, D, generator=gen, device="cuda").to(q_dtype).transpose(1, 2)
        ang = torch.rand(1, L, D // 2, generator=gen, device="cuda") * 6
        cos, sin = torch.cat([ang.cos()] * 2, -1).to(tab_dtype), torch.cat([ang.sin()] * 2, -1).to(tab_dtype)
        gq = torch.randn(b, hq, L, D, generator=gen, device="cuda").to(q_dtype)
        gk = torch.randn(b, hk, L, D, generator=gen, device="cuda").to(q_dtype)
        res = []
        for fn in (rotary_triton, rotary_ref):
            qi, ki = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
            with torch.enable_grad():
                qo, ko = fn(qi, ki, cos, sin)
                dq, dk = torch.autograd.grad((qo.float() * gq.float()).sum() + (ko.float() * gk.float()).sum(),
                                             (qi, ki))
            res.append((qo, ko, dq, dk))
        errs += [_rel(a.detach(), r.detach()) for a, r in zip(*res)]
        if res[0][0].dtype != res[1][0].dtype:
            return float("inf")
    return max(errs)


def _register() -> None:
    from mamballama_cli.ops.common import _probe

    ops.register_fast("rotary", "mamballama-triton", rotary_triton, _probe(_check_rotary, tol=1e-2))


_register()
