"""Triton kernels of the captured decode step (:class:`mamballama_cli.generation.fast.StaticDecoder`).

Fused residual-add + RMSNorm, SwiGLU, the conv-window update and the whole Mamba-2 recurrence step with GQA
indexing + D + gated RMSNorm. The attention step's kernels (RoPE + K/V write, split-K attention) serve decode
and verify alike and live in :mod:`mamballama_cli.ops.triton_attention`. Each has a pure-PyTorch twin in
:mod:`mamballama_cli.ops.decode` (or the ops package for ``causal_conv1d_update``) that its probe and the gpu
tests compare it with. The
launchers are decode-only: under autograd they fall back to the reference.

Importing this module registers the decode ops' references (ops/decode.py) and, on CUDA, these kernels.
"""

from __future__ import annotations

import torch

from mamballama_cli import ops
from mamballama_cli.ops import decode as _decode_refs  # registers the decode ops' references
from mamballama_cli.ops import tuning
from mamballama_cli.ops.common import (
    INTERPRETING,
    _check_conv_update,
    _device_guard,
    _gdc_on,
    _needs_grad,
    _next_pow2,
    _probe,
    _rand,
    _rel,
    count_scratch,
)
from mamballama_cli.ops.conv import causal_conv1d_update_ref

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the machine; the probes say why (ops/common.py)
    triton = tl = None


# ================================================================================================
# Project Triton kernels
# ================================================================================================
if triton is not None:
    # TRIGGER (sm90 and later): the kernel lets a successor launched with programmatic dependent launch (the gemv
    # op's pdl form, ops/triton_gemv.py) start at once, so that the projection after it loads its first weights
    # while this kernel runs; that successor still waits for this kernel to finish before it reads its output.
    from mamballama_cli.ops.common import _grid_launch_dependents

    @triton.jit
    def _softplus(v):
        # torch's softplus (threshold 20) with an accurate log1p (Kahan's trick): dt is often ~1e-3.
        u = tl.exp(v)
        w = 1.0 + u
        lp = tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))
        return tl.where(v > 20.0, v, lp)

    @triton.jit
    def _add_rmsnorm_kernel(X, R, W, OUT, ROUT, n_cols, eps, stride_x, stride_r, stride_o, stride_ro,
                            HAS_RES: tl.constexpr, BLOCK: tl.constexpr, TRIGGER: tl.constexpr):
        if TRIGGER:
            _grid_launch_dependents()
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        # every load ahead of the first store: a load after a store waits a round trip of its own
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            # the model adds in the activation dtype: round the sum like torch does
            h = (r.to(tl.float32) + h.to(tl.float32)).to(ROUT.dtype.element_ty)
            tl.store(ROUT + row * stride_ro + cols, h, mask=mask)
        hf = h.to(tl.float32)
        var = tl.sum(hf * hf, axis=0) / n_cols
        normed = (hf * tl.rsqrt(var + eps)).to(OUT.dtype.element_ty)  # Llama: cast, then scale
        tl.store(OUT + row * stride_o + cols, (normed.to(tl.float32) * w).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_kernel(GU, OUT, n_cols, stride_gu, stride_o, BLOCK: tl.constexpr, TRIGGER: tl.constexpr):
        if TRIGGER:
            _grid_launch_dependents()
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(OUT.dtype.element_ty).to(tl.float32)  # silu rounds, then the product
        tl.store(OUT + row * stride_o + cols, (act * u).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _conv_update_kernel(X, S, SO, W, BIAS, Y, dim, stride_xb, stride_sb, stride_sd, stride_sw,
                            stride_ob, stride_od, stride_ow, stride_wd, stride_ww, stride_yb,
                            WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr):
        # Reads the window S (batch, dim, WIDTH-1), writes the slid window to SO (which may be S itself).
        pb = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        md = d < dim
        k = tl.arange(0, BLOCK_W)  # window slots 0 .. WIDTH-2 (oldest first)
        x = tl.load(X + pb * stride_xb + d, mask=md, other=0.0)
        out, new, m2 = _conv_window(S + pb * stride_sb, stride_sd, stride_sw, x, W, stride_wd, stride_ww, BIAS, Y, d,
                                    md, k, WIDTH, HAS_BIAS, SILU)
        tl.store(Y + pb * stride_yb + d, out, mask=md)
        tl.debug_barrier()  # in place: every thread has read the old window before any slot is overwritten
        tl.store(SO + pb * stride_ob + d[:, None] * stride_od + k[None, :] * stride_ow,
                 new.to(SO.dtype.element_ty), mask=m2)

    @triton.jit
    def _conv_window(S, stride_sd, stride_sw, x, W, stride_wd, stride_ww, BIAS, Y, d, md, k,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
        # One conv step of channels d (md: the live ones; k: the window's slots 0 .. WIDTH-2, oldest first) on
        # their new inputs x: (y in Y's dtype, the slid window, its mask). Also the epilogue of the one-row in_proj
        # GEMV (ops/triton_gemv_conv.py), where x is the GEMV's own output.
        m2 = md[:, None] & (k[None, :] < WIDTH - 1)
        s_ptrs = S + d[:, None] * stride_sd + k[None, :] * stride_sw
        s = tl.load(s_ptrs, mask=m2, other=0.0)
        # the slid window's slots (slot k takes slot k+1), loaded now: a load after the output's store would
        # wait a round trip of its own
        nxt = tl.load(s_ptrs + stride_sw, mask=md[:, None] & (k[None, :] + 1 < WIDTH - 1), other=0.0)
        w_win = tl.load(W + d[:, None] * stride_wd + k[None, :] * stride_ww, mask=m2, other=0.0).to(tl.float32)
        w_new = tl.load(W + d * stride_wd + (WIDTH - 1) * stride_ww, mask=md, other=0.0).to(tl.float32)
        acc = tl.sum(s.to(tl.float32) * w_win, axis=1) + x.to(tl.float32) * w_new
        if HAS_BIAS:
            acc += tl.load(BIAS + d, mask=md, other=0.0).to(tl.float32)
        out = acc.to(Y.dtype.element_ty)
        if SILU:
            of = out.to(tl.float32)
            out = (of * tl.sigmoid(of)).to(Y.dtype.element_ty)
        # slide the window: slot k takes slot k+1, the newest slot takes x
        return out, tl.where(k[None, :] == WIDTH - 2, x[:, None].to(nxt.dtype), nxt), m2

    @triton.jit
    def _ssm_step_gated_kernel(STATE, X, B, C, DT, DT_BIAS, A_LOG, D, Z, NW, OUT, Y32, CNT,
                               heads_per_group, headdim, dstate, eps,
                               s_sb, s_sh, s_sp, s_sn, x_sb, x_sg, x_sp, b_sb, b_sg, b_sn,
                               c_sb, c_sh, c_sn, dt_sb, dt_sh, z_sb, z_sh, z_sp, o_sb,
                               HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_NORM: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, TRIGGER: tl.constexpr,
                               SPLIT: tl.constexpr):
        # One program per (sequence, SSM head, SPLIT-th of the head's rows). SPLIT = 1: the whole (headdim x dstate)
        # state of the head, so that the output row is complete for the per-head gated RMSNorm. SPLIT > 1: more
        # programs a head (a head's state is 64 KB at the 8B shape, and one program a head keeps 32 SMs busy);
        # each writes its rows of the gated y to the Y32 scratch and counts itself in CNT, and the last of the
        # head's programs to arrive normalises the whole row and resets the count (no program waits on another).
        if TRIGGER:
            _grid_launch_dependents()
        pb = tl.program_id(0)
        ph = tl.program_id(1)
        g = ph // heads_per_group  # GQA: head ph reads x and B of its KV group
        ROWS: tl.constexpr = BLOCK_P // SPLIT
        p = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
        mp = p < headdim
        dt = _softplus(tl.load(DT + pb * dt_sb + ph * dt_sh).to(tl.float32) + tl.load(DT_BIAS + ph).to(tl.float32))
        dA = tl.exp(dt * -tl.exp(tl.load(A_LOG + ph).to(tl.float32)))
        x = tl.load(X + pb * x_sb + g * x_sg + p * x_sp, mask=mp, other=0.0).to(tl.float32)
        # everything the output needs, loaded ahead of the state's store (a load after it waits a round trip)
        if HAS_D:
            Dh = tl.load(D + ph).to(tl.float32)
        if HAS_Z:
            z = tl.load(Z + pb * z_sb + ph * z_sh + p * z_sp, mask=mp, other=0.0).to(tl.float32)
        if HAS_NORM:
            q = tl.arange(0, BLOCK_P) if SPLIT > 1 else p  # the split tiles: the whole row's weights, for the last
            mq = q < headdim
            w = tl.load(NW + ph * headdim + q, mask=mq, other=0.0).to(tl.float32)
        dtx = dt * x
        y = tl.zeros([ROWS], dtype=tl.float32)
        for n0 in range(0, dstate, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            mn = n < dstate
            m2 = mp[:, None] & mn[None, :]
            s_ptrs = STATE + pb * s_sb + ph * s_sh + p[:, None] * s_sp + n[None, :] * s_sn
            s = tl.load(s_ptrs, mask=m2, other=0.0).to(tl.float32)
            bv = tl.load(B + pb * b_sb + g * b_sg + n * b_sn, mask=mn, other=0.0).to(tl.float32)
            cv = tl.load(C + pb * c_sb + ph * c_sh + n * c_sn, mask=mn, other=0.0).to(tl.float32)
            s = s * dA + dtx[:, None] * bv[None, :]
            tl.store(s_ptrs, s.to(STATE.dtype.element_ty), mask=m2)
            y += tl.sum(s * cv[None, :], axis=1)
        if HAS_D:
            y += x * Dh
        y = y.to(OUT.dtype.element_ty).to(tl.float32)  # the unfused path hands y over in the activation dtype
        if HAS_NORM:
            if HAS_Z:
                y = y * (z * tl.sigmoid(z))
            if SPLIT == 1:
                var = tl.sum(tl.where(mp, y * y, 0.0), axis=0) / headdim
                y = y * tl.rsqrt(var + eps) * w
                tl.store(OUT + pb * o_sb + ph * headdim + p, y.to(OUT.dtype.element_ty), mask=mp)
            else:
                row = pb * tl.num_programs(1) + ph
                tl.store(Y32 + row * BLOCK_P + p, y, mask=mp)
                tl.debug_barrier()  # every thread's rows stored before the one count (a release, acq_rel) is taken
                if tl.atomic_add(CNT + row, 1) == SPLIT - 1:
                    yh = tl.load(Y32 + row * BLOCK_P + q, mask=mq, other=0.0, cache_modifier=".cg")
                    var = tl.sum(tl.where(mq, yh * yh, 0.0), axis=0) / headdim  # the whole row, in one order
                    yh = yh * tl.rsqrt(var + eps) * w
                    tl.store(OUT + pb * o_sb + ph * headdim + q, yh.to(OUT.dtype.element_ty), mask=mq)
                    tl.atomic_xchg(CNT + row, 0)  # ready for the next call (and a CUDA graph's next replay)
        else:
            tl.store(OUT + pb * o_sb + ph * headdim + p, y.to(OUT.dtype.element_ty), mask=mp)


# ------------------------------------------------------------------------------------------------
# Launchers (same signatures as the references; decode-only, so they fall back when autograd needs them)
# ------------------------------------------------------------------------------------------------
def add_rmsnorm_triton(x, residual, weight, eps):
    if _needs_grad(x, residual, weight):
        return _decode_refs.add_rmsnorm_ref(x, residual, weight, eps)
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty_like(x2)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        rout = torch.empty_like(x2)
    else:
        r2 = rout = x2  # unused
    block = _next_pow2(n)
    with _device_guard(x):
        _add_rmsnorm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, rout, n, float(eps), x2.stride(0), r2.stride(0), out.stride(0), rout.stride(0),
            HAS_RES=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 8), TRIGGER=_gdc_on(x2),
        )
    return out.view(shape), (rout.view(shape) if residual is not None else x)


def swiglu_triton(gate_up):
    if _needs_grad(gate_up):
        return _decode_refs.swiglu_ref(gate_up)
    shape = gate_up.shape
    n = shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * n)
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    out = torch.empty(gu.shape[0], n, dtype=gu.dtype, device=gu.device)
    block = 1024
    with _device_guard(gu):
        _swiglu_kernel[(gu.shape[0], triton.cdiv(n, block))](gu, out, n, gu.stride(0), out.stride(0), BLOCK=block,
                                                              num_warps=4, TRIGGER=_gdc_on(gu))
    return out.view(*shape[:-1], n)


def _conv_update_launch(x, conv_state, weight, bias, activation, out_state):
    b, dim = x.shape
    width = weight.shape[-1]
    y = torch.empty_like(x)
    block_d = 128
    with _device_guard(x):
        _conv_update_kernel[(b, triton.cdiv(dim, block_d))](
            x, conv_state, out_state, weight, bias if bias is not None else weight, y, dim,
            x.stride(0), *conv_state.stride(), *out_state.stride(), weight.stride(0), weight.stride(1), y.stride(0),
            WIDTH=width, HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"),
            BLOCK_D=block_d, BLOCK_W=_next_pow2(width - 1), num_warps=4,
        )
    return y


def _conv_update_supported(x, conv_state, weight, bias, activation) -> bool:
    return (x.dim() == 2 and weight.shape[-1] >= 2 and activation in (None, "identity", "silu", "swish")
            and not _needs_grad(x, conv_state, weight, bias))


def conv_update_triton(x, conv_state, weight, bias=None, activation=None):
    """The ``causal_conv1d_update`` op for one new input: returns (y, new_state); ``conv_state`` is untouched."""
    if not _conv_update_supported(x, conv_state, weight, bias, activation):
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    new_state = torch.empty_like(conv_state)
    return _conv_update_launch(x, conv_state, weight, bias, activation, new_state), new_state


def conv_update_inplace_triton(x, conv_state, weight, bias=None, activation=None):
    """The ``conv_update_inplace`` decode op: slides ``conv_state`` in place and returns y."""
    if not _conv_update_supported(x, conv_state, weight, bias, activation):
        return _decode_refs.conv_update_inplace_ref(x, conv_state, weight, bias, activation)
    return _conv_update_launch(x, conv_state, weight, bias, activation, conv_state)


# The Mamba-2 step's tiles, (BLOCK_N, num_warps, SPLIT): SPLIT programs a head, each walking its rows of the
# head's (headdim x dstate) state BLOCK_N columns at a time. (32, 4, 1) was the only tile until 2026-12-05, when the
# 2026-11-28 profile's 6.4 us a call at the 8B shape (a head's 64 KB read and written in four dependent rounds by
# 32 programs) was read against the 1 us the state's bytes take: wider tiles take the head in fewer rounds (the
# 128-wide tile at 8 warps holds its 128 x 128 in 207 registers a thread, nothing spilled). An H100 still took
# 5.9 us a call at 8B with the autotuner's pick (2026-12-05, sixteenth session): 32 programs, one SM each, move
# the whole 4 MB; the SPLIT tiles spread a head over 2 or 4 programs (an H100 kept 128 x 8 over 2 at the 8B head,
# 2026-12-06). The autotuner times them per shape on the first call (the static decoder's warm-up), the state
# restored after each timing.
STEP_TILES = ((32, 4, 1), (64, 4, 1), (64, 8, 1), (128, 8, 1), (128, 16, 1), (128, 4, 4), (64, 4, 4), (128, 8, 2))
STEP_MAX_TILE = 128 * 128  # state elements a program holds at once at most (the 8B head: 207 registers a thread)
_STEP_TUNED: set = set()  # (headdim, dstate, device index, the tensors' dtypes): shapes the autotuner timed


def step_tiles(p: int, n: int) -> list[tuple[int, int, int]]:
    """The tiles worth timing for a head of ``p`` x ``n`` (headdim x dstate): none wider than n rounded up to a
    power of two, none holding more than :data:`STEP_MAX_TILE` elements a program; the first tile at least."""
    wide, rows = max(32, _next_pow2(n)), _next_pow2(p)
    return ([t for t in STEP_TILES if t[0] <= wide and t[0] * rows // t[2] <= STEP_MAX_TILE and rows >= t[2]]
            or list(STEP_TILES[:1]))


if triton is not None:
    def _prune_step(configs, named_args, **kwargs):
        keep = set(step_tiles(named_args["headdim"], named_args["dstate"]))
        return [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["SPLIT"]) in keep]

    _ssm_step_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "SPLIT": sp}, num_warps=w) for bn, w, sp in STEP_TILES],
        key=["headdim", "dstate"], restore_value=["STATE"], prune_configs_by={"early_config_prune": _prune_step},
    )(_ssm_step_gated_kernel)
    tuning.register_tuner("ssm_step", _ssm_step_tuned)


def choices_report() -> dict:
    """For a benchmark's JSON: the tile the autotuner kept for each Mamba-2 step shape (``step_tiles``:
    ``headdim x dstate state-dtype -> BLOCK_N x num_warps / SPLIT``)."""
    cache = getattr(_ssm_step_tuned, "cache", {}) if triton is not None else {}
    return {"step_tiles": {f"{k[0]}x{k[1]} {str(k[2]).replace('torch.', '')}":
                           f"{c.kwargs['BLOCK_N']}x{c.num_warps}/{c.kwargs['SPLIT']}" for k, c in cache.items()}}


def ssm_step_gated_triton(state, x, B, C, dt_raw, dt_bias, A_log, D, z, norm_weight, eps, tile=None):
    """``tile`` (an entry of :data:`STEP_TILES`): that tile, not the autotuner's choice (the tests run each; under
    the interpreter, and inside a CUDA graph's recording for a shape not yet timed or a batch without its scratch,
    the first of :func:`step_tiles` runs)."""
    if _needs_grad(state, x, B, C, dt_raw, dt_bias, A_log, D, z, norm_weight) or state.dtype != torch.float32:
        return _decode_refs.ssm_step_gated_ref(state, x, B, C, dt_raw, dt_bias, A_log, D, z, norm_weight, eps)
    b, h, p, n = state.shape
    g = x.shape[1]
    out = torch.empty(b, h * p, dtype=x.dtype, device=x.device)
    zz = z if z is not None else x
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    scratch = count_scratch("ssm_step", x.device, b * h, _next_pow2(p), capturing)  # rows of y (SPLIT tiles)
    y32, cnt = scratch if scratch is not None else (state, dt_raw.new_zeros(1, dtype=torch.int32))  # unread
    args = (state, x, B, C, dt_raw, dt_bias, A_log, D if D is not None else dt_bias, zz,
            norm_weight if norm_weight is not None else dt_bias, out, y32, cnt,
            h // g, p, n, float(eps),
            *state.stride(), *x.stride(), *B.stride(), *C.stride(), *dt_raw.stride(), *zz.stride(), out.stride(0))
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_NORM=norm_weight is not None, BLOCK_P=_next_pow2(p),
                 TRIGGER=_gdc_on(x))
    shape = (p, n, x.device.index, *(a.dtype for a in args[:13]))  # as the autotuner's key: sizes, dtypes
    if tile is None and (INTERPRETING or (capturing and (shape not in _STEP_TUNED or scratch is None))):
        tile = step_tiles(p, n)[0]  # nothing can be timed inside a recording (nor by the interpreter): the first tile
    with _device_guard(x):
        if tile is None:
            _ssm_step_tuned[lambda meta: (b, h, meta["SPLIT"])](*args, **flags)
            _STEP_TUNED.add(shape)
        else:
            _ssm_step_gated_kernel[(b, h, tile[2])](*args, **flags, BLOCK_N=tile[0], SPLIT=tile[2],
                                                    num_warps=tile[1])
    return out


# ================================================================================================
# Probes: run once on small random CUDA inputs, compare with the reference
# ================================================================================================
def _check_add_rmsnorm(gen):
    x, r, w = _rand(gen, 3, 300), _rand(gen, 3, 300), _rand(gen, 300)
    out, res = add_rmsnorm_triton(x, r, w, 1e-5)
    out_ref, res_ref = _decode_refs.add_rmsnorm_ref(x.double(), r.double(), w.double(), 1e-5)
    return max(_rel(out, out_ref), _rel(res, res_ref))


def _check_swiglu(gen):
    gu = _rand(gen, 3, 2 * 300)
    return _rel(swiglu_triton(gu), _decode_refs.swiglu_ref(gu.double()))


def _check_ssm_step_gated(gen):
    b, h, g, p, n = 2, 4, 2, 16, 48
    s0 = _rand(gen, b, h, p, n)
    args = (_rand(gen, b, g, p), _rand(gen, b, g, n), _rand(gen, b, h, n), _rand(gen, b, h), _rand(gen, h) - 2,
            _rand(gen, h), _rand(gen, h), _rand(gen, b, h, p), _rand(gen, h * p))
    s_ref = s0.double().clone()
    y_ref = _decode_refs.ssm_step_gated_ref(s_ref, *[a.double() for a in args], 1e-5)
    s = s0.clone()
    y = ssm_step_gated_triton(s, *args, 1e-5)
    return max(_rel(y, y_ref), _rel(s, s_ref))


def _register() -> None:
    reg = ops.register_fast
    ours = "mamballama-triton"
    reg("causal_conv1d_update", ours, conv_update_triton, _probe(_check_conv_update(conv_update_triton)))
    reg("conv_update_inplace", ours, conv_update_inplace_triton,
        _probe(_check_conv_update(conv_update_inplace_triton, inplace=True)))
    reg("add_rmsnorm", ours, add_rmsnorm_triton, _probe(_check_add_rmsnorm))
    reg("swiglu", ours, swiglu_triton, _probe(_check_swiglu))
    reg("ssm_step_gated", ours, ssm_step_gated_triton, _probe(_check_ssm_step_gated))


_register()
