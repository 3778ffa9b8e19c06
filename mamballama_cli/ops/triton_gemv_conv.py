"""The ``add_rmsnorm_gemv_conv`` op on CUDA: a Mamba-2 layer's in_proj and its conv step in one kernel, one row.

A Mamba-2 layer's decode step begins with ``add_rmsnorm``, in_proj (a GEMV) and ``conv_update_inplace`` on in_proj's
[x | B | C] columns, three launches. The conv is per channel, and the one-row GEMV kernel's programs each own whole
output rows: so the program that computes a channel can also read that channel's window (d_conv - 1 values), apply
the conv, its bias and SiLU, and slide the window in place, with no other program involved (inside the Mamba-2 step
kernel it could not: x and B are shared by a group's heads). That is one launch and one round trip of the conv's
input less per Mamba layer, and no more weight bytes. The arithmetic is the ops apart's: the GEMV's loop is the
one-row kernel's own (``_gemv_block``, ops/triton_gemv.py), its output rounded to the activations' dtype, then the
conv kernel's own step (``_conv_window``, ops/triton_decode.py).

Like the other per-shape kernels, it serves a shape only where, on its first use, it agreed with the ops apart and
was timed faster than them inside CUDA graphs, both behind the norm (the ops apart: the ``add_rmsnorm_gemv`` op as
dispatched, which may itself be the fused norm + GEMV kernel, then the conv op); :data:`TIMINGS` keeps the numbers,
and benchmarks report them as ``gemv_conv_timings``. More than one row (a batch, a verify window) goes to the ops
apart.
"""

from __future__ import annotations

import torch

from mamballama_cli import ops
from mamballama_cli.ops import decode as _decode_refs  # registers the decode ops' references (this one too)
from mamballama_cli.ops.common import GDC, _device_guard, _needs_grad, _probe, _rand, _rel
from mamballama_cli.ops.gemv_candidates import CONFIGS
from mamballama_cli.ops.graph_timing import chosen, graph_ab_us, shape_report
from mamballama_cli.ops.triton_gemv import PDL_CHOICES, _pdl_usable, gemv_supported, triton, tuned_tiles

if triton is not None:
    import triton.language as tl

    from mamballama_cli.ops.triton_decode import _conv_window
    from mamballama_cli.ops.triton_gemv import _even_k, _gemv_block

    @triton.jit
    def _gemv_conv_kernel(X, W, BIAS, Y, N, K, stride_wn, S, CW, CB, C0, C, stride_sd, stride_sw, stride_cwd,
                          stride_cww, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          EVEN_K: tl.constexpr, PDL: tl.constexpr, WIDTH: tl.constexpr, HAS_CB: tl.constexpr,
                          SILU: tl.constexpr, BLOCK_W: tl.constexpr):
        # The one-row GEMV, then, for its outputs C0 .. C0 + C - 1 (channels 0 .. C - 1 of the window S, (C, WIDTH-1)
        # at strides stride_sd, stride_sw; conv weight CW (C, WIDTH), bias CB), the conv step on the rounded outputs
        y, rows, live = _gemv_block(X, W, BIAS, Y, N, K, stride_wn, HAS_BIAS, BLOCK_N, BLOCK_K, EVEN_K, PDL, False)
        xr = y.to(Y.dtype.element_ty)  # what the conv op would read: the GEMV's output in the activations' dtype
        ch = rows - C0
        conv = live & (ch >= 0) & (ch < C)
        ch = tl.where(conv, ch, 0)
        k = tl.arange(0, BLOCK_W)
        out, new, m2 = _conv_window(S, stride_sd, stride_sw, xr, CW, stride_cwd, stride_cww, CB, Y, ch, conv, k,
                                    WIDTH, HAS_CB, SILU)
        tl.store(Y + rows, tl.where(conv, out, xr), mask=live)
        tl.debug_barrier()  # in place: every thread has read the old window before any slot is overwritten
        tl.store(S + ch[:, None] * stride_sd + k[None, :] * stride_sw, new.to(S.dtype.element_ty), mask=m2)

    # tuned over the one-row kernel's tiles, apart from it (the epilogue's registers may favour another tile)
    _gemv_conv_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in CONFIGS],
        key=["N", "K", "C"], restore_value=["S"])(_even_k(_gemv_conv_kernel))

# (N, K, C, dtype, device index) -> whether the kernel serves that in_proj shape; TIMINGS: the timings behind each
# choice (microseconds per call: the norm and the kernel, against the norm + GEMV op and the conv op).
CHOICES: dict[tuple, bool] = {}
TIMINGS: dict[tuple, dict] = {}
CONV = True  # False: never the kernel, the ops apart (benchmarks/speed.py --no-gemv-conv, the A/B over a step)
ACTIVATIONS = (None, "identity", "silu", "swish")


def conv_supported(x, weight, bias, conv_state, conv_weight, conv_bias, start: int, activation) -> bool:
    """Whether the kernel can take these arguments: one row (x's elements are one row of K), what the one-row GEMV
    kernel takes, a (1, C, width - 1) window and a (C, width) weight with the conv's columns inside the output, a
    known activation, no autograd, the references not forced for ``gemv`` or the conv, and :data:`CONV` on."""
    n, k = weight.shape
    return (CONV and x.numel() == k and gemv_supported(x, weight, bias)
            and conv_state.dim() == 3 and conv_state.shape[0] == 1 and conv_weight.dim() == 2
            and conv_weight.shape[0] == conv_state.shape[1] and conv_weight.shape[1] == conv_state.shape[2] + 1
            and conv_weight.shape[1] >= 2 and 0 <= start and start + conv_state.shape[1] <= n
            and (conv_bias is None or conv_bias.shape == (conv_state.shape[1],))
            and activation in ACTIVATIONS and not _needs_grad(conv_state, conv_weight, conv_bias)
            and not (ops.forced_reference("gemv") or ops.forced_reference("conv_update_inplace")))


def gemv_conv_launch(x, weight, bias, conv_state, conv_weight, conv_bias=None, start: int = 0, activation=None,
                     config: tuple | None = None, pdl: bool = False):
    """x (..., K), one row in all, @ weight (N, K)^T + bias -> (..., N), its columns ``start .. start + C`` then
    through the conv step (``conv_update_inplace`` on them: the window ``conv_state`` (1, C, width - 1) slid in
    place), in one kernel: autotuned, or at ``config`` (an entry of :data:`CONFIGS`: the interpreter tests run each
    this way). ``pdl``: the programmatic-dependent-launch form (on CUDA)."""
    N, K = weight.shape
    C, width = conv_weight.shape
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    x1 = x.reshape(K)
    if x1.stride(0) != 1:
        x1 = x1.contiguous()
    args = (x1, weight, bias if bias is not None else weight, y, N, K, weight.stride(0), conv_state,
            conv_weight, conv_bias if conv_bias is not None else conv_weight, start, C, conv_state.stride(1),
            conv_state.stride(2), conv_weight.stride(0), conv_weight.stride(1))
    launch = {"HAS_BIAS": bias is not None, "PDL": bool(pdl), "WIDTH": width, "HAS_CB": conv_bias is not None,
              "SILU": activation in ("silu", "swish"), "BLOCK_W": triton.next_power_of_2(width - 1)}
    if pdl and GDC:
        launch["launch_pdl"] = True
    with _device_guard(x):
        if config is None:
            _gemv_conv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **launch)
        else:
            bn, bk, warps = config
            _gemv_conv_kernel[(triton.cdiv(N, bn),)](*args, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0,
                                                     num_warps=warps, **launch)
    return y.view(*x.shape[:-1], N)


def _pdl(x, weight) -> bool:
    """Whether the kernel runs in its pdl launch: where the gemv op chose that launch for this weight at one row."""
    return PDL_CHOICES.get((1, *weight.shape, x.dtype, x.device.index), False) and _pdl_usable(x)


def _apart(x, residual, norm_w, eps, weight, bias, conv_state, conv_weight, conv_bias, start, activation):
    """What the kernel replaces, as dispatched on x's device: the ``add_rmsnorm_gemv`` op (the norm and the GEMV
    apart, or the fused kernel where that serves the shape), then ``conv_update_inplace`` on the conv's columns:
    (y, the conv's output, h)."""
    y, h = ops.dispatch("add_rmsnorm_gemv", x.device)[1](x, residual, norm_w, eps, weight, bias)
    xbc = ops.dispatch("conv_update_inplace", x.device)[1](y[..., start: start + conv_state.shape[1]], conv_state,
                                                           conv_weight, conv_bias, activation)
    return y, xbc, h


def _ours(x, residual, norm_w, eps, weight, bias, conv_state, conv_weight, conv_bias, start, activation, pdl):
    """The norm op, then the kernel: (y, the view of y's conv columns, h)."""
    normed, h = ops.dispatch("add_rmsnorm", x.device)[1](x, residual, norm_w, eps)
    y = gemv_conv_launch(normed, weight, bias, conv_state, conv_weight, conv_bias, start, activation, pdl=pdl)
    return y, y[..., start: start + conv_state.shape[1]], h


def _conv_is_faster(args: tuple, key) -> bool:
    """Check the autotuned kernel (behind the norm op) against the ops apart on copies of the window, then time both
    inside CUDA graphs over copies of the weight that pass twice the L2 cache, each on a scratch window; the caller's
    window is untouched. The kernel runs in the launch the gemv op chose for this weight
    (:data:`~mamballama_cli.ops.triton_gemv.PDL_CHOICES`); the timings go into :data:`TIMINGS`."""
    x, residual, norm_w, eps, weight, bias, conv_state, conv_weight, conv_bias, start, activation = args
    rest = (conv_weight, conv_bias, start, activation)
    try:
        s_want, s_got = conv_state.clone(), conv_state.clone()
        want = _apart(x, residual, norm_w, eps, weight, bias, s_want, *rest)  # also settles the gemv op's choices
        pdl = _pdl(x, weight)
        got = _ours(x, residual, norm_w, eps, weight, bias, s_got, *rest, pdl)  # autotunes, outside the timing
        c0, c1 = start, start + conv_state.shape[1]
        pairs = ((got[1], want[1]), (s_got, s_want), (got[2], want[2]), (got[0][..., :c0], want[0][..., :c0]),
                 (got[0][..., c1:], want[0][..., c1:]))
        if not all(_rel(a, b) < 1e-2 for a, b in pairs if a.numel()):
            TIMINGS[key] = {"how": "disagrees"}
            return False
        scratch = conv_state.clone()
        ours, apart, copies = graph_ab_us(
            lambda w: _ours(x, residual, norm_w, eps, w, bias, scratch, *rest, pdl),
            lambda w: _apart(x, residual, norm_w, eps, w, bias, scratch, *rest), weight)
    except Exception as exc:  # noqa: BLE001 - a kernel that does not build or time: the ops apart serve the shape
        TIMINGS[key] = {"how": "failed", "why": f"{type(exc).__name__}: {str(exc)[:120]}"}
        return False
    TIMINGS[key] = {"conv_us": round(ours, 2), "apart_us": round(apart, 2), "how": "graph", "copies": copies,
                    "pdl": pdl, **tuned_tiles(_gemv_conv_tuned)}
    return ours < apart


def add_rmsnorm_gemv_conv_triton(x, residual, norm_w, eps, weight, bias, conv_state, conv_weight, conv_bias=None,
                                 start: int = 0, activation=None):
    """Same contract as :func:`~mamballama_cli.ops.decode.add_rmsnorm_gemv_conv_ref`: the norm op, then one kernel
    for in_proj and the conv where :func:`conv_supported` and where, on this shape's first use, that agreed with the
    ops apart and was timed faster than them; else the ops apart. The first call of a shape should not be inside a
    CUDA graph's recording (the static decoder's warm-up makes it); one that is gets the ops apart, not
    remembered."""
    args = (x, residual, norm_w, eps, weight, bias, conv_state, conv_weight, conv_bias, start, activation)
    if not conv_supported(x, weight, bias, conv_state, conv_weight, conv_bias, start, activation):
        return _apart(*args)
    key = (*weight.shape, conv_state.shape[1], x.dtype, x.device.index)
    if not chosen(CHOICES, key, x, lambda: _conv_is_faster(args, key)):
        return _apart(*args)
    return _ours(*args, _pdl(x, weight))


def choices_report() -> dict:
    """For a benchmark's JSON: the in_proj shapes (N x K, C conv channels) the kernel serves, and the timings behind
    every choice."""
    return shape_report(CHOICES, TIMINGS, lambda k: f"{k[0]}x{k[1]} conv {k[2]}", "gemv_conv_shapes",
                        "gemv_conv_timings")


def _check_gemv_conv(gen):
    errs = []
    for n, k, c, start, bias in ((96, 320, 40, 16, True), (1100, 4096, 640, 300, False)):
        x, w = _rand(gen, 1, k, dtype=torch.bfloat16), _rand(gen, n, k, dtype=torch.bfloat16)
        b = _rand(gen, n, dtype=torch.bfloat16) if bias else None
        state, cw, cb = (_rand(gen, 1, c, 3, dtype=torch.bfloat16), _rand(gen, c, 4, dtype=torch.bfloat16),
                         _rand(gen, c, dtype=torch.bfloat16))
        want_state, ones = state.double(), torch.ones(k, dtype=torch.double, device="cuda")
        want = _decode_refs.add_rmsnorm_gemv_conv_ref(x.double(), None, ones, 0.0, w.double(),
                                                      b.double() if bias else None, want_state, cw.double(),
                                                      cb.double(), start, "silu")[1]
        normed = _decode_refs.add_rmsnorm_ref(x, None, torch.ones(k, dtype=x.dtype, device="cuda"), 0.0)[0]
        got = gemv_conv_launch(normed, w, b, state, cw, cb, start, "silu")[..., start: start + c]
        errs += [_rel(got, want), _rel(state, want_state)]
    return max(errs)


if triton is not None:
    ops.register_fast("add_rmsnorm_gemv_conv", "mamballama-triton", add_rmsnorm_gemv_conv_triton,
                      _probe(_check_gemv_conv, tol=1e-2))
