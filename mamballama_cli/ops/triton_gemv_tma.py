"""A verify window's GEMV with the weight tile loaded by TMA (Hopper's tensor copy engine): an experiment, not yet
registered as an op nor chosen by any dispatch; ``benchmarks/gemv_tma.py`` times it against cuBLAS, the five-row
kernel of ops/triton_gemv.py and its one-row kernel. Reference: ``F.linear`` (ops/decode.py's ``gemv_ref``), and
with ``glu`` ``silu(gate) * up`` of [gate; up] (ops/decode.py's ``gemv_swiglu_ref``).

Why: at five rows (a verify window of 5 tokens at batch 1) the skinny kernels read the 8B shape's weights at about
3.55-3.8 TB/s on an H200, the one-row kernel at 3.9-4.1. A GEMV is bound by the bytes it keeps in flight; the
skinny kernels issue their weight loads from every thread, through registers. Here each K tile of the weight is one
TMA copy from a host-side ``TensorDescriptor`` into shared memory, issued by one thread, so that a few warps keep
``num_stages - 1`` tiles in flight through the software pipeline while the tensor cores take the last one. The rows
are padded by the descriptor's zero fill (the box is PAD rows, x has M), and so are a last partial K tile and a
last partial block of outputs: no masks on the loads, only on the store.

Two modes, as the skinny kernel's dot modes: ``tma``, the rows as tl.dot's M, padded to 16 (an m16n8k16 product's
M); ``tmaw``, the weight tile as tl.dot's first operand (the outputs as its M) and the rows as its N, padded to 8.
(On an H100, triton 3.6 built both with TMA copies, ``cp.async.bulk.tensor``, and ``mma.sync``, no wgmma.)
With ``glu`` the weight is [gate; up] (2N x K), each program loads its gate rows and the up rows N further into a
second accumulator, and the SwiGLU is the epilogue (ops/triton_gemv_tiles.py's ``_glu``, in the roundings of the
ops apart).
"""

from __future__ import annotations

import torch

from mamballama_cli.ops.common import _device_guard, _needs_grad

try:
    import triton
    import triton.language as tl

    try:  # the host-side descriptor: missing in an old triton, and then no kernel here
        from triton.tools.tensor_descriptor import TensorDescriptor
    except Exception:  # noqa: BLE001  # pragma: no cover - depends on the triton
        TensorDescriptor = None
except Exception:  # noqa: BLE001  # pragma: no cover - depends on the machine
    triton = tl = TensorDescriptor = None

TMA_AVAILABLE = TensorDescriptor is not None
# mode -> (PAD: the rows as the box's and tl.dot's padded dimension, OUTPUTS_FIRST: the weight tile as tl.dot's
# first operand)
TMA_MODES = {"tma": (16, False), "tmaw": (8, True)}
# (BLOCK_N, BLOCK_K, num_warps, num_stages, mode): the candidates benchmarks/gemv_tma.py times, each run by the CPU
# tests under the interpreter. Every box dimension <= 256 (TMA's limit) and every tile's buffers under SMEM_BUDGET
# with GLU too (stage_bytes).
TMA_TILES = ((16, 256, 4, 4, "tma"), (16, 256, 4, 6, "tma"), (32, 128, 4, 4, "tma"), (32, 128, 4, 6, "tma"),
             (32, 256, 4, 4, "tma"), (64, 128, 4, 4, "tma"), (64, 128, 4, 6, "tma"), (16, 128, 4, 8, "tma"),
             (32, 64, 4, 8, "tma"),
             (64, 128, 4, 4, "tmaw"), (64, 128, 4, 6, "tmaw"), (64, 256, 4, 3, "tmaw"), (128, 64, 4, 6, "tmaw"),
             (128, 128, 4, 4, "tmaw"), (64, 64, 4, 8, "tmaw"))
SMEM_BUDGET = 200 << 10  # bytes of shared memory a tile's stages may take (an sm90 block gets at most 227 KB)
MAX_ROWS = 8  # the rows one call may hold (tmaw's PAD)

if TMA_AVAILABLE:
    from mamballama_cli.ops.triton_gemv_tiles import _glu

    @triton.jit
    def _tma_gemv_kernel(x_desc, w_desc, Y, M, N, K, stride_ym, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PAD: tl.constexpr, OUTPUTS_FIRST: tl.constexpr, GLU: tl.constexpr):
        # Program i owns outputs [i * BLOCK_N, (i + 1) * BLOCK_N). x_desc: the rows, a (PAD x BLOCK_K) box over
        # (M x K); w_desc: a (BLOCK_N x BLOCK_K) box over the weight (N x K, GLU: 2N x K with N the outputs). Past M
        # rows, past K columns and past the weight's last row the boxes read zeros, so the loads take no masks, and
        # the pipeliner turns them into TMA copies num_stages deep.
        n0 = tl.program_id(0) * BLOCK_N
        if OUTPUTS_FIRST:  # (outputs x rows), transposed once after the loop
            acc = tl.zeros((BLOCK_N, PAD), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N, PAD), dtype=tl.float32)  # GLU only (otherwise never touched)
        else:
            acc = tl.zeros((PAD, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((PAD, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([0, k0])
            w = w_desc.load([n0, k0])
            if OUTPUTS_FIRST:
                acc = tl.dot(w, tl.trans(x), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
            if GLU:  # the up rows, N further (a gate block past N reads up rows: those outputs are not stored)
                u = w_desc.load([N + n0, k0])
                if OUTPUTS_FIRST:
                    acc_u = tl.dot(u, tl.trans(x), acc_u)
                else:
                    acc_u = tl.dot(x, tl.trans(u), acc_u)
        if OUTPUTS_FIRST:
            acc = tl.trans(acc)
            acc_u = tl.trans(acc_u)
        if GLU:
            acc = _glu(acc, acc_u, Y)
        rows = tl.arange(0, PAD)
        outs = n0 + tl.arange(0, BLOCK_N)
        tl.store(Y + rows[:, None] * stride_ym + outs[None, :], acc.to(Y.dtype.element_ty),
                 mask=(rows < M)[:, None] & (outs < N)[None, :])


def stage_bytes(tile: tuple, glu: bool = False, itemsize: int = 2) -> int:
    """Shared memory a tile's loads take: num_stages - 1 buffers (triton 3.6's pipeliner; the compiled kernels'
    ``shared`` was this plus a few barriers on an H100) of the weight tile (two with ``glu``) and the rows' box, each
    BLOCK_K wide, at ``itemsize`` bytes an element."""
    bn, bk, _, stages, mode = tile
    return (stages - 1) * ((2 if glu else 1) * bn + TMA_MODES[mode][0]) * bk * itemsize


def tma_supported(x, weight) -> bool:
    """Whether :func:`gemv_tma` runs on these arguments: triton with host-side descriptors, x and the weight bf16
    or fp16 of one dtype, a contiguous 2-D weight on a 16-byte boundary (TMA's base), 1 to :data:`MAX_ROWS` rows,
    rows of a multiple of 16 bytes (TMA's strides), and no autograd."""
    if not (TMA_AVAILABLE and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype):
        return False
    if weight.dim() != 2 or not weight.is_contiguous() or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return False
    K = weight.shape[1]
    return (K > 0 and 1 <= x.numel() // K <= MAX_ROWS and (K * x.element_size()) % 16 == 0
            and weight.data_ptr() % 16 == 0 and not _needs_grad(x, weight))


def gemv_tma(x, weight, config: tuple, glu: bool = False):
    """x (..., K) @ weight (N, K)^T -> (..., N) by the TMA kernel with the tile ``config`` (an entry of
    :data:`TMA_TILES`), in x's dtype. ``glu``: weight is [gate; up] (2N, K) and the result silu(gate . x) *
    (up . x) (..., N). The caller checks :func:`tma_supported`; the descriptors assert what it checks."""
    bn, bk, warps, stages, mode = config
    if mode not in TMA_MODES:
        raise ValueError(f"the TMA GEMV takes a tile of mode {' or '.join(TMA_MODES)}, not {mode!r}")
    pad, outputs_first = TMA_MODES[mode]
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if x2.data_ptr() % 16:  # a view at an odd offset: TMA reads from a 16-byte boundary
        x2 = x2.clone()
    M = x2.shape[0]
    if M > pad:
        raise ValueError(f"the TMA GEMV's mode {mode} takes at most {pad} rows, not {M}")
    if glu:
        if N % 2:
            raise ValueError(f"the SwiGLU TMA GEMV takes [gate; up], an even number of weight rows, not {N}")
        N //= 2
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    x_desc = TensorDescriptor.from_tensor(x2, [pad, bk])
    w_desc = TensorDescriptor.from_tensor(weight, [bn, bk])
    with _device_guard(x):
        _tma_gemv_kernel[(triton.cdiv(N, bn),)](x_desc, w_desc, y, M, N, K, y.stride(0), BLOCK_N=bn, BLOCK_K=bk,
                                                 PAD=pad, OUTPUTS_FIRST=outputs_first, GLU=bool(glu),
                                                 num_warps=warps, num_stages=stages)
    return y.view(*x.shape[:-1], N)
