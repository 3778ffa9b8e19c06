"""The linears of a batch-1 decode or verify step as Triton GEMV kernels (``gemv``; reference in
:mod:`mamballama_cli.ops.decode`: ``F.linear``).

A batch-1 decode step is mostly GEMVs: one token times each weight, read once from memory, and a verify step is
the same with K+1 tokens. For the tall weights (``out_proj``, ``o_proj``, ``down_proj`` of the 8B shape) cuBLAS
splits the reduction over K and adds a kernel that sums the pieces; here one program owns a block of outputs and
walks the whole of K, reading each weight byte once: no second kernel. The wide weights are offered to the same
kernels; for every shape the per-shape timing against cuBLAS decides.

* one row (``_gemv_kernel``): ``BLOCK_N x BLOCK_K`` float32 products accumulated, reduced once at the end (with
  ``GLU``, [gate; up] and the SwiGLU in the epilogue: ops/triton_gemv_swiglu.py);
* 2 to :data:`MAX_ROWS` rows (``_skinny_kernel``, a verify window or a small batch), the weight tile read once for
  all of them, in one of three modes (the autotuner picks): ``dot``, the rows padded to 16 and ``tl.dot`` with a
  float32 accumulator; ``acc``, as the one-row kernel does it, a (rows x BLOCK_N x BLOCK_K) float32 accumulator of the
  products, summed over K once at the end (no cross-thread reduction inside the loop), the rows in two
  power-of-two groups (5 = 4 + 1) so that padding rows cost no products; ``dotw``, the weight tile as tl.dot's
  first operand and the rows padded to 8.

The launcher takes only what it is built for: at most :data:`MAX_ROWS` rows (all leading dimensions together),
bf16 or fp16, x and the weight of one dtype, a weight with unit stride along K, and no autograd. Anything else
goes to ``F.linear`` (cuBLAS), which is also what ``--kernels ref:gemv`` forces: the A/B of these kernels. On the
first call of a shape (a static decoder's warm-up, before its graph is recorded) the block sizes are autotuned and
the tuned kernel is timed against cuBLAS; the faster serves that shape from then on (:data:`CHOICES`). Where the
kernel won, on Hopper and later, it is timed once more launched with programmatic dependent launch (``pdl``: it may
start while the kernel before it finishes; it loads its first weight tile, which no kernel writes, before
``gdc_wait``, and the one-row kernel keeps its next tile in flight), behind the norm kernel that precedes a
projection in a step, and that launch serves the shape if faster (:data:`PDL_CHOICES`). The decode step's small
kernels (ops/triton_decode.py) let such a successor start as soon as they do. Importing this module registers the
kernels on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamballama_cli import ops
from mamballama_cli.ops import decode as _decode_refs  # registers the decode ops' references (gemv among them)
from mamballama_cli.ops.common import GDC, _device_guard, _gdc_on, _needs_grad, _probe, _rand, _rel
# the candidates, also read here by the tests and tools
from mamballama_cli.ops.gemv_candidates import CONFIGS, DTYPES, GLU_MODES, GLU_TILES, MAX_ROWS, MODES, SKINNY
from mamballama_cli.ops.gemv_candidates import DOT_MODES, EXTRA, MODES_PLAIN, PAIRED_TILES, _row_split, row_groups  # noqa: F401
from mamballama_cli.ops.gemv_candidates import tile_name, tuned_tiles  # noqa: F401
from mamballama_cli.ops import tuning
from mamballama_cli.ops.graph_timing import chosen, graph_ab_us, retiled, shape_report

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the machine; the probe says why (ops/common.py)
    triton = tl = None

if triton is not None:
    from mamballama_cli.ops.common import _grid_wait  # a no-op under the interpreter, which runs the pdl code too
    from mamballama_cli.ops.triton_gemv_tiles import _dot_step, _first_tiles, _glu, _tiles, _x_tile

    DOT_ROWS = tl.constexpr(16)  # the dot mode's rows, padded to 16 (an m16n8k16 product's M)
    WIDE_ROWS = tl.constexpr(8)  # the dotw mode's rows, padded to 8 (its N): MAX_ROWS

    @triton.jit
    def _gemv_kernel(X, W, BIAS, Y, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr, GLU: tl.constexpr = False):
        # GLU: W is [gate; up] (2N x K) and the output silu(gate . x) * (up . x) (N): each program takes its gate
        # rows and the up rows N further, a second accumulator, and the SwiGLU in its epilogue, in the roundings of
        # the ops apart (each projection, then silu, then the product, rounded to the output's dtype)
        y, rows, live = _gemv_block(X, W, BIAS, Y, N, K, stride_wn, HAS_BIAS, BLOCK_N, BLOCK_K, EVEN_K, PDL, GLU)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=live)

    @triton.jit
    def _gemv_block(X, W, BIAS, Y, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr, GLU: tl.constexpr):
        # The one-row kernel up to its store: (outputs in float32, rows, live); also ops/triton_gemv_conv.py's body
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < N
        rows_read = tl.where(live, rows, 0)  # a last partial block reads row 0 for its dead rows, stores nothing
        cols = tl.arange(0, BLOCK_K)
        w_ptrs = W + rows_read[:, None].to(tl.int64) * stride_wn + cols[None, :]
        u_ptrs = W + (rows_read + N)[:, None].to(tl.int64) * stride_wn + cols[None, :]  # GLU: the up rows
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # GLU only (otherwise never touched)
        if PDL:  # launched beside the kernel before it: the first weight tile now, x once that kernel is done
            if EVEN_K:
                w = tl.load(w_ptrs)
                u = w
                if GLU:
                    u = tl.load(u_ptrs)
            else:
                w = tl.load(w_ptrs, mask=(cols < K)[None, :], other=0.0)
                u = w
                if GLU:
                    u = tl.load(u_ptrs, mask=(cols < K)[None, :], other=0.0)
            _grid_wait()
            for k0 in range(0, K, BLOCK_K):  # the next weight tile in flight while this one is summed
                if EVEN_K:
                    x = tl.load(X + k0 + cols)
                else:
                    x = tl.load(X + k0 + cols, mask=k0 + cols < K, other=0.0)
                following = (k0 + BLOCK_K + cols < K)[None, :]
                w_next = tl.load(w_ptrs + k0 + BLOCK_K, mask=following, other=0.0)
                acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
                w = w_next
                if GLU:
                    u_next = tl.load(u_ptrs + k0 + BLOCK_K, mask=following, other=0.0)
                    acc_u += u.to(tl.float32) * x.to(tl.float32)[None, :]
                    u = u_next
        else:
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:  # no mask on the hot loads
                    w = tl.load(w_ptrs + k0)
                    x = tl.load(X + k0 + cols)
                    if GLU:
                        acc_u += tl.load(u_ptrs + k0).to(tl.float32) * x.to(tl.float32)[None, :]
                else:
                    inside = k0 + cols < K
                    w = tl.load(w_ptrs + k0, mask=inside[None, :], other=0.0)
                    x = tl.load(X + k0 + cols, mask=inside, other=0.0)
                    if GLU:
                        u = tl.load(u_ptrs + k0, mask=inside[None, :], other=0.0)
                        acc_u += u.to(tl.float32) * x.to(tl.float32)[None, :]
                acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(BIAS + rows_read).to(tl.float32)
        if GLU:
            up = tl.sum(acc_u, axis=1)
            if HAS_BIAS:
                up += tl.load(BIAS + N + rows_read).to(tl.float32)
            y = _glu(y, up, Y)
        return y, rows, live

    @triton.jit
    def _acc_rows(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym, RA: tl.constexpr, RB: tl.constexpr,
                  RBP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr):
        # The acc mode: rows 0 .. RA - 1 and RA .. RA + RB - 1 (those below M; RB may be 0) against this program's
        # block of outputs (RBP: RB, at least 1), each weight tile loaded once for both groups; the products
        # accumulated in float32 (rows x BLOCK_N x BLOCK_K) tiles, summed over K once after the loop, as one row.
        outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live_n = outs < N
        outs_read = tl.where(live_n, outs, 0)
        cols = tl.arange(0, BLOCK_K)
        ra = tl.arange(0, RA)
        rb = RA + tl.arange(0, RBP)
        live_a, live_b = ra < M, rb < M
        xa_ptrs = X + ra[:, None] * stride_xm + cols[None, :]
        xb_ptrs = X + rb[:, None] * stride_xm + cols[None, :]
        w_ptrs = W + outs_read[:, None].to(tl.int64) * stride_wn + cols[None, :]
        acc_a = tl.zeros((RA, BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_b = tl.zeros((RBP, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xa, w = _tiles(xa_ptrs, w_ptrs, k0, cols, K, live_a, EVEN_K)
            wf = w.to(tl.float32)[None, :, :]
            acc_a += xa.to(tl.float32)[:, None, :] * wf
            if RB > 0:
                acc_b += _x_tile(xb_ptrs, k0, cols, K, live_b, EVEN_K).to(tl.float32)[:, None, :] * wf
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(BIAS + outs_read).to(tl.float32)
        ya = tl.sum(acc_a, axis=2) + bias[None, :]
        tl.store(Y + ra[:, None] * stride_ym + outs[None, :], ya.to(Y.dtype.element_ty),
                 mask=live_a[:, None] & live_n[None, :])
        if RB > 0:
            yb = tl.sum(acc_b, axis=2) + bias[None, :]
            tl.store(Y + rb[:, None] * stride_ym + outs[None, :], yb.to(Y.dtype.element_ty),
                     mask=live_b[:, None] & live_n[None, :])

    @triton.jit
    def _dot_rows(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, HAS_BIAS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, OUTPUTS_FIRST: tl.constexpr,
                  GLU: tl.constexpr, PDL: tl.constexpr, PAIRED: tl.constexpr = False):
        # The dot modes: the rows times this program's block of outputs on tensor cores, float32 accumulator. dot:
        # the rows as tl.dot's M, padded to DOT_ROWS = 16. dotw (OUTPUTS_FIRST): the weight tile as tl.dot's first
        # operand (the outputs as its M) and the rows as its N, padded to WIDE_ROWS = 8 only (an m16n8k16 product's
        # N); its accumulator is transposed once, after the loop. GLU: W is [gate; up] (2N x K); the up rows N
        # further go into a second accumulator, and the SwiGLU is the epilogue, as in the one-row kernel; with
        # PAIRED (the dotp and dotwp modes), one weight tile of 2 x BLOCK_N rows instead, each gate row beside its
        # up row, so that the loop is the plain GEMV's (one load, one product a K tile), and the accumulator is
        # split into gate and up in the epilogue. PDL: the first K tile before the loop, its weights loaded before
        # the grid wait (_first_tiles).
        PAD: tl.constexpr = WIDE_ROWS if OUTPUTS_FIRST else DOT_ROWS
        TWO: tl.constexpr = GLU and not PAIRED  # a second accumulator for the up rows
        WN: tl.constexpr = 2 * BLOCK_N if PAIRED else BLOCK_N  # the weight tile's rows
        outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live_n = outs < N
        outs_read = tl.where(live_n, outs, 0)
        rows = tl.arange(0, PAD)
        live_m = rows < M
        cols = tl.arange(0, BLOCK_K)
        x_ptrs = X + rows[:, None] * stride_xm + cols[None, :]
        if PAIRED:  # weight-tile row 2i is output i's gate row, 2i + 1 its up row (N further)
            lane = tl.arange(0, WN)
            paired = tl.program_id(0) * BLOCK_N + lane // 2
            w_rows = tl.where(paired < N, paired, 0) + (lane % 2) * N
        else:
            w_rows = outs_read
        w_ptrs = W + w_rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
        u_ptrs = W + (outs_read + N)[:, None].to(tl.int64) * stride_wn + cols[None, :]  # TWO: the up rows
        if OUTPUTS_FIRST:  # (outputs x rows), transposed once after the loop
            acc = tl.zeros((WN, PAD), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N, PAD), dtype=tl.float32)  # TWO only (otherwise never touched)
        else:
            acc = tl.zeros((PAD, WN), dtype=tl.float32)
            acc_u = tl.zeros((PAD, BLOCK_N), dtype=tl.float32)
        start = 0
        if PDL:
            x, w, u = _first_tiles(x_ptrs, w_ptrs, u_ptrs, cols, K, live_m, EVEN_K, TWO)
            acc, acc_u = _dot_step(acc, acc_u, x, w, u, u_ptrs, 0, cols, K, EVEN_K, OUTPUTS_FIRST, TWO, False)
            start = BLOCK_K
        for k0 in range(start, K, BLOCK_K):
            x, w = _tiles(x_ptrs, w_ptrs, k0, cols, K, live_m, EVEN_K)
            acc, acc_u = _dot_step(acc, acc_u, x, w, w, u_ptrs, k0, cols, K, EVEN_K, OUTPUTS_FIRST, TWO, True)
        if OUTPUTS_FIRST:
            acc = tl.trans(acc)
            acc_u = tl.trans(acc_u)
        if HAS_BIAS:
            acc += tl.load(BIAS + w_rows).to(tl.float32)[None, :]
            if TWO:
                acc_u += tl.load(BIAS + N + outs_read).to(tl.float32)[None, :]
        if PAIRED:  # (rows x 2 BLOCK_N) -> gate (even columns) and up (odd)
            acc, acc_u = tl.split(tl.reshape(acc, (PAD, BLOCK_N, 2)))
        if GLU:
            acc = _glu(acc, acc_u, Y)
        return acc, rows, outs, live_m[:, None] & live_n[None, :]  # stored by the caller (a conv epilogue may follow)

    @triton.jit
    def _skinny_kernel(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, MODE: tl.constexpr,
                       ROWS_A: tl.constexpr, ROWS_B: tl.constexpr, ROWS_BP: tl.constexpr,
                       PDL: tl.constexpr, GLU: tl.constexpr = False):
        # MODE: 0 dot (the rows padded to DOT_ROWS), 1 acc (the rows as ROWS_A, the largest power of two <= M,
        # then ROWS_B >= the rest, 0 if none: 5 rows are 4 + 1, so no product is spent on a padding row where it
        # can be helped; one weight load serves both groups), 2 dotw (_dot_rows); with GLU, 3 dotp and 4 dotwp, the
        # dot and dotw modes over paired gate and up rows (_dot_rows' PAIRED). GLU: the dot modes only.
        # PDL: launched beside the kernel before it, it waits for it before loading x (acc: before any load).
        if MODE == 1:
            if PDL:
                _grid_wait()
            _acc_rows(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym, ROWS_A, ROWS_B, ROWS_BP, HAS_BIAS,
                      BLOCK_N, BLOCK_K, EVEN_K)
        else:
            acc, rows, outs, live = _dot_rows(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, HAS_BIAS, BLOCK_N,
                                              BLOCK_K, EVEN_K, (MODE == 2) | (MODE == 4), GLU, PDL, MODE >= 3)
            tl.store(Y + rows[:, None] * stride_ym + outs[None, :], acc.to(Y.dtype.element_ty), mask=live)

    _even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
    _rows_k = _even_k(triton.heuristics({name: (lambda a, name=name: row_groups(a["M"], a["MODE"])[name])
                                         for name in ("ROWS_A", "ROWS_B", "ROWS_BP")})(_skinny_kernel))
    # several rows; and with GLU=True, tuned apart, over the dot modes' tiles and the paired ones (GLU_TILES)
    _skinny_tuned, _skinny_glu_tuned = (triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k, "MODE": MODES[mode]}, num_warps=w, num_stages=st)
                 for n, k, w, st, mode in tiles],
        key=["M", "N", "K"],  # the pdl form runs the plain form's tuned tiles: it is timed only where those won
    )(_rows_k) for tiles in (SKINNY, GLU_TILES))
    # one row; and the same kernel with GLU=True, tuned apart (two weight tiles in flight)
    _gemv_tuned, _gemv_glu_tuned = (triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in CONFIGS],
        key=["N", "K"])(_even_k(_gemv_kernel)) for _ in range(2))
    for _name, _tuner in (("gemv", _gemv_tuned), ("gemv_glu", _gemv_glu_tuned), ("gemv_rows", _skinny_tuned),
                          ("gemv_rows_glu", _skinny_glu_tuned)):
        tuning.register_tuner(_name, _tuner)


def _rows(x, weight) -> int:
    return x.numel() // max(1, weight.shape[1])


def gemv_supported(x, weight, bias=None) -> bool:
    """Whether :func:`gemv_triton` runs a kernel on these arguments (else it calls ``F.linear``)."""
    return (x.dim() >= 2 and x.dtype in DTYPES and weight.dtype == x.dtype and weight.dim() == 2
            and x.shape[-1] == weight.shape[1] and 1 <= _rows(x, weight) <= MAX_ROWS
            and weight.stride(1) == 1
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
            and not _needs_grad(x, weight, bias))


def gemv_launch(x, weight, bias=None, config: tuple | None = None, pdl: bool = False, glu: bool = False):
    """x (..., K) @ weight (N, K)^T + bias -> (..., N), by the kernel for its number of rows: autotuned, or with
    ``config`` given (an entry of :data:`CONFIGS` for one row, of :data:`SKINNY` for more: the interpreter tests
    run each candidate this way). ``pdl``: the kernel's programmatic-dependent-launch form, launched so (on CUDA).
    ``glu``: weight is [gate; up] (2N, K) and the result silu(gate . x) * (up . x) (..., N), the SwiGLU in the
    kernel's epilogue (:func:`gemv_swiglu_triton`; several rows: the dot modes' tiles and the paired ones,
    :data:`GLU_TILES`)."""
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if glu:
        if N % 2:
            raise ValueError(f"the SwiGLU GEMV takes [gate; up], an even number of outputs, not {N}")
        if M > 1 and config is not None and config[-1] not in GLU_MODES:
            raise ValueError(f"the SwiGLU GEMV at several rows takes a tile of mode {' or '.join(GLU_MODES)}, not "
                             f"{config[-1]!r}")
        N //= 2
    elif M > 1 and config is not None and config[-1] not in MODES_PLAIN:
        raise ValueError(f"the GEMV without the SwiGLU takes a tile of mode {' or '.join(MODES_PLAIN)}, not "
                         f"{config[-1]!r}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else weight
    launch = dict(HAS_BIAS=bias is not None, PDL=bool(pdl), **({"GLU": True} if glu else {}))
    if pdl and GDC:
        launch["launch_pdl"] = True
    with _device_guard(x):
        if M == 1:
            args = (x2, weight, b, y, N, K, weight.stride(0))
            if config is None:
                tuner = _gemv_glu_tuned if glu else _gemv_tuned
                tuner[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **launch)
            else:
                bn, bk, warps = config
                _gemv_kernel[(triton.cdiv(N, bn),)](*args, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0,
                                                    num_warps=warps, **launch)
        else:
            args = (x2, weight, b, y, M, N, K, x2.stride(0), weight.stride(0), y.stride(0))
            if config is None:
                tuner = _skinny_glu_tuned if glu else _skinny_tuned
                tuner[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **launch)
            else:
                bn, bk, warps, stages, mode = config
                _skinny_kernel[(triton.cdiv(N, bn),)](*args, BLOCK_N=bn, BLOCK_K=bk,
                                                      EVEN_K=K % bk == 0, MODE=MODES[mode],
                                                      **row_groups(M, MODES[mode]),
                                                      num_warps=warps, num_stages=stages, **launch)
    return y.view(*x.shape[:-1], N)


# (rows, N, K, dtype, device index) -> whether the kernel serves that shape (timed against cuBLAS on first use).
CHOICES: dict[tuple, bool] = {}
# The same keys -> the timings behind each choice: microseconds per call of the kernel and of cuBLAS, and how they
# were taken ("graph" or "do_bench"; see _kernel_is_faster). The speed benchmarks report them.
TIMINGS: dict[tuple, dict] = {}
# The same keys -> whether the kernel, where it serves the shape, is launched with programmatic dependent launch.
PDL_CHOICES: dict[tuple, bool] = {}
tuning.register_choices("gemv", CHOICES)
tuning.register_choices("gemv_pdl", PDL_CHOICES)
PDL = True  # False: the pdl form is never tried (benchmarks/speed.py --no-pdl, the A/B of that launch over a step)
# The kernel keeps a tall shape unless it is timed this much slower than cuBLAS (a wide one: unless slower at all),
# and only where the graph timing failed and do_bench's was used (why: docs/gpu.md, "How SKINNY came to be").
MARGIN = 1.10


def _timings(x, weight, bias) -> dict:
    """Kernel and cuBLAS, microseconds per call on these arguments: :func:`graph_ab_us`; if that cannot be done
    (memory, capture), triton's ``do_bench`` on the one weight (median of repetitions, L2 flushed between them)."""
    try:
        ours, theirs, copies = graph_ab_us(lambda w: gemv_launch(x, w, bias), lambda w: F.linear(x, w, bias), weight)
        return {"kernel_us": ours, "cublas_us": theirs, "how": "graph", "copies": copies}
    except Exception as exc:  # noqa: BLE001 - any failure here still leaves a fair (if noisier) timing
        from triton.testing import do_bench

        torch.cuda.synchronize(x.device)
        ours = do_bench(lambda: gemv_launch(x, weight, bias), warmup=5, rep=40, return_mode="median")
        theirs = do_bench(lambda: F.linear(x, weight, bias), warmup=5, rep=40, return_mode="median")
        return {"kernel_us": 1000.0 * ours, "cublas_us": 1000.0 * theirs, "how": "do_bench",
                "why": f"{type(exc).__name__}: {str(exc)[:120]}"}


def _kernel_is_faster(x, weight, bias, key=None) -> bool:
    """Check the autotuned kernel against ``F.linear`` on these arguments, then time both (:func:`_timings`):
    whether the kernel agrees and is faster, or, for a tall weight (where cuBLAS splits K) timed by ``do_bench``
    (one call at a time, without cuBLAS's reduction node), slower by less than :data:`MARGIN`. ``key``: where to
    keep the timings in :data:`TIMINGS`."""
    tuner = _gemv_tuned if _rows(x, weight) == 1 else _skinny_tuned
    before, cached = getattr(tuner, "configs_timings", None), set(tuner.cache)
    try:
        y = gemv_launch(x, weight, bias)  # autotunes (outside the timing)
    except Exception:  # a kernel that does not build or launch on this shape: cuBLAS serves it
        return False
    if not _rel(y, F.linear(x, weight, bias)) < 1e-2:  # nor one that disagrees with cuBLAS
        return False
    retile = retiled(tuner, cached, lambda w: gemv_launch(x, w, bias), lambda w: F.linear(x, w, bias), weight,
                     _rows(x, weight))
    t = _timings(x, weight, bias)
    if key is not None:
        TIMINGS[key] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in t.items()}
        TIMINGS[key].update(tuned_tiles(tuner, before), **retile)
    # MARGIN only where cuBLAS adds its split-K reduction (tall weights) and the timing left it out (do_bench, one
    # call at a time): timed inside CUDA graphs, cuBLAS's reduction node is in its own time, so the kernel must be
    # faster outright, as on a wide weight. (Under the margin, the 2026-12-05 verify call kept the five-row
    # 4096 x 4096 kernel at 15.16 us against cuBLAS's 14.31 us, both timed in graphs: 32 such calls a verify.)
    tall_untimed = weight.shape[0] <= weight.shape[1] and t.get("how") != "graph"
    return t["kernel_us"] <= (MARGIN if tall_untimed else 1.0) * t["cublas_us"]


def _pdl_usable(x) -> bool:
    """Whether the kernel can be launched with programmatic dependent launch on x's device (sm90 and later), and
    :data:`PDL` allows it."""
    return PDL and _gdc_on(x)


def _pdl_is_faster(x, weight, bias, key) -> bool:
    """For a shape the kernel serves: whether its pdl launch agrees with ``F.linear`` and is timed faster, inside
    CUDA graphs (:func:`graph_ab_us`), than its plain launch; the timings go into ``TIMINGS[key]``. Each GEMV is
    timed behind the small kernel that comes before a projection in a step (``add_rmsnorm``, which lets a pdl
    successor start early), on both sides alike: a pdl launch gains by overlapping that kernel."""
    if not _pdl_usable(x):
        return False
    t = TIMINGS.setdefault(key, {})
    norm = ops.dispatch("add_rmsnorm", x.device)[1]
    norm_w = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)

    def behind_norm(w, pdl):
        return gemv_launch(norm(x, None, norm_w, 1e-5)[0], w, bias, pdl=pdl)

    try:
        y = gemv_launch(x, weight, bias, pdl=True)
        if not _rel(y, F.linear(x, weight, bias)) < 1e-2:
            t["pdl"] = "disagrees"
            return False
        ours, plain, _ = graph_ab_us(lambda w: behind_norm(w, True), lambda w: behind_norm(w, False), weight)
    except Exception as exc:  # noqa: BLE001 - a launch or capture that fails: the plain launch serves
        t["pdl"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        return False
    t.update(pdl_us=round(ours, 2), plain_launch_us=round(plain, 2))
    return ours < plain


def choices_report() -> dict:
    """For a benchmark's JSON: the shapes (rows x N x K) the kernel serves, those it serves with a pdl launch, and
    the timings behind every choice."""
    name = lambda k: f"{k[0]}x{k[1]}x{k[2]}"  # noqa: E731
    return {**shape_report(CHOICES, TIMINGS, name, "gemv_kernel_shapes", "gemv_timings"),
            "gemv_pdl_shapes": sorted({name(k) for k, use in PDL_CHOICES.items() if use and CHOICES.get(k)})}


def gemv_triton(x, weight, bias=None):
    """The kernel where :func:`gemv_supported` and where, on this shape's first use, it agreed with cuBLAS and
    was timed faster than cuBLAS (or within :data:`MARGIN` of it on a tall weight timed by ``do_bench``); else
    ``F.linear``. The first call of a shape should not be inside a CUDA graph's recording (the static decoder's
    warm-up makes it); one that is gets cuBLAS."""
    if not gemv_supported(x, weight, bias):
        return F.linear(x, weight, bias)
    key = (_rows(x, weight), *weight.shape, x.dtype, x.device.index)

    def decide():
        use = _kernel_is_faster(x, weight, bias, key)
        PDL_CHOICES[key] = use and _pdl_is_faster(x, weight, bias, key)
        return use

    use = chosen(CHOICES, key, x, decide)  # None inside a recording: cuBLAS
    return gemv_launch(x, weight, bias, pdl=PDL_CHOICES.get(key, False)) if use else F.linear(x, weight, bias)


def _check_gemv(gen):
    errs = []
    # one row only: a shape of several rows is checked against cuBLAS on its first use (_kernel_is_faster), so a
    # multi-row kernel that fails there cannot take the one-row kernel down with it
    for rows, n, k, bias in ((1, 96, 320, True), (1, 4096, 4096, False), (1, 1000, 3000, True)):
        x, w = _rand(gen, rows, k, dtype=torch.bfloat16), _rand(gen, n, k, dtype=torch.bfloat16)
        b = _rand(gen, n, dtype=torch.bfloat16) if bias else None
        errs.append(_rel(gemv_launch(x, w, b), _decode_refs.gemv_ref(x.double(), w.double(),
                                                                     b.double() if bias else None)))
    return max(errs)


if triton is not None:
    ops.register_fast("gemv", "mamballama-triton", gemv_triton, _probe(_check_gemv, tol=1e-2))
