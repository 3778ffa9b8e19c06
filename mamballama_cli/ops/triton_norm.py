"""Llama's RMSNorm for training and prefill on CUDA: a Triton forward and backward with the output cast fused.

Reference: :func:`mamballama_cli.ops.norm.rmsnorm_ref` (normalise in float32, round to the input dtype, scale by
the weight; the result in the promoted dtype of input and weight). Under autocast the residual stream is float32
and the norm's consumers are projections that autocast feeds in bfloat16, so the model asks for the output in
that dtype (``out_dtype``): the kernel writes it directly instead of a float32 tensor and a cast.

In mamba_ssm's fused norm, the model's default for its RMSNorm on CUDA, the backward computes the weight gradient
with few programs and takes about 4x its memory-bound time on an H200 (docs/benchmarks.md). Here the backward runs a
fixed grid of programs that each stride over tiles of rows and keep a float32 partial sum of the weight gradient,
reduced by one ``sum`` at the end:

    x_hat = x * rstd,   dx = rstd * (w * dy - x_hat * mean(x_hat * w * dy)),   dw = sum_rows dy * x_hat

Importing this module registers the kernel for ``rmsnorm`` on CUDA ahead of mamba_ssm's (``ops.FAST_MODULES``),
**off by default** (``MAMBALLAMA_TRITON_NORM=1`` turns it on; its probe then checks the forward and backward on a
random input before first use). It passes ``tests/test_gpu_ops.py::test_rmsnorm_forward_backward``; whether a
distillation step is faster with it is in docs/benchmarks.md.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from mamballama_cli import ops
from mamballama_cli.ops.common import _device_guard
from mamballama_cli.ops.norm import rmsnorm_ref

MAX_N = 16384  # one row per program in registers; wider rows use the next backend


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, M, N, x_s, y_s, eps, BLOCK_N: tl.constexpr, ROUND_X: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * x_s + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    h = x * rstd
    if ROUND_X:  # the reference rounds the normalised input to the input dtype before the weight
        h = h.to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * y_s + cols, (h * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd_kernel(X, W, DY, RSTD, DX, DWP, M, N, x_s, dy_s, dx_s, tiles_per_program,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program pid takes the tiles of BLOCK_M consecutive rows numbered pid * tiles_per_program + i: whole tiles keep
    # several rows' loads in flight at once (one row at a time left the loop waiting on memory latency).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, tiles_per_program):
        rows = (pid * tiles_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M  # the last tiles may run past M
        m = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * x_s + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * dy_s + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        x_hat = x * rstd[:, None]
        wdy = w[None, :] * dy
        c = tl.sum(x_hat * wdy, axis=1) / N
        tl.store(DX + rows[:, None] * dx_s + cols[None, :],
                 (rstd[:, None] * (wdy - x_hat * c[:, None])).to(DX.dtype.element_ty), mask=m)
        dw += dy * x_hat
    tl.store(DWP + pid * N + cols, tl.sum(dw, axis=0), mask=cmask)


def _programs(device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # Triton's interpreter on CPU: few programs, so each strides over several tiles in the tests


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype):
        shape = x.shape
        N = shape[-1]
        x2 = x.reshape(-1, N)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M = x2.shape[0]
        y = torch.empty(M, N, dtype=out_dtype, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        w = weight.contiguous()
        if M:
            with _device_guard(x):
                _rms_fwd_kernel[(M,)](x2, w, y, rstd, M, N, x2.stride(0), y.stride(0), float(eps),
                                      BLOCK_N=triton.next_power_of_2(N), ROUND_X=x.dtype != torch.float32,
                                      num_warps=4 if N <= 4096 else 8)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape, ctx.x_dtype = shape, x.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(M, N)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty(M, N, dtype=ctx.x_dtype, device=x2.device)
        block_n = triton.next_power_of_2(N)
        block_m = max(1, min(16, 4096 // block_n))
        tiles = triton.cdiv(M, block_m)
        programs = max(1, min(_programs(x2.device), tiles))
        per = triton.cdiv(tiles, programs) if M else 0
        dwp = torch.zeros(programs, N, dtype=torch.float32, device=x2.device)
        if M:
            with _device_guard(x2):
                _rms_bwd_kernel[(programs,)](x2, w, dy2, rstd, dx, dwp, M, N, x2.stride(0), dy2.stride(0),
                                             dx.stride(0), per, BLOCK_M=block_m, BLOCK_N=block_n,
                                             num_warps=4 if block_m * block_n <= 4096 else 8)
        return dx.view(ctx.shape), dwp.sum(0).to(w.dtype), None, None


def rmsnorm_triton(x, weight, eps, out_dtype=None):
    """Same contract as :func:`rmsnorm_ref` (``out_dtype``: the result's dtype, default the promoted one)."""
    if x.shape[-1] > MAX_N:
        return rmsnorm_ref(x, weight, eps, out_dtype)
    out_dtype = out_dtype or torch.promote_types(x.dtype, weight.dtype)
    return _RMSNorm.apply(x, weight, float(eps), out_dtype)


def _probe() -> tuple[bool, str]:
    if os.environ.get("MAMBALLAMA_TRITON_NORM") != "1":
        return False, ("off by default (not faster than mamba_ssm's in a whole step); "
                       "MAMBALLAMA_TRITON_NORM=1 turns it on")
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 5, 300, generator=gen, device="cuda", requires_grad=True)
    w = (1 + 0.1 * torch.randn(300, generator=gen, device="cuda")).requires_grad_(True)
    g = torch.randn(3, 5, 300, generator=gen, device="cuda")
    out = rmsnorm_triton(x, w, 1e-5)
    gx, gw = torch.autograd.grad((out * g).sum(), (x, w))
    xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = rmsnorm_ref(xr, wr, 1e-5)
    rx, rw = torch.autograd.grad((ref * g.double()).sum(), (xr, wr))
    errs = [float((a.double() - b).norm() / b.norm()) for a, b in ((out, ref), (gx, rx), (gw, rw))]
    err = max(errs) if all(math.isfinite(e) for e in errs) else float("inf")  # max() would drop a NaN
    if not err < 1e-5:
        return False, f"wrong result on a probe input (relative error {err:.2e}, forward and backward)"
    return True, f"ok (probe relative error {err:.1e}, forward and backward)"


ops.register_fast("rmsnorm", "mamballama-triton", rmsnorm_triton, _probe)
