"""A GEMV with the residual add and RMSNorm before it fused in (``add_rmsnorm_gemv``), and the same with SwiGLU
after it (``add_rmsnorm_gemv_swiglu``, for [gate; up]); references in :mod:`mamballama_cli.ops.decode`: the ops
composed.

A batch-1 decode step of the 8B shape runs about 290 kernels in 4.5 ms, and about a third of them are small
elementwise kernels between two GEMVs: the residual add and RMSNorm before the mixer's first projection, before
[gate; up] and before lm_head, and SwiGLU between [gate; up] and down_proj. Each costs a launch inside the CUDA
graph and a round trip of a few kilobytes, for work a GEMV beside it could do. Here the GEMVs do it:

* ``add_rmsnorm_gemv(x, residual, norm_w, eps, W, bias)`` -> ``(y, h)``: h = residual + x (stored once, by the first
  program), and ``y = rmsnorm(h) * norm_w @ W^T + bias``. RMSNorm scales a row by one number, so each program
  walks K as the plain GEMV does, multiplying each chunk of h by norm_w as it loads it and summing h^2 beside the
  products, and scales its outputs by 1 / rms(h) at the end: y = (W (h * norm_w)) / rms(h) + bias. (It first summed
  h^2 over the whole row before loading any weight: on the H200 that wait made it slower than the two ops apart
  at every 8B shape, 2026-12-05.)
* ``add_rmsnorm_gemv_swiglu(x, residual, norm_w, eps, W, bias)`` -> ``(silu(g) * u, h)`` where [g | u] is the
  above's y for W = [W_gate; W_up] (2 * inter rows): each program computes the same BLOCK_N outputs of the gate
  half and of the up half (two weight tiles a K step, two accumulators) and writes their SwiGLU, so down_proj
  reads the activation with the plain ``gemv`` op and no SwiGLU kernel runs. (A first version fused SwiGLU into
  down_proj instead; every program then recomputed it over all of K, and the H200 timed that 10 us slower than
  the ops apart at the 8B shape.)

The sum h rounds in the activation dtype as the reference's; on CUDA cores the normalised activations are not
rounded (the reference rounds h / rms(h), then its product with norm_w, to the activation dtype before its GEMV), so
y differs from it by about one such rounding. The SwiGLU epilogue rounds as its reference (g and u to the
activation dtype, then silu, then the product). At 1 to :data:`~mamballama_cli.ops.triton_gemv.MAX_ROWS` rows (a decode step or a
verify window), bf16 or fp16, in one of two modes: on CUDA cores (:data:`CONFIGS`), float32 (rows x BLOCK_N x
BLOCK_K) accumulators summed once after the loop; or on tensor cores (:data:`DOT_CONFIGS`, the rows padded to 8), the
normalised rows rounded to the activation dtype (the reference rounds them too) and multiplied by ``tl.dot`` into a
float32 accumulator. The autotuner times both.

Whether a shape takes the fused kernel is timed, as the GEMV op's choice is: on its first use (a static decoder's
warm-up, before its graph is recorded) the fused kernel is checked against the reference and timed inside CUDA
graphs against the ops it replaces (the fast elementwise kernels and the ``gemv`` op), each weight cold in L2; it
keeps the shape only if it agrees and is faster (:data:`CHOICES`, :data:`TIMINGS`). Otherwise, and for anything
the kernel is not built for, the ops run apart as before. Importing this module registers the kernels on CUDA.
"""

from __future__ import annotations

import torch

from mamballama_cli import ops
from mamballama_cli.ops import decode as _decode_refs  # registers the references
from mamballama_cli.ops import tuning
from mamballama_cli.ops.common import _device_guard, _needs_grad, _probe, _rand, _rel
from mamballama_cli.ops.graph_timing import chosen, graph_ab_us, shape_report, timed_choice
from mamballama_cli.ops.triton_gemv import DTYPES, MAX_ROWS

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the machine; the probe says why (ops/common.py)
    triton = tl = None

# (BLOCK_N, BLOCK_K, num_warps): the candidates the autotuner times per shape (those whose accumulator would pass
# REGS float32 values a thread at the call's rows are dropped first); the CPU tests run each under the interpreter.
# The one-row GEMV's own candidates come first (BLOCK_K up to 2,048: more bytes in flight a program). On the H200
# (2026-12-05) the plain GEMV, tuned over those, ran the 8B shapes 3-18 us faster than this kernel over the others.
CONFIGS = ((4, 1024, 4), (8, 1024, 4), (16, 1024, 8), (2, 2048, 4),
           (4, 512, 4), (8, 512, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8), (8, 1024, 8), (2, 1024, 4),
           (4, 256, 4), (8, 128, 4))
REGS = 128
# (BLOCK_N, BLOCK_K, num_warps, num_stages): the tensor-core (DOT) candidates, at any row count (the rows padded to
# 8: they are the product's N; one row wastes seven eighths of a product that costs little). Compiled for sm90
# (benchmarks/kernel_sass.py --fused) their loops issue 1.6-7.6 instructions a weight element (2.1-4.1 at 64
# outputs), the same code at any row count; the CUDA-core tiles issue 15-53 at 2-8 rows (8 float32 products each,
# and the 3-D accumulator's layout changes through shared memory every iteration) and 4.2-8.6 at one row and
# K = 4,096, where every program also re-reads the whole row of x, residual and norm weight for a few outputs. At
# the default teacher's K = 576 a verify window's in_proj and [gate; up] had only the smallest CUDA-core tiles left
# under REGS (two at five rows of the SwiGLU kind). Not yet timed on the H200: the timing against the ops apart
# decides, as for every tile.
DOT_CONFIGS = ((16, 64, 2, 4), (32, 64, 2, 4), (64, 64, 4, 4), (16, 128, 2, 3), (32, 128, 4, 3), (64, 128, 4, 3))
DOT_ROWS = 8  # the tensor-core tiles' ROWS
# The widest row (K) the CUDA-core tiles take. Their win is a launch saved, which counts where a GEMV is short (the
# default teacher's K = 576). At the 8B shape (K = 4,096) they lost to the ops apart at every one-row shape on the
# H200 (ninth session, 2026-12-05), so wider rows go to the tensor-core tiles alone (each tile compiled costs
# warm-up time on the GPU). The tenth session's LLVM crash, first put down to K = 4,096, was the 2-4-row code at any
# K (see _padded).
MAX_K = 1024
# The widest row the fused ops take (on the tensor-core tiles past MAX_K): the 8B shape's K = 4,096, where each
# fused projection saves a norm kernel (65 a decode step or verify call: 32 layers x 2, and lm_head). The timing
# against the ops apart decides, shape by shape.
DOT_MAX_K = 8192
NORM, NORM_SWIGLU = 0, 1  # the kernel's KIND
OP_NAMES = ("add_rmsnorm_gemv", "add_rmsnorm_gemv_swiglu")

if triton is not None:

    @triton.jit
    def _normed_tile(X, R, LNW, HOUT, rows, cols, k0, K, live_m, stride_xm, stride_rm, stride_hm, first,
                     HAS_RES: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
        # the rows' h at k0 (h = R + X, rounded in the activation dtype as the model adds; stored by the ``first``
        # program) as float32, and h * norm_w (the 1 / rms(h) comes after the loop)
        inside = k0 + cols < K
        if EVEN_K:  # no mask along K on the activations either
            m = live_m[:, None] & (cols < BLOCK_K)[None, :]
        else:
            m = live_m[:, None] & inside[None, :]
        h = tl.load(X + rows[:, None] * stride_xm + k0 + cols[None, :], mask=m, other=0.0)
        if HAS_RES:
            r = tl.load(R + rows[:, None] * stride_rm + k0 + cols[None, :], mask=m, other=0.0)
            h = (r.to(tl.float32) + h.to(tl.float32)).to(X.dtype.element_ty)
            if first:
                tl.store(HOUT + rows[:, None] * stride_hm + k0 + cols[None, :], h, mask=m)
        hf = h.to(tl.float32)
        lnw = tl.load(LNW + k0 + cols, mask=inside, other=0.0).to(tl.float32)
        return hf, hf * lnw[None, :]

    @triton.jit
    def _weight_tile(w_ptrs, k0, cols, K, EVEN_K: tl.constexpr):
        if EVEN_K:  # no mask on the weight's hot loads
            w = tl.load(w_ptrs + k0)
        else:
            w = tl.load(w_ptrs + k0, mask=(k0 + cols < K)[None, :], other=0.0)
        return w

    @triton.jit
    def _fused_kernel(X, R, LNW, W, BIAS, Y, HOUT, M, N, K, eps, stride_xm, stride_rm, stride_hm, stride_wn,
                      stride_ym, KIND: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, EVEN_K: tl.constexpr,
                      DOT: tl.constexpr):
        # X (M, K) the new hidden, R (M, K) the residual (HAS_RES; else h = X), LNW (K,) the norm weight, HOUT (M, K)
        # gets R + X. KIND 0: W (N, K), Y (M, N). KIND 1: W (2N, K) = [gate; up], Y (M, N) = silu(gate) * up, BIAS
        # (2N,) likewise. DOT 0: float32 (ROWS x BLOCK_N x BLOCK_K) products on CUDA cores, summed over K after the
        # loop; DOT 1 (ROWS = 8): on tensor cores, the weight tile as tl.dot's first operand and the rows (h * norm_w
        # rounded to the activation dtype) as its N, a float32 (BLOCK_N x ROWS) accumulator.
        pid = tl.program_id(0)
        outs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        live_n = outs < N
        outs_read = tl.where(live_n, outs, 0)
        rows = tl.arange(0, ROWS)
        live_m = rows < M
        cols = tl.arange(0, BLOCK_K)
        dt = Y.dtype.element_ty
        ss = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)  # the sum of h^2, beside the products
        w_ptrs = W + outs_read[:, None].to(tl.int64) * stride_wn + cols[None, :]
        up_ptrs = w_ptrs + N * stride_wn  # KIND 1: the same outputs' rows of the up half
        if DOT:
            acc_t = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
            up_t = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)  # KIND 1 only (otherwise compiled away)
            for k0 in range(0, K, BLOCK_K):
                hf, a = _normed_tile(X, R, LNW, HOUT, rows, cols, k0, K, live_m, stride_xm, stride_rm, stride_hm,
                                     pid == 0, HAS_RES, EVEN_K, BLOCK_K)
                ss += hf * hf
                a_t = tl.trans(a.to(dt))
                acc_t = tl.dot(_weight_tile(w_ptrs, k0, cols, K, EVEN_K), a_t, acc_t)
                if KIND == 1:
                    up_t = tl.dot(_weight_tile(up_ptrs, k0, cols, K, EVEN_K), a_t, up_t)
            y = tl.trans(acc_t)
            u = tl.trans(up_t)
        else:
            acc = tl.zeros((ROWS, BLOCK_N, BLOCK_K), dtype=tl.float32)
            acc_up = tl.zeros((ROWS, BLOCK_N, BLOCK_K), dtype=tl.float32)  # KIND 1 only (otherwise compiled away)
            for k0 in range(0, K, BLOCK_K):
                hf, a = _normed_tile(X, R, LNW, HOUT, rows, cols, k0, K, live_m, stride_xm, stride_rm, stride_hm,
                                     pid == 0, HAS_RES, EVEN_K, BLOCK_K)
                ss += hf * hf
                acc += a[:, None, :] * _weight_tile(w_ptrs, k0, cols, K, EVEN_K).to(tl.float32)[None, :, :]
                if KIND == 1:
                    acc_up += a[:, None, :] * _weight_tile(up_ptrs, k0, cols, K, EVEN_K).to(tl.float32)[None, :, :]
            y = tl.sum(acc, axis=2)
            u = tl.sum(acc_up, axis=2)
        rstd = tl.rsqrt(tl.sum(ss, axis=1) / K + eps)[:, None]
        y = y * rstd
        if HAS_BIAS:
            y += tl.load(BIAS + outs_read).to(tl.float32)[None, :]
        if KIND == 1:  # rounded as the ops apart: [gate | up] to the activation dtype, silu, then the product
            u = u * rstd
            if HAS_BIAS:
                u += tl.load(BIAS + N + outs_read).to(tl.float32)[None, :]
            g = y.to(dt).to(tl.float32)
            act = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
            y = act * u.to(dt).to(tl.float32)
        tl.store(Y + rows[:, None] * stride_ym + outs[None, :], y.to(dt), mask=live_m[:, None] & live_n[None, :])

    def _prune(configs, named_args, **kwargs):
        kind = kwargs.get("KIND", named_args.get("KIND"))
        wanted = set(candidates(kind, named_args["M"], named_args["K"]))
        return [c for c in configs if tile_of(c) in wanted]

    _fused_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k, "DOT": False}, num_warps=w) for n, k, w in CONFIGS]
        + [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "DOT": True}, num_warps=w, num_stages=st)
           for n, k, w, st in DOT_CONFIGS],
        key=["M", "N", "K", "KIND", "HAS_RES"],
        prune_configs_by={"early_config_prune": _prune},
    )(triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
                         "ROWS": lambda a: _kernel_rows(a["DOT"], a["M"])})(_fused_kernel))
    tuning.register_tuner("gemv_fused", _fused_tuned)


def _padded(m: int) -> int:
    """The kernel's ROWS for ``m`` rows: 1, or 8 for any of 2 to 8. Triton 3.6's LLVM (torch 2.11's, the H200's)
    aborts the process (an SLPVectorizer assertion) compiling this kernel, with a residual, at 2 rows padded (6 of
    the 13 tiles) or 4 (one tile), at any K (576 and 4,096 alike); never at 1 or 8 (benchmarks/kernel_sass.py
    --check under triton 3.6.0, 2026-12-05). An abort cannot be caught, so those row counts run 8 rows' code, the
    padding rows masked; the timing against the ops apart still decides whether it serves."""
    return 1 if int(m) <= 1 else 8


def _fits(kind: int, m: int, block_n: int, block_k: int, warps: int) -> bool:
    # whether the accumulators (two for the SwiGLU kind) at m rows stay within REGS float32 values a thread
    return _padded(m) * (2 if kind == NORM_SWIGLU else 1) * block_n * block_k <= REGS * 32 * warps


def candidates(kind: int, m: int, k: int | None = None) -> list[tuple]:
    """The tiles the autotuner may run for ``kind`` at ``m`` rows of width ``k`` (the others are pruned before
    anything compiles): the entries of :data:`CONFIGS` whose accumulators fit (the last one if none does) unless
    ``k`` passes :data:`MAX_K`, then every entry of :data:`DOT_CONFIGS`."""
    cuda_cores = [] if k is not None and k > MAX_K else (
        [c for c in CONFIGS if _fits(kind, m, *c)] or list(CONFIGS[-1:]))
    return cuda_cores + list(DOT_CONFIGS)


def rows_of(tile: tuple, m: int) -> int:
    """The kernel's ROWS for ``tile`` (an entry of :data:`CONFIGS` or :data:`DOT_CONFIGS`) at ``m`` rows."""
    return _kernel_rows(len(tile) == 4, m)


def _kernel_rows(dot: bool, m: int) -> int:
    # DOT_ROWS for a tensor-core tile at any row count, else _padded(m); the autotuned path's heuristic too
    return DOT_ROWS if dot else _padded(m)


def tile_of(config) -> tuple:
    """An autotuner config as the tile it came from: an entry of :data:`CONFIGS` or of :data:`DOT_CONFIGS`."""
    kw = config.kwargs
    tile = (kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps)
    return (*tile, config.num_stages) if kw.get("DOT") else tile


def _rows(x, k: int) -> int:
    return x.numel() // max(1, k)


def _common_ok(x, weight, bias, k: int) -> bool:
    return (x.dim() >= 2 and x.dtype in DTYPES and weight.dtype == x.dtype and weight.dim() == 2
            and weight.shape[1] == k and 1 <= _rows(x, x.shape[-1]) <= MAX_ROWS and weight.stride(1) == 1
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())))


def norm_supported(x, residual, norm_w, weight, bias=None, kind: int = NORM) -> bool:
    """Whether :func:`fused_launch` runs ``add_rmsnorm_gemv`` (``kind`` NORM) or ``add_rmsnorm_gemv_swiglu``
    (NORM_SWIGLU: the weight's rows are [gate; up], an even count) on these arguments."""
    return (_common_ok(x, weight, bias, x.shape[-1]) and x.shape[-1] <= DOT_MAX_K
            and (kind == NORM or weight.shape[0] % 2 == 0)
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype))
            and norm_w.dtype == x.dtype and norm_w.shape == (x.shape[-1],)
            and norm_w.is_contiguous() and not _needs_grad(x, residual, norm_w, weight, bias))


def fused_launch(kind: int, x, weight, bias=None, residual=None, norm_w=None, eps: float = 0.0,
                 config: tuple | None = None):
    """The fused kernel, autotuned or at ``config`` (an entry of :data:`CONFIGS` or of :data:`DOT_CONFIGS`): x the
    new hidden (..., K); returns (y, h), y (..., N) for ``kind`` NORM (weight (N, K)) and silu(gate) * up (..., N)
    for NORM_SWIGLU (weight [gate; up] (2N, K))."""
    N, K = weight.shape
    if kind == NORM_SWIGLU:
        N //= 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if residual is None:  # h is x itself, as the reference hands it back
        h = x2
        r2, strides = x2, (0, 0)
    else:
        r2 = residual.reshape(-1, K)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h = torch.empty(M, K, dtype=x.dtype, device=x.device)
        strides = (r2.stride(0), h.stride(0))
    b = bias if bias is not None else weight
    args = (x2, r2, norm_w, weight, b, y, h, M, N, K, float(eps), x2.stride(0), strides[0], strides[1],
            weight.stride(0), y.stride(0))
    with _device_guard(x):
        if config is None:
            _fused_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
                *args, KIND=kind, HAS_RES=residual is not None, HAS_BIAS=bias is not None)
        else:
            bn, bk, warps, *stages = config
            _fused_kernel[(triton.cdiv(N, bn),)](*args, KIND=kind, HAS_RES=residual is not None,
                                                 HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk,
                                                 ROWS=rows_of(tuple(config), M),
                                                 EVEN_K=K % bk == 0, DOT=bool(stages), num_warps=warps,
                                                 **({"num_stages": stages[0]} if stages else {}))
    return y.view(*x.shape[:-1], N), h.view(x.shape)


# (kind, rows, N, K, dtype, device index) -> whether the fused kernel serves that shape; TIMINGS: the timings
# behind each choice (microseconds per call of the fused kernel and of the two ops it replaces).
CHOICES: dict[tuple, bool] = {}
TIMINGS: dict[tuple, dict] = {}
tuning.register_choices("gemv_fused", CHOICES)


def _unfused(kind: int, x, weight, bias, residual, norm_w, eps):
    """The ops the fused kernel replaces, as dispatched on x's device (the fast kernels on CUDA): (y, h). The
    SwiGLU kind's GEMV and SwiGLU are the ``gemv_swiglu`` op (one kernel at one row where that was timed faster,
    ops/triton_gemv_swiglu.py)."""
    normed, h = ops.dispatch("add_rmsnorm", x.device)[1](x, residual, norm_w, eps)
    if kind == NORM:
        return ops.dispatch("gemv", x.device)[1](normed, weight, bias), h
    return ops.dispatch("gemv_swiglu", x.device)[1](normed, weight, bias), h


def _fused_is_faster(kind, x, weight, bias, residual, norm_w, eps, key) -> bool:
    """Check the autotuned fused kernel against the reference, then time it against the ops apart inside CUDA graphs
    over copies of the weight that together pass twice the L2 cache (as a decode step runs them)."""
    try:
        cached = set(_fused_tuned.cache)
        got = fused_launch(kind, x, weight, bias, residual, norm_w, eps)  # autotunes, outside the timing
        want = _unfused(kind, x, weight, bias, residual, norm_w, eps)  # also settles the gemv op's own choice
    except Exception:  # noqa: BLE001 - a kernel that does not build or launch on this shape: the two ops serve it
        return False
    if not all(_rel(g, w) < 1e-2 for g, w in zip(got, want)):
        return False

    def ours(w):
        return fused_launch(kind, x, w, bias, residual, norm_w, eps)

    def apart(w):
        return _unfused(kind, x, w, bias, residual, norm_w, eps)

    return timed_choice(TIMINGS, key, ("fused_us", "unfused_us"), ours, apart, weight, (_fused_tuned, cached, key[1]),
                        graph_ab_us)


def _choose(kind, x, weight, bias, residual, norm_w, eps) -> bool:
    key = (kind, _rows(x, x.shape[-1]), *weight.shape, x.dtype, x.device.index)
    # None inside a recording: the two ops
    return bool(chosen(CHOICES, key, x, lambda: _fused_is_faster(kind, x, weight, bias, residual, norm_w, eps, key)))


def _fusing() -> bool:
    """False where the references are forced for ``gemv`` (``--kernels ref:gemv``, the A/B against cuBLAS): then
    every projection must be cuBLAS's, these ones included."""
    return not ops.forced_reference("gemv")


def add_rmsnorm_gemv_triton(x, residual, norm_w, eps, weight, bias=None):
    """Same contract as :func:`~mamballama_cli.ops.decode.add_rmsnorm_gemv_ref`."""
    return _fused_or_apart(NORM, x, residual, norm_w, eps, weight, bias)


def add_rmsnorm_gemv_swiglu_triton(x, residual, norm_w, eps, weight, bias=None):
    """Same contract as :func:`~mamballama_cli.ops.decode.add_rmsnorm_gemv_swiglu_ref`."""
    return _fused_or_apart(NORM_SWIGLU, x, residual, norm_w, eps, weight, bias)


def _fused_or_apart(kind, x, residual, norm_w, eps, weight, bias):
    if (_fusing() and norm_supported(x, residual, norm_w, weight, bias, kind)
            and _choose(kind, x, weight, bias, residual, norm_w, eps)):
        return fused_launch(kind, x, weight, bias, residual, norm_w, eps)
    return _unfused(kind, x, weight, bias, residual, norm_w, eps)


def choices_report() -> dict:
    """For a benchmark's JSON: the shapes (op rows x N x K) the fused kernels serve, and the timings behind each."""
    return shape_report(CHOICES, TIMINGS, lambda k: f"{OP_NAMES[k[0]]} {k[1]}x{k[2]}x{k[3]}",
                        "fused_gemv_shapes", "fused_gemv_timings")


def _check_fused(gen):
    errs = []
    for rows, n, k in ((1, 96, 320), (5, 200, 512)):
        x, r = _rand(gen, rows, k, dtype=torch.bfloat16), _rand(gen, rows, k, dtype=torch.bfloat16)
        lnw, w = _rand(gen, k, dtype=torch.bfloat16), _rand(gen, n, k, dtype=torch.bfloat16)
        for kind, ref in ((NORM, _decode_refs.add_rmsnorm_gemv_ref),
                          (NORM_SWIGLU, _decode_refs.add_rmsnorm_gemv_swiglu_ref)):
            y, h = fused_launch(kind, x, w, None, r, lnw, 1e-5)
            want_y, want_h = ref(x, r, lnw, 1e-5, w)
            errs += [_rel(y, want_y), _rel(h, want_h)]
            y0, _ = fused_launch(kind, x, w, None, None, lnw, 1e-5)  # a layer's first norm: no residual
            errs.append(_rel(y0, ref(x, None, lnw, 1e-5, w)[0]))
    return max(errs)


if triton is not None:
    _fused_probe = _probe(_check_fused, tol=1e-2)
    ops.register_fast("add_rmsnorm_gemv", "mamballama-triton", add_rmsnorm_gemv_triton, _fused_probe)
    ops.register_fast("add_rmsnorm_gemv_swiglu", "mamballama-triton", add_rmsnorm_gemv_swiglu_triton, _fused_probe)
