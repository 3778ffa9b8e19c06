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
and benchmarks report them as ``gemv_conv_timings``. More than one row of a batch goes to the ops apart.

A verify window has the same pair: in_proj of its T rows and ``spec_conv`` over them (``add_rmsnorm_gemv_spec_conv``,
ops/verify_ref.py). There the several-row GEMV kernel's dot modes (``_dot_rows``) own whole output columns for all
the window's rows, so a program that computed a channel stores it, then runs that channel's window conv
(``_spec_conv_block``, ops/triton_conv.py) on what it stored: one launch a Mamba layer fewer in a verify call (the
conv kernel took 3.4 us of a layer's work on an H100 at the 8B shape, 81 us a call). Batch 1 only; timed against
the ops apart per shape, as the one-row kernel is.
"""

from __future__ import annotations

import torch

# importing decode and verify_ref registers the ops' references (this module's two ops among them)
from mamballama_cli import ops
from mamballama_cli.ops import decode as _decode_refs
from mamballama_cli.ops import tuning
from mamballama_cli.ops import verify_ref as _verify_refs
from mamballama_cli.ops.common import GDC, _device_guard, _needs_grad, _next_pow2, _probe, _rand, _rel
from mamballama_cli.ops.gemv_candidates import CONFIGS, DOT_MODES, MAX_ROWS, MODES, SKINNY
from mamballama_cli.ops.graph_timing import chosen, failed, graph_ab_us, shape_report, timed_choice
from mamballama_cli.ops.triton_gemv import PDL_CHOICES, _pdl_usable, gemv_supported, triton, tuned_tiles

WINDOW_TILES = tuple(t for t in SKINNY if t[-1] in DOT_MODES)  # the window kernel's candidates: the dot modes'

if triton is not None:
    import triton.language as tl

    from mamballama_cli.ops.triton_conv import _spec_conv_block
    from mamballama_cli.ops.triton_decode import _conv_window
    from mamballama_cli.ops.triton_gemv import _dot_rows, _even_k, _gemv_block

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

    @triton.jit
    def _gemv_spec_conv_kernel(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym, BUF, SHIFT, CW, CB, POST,
                               C0, C, offset, b_sd, b_st, stride_cwd, stride_cww, p_st, p_sd,
                               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               EVEN_K: tl.constexpr, MODE: tl.constexpr, PDL: tl.constexpr, WIDTH: tl.constexpr,
                               HAS_CB: tl.constexpr, SILU: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_S: tl.constexpr):
        # The several-row GEMV of one sequence's window (M rows, a dot mode), stored; then, in a program whose
        # outputs hold conv channels (C0 .. C0 + C - 1 of the output: channels 0 .. C - 1 of the buffer BUF), their
        # window conv (spec_conv) on the rounded outputs it just stored, read back, into POST (1, M, C)
        acc, rows, outs, live = _dot_rows(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, HAS_BIAS, BLOCK_N, BLOCK_K,
                                          EVEN_K, MODE == 2, False, PDL, False)
        tl.store(Y + rows[:, None] * stride_ym + outs[None, :], acc.to(Y.dtype.element_ty), mask=live)
        first = tl.program_id(0) * BLOCK_N
        if (first + BLOCK_N > C0) & (first < C0 + C):
            tl.debug_barrier()  # every thread's outputs stored before any thread reads them back
            ch = outs - C0
            conv = (outs < N) & (ch >= 0) & (ch < C)
            ch = tl.where(conv, ch, 0)
            src = offset + tl.load(SHIFT).to(tl.int32)  # the buffer index of the conv's first input
            _spec_conv_block(Y + (C0 + ch)[:, None], stride_ym, BUF + ch[:, None] * b_sd, b_st, src, offset, M, CW, CB,
                             POST + ch[:, None] * p_sd, p_st, ch, conv, stride_cwd, stride_cww, WIDTH, HAS_CB, SILU,
                             BLOCK_N, BLOCK_T, BLOCK_S)

    # tuned over the one-row kernel's tiles, apart from it (the epilogue's registers may favour another tile); the
    # window's over the several-row kernel's dot-mode tiles (the acc mode stores as it goes)
    _gemv_conv_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in CONFIGS],
        key=["N", "K", "C"], restore_value=["S"])(_even_k(_gemv_conv_kernel))
    _gemv_spec_conv_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k, "MODE": MODES[mode]}, num_warps=w, num_stages=st)
                 for n, k, w, st, mode in WINDOW_TILES],
        key=["M", "N", "K", "C"], restore_value=["BUF"])(_even_k(_gemv_spec_conv_kernel))
    tuning.register_tuner("gemv_conv", _gemv_conv_tuned)
    tuning.register_tuner("gemv_spec_conv", _gemv_spec_conv_tuned)

# (N, K, C, dtype, device index) -> whether the kernel serves that in_proj shape; TIMINGS: the timings behind each
# choice (microseconds per call: the norm and the kernel, against the norm + GEMV op and the conv op).
CHOICES: dict[tuple, bool] = {}
TIMINGS: dict[tuple, dict] = {}
WINDOW_CHOICES: dict[tuple, bool] = {}  # the window kernel's, keyed (rows, N, K, C, dtype, device index)
WINDOW_TIMINGS: dict[tuple, dict] = {}
tuning.register_choices("gemv_conv", CHOICES)
tuning.register_choices("gemv_spec_conv", WINDOW_CHOICES)
CONV = True  # False: never the kernel, the ops apart (benchmarks/speed.py --no-gemv-conv, the A/B over a step)
# False: a verify window's in_proj and conv always apart, the one-token step's epilogue kept (speculative_verify.py
# --no-spec-conv, the A/B of the window's epilogue over a verify call: gpu_session.sh verifync, verifyold)
SPEC_CONV = True
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
    tile = None
    if config is not None:
        bn, bk, warps = config
        tile = {"BLOCK_N": bn, "BLOCK_K": bk, "EVEN_K": K % bk == 0, "num_warps": warps}
    _launch(x, _gemv_conv_tuned, _gemv_conv_kernel, N, args, launch, pdl, tile)
    return y.view(*x.shape[:-1], N)


def _launch(x, tuned, kernel, N: int, args: tuple, launch: dict, pdl: bool, tile: dict | None) -> None:
    """``kernel`` over N outputs in blocks of BLOCK_N: autotuned by ``tuned``, or at ``tile`` (its constexprs and
    launch options); ``pdl``: in the programmatic-dependent-launch form where the device has it."""
    if pdl and GDC:
        launch = {**launch, "launch_pdl": True}
    with _device_guard(x):
        if tile is None:
            tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **launch)
        else:
            kernel[(triton.cdiv(N, tile["BLOCK_N"]),)](*args, **tile, **launch)


def spec_conv_supported(x, weight, bias, conv_buf, shift, offset: int, conv_weight, conv_bias, start: int,
                        activation) -> bool:
    """Whether the window kernel can take these arguments: one sequence's 2 .. MAX_ROWS rows that the several-row
    GEMV kernel takes, a (1, C, width - 1 + window) buffer with room for the rows after ``offset``, one shift, a
    (C, width) weight with the conv's columns inside the output, a known activation, no autograd, the references
    not forced for ``gemv`` or ``spec_conv``, and :data:`CONV` and :data:`SPEC_CONV` on."""
    n, k = weight.shape
    rows = x.numel() // max(k, 1)
    return (CONV and SPEC_CONV and 2 <= rows <= MAX_ROWS and x.shape[0] == 1 and gemv_supported(x, weight, bias)
            and conv_buf.dim() == 3 and conv_buf.shape[0] == 1 and conv_weight.dim() == 2
            and conv_weight.shape[0] == conv_buf.shape[1] and conv_weight.shape[1] >= 2
            and 0 <= offset and offset + conv_weight.shape[1] - 1 + rows <= conv_buf.shape[2]
            and shift.numel() == 1 and not shift.is_floating_point()
            and 0 <= start and start + conv_buf.shape[1] <= n
            and (conv_bias is None or conv_bias.shape == (conv_buf.shape[1],))
            and activation in ACTIVATIONS and not _needs_grad(conv_buf, conv_weight, conv_bias)
            and not (ops.forced_reference("gemv") or ops.forced_reference("spec_conv")))


def gemv_spec_conv_launch(x, weight, bias, conv_buf, shift, offset: int, conv_weight, conv_bias=None, start: int = 0,
                          activation=None, config: tuple | None = None, pdl: bool = False):
    """x (1, T, K) @ weight (N, K)^T + bias -> (1, T, N), then ``spec_conv`` of its columns ``start .. start + C``
    over the window (``conv_buf`` (1, C, ...) rewritten from ``offset``, its prefix read at ``offset + shift``), in
    one kernel: autotuned, or at ``config`` (an entry of :data:`WINDOW_TILES`). Returns (the projection, the conv's
    output (1, T, C)). ``pdl``: the programmatic-dependent-launch form (on CUDA)."""
    N, K = weight.shape
    C, width = conv_weight.shape
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    post = torch.empty(1, M, C, dtype=x.dtype, device=x.device)
    args = (x2, weight, bias if bias is not None else weight, y, M, N, K, x2.stride(0), weight.stride(0),
            y.stride(0), conv_buf, shift.reshape(1), conv_weight, conv_bias if conv_bias is not None else conv_weight,
            post, start, C, int(offset), conv_buf.stride(1), conv_buf.stride(2), conv_weight.stride(0),
            conv_weight.stride(1), post.stride(1), post.stride(2))
    launch = {"HAS_BIAS": bias is not None, "PDL": bool(pdl), "WIDTH": width, "HAS_CB": conv_bias is not None,
              "SILU": activation in ("silu", "swish"), "BLOCK_T": _next_pow2(M), "BLOCK_S": _next_pow2(width - 1 + M)}
    tile = None
    if config is not None:
        bn, bk, warps, stages, mode = config
        if mode not in DOT_MODES:
            raise ValueError(f"the window's conv GEMV takes a tile of mode {' or '.join(DOT_MODES)}, not {mode!r}")
        tile = {"BLOCK_N": bn, "BLOCK_K": bk, "EVEN_K": K % bk == 0, "MODE": MODES[mode], "num_warps": warps,
                "num_stages": stages}
    _launch(x, _gemv_spec_conv_tuned, _gemv_spec_conv_kernel, N, args, launch, pdl, tile)
    return y.view(*x.shape[:-1], N), post


def _pdl(x, weight) -> bool:
    """Whether the kernel runs in its pdl launch: where the gemv op chose that launch for this weight at x's rows."""
    rows = x.numel() // max(weight.shape[1], 1)
    return PDL_CHOICES.get((rows, *weight.shape, x.dtype, x.device.index), False) and _pdl_usable(x)


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


def _faster(key, weight, state, cols, apart, ours, pdl, tuner, timings=None) -> bool:
    """Check ``ours(w, s)`` (the norm op, then a conv kernel, on weight ``w`` and a conv state ``s``) against
    ``apart(w, s)`` (the ops apart) on copies of the state: every output and the state after it must agree. Then
    time both inside CUDA graphs over copies of the weight that pass twice the L2 cache, each on a scratch state;
    the caller's state is untouched. Each returns (y, the conv's output, h); y is compared outside the conv's
    columns ``cols`` (start, end) only (``ours`` may leave them unspecified). The timings go into ``timings[key]``
    (default: :data:`TIMINGS`)."""
    timings = TIMINGS if timings is None else timings
    try:
        s_want, s_got = state.clone(), state.clone()
        want = apart(weight, s_want)  # also settles the gemv op's choices
        cached = set(tuner.cache)
        got = ours(weight, s_got)  # autotunes, outside the timing
        c0, c1 = cols
        pairs = ((got[1], want[1]), (s_got, s_want), (got[2], want[2]), (got[0][..., :c0], want[0][..., :c0]),
                 (got[0][..., c1:], want[0][..., c1:]))
        if not all(_rel(a, b) < 1e-2 for a, b in pairs if a.numel()):
            timings[key] = {"how": "disagrees"}
            return False
    except Exception as exc:  # noqa: BLE001 - a kernel that does not build or run: the ops apart serve the shape
        timings[key] = failed(exc)
        return False
    scratch = state.clone()
    return timed_choice(timings, key, ("conv_us", "apart_us"), lambda w: ours(w, scratch),
                        lambda w: apart(w, scratch), weight, (tuner, cached, got[0].numel() // got[0].shape[-1]),
                        graph_ab_us, lambda: ({"pdl": pdl}, tuned_tiles(tuner)))


def _conv_is_faster(args: tuple, key) -> bool:
    """The one-row kernel (behind the norm op) against the ops apart (:func:`_apart`), checked and timed by
    :func:`_faster`; it runs in the launch the gemv op chose for this weight
    (:data:`~mamballama_cli.ops.triton_gemv.PDL_CHOICES`)."""
    x, residual, norm_w, eps, weight, bias, conv_state, conv_weight, conv_bias, start, activation = args
    rest = (conv_weight, conv_bias, start, activation)
    pdl = _pdl(x, weight)
    return _faster(key, weight, conv_state, (start, start + conv_state.shape[1]),
                   lambda w, s: _apart(x, residual, norm_w, eps, w, bias, s, *rest),
                   lambda w, s: _ours(x, residual, norm_w, eps, w, bias, s, *rest, pdl), pdl, _gemv_conv_tuned)


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


def _spec_apart(x, residual, norm_w, eps, weight, bias, conv_buf, shift, offset, conv_weight, conv_bias, start,
                activation):
    """What the window kernel replaces, as dispatched on x's device: the ``add_rmsnorm_gemv`` op, then ``spec_conv``
    on the conv's columns: (y, the conv's output, h)."""
    y, h = ops.dispatch("add_rmsnorm_gemv", x.device)[1](x, residual, norm_w, eps, weight, bias)
    post = ops.dispatch("spec_conv", x.device)[1](y[..., start: start + conv_buf.shape[1]], conv_buf, shift, offset,
                                                  conv_weight, conv_bias, activation)
    return y, post, h


def _spec_ours(x, residual, norm_w, eps, weight, bias, conv_buf, shift, offset, conv_weight, conv_bias, start,
               activation, pdl):
    """The norm op, then the window kernel: (y, the conv's output, h)."""
    normed, h = ops.dispatch("add_rmsnorm", x.device)[1](x, residual, norm_w, eps)
    y, post = gemv_spec_conv_launch(normed, weight, bias, conv_buf, shift, offset, conv_weight, conv_bias, start,
                                    activation, pdl=pdl)
    return y, post, h


def add_rmsnorm_gemv_spec_conv_triton(x, residual, norm_w, eps, weight, bias, conv_buf, shift, offset: int,
                                      conv_weight, conv_bias=None, start: int = 0, activation=None):
    """Same contract as :func:`~mamballama_cli.ops.verify_ref.add_rmsnorm_gemv_spec_conv_ref`: the norm op, then one
    kernel for the window's in_proj and its conv where :func:`spec_conv_supported` and where, on this shape's first
    use, that agreed with the ops apart and was timed faster than them (:func:`_faster`); else the ops apart. As
    for the one-row op, a shape's first call inside a CUDA graph's recording gets the ops apart, not remembered."""
    args = (x, residual, norm_w, eps, weight, bias, conv_buf, shift, offset, conv_weight, conv_bias, start,
            activation)
    if not spec_conv_supported(x, weight, bias, conv_buf, shift, offset, conv_weight, conv_bias, start, activation):
        return _spec_apart(*args)
    key = (x.numel() // weight.shape[1], *weight.shape, conv_buf.shape[1], x.dtype, x.device.index)
    pdl = _pdl(x, weight)
    head, tail = args[:4], args[7:]  # (x, residual, norm_w, eps), (shift, offset, conv_weight, ..., activation)

    def decide():
        return _faster(key, weight, conv_buf, (start, start + conv_buf.shape[1]),
                       lambda w, buf: _spec_apart(*head, w, bias, buf, *tail),
                       lambda w, buf: _spec_ours(*head, w, bias, buf, *tail, pdl), pdl, _gemv_spec_conv_tuned,
                       WINDOW_TIMINGS)

    if not chosen(WINDOW_CHOICES, key, x, decide):
        return _spec_apart(*args)
    return _spec_ours(*args, pdl)


def choices_report() -> dict:
    """For a benchmark's JSON: the in_proj shapes (N x K, C conv channels; rows first for a window) each kernel
    serves, and the timings behind every choice."""
    return {**shape_report(CHOICES, TIMINGS, lambda k: f"{k[0]}x{k[1]} conv {k[2]}", "gemv_conv_shapes",
                           "gemv_conv_timings"),
            **shape_report(WINDOW_CHOICES, WINDOW_TIMINGS, lambda k: f"{k[0]}x{k[1]}x{k[2]} conv {k[3]}",
                           "gemv_spec_conv_shapes", "gemv_spec_conv_timings")}


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


def _check_gemv_spec_conv(gen):
    errs = []
    for rows, n, k, c, start, shift, offset in ((5, 96, 320, 40, 16, 2, 0), (3, 1100, 4096, 640, 300, 0, 4)):
        x, w = _rand(gen, 1, rows, k, dtype=torch.bfloat16), _rand(gen, n, k, dtype=torch.bfloat16)
        buf, cw = _rand(gen, 1, c, 3 + 8, dtype=torch.bfloat16), _rand(gen, c, 4, dtype=torch.bfloat16)
        sh = torch.full((1,), shift, dtype=torch.long, device="cuda")
        want_buf = buf.double()
        y = _decode_refs.gemv_ref(x, w, None)  # the kernel's own rounding of the projection, then the conv in float64
        want = _verify_refs.spec_conv_ref(y[..., start: start + c].double(), want_buf, sh, offset, cw.double(), None,
                                          "silu")
        # one tile, not the autotuner's eleven: a probe that compiled every tile twice would cost a first call
        got = gemv_spec_conv_launch(x, w, None, buf, sh, offset, cw, None, start, "silu", config=WINDOW_TILES[0])
        errs += [_rel(got[0], y), _rel(got[1], want), _rel(buf, want_buf)]
    return max(errs)


if triton is not None:
    ops.register_fast("add_rmsnorm_gemv_conv", "mamballama-triton", add_rmsnorm_gemv_conv_triton,
                      _probe(_check_gemv_conv, tol=1e-2))
    ops.register_fast("add_rmsnorm_gemv_spec_conv", "mamballama-triton", add_rmsnorm_gemv_spec_conv_triton,
                      _probe(_check_gemv_spec_conv, tol=1e-2))
