"""A GEMV with the elementwise op before it fused in (``add_rmsnorm_gemv`` and ``swiglu_gemv``; references in
:mod:`mamballama_cli.ops.decode`: the two ops composed).

A batch-1 decode step of the 8B shape runs about 290 kernels in 4.5 ms, and about a third of them are small
elementwise kernels between two GEMVs: the residual add and RMSNorm before [gate; up] (and before lm_head), and
SwiGLU before down_proj. Each costs a launch inside the CUDA graph and a round trip of a few kilobytes, for work
the GEMV after it could do while it loads its input. Here the GEMV does it:

* ``add_rmsnorm_gemv(x, residual, norm_w, eps, W, bias)`` -> ``(y, h)``: h = residual + x (stored once, by the first
  program), and ``y = rmsnorm(h) * norm_w @ W^T + bias``. RMSNorm scales a row by one number, so each program
  walks K as the plain GEMV does, multiplying each chunk of h by norm_w as it loads it and summing h^2 beside the
  products, and scales its outputs by 1 / rms(h) at the end: y = (W (h * norm_w)) / rms(h) + bias. (It first summed
  h^2 over the whole row before loading any weight: on the H200 that wait made it slower than the two ops apart
  at every 8B shape, 2026-12-05.)
* ``swiglu_gemv(gate_up, W, bias)`` -> ``silu(gate) * up @ W^T + bias``: each chunk of the input is made from the
  two halves of gate_up as it is loaded.

The sum h rounds in the activation dtype as the reference's; the normalised activations are not rounded (the
reference rounds h / rms(h), then its product with norm_w, to the activation dtype before its GEMV), so y differs
from it by about one such rounding. SwiGLU rounds as its reference (silu rounded, then the product). At 1 to :data:`~mamballama_cli.ops.triton_gemv.MAX_ROWS` rows (a
decode step or a verify window), bf16 or fp16, with a float32 (rows x BLOCK_N x BLOCK_K) accumulator summed once
after the loop.

Whether a shape takes the fused kernel is timed, as the GEMV op's choice is: on its first use (a static decoder's
warm-up, before its graph is recorded) the fused kernel is checked against the reference and timed inside CUDA
graphs against the two ops it replaces (the fast elementwise kernel, then the ``gemv`` op), each weight cold in
L2; it keeps the shape only if it agrees and is faster (:data:`CHOICES`, :data:`TIMINGS`). Otherwise, and for
anything the kernel is not built for, the two ops run as before. Importing this module registers the kernels on
CUDA.
"""

from __future__ import annotations

import torch

from mamballama_cli import ops
from mamballama_cli.ops import decode as _decode_refs  # registers the references
from mamballama_cli.ops.common import _device_guard, _needs_grad, _probe, _rand, _rel
from mamballama_cli.ops.triton_gemv import DTYPES, MAX_ROWS, graph_ab_us, shape_report

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
NORM, SWIGLU = 0, 1  # the kernel's KIND

if triton is not None:

    @triton.jit
    def _fused_kernel(X, R, LNW, W, BIAS, Y, HOUT, M, N, K, eps, stride_xm, stride_rm, stride_hm, stride_wn,
                      stride_ym, KIND: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, EVEN_K: tl.constexpr):
        # KIND 0: X (M, K) the new hidden, R (M, K) the residual (HAS_RES; else h = X), LNW (K,) the norm weight,
        # HOUT (M, K) gets R + X.
        # KIND 1: X (M, 2K) = [gate | up]; R, LNW, HOUT unused.
        pid = tl.program_id(0)
        outs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        live_n = outs < N
        outs_read = tl.where(live_n, outs, 0)
        rows = tl.arange(0, ROWS)
        live_m = rows < M
        cols = tl.arange(0, BLOCK_K)
        dt = Y.dtype.element_ty
        ss = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)  # KIND 0: sum of h^2, beside the products
        acc = tl.zeros((ROWS, BLOCK_N, BLOCK_K), dtype=tl.float32)
        w_ptrs = W + outs_read[:, None].to(tl.int64) * stride_wn + cols[None, :]
        for k0 in range(0, K, BLOCK_K):
            inside = k0 + cols < K
            if EVEN_K:  # no mask along K on the activations either
                m = live_m[:, None] & (cols < BLOCK_K)[None, :]
            else:
                m = live_m[:, None] & inside[None, :]
            if KIND == 0:  # h * norm_w now, the 1 / rms(h) after the loop; the first program stores h
                h = tl.load(X + rows[:, None] * stride_xm + k0 + cols[None, :], mask=m, other=0.0)
                if HAS_RES:
                    r = tl.load(R + rows[:, None] * stride_rm + k0 + cols[None, :], mask=m, other=0.0)
                    h = (r.to(tl.float32) + h.to(tl.float32)).to(dt)  # the model adds in the activation dtype
                    if pid == 0:
                        tl.store(HOUT + rows[:, None] * stride_hm + k0 + cols[None, :], h, mask=m)
                hf = h.to(tl.float32)
                ss += hf * hf
                lnw = tl.load(LNW + k0 + cols, mask=inside, other=0.0).to(tl.float32)
                a = hf * lnw[None, :]
            else:
                g = tl.load(X + rows[:, None] * stride_xm + k0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
                u = tl.load(X + rows[:, None] * stride_xm + K + k0 + cols[None, :], mask=m,
                            other=0.0).to(tl.float32)
                act = (g * tl.sigmoid(g)).to(dt).to(tl.float32)  # silu rounds, then the product
                a = (act * u).to(dt).to(tl.float32)
            if EVEN_K:  # no mask on the weight's hot loads
                w = tl.load(w_ptrs + k0).to(tl.float32)
            else:
                w = tl.load(w_ptrs + k0, mask=inside[None, :], other=0.0).to(tl.float32)
            acc += a[:, None, :] * w[None, :, :]
        y = tl.sum(acc, axis=2)
        if KIND == 0:
            y = y * tl.rsqrt(tl.sum(ss, axis=1) / K + eps)[:, None]
        if HAS_BIAS:
            y += tl.load(BIAS + outs_read).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * stride_ym + outs[None, :], y.to(dt), mask=live_m[:, None] & live_n[None, :])

    def _prune(configs, named_args, **kwargs):
        rows = _padded(named_args["M"])
        kept = [c for c in configs
                if rows * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= REGS * 32 * c.num_warps]
        return kept or configs[-1:]

    _fused_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in CONFIGS],
        key=["M", "N", "K", "KIND", "HAS_RES"],
        prune_configs_by={"early_config_prune": _prune},
    )(triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_fused_kernel))


def _padded(m: int) -> int:
    return 1 << max(0, (int(m) - 1).bit_length())


def _rows(x, k: int) -> int:
    return x.numel() // max(1, k)


def _common_ok(x, weight, bias, k: int) -> bool:
    return (x.dim() >= 2 and x.dtype in DTYPES and weight.dtype == x.dtype and weight.dim() == 2
            and weight.shape[1] == k and 1 <= _rows(x, x.shape[-1]) <= MAX_ROWS and weight.stride(1) == 1
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())))


def norm_supported(x, residual, norm_w, weight, bias=None) -> bool:
    """Whether :func:`fused_launch` runs ``add_rmsnorm_gemv`` on these arguments."""
    return (_common_ok(x, weight, bias, x.shape[-1])
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype))
            and norm_w.dtype == x.dtype and norm_w.shape == (x.shape[-1],)
            and norm_w.is_contiguous() and not _needs_grad(x, residual, norm_w, weight, bias))


def swiglu_supported(gate_up, weight, bias=None) -> bool:
    """Whether :func:`fused_launch` runs ``swiglu_gemv`` on these arguments."""
    return (gate_up.shape[-1] % 2 == 0 and _common_ok(gate_up, weight, bias, gate_up.shape[-1] // 2)
            and not _needs_grad(gate_up, weight, bias))


def fused_launch(kind: int, x, weight, bias=None, residual=None, norm_w=None, eps: float = 0.0,
                 config: tuple | None = None):
    """The fused kernel, autotuned or at ``config`` (an entry of :data:`CONFIGS`). ``kind`` NORM: x the new hidden
    (..., K), returns (y, h); SWIGLU: x = [gate | up] (..., 2K), returns y."""
    N, K = weight.shape
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if kind == NORM and residual is None:  # h is x itself, as the reference hands it back
        h = x2
        extra, strides = (x2, norm_w, x2), (0, 0)
    elif kind == NORM:
        r2 = residual.reshape(-1, K)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h = torch.empty(M, K, dtype=x.dtype, device=x.device)
        extra, strides = (r2, norm_w, h), (r2.stride(0), h.stride(0))
    else:
        h = None
        extra, strides = (x2, x2, x2), (0, 0)
    b = bias if bias is not None else weight
    args = (x2, extra[0], extra[1], weight, b, y, extra[2], M, N, K, float(eps), x2.stride(0), strides[0],
            strides[1], weight.stride(0), y.stride(0))
    with _device_guard(x):
        if config is None:
            _fused_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
                *args, KIND=kind, HAS_RES=residual is not None, HAS_BIAS=bias is not None, ROWS=_padded(M))
        else:
            bn, bk, warps = config
            _fused_kernel[(triton.cdiv(N, bn),)](*args, KIND=kind, HAS_RES=residual is not None,
                                                 HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk, ROWS=_padded(M),
                                                 EVEN_K=K % bk == 0, num_warps=warps)
    y = y.view(*x.shape[:-1], N)
    return (y, h.view(x.shape)) if kind == NORM else y


# (kind, rows, N, K, dtype, device index) -> whether the fused kernel serves that shape; TIMINGS: the timings
# behind each choice (microseconds per call of the fused kernel and of the two ops it replaces).
CHOICES: dict[tuple, bool] = {}
TIMINGS: dict[tuple, dict] = {}


def _unfused(kind: int, x, weight, bias, residual, norm_w, eps):
    """The two ops the fused kernel replaces, as dispatched on x's device (the fast kernels on CUDA)."""
    gemv = ops.dispatch("gemv", x.device)[1]
    if kind == NORM:
        normed, h = ops.dispatch("add_rmsnorm", x.device)[1](x, residual, norm_w, eps)
        return gemv(normed, weight, bias), h
    return gemv(ops.dispatch("swiglu", x.device)[1](x), weight, bias)


def _fused_is_faster(kind, x, weight, bias, residual, norm_w, eps, key) -> bool:
    """Check the autotuned fused kernel against the reference, then time it against the two ops inside CUDA graphs
    over copies of the weight that together pass twice the L2 cache (as a decode step runs them)."""
    try:
        got = fused_launch(kind, x, weight, bias, residual, norm_w, eps)  # autotunes, outside the timing
        want = _unfused(kind, x, weight, bias, residual, norm_w, eps)  # also settles the gemv op's own choice
    except Exception:  # noqa: BLE001 - a kernel that does not build or launch on this shape: the two ops serve it
        return False
    pairs = zip(got, want) if kind == NORM else [(got, want)]
    if not all(_rel(g, w) < 1e-2 for g, w in pairs):
        return False
    try:
        fused, apart, copies = graph_ab_us(lambda w: fused_launch(kind, x, w, bias, residual, norm_w, eps),
                                           lambda w: _unfused(kind, x, w, bias, residual, norm_w, eps), weight)
    except Exception as exc:  # noqa: BLE001 - no fair timing: keep the two ops, say why
        TIMINGS[key] = {"how": "failed", "why": f"{type(exc).__name__}: {str(exc)[:120]}"}
        return False
    TIMINGS[key] = {"fused_us": round(fused, 2), "unfused_us": round(apart, 2), "how": "graph", "copies": copies}
    return fused < apart


def _choose(kind, x, weight, bias, residual, norm_w, eps) -> bool:
    key = (kind, _rows(x, x.shape[-1]), *weight.shape, x.dtype, x.device.index)
    use = CHOICES.get(key)
    if use is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False  # nothing can be timed inside a recording: the two ops, not remembered
        use = CHOICES[key] = (_fused_is_faster(kind, x, weight, bias, residual, norm_w, eps, key)
                              if x.is_cuda else True)
    return use


def _fusing() -> bool:
    """False where the references are forced for ``gemv`` (``--kernels ref:gemv``, the A/B against cuBLAS): then
    every projection must be cuBLAS's, these ones included."""
    return not ops.forced_reference("gemv")


def add_rmsnorm_gemv_triton(x, residual, norm_w, eps, weight, bias=None):
    """Same contract as :func:`~mamballama_cli.ops.decode.add_rmsnorm_gemv_ref`."""
    if (_fusing() and norm_supported(x, residual, norm_w, weight, bias)
            and _choose(NORM, x, weight, bias, residual, norm_w, eps)):
        return fused_launch(NORM, x, weight, bias, residual, norm_w, eps)
    return _unfused(NORM, x, weight, bias, residual, norm_w, eps)


def swiglu_gemv_triton(gate_up, weight, bias=None):
    """Same contract as :func:`~mamballama_cli.ops.decode.swiglu_gemv_ref`."""
    if _fusing() and swiglu_supported(gate_up, weight, bias) and _choose(SWIGLU, gate_up, weight, bias, None, None,
                                                                         0.0):
        return fused_launch(SWIGLU, gate_up, weight, bias)
    return _unfused(SWIGLU, gate_up, weight, bias, None, None, 0.0)


def choices_report() -> dict:
    """For a benchmark's JSON: the shapes (op rows x N x K) the fused kernels serve, and the timings behind each."""
    return shape_report(CHOICES, TIMINGS, lambda k: f"{('add_rmsnorm', 'swiglu')[k[0]]}_gemv {k[1]}x{k[2]}x{k[3]}",
                        "fused_gemv_shapes", "fused_gemv_timings")


def _check_fused(gen):
    errs = []
    for rows, n, k in ((1, 96, 320), (5, 200, 512)):
        x, r = _rand(gen, rows, k, dtype=torch.bfloat16), _rand(gen, rows, k, dtype=torch.bfloat16)
        lnw, w = _rand(gen, k, dtype=torch.bfloat16), _rand(gen, n, k, dtype=torch.bfloat16)
        y, h = fused_launch(NORM, x, w, None, r, lnw, 1e-5)
        want_y, want_h = _decode_refs.add_rmsnorm_gemv_ref(x, r, lnw, 1e-5, w)
        errs += [_rel(y, want_y), _rel(h, want_h)]
        y0, _ = fused_launch(NORM, x, w, None, None, lnw, 1e-5)  # a layer's first norm: no residual
        errs.append(_rel(y0, _decode_refs.add_rmsnorm_gemv_ref(x, None, lnw, 1e-5, w)[0]))
        gu = _rand(gen, rows, 2 * k, dtype=torch.bfloat16)
        errs.append(_rel(fused_launch(SWIGLU, gu, w), _decode_refs.swiglu_gemv_ref(gu, w)))
    return max(errs)


if triton is not None:
    _fused_probe = _probe(_check_fused, tol=1e-2)
    ops.register_fast("add_rmsnorm_gemv", "mamballama-triton", add_rmsnorm_gemv_triton, _fused_probe)
    ops.register_fast("swiglu_gemv", "mamballama-triton", swiglu_gemv_triton, _fused_probe)
