"""Fast CUDA implementations of the ops in :mod:`mamballama_cli.ops`, registered through ``register_fast``.

Two sources:

* mamba_ssm's Triton kernels: the SSD chunk scan with initial and final states (prefill and training,
  forward and backward), ``selective_state_update`` (one recurrent step) and the gated RMSNorm. mamba_ssm is
  often installed without its CUDA extension; only the Triton modules are needed, and each probe imports and
  runs exactly what it uses, so the package being present proves nothing by itself.
* Triton kernels of this project for the captured decode step (:mod:`mamballama_cli.generation.fast`):
  fused residual-add + RMSNorm, SwiGLU, the conv-window update, the whole Mamba-2 recurrence step with
  GQA indexing + D + gated RMSNorm, RoPE + K/V write at a device-side position, and split-K decode
  attention over a static K/V buffer with a device-side length. Each has a pure-PyTorch twin (the
  ``*_ref`` functions of generation/fast.py or the ops package) that the gpu tests compare it with.

causal-conv1d's kernels are used for the prefill conv when that package imports and runs; otherwise the
reference (a depthwise ``F.conv1d``, which is already a single cuDNN call) stays in place.

Every probe runs its kernel once on small random CUDA inputs and compares it with the reference, so a
broken install falls back to the reference with the reason recorded (``mamballama env`` prints it).
"""

from __future__ import annotations

import contextlib
import importlib
import math

import torch
import torch.nn.functional as F

from mamballama_cli import ops
from mamballama_cli.generation import fast as _decode_refs  # registers the decode ops' references
from mamballama_cli.ops.conv import causal_conv1d_ref, causal_conv1d_update_ref
from mamballama_cli.ops.norm import rmsnorm_gated_ref, rmsnorm_ref
from mamballama_cli.ops.ssd import ssd_chunk_scan_ref, ssm_step_ref

try:
    import triton
    import triton.language as tl

    TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the machine
    triton = tl = None
    TRITON_ERROR = f"triton does not import ({type(exc).__name__}: {exc})"


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ================================================================================================
# Project Triton kernels
# ================================================================================================
if triton is not None:

    @triton.jit
    def _softplus(v):
        # torch's softplus (threshold 20) with an accurate log1p (Kahan's trick): dt is often ~1e-3.
        u = tl.exp(v)
        w = 1.0 + u
        lp = tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))
        return tl.where(v > 20.0, v, lp)

    @triton.jit
    def _add_rmsnorm_kernel(X, R, W, OUT, ROUT, n_cols, eps, stride_x, stride_r, stride_o, stride_ro,
                            HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            # the model adds in the activation dtype: round the sum like torch does
            h = (r.to(tl.float32) + h.to(tl.float32)).to(ROUT.dtype.element_ty)
            tl.store(ROUT + row * stride_ro + cols, h, mask=mask)
        hf = h.to(tl.float32)
        var = tl.sum(hf * hf, axis=0) / n_cols
        normed = (hf * tl.rsqrt(var + eps)).to(OUT.dtype.element_ty)  # Llama: cast, then scale
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * stride_o + cols, (normed.to(tl.float32) * w).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_kernel(GU, OUT, n_cols, stride_gu, stride_o, BLOCK: tl.constexpr):
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
        m2 = md[:, None] & (k[None, :] < WIDTH - 1)
        s_ptrs = S + pb * stride_sb + d[:, None] * stride_sd + k[None, :] * stride_sw
        s = tl.load(s_ptrs, mask=m2, other=0.0)
        x = tl.load(X + pb * stride_xb + d, mask=md, other=0.0)
        w_win = tl.load(W + d[:, None] * stride_wd + k[None, :] * stride_ww, mask=m2, other=0.0).to(tl.float32)
        w_new = tl.load(W + d * stride_wd + (WIDTH - 1) * stride_ww, mask=md, other=0.0).to(tl.float32)
        acc = tl.sum(s.to(tl.float32) * w_win, axis=1) + x.to(tl.float32) * w_new
        if HAS_BIAS:
            acc += tl.load(BIAS + d, mask=md, other=0.0).to(tl.float32)
        out = acc.to(Y.dtype.element_ty)
        if SILU:
            of = out.to(tl.float32)
            out = (of * tl.sigmoid(of)).to(Y.dtype.element_ty)
        tl.store(Y + pb * stride_yb + d, out, mask=md)
        # slide the window: slot k takes slot k+1, the newest slot takes x
        nxt = tl.load(s_ptrs + stride_sw, mask=md[:, None] & (k[None, :] + 1 < WIDTH - 1), other=0.0)
        new = tl.where(k[None, :] == WIDTH - 2, x[:, None].to(nxt.dtype), nxt)
        tl.debug_barrier()  # in place: every thread has read the old window before any slot is overwritten
        tl.store(SO + pb * stride_ob + d[:, None] * stride_od + k[None, :] * stride_ow,
                 new.to(SO.dtype.element_ty), mask=m2)

    @triton.jit
    def _ssm_step_gated_kernel(STATE, X, B, C, DT, DT_BIAS, A_LOG, D, Z, NW, OUT,
                               heads_per_group, headdim, dstate, eps,
                               s_sb, s_sh, s_sp, s_sn, x_sb, x_sg, x_sp, b_sb, b_sg, b_sn,
                               c_sb, c_sh, c_sn, dt_sb, dt_sh, z_sb, z_sh, z_sp, o_sb,
                               HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_NORM: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program per (sequence, SSM head): the whole (headdim x dstate) state of the head, so that the
        # output row is complete for the per-head gated RMSNorm without a second kernel.
        pb = tl.program_id(0)
        ph = tl.program_id(1)
        g = ph // heads_per_group  # GQA: head ph reads x and B of its KV group
        p = tl.arange(0, BLOCK_P)
        mp = p < headdim
        dt = _softplus(tl.load(DT + pb * dt_sb + ph * dt_sh).to(tl.float32) + tl.load(DT_BIAS + ph).to(tl.float32))
        dA = tl.exp(dt * -tl.exp(tl.load(A_LOG + ph).to(tl.float32)))
        x = tl.load(X + pb * x_sb + g * x_sg + p * x_sp, mask=mp, other=0.0).to(tl.float32)
        dtx = dt * x
        y = tl.zeros([BLOCK_P], dtype=tl.float32)
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
            y += x * tl.load(D + ph).to(tl.float32)
        y = y.to(OUT.dtype.element_ty).to(tl.float32)  # the unfused path hands y over in the activation dtype
        if HAS_NORM:
            if HAS_Z:
                z = tl.load(Z + pb * z_sb + ph * z_sh + p * z_sp, mask=mp, other=0.0).to(tl.float32)
                y = y * (z * tl.sigmoid(z))
            var = tl.sum(tl.where(mp, y * y, 0.0), axis=0) / headdim
            w = tl.load(NW + ph * headdim + p, mask=mp, other=0.0).to(tl.float32)
            y = y * tl.rsqrt(var + eps) * w
        tl.store(OUT + pb * o_sb + ph * headdim + p, y.to(OUT.dtype.element_ty), mask=mp)

    @triton.jit
    def _rope_kv_write_kernel(QKV, COS, SIN, POS, QOUT, KC, VC, n_heads, n_kv, headdim, half_rot,
                              qkv_sb, cs_st, q_sb, q_sh, kc_sb, kc_sh, kc_st, vc_sb, vc_sh, vc_st,
                              BLOCK_D: tl.constexpr):
        # Programs 0..n_heads-1 rotate a query head; the next n_kv rotate a key head and store it and its
        # value head at the device-side position (no host sync, so the step can live in a CUDA graph).
        pb = tl.program_id(0)
        j = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        md = d < headdim
        pos = tl.load(POS)
        base = QKV + pb * qkv_sb + j * headdim  # [q heads | k heads | v heads]
        x = tl.load(base + d, mask=md, other=0.0)
        in_rot = d < 2 * half_rot
        first = d < half_rot
        partner = tl.where(first, d + half_rot, d - half_rot)
        xp = tl.load(base + partner, mask=md & in_rot, other=0.0)
        c = tl.load(COS + pos * cs_st + d, mask=md & in_rot, other=0.0).to(tl.float32)
        s = tl.load(SIN + pos * cs_st + d, mask=md & in_rot, other=0.0).to(tl.float32)
        # q * cos + rotate_half(q) * sin, each product rounded to the activation dtype as torch does
        a = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32)
        rh = tl.where(first, -xp, xp)
        b = (rh.to(tl.float32) * s).to(x.dtype).to(tl.float32)
        out = tl.where(in_rot, (a + b).to(x.dtype), x)
        if j < n_heads:
            tl.store(QOUT + pb * q_sb + j * q_sh + d, out.to(QOUT.dtype.element_ty), mask=md)
        else:
            kh = j - n_heads
            tl.store(KC + pb * kc_sb + kh * kc_sh + pos * kc_st + d, out.to(KC.dtype.element_ty), mask=md)
            v = tl.load(QKV + pb * qkv_sb + (n_heads + n_kv + kh) * headdim + d, mask=md, other=0.0)
            tl.store(VC + pb * vc_sb + kh * vc_sh + pos * vc_st + d, v.to(VC.dtype.element_ty), mask=md)

    @triton.jit
    def _decode_attn_split_kernel(Q, K, V, LEN, OP, LSE, scale, n_kv, group, headdim, split_len,
                                  q_sb, q_sh, k_sb, k_sh, k_st, v_sb, v_sh, v_st,
                                  op_sb, op_sh, op_ss, lse_sb, lse_sh,
                                  BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                                  IEEE: tl.constexpr):
        # Flash-decoding: program (sequence x KV head, split) handles the `group` query heads that share the
        # KV head over one slice of positions; a second kernel merges the slices by their log-sum-exp.
        pbk = tl.program_id(0)
        ps = tl.program_id(1)
        pb = pbk // n_kv
        kh = pbk % n_kv
        r = tl.arange(0, BLOCK_R)
        mr = r < group
        d = tl.arange(0, BLOCK_D)
        md = d < headdim
        heads = kh * group + r
        q = tl.load(Q + pb * q_sb + heads[:, None] * q_sh + d[None, :], mask=mr[:, None] & md[None, :], other=0.0)
        length = tl.load(LEN)
        start = ps * split_len
        end = tl.minimum(start + split_len, length)
        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mt = t < end
            m2 = mt[:, None] & md[None, :]
            k = tl.load(K + pb * k_sb + kh * k_sh + t[:, None] * k_st + d[None, :], mask=m2, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(mt[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V + pb * v_sb + kh * v_sh + t[:, None] * v_st + d[None, :], mask=m2, other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        has = l_i > 0.0
        safe_l = tl.where(has, l_i, 1.0)
        lse = tl.where(has, m_i + tl.log(safe_l), float("-inf"))
        o = acc / safe_l[:, None]
        tl.store(OP + pb * op_sb + heads[:, None] * op_sh + ps * op_ss + d[None, :], o,
                 mask=mr[:, None] & md[None, :])
        tl.store(LSE + pb * lse_sb + heads * lse_sh + ps, lse, mask=mr)

    @triton.jit
    def _decode_attn_combine_kernel(OP, LSE, OUT, n_splits, headdim, op_sb, op_sh, op_ss, lse_sb, lse_sh,
                                    o_sb, o_sh, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        pb = tl.program_id(0)
        ph = tl.program_id(1)
        sp = tl.arange(0, BLOCK_S)
        ms = sp < n_splits
        lse = tl.load(LSE + pb * lse_sb + ph * lse_sh + sp, mask=ms, other=float("-inf"))
        m = tl.max(lse, axis=0)  # finite: the first slice always holds position 0
        w = tl.where(ms, tl.exp(lse - m), 0.0)
        w = w / tl.sum(w, axis=0)
        d = tl.arange(0, BLOCK_D)
        md = d < headdim
        o = tl.load(OP + pb * op_sb + ph * op_sh + sp[:, None] * op_ss + d[None, :],
                    mask=ms[:, None] & md[None, :], other=0.0)
        out = tl.sum(o * w[:, None], axis=0)
        tl.store(OUT + pb * o_sb + ph * o_sh + d, out.to(OUT.dtype.element_ty), mask=md)


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
            HAS_RES=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 8),
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
                                                              num_warps=4)
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


def ssm_step_gated_triton(state, x, B, C, dt_raw, dt_bias, A_log, D, z, norm_weight, eps):
    if _needs_grad(state, x, B, C, dt_raw, dt_bias, A_log, D, z, norm_weight) or state.dtype != torch.float32:
        return _decode_refs.ssm_step_gated_ref(state, x, B, C, dt_raw, dt_bias, A_log, D, z, norm_weight, eps)
    b, h, p, n = state.shape
    g = x.shape[1]
    out = torch.empty(b, h * p, dtype=x.dtype, device=x.device)
    zz = z if z is not None else x
    with _device_guard(x):
        _ssm_step_gated_kernel[(b, h)](
            state, x, B, C, dt_raw, dt_bias, A_log, D if D is not None else dt_bias, zz,
            norm_weight if norm_weight is not None else dt_bias, out,
            h // g, p, n, float(eps),
            *state.stride(), *x.stride(), *B.stride(), *C.stride(), *dt_raw.stride(), *zz.stride(), out.stride(0),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_NORM=norm_weight is not None,
            BLOCK_P=_next_pow2(p), BLOCK_N=min(_next_pow2(n), 32), num_warps=4,
        )
    return out


def rope_kv_write_triton(qkv, cos_table, sin_table, k_cache, v_cache, pos, n_heads, n_kv):
    if _needs_grad(qkv):
        return _decode_refs.rope_kv_write_ref(qkv, cos_table, sin_table, k_cache, v_cache, pos, n_heads, n_kv)
    b = qkv.shape[0]
    hd = k_cache.shape[-1]
    rot = cos_table.shape[-1]
    q = torch.empty(b, n_heads, hd, dtype=qkv.dtype, device=qkv.device)
    with _device_guard(qkv):
        _rope_kv_write_kernel[(b, n_heads + n_kv)](
            qkv, cos_table, sin_table, pos, q, k_cache, v_cache, n_heads, n_kv, hd, rot // 2,
            qkv.stride(0), cos_table.stride(0), q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            BLOCK_D=_next_pow2(hd), num_warps=1,
        )
    return q


DECODE_BLOCK_T = 64


def decode_splits(capacity: int, batch: int, n_kv: int, target_programs: int = 256, max_splits: int = 64):
    """(n_splits, split_len) for a K/V buffer of ``capacity`` positions: enough programs to fill the GPU."""
    blocks = max(1, math.ceil(capacity / DECODE_BLOCK_T))
    n_splits = max(1, min(max_splits, blocks, math.ceil(target_programs / max(1, batch * n_kv))))
    split_len = math.ceil(blocks / n_splits) * DECODE_BLOCK_T
    return math.ceil(capacity / split_len), split_len


def decode_attention_triton(q, k_cache, v_cache, length, scale):
    if _needs_grad(q):
        return _decode_refs.decode_attention_ref(q, k_cache, v_cache, length, scale)
    b, nh, hd = q.shape
    n_kv, cap = k_cache.shape[1], k_cache.shape[2]
    group = nh // n_kv
    n_splits, split_len = decode_splits(cap, b, n_kv)
    part = torch.empty(b, nh, n_splits, hd, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, nh, n_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(b, nh, hd, dtype=q.dtype, device=q.device)
    with _device_guard(q):
        _decode_attn_split_kernel[(b * n_kv, n_splits)](
            q, k_cache, v_cache, length, part, lse, float(scale), n_kv, group, hd, split_len,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            BLOCK_R=max(16, _next_pow2(group)), BLOCK_T=DECODE_BLOCK_T, BLOCK_D=max(16, _next_pow2(hd)),
            IEEE=q.dtype == torch.float32, num_warps=4,
        )
        _decode_attn_combine_kernel[(b, nh)](
            part, lse, out, n_splits, hd, part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
            BLOCK_S=_next_pow2(n_splits), BLOCK_D=_next_pow2(hd), num_warps=4,
        )
    return out


# ================================================================================================
# mamba_ssm's Triton kernels
# ================================================================================================
def _expand_groups(t, groups: int):
    """(..., g, n) -> (..., groups, n), group i reading g-group i // (groups // g)."""
    g = t.shape[-2]
    return t if g == groups else t.repeat_interleave(groups // g, dim=-2)


def ssd_scan_mamba(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None):
    """mamba_chunk_scan_combined with initial and final states (differentiable through both)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    # mamba_ssm needs B and C at the same group count; here C has one group per head, B one per KV head
    groups = max(B.shape[2], C.shape[2])  # n_kv or n_heads: both divide the head count
    B, C = _expand_groups(B, groups), _expand_groups(C, groups)
    y, final = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, return_final_states=True
    )
    return y, final


_ZERO_BIAS: dict = {}


def ssm_step_mamba(state, x, dt, A, B, C, D=None):
    """selective_state_update; updates ``state`` in place and returns it."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    if _needs_grad(state, x, dt, A, B, C, D) or state.dtype not in (torch.float32, x.dtype):
        return ssm_step_ref(state, x, dt, A, B, C, D)
    b, h, p = x.shape
    n = state.shape[-1]
    groups = max(B.shape[1], C.shape[1])
    B, C = _expand_groups(B, groups), _expand_groups(C, groups)
    key = (h, state.device)
    if key not in _ZERO_BIAS:  # the launcher reads dt_bias's strides even when there is no bias
        _ZERO_BIAS[key] = torch.zeros(h, dtype=torch.float32, device=state.device)
    y = selective_state_update(
        state, x, dt[..., None].expand(b, h, p), A.float()[:, None, None].expand(h, p, n), B, C,
        D=D[:, None].expand(h, p) if D is not None else None,
        dt_bias=_ZERO_BIAS[key][:, None].expand(h, p), dt_softplus=False,
    )
    return state, y


def rmsnorm_gated_mamba(y, z, weight, eps, group_size):
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    return rmsnorm_fn(y, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)


def rmsnorm_mamba(x, weight, eps, out_dtype=None):
    """Llama's RMSNorm through mamba_ssm's fused Triton layer norm (forward and backward in one kernel each).

    The reference runs six elementwise kernels forward and more backward over the activations; in training
    that is one of the larger costs of a small-width model. Rounds once at the end (the reference rounds the
    normalised input to the input dtype before the weight), a difference well inside bf16's precision.
    """
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

    out = rms_norm_fn(x, weight, None, eps=eps)
    return out if out_dtype is None else out.to(out_dtype)


def causal_conv1d_pkg(x, weight, bias=None, initial_state=None, activation=None):
    from causal_conv1d import causal_conv1d_fn

    act = None if activation in (None, "identity") else "silu"
    if initial_state is not None:
        # causal-conv1d wants the carried window channel-last in memory
        initial_state = initial_state.transpose(1, 2).contiguous().transpose(1, 2)
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    y, final = causal_conv1d_fn(x, weight, bias, initial_states=initial_state, return_final_states=True,
                                activation=act)
    return y, final


def causal_conv1d_update_pkg(x, conv_state, weight, bias=None, activation=None):
    from causal_conv1d import causal_conv1d_update

    if _needs_grad(x, conv_state, weight, bias):
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    act = None if activation in (None, "identity") else "silu"
    y = causal_conv1d_update(x, conv_state, weight, bias, act)
    return y, conv_state


# ================================================================================================
# Probes: import, run once on small random CUDA inputs, compare with the reference
# ================================================================================================
def _rel(a, b) -> float:
    """Relative error of ``a`` against ``b``; inf when either holds a non-finite value, so that ``max`` over several
    errors and every tolerance check treat it as a failure (Python's max drops a NaN that is not first)."""
    a, b = a.double(), b.double()
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return err if math.isfinite(err) else float("inf")


def _cuda_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def _triton_ready() -> tuple[bool, str]:
    ok, why = _cuda_ready()
    if not ok:
        return ok, why
    if triton is None:
        return False, TRITON_ERROR
    return True, ""


def _module_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


def _probe(check, needs: str | None = None, tol: float = 2e-3):
    """Wrap a check() -> relative error into a probe -> (usable, reason)."""

    def probe():
        ok, why = _triton_ready()
        if not ok:
            return False, why
        if needs:
            try:
                importlib.import_module(needs)
            except Exception as exc:
                return False, f"{needs} does not import ({type(exc).__name__}: {exc})"
        gen = torch.Generator(device="cuda").manual_seed(0)
        err = check(gen)
        if not math.isfinite(err) or err > tol:
            return False, f"wrong result on a probe input (relative error {err:.2e})"
        return True, f"ok (probe relative error {err:.1e})"

    return probe


def _rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


def _check_ssd(gen):
    b, l, h, g, p, n = 2, 150, 4, 2, 32, 32
    x = _rand(gen, b, l, h, p)
    dt = F.softplus(_rand(gen, b, l, h) - 1)
    A = -torch.rand(h, generator=gen, device="cuda") - 0.5
    B, C = _rand(gen, b, l, g, n), _rand(gen, b, l, h, n)
    D, s0 = _rand(gen, h), _rand(gen, b, h, p, n)
    y, s = ssd_scan_mamba(x, dt, A, B, C, chunk_size=128, D=D, initial_state=s0)
    y_ref, s_ref = ssd_chunk_scan_ref(x.double(), dt, A, B, C, chunk_size=128, D=D, initial_state=s0)
    return max(_rel(y, y_ref), _rel(s, s_ref))


def _check_ssm_step(gen):
    b, h, g, p, n = 2, 4, 2, 16, 32
    s0 = _rand(gen, b, h, p, n)
    x, dt = _rand(gen, b, h, p), F.softplus(_rand(gen, b, h))
    A = -torch.rand(h, generator=gen, device="cuda") - 0.5
    B, C, D = _rand(gen, b, g, n), _rand(gen, b, h, n), _rand(gen, h)
    s_ref, y_ref = ssm_step_ref(s0.double(), x.double(), dt, A, B, C, D)
    s, y = ssm_step_mamba(s0.clone(), x, dt, A, B, C, D)
    return max(_rel(y, y_ref), _rel(s, s_ref))


def _check_gated_norm(gen):
    y, z, w = _rand(gen, 3, 5, 64), _rand(gen, 3, 5, 64), _rand(gen, 64)
    return _rel(rmsnorm_gated_mamba(y, z, w, 1e-5, 16), rmsnorm_gated_ref(y.double(), z.double(), w, 1e-5, 16))


def _check_rmsnorm(gen):
    x, w = _rand(gen, 3, 5, 300), 1 + 0.1 * _rand(gen, 300)
    return _rel(rmsnorm_mamba(x, w, 1e-5), rmsnorm_ref(x.double(), w.double(), 1e-5))


def _check_conv_pkg(gen):
    x, w, bias, s0 = _rand(gen, 2, 64, 20), _rand(gen, 64, 4), _rand(gen, 64), _rand(gen, 2, 64, 3)
    y, s = causal_conv1d_pkg(x, w, bias, s0, "silu")
    y_ref, s_ref = causal_conv1d_ref(x.double(), w, bias, s0, "silu")
    return max(_rel(y, y_ref), _rel(s, s_ref))


def _check_conv_update(fn, inplace=False):
    def check(gen):
        x, w, bias, s0 = _rand(gen, 2, 200), _rand(gen, 200, 4), _rand(gen, 200), _rand(gen, 2, 200, 3)
        y_ref, s_ref = causal_conv1d_update_ref(x.double(), s0.double(), w, bias, "silu")
        state = s0.clone()
        if inplace:
            y, s = fn(x, state, w, bias, "silu"), state
        else:
            y, s = fn(x, state, w, bias, "silu")
            if not torch.equal(state, s0):
                return float("inf")  # the op must leave its input state alone
        return max(_rel(y, y_ref), _rel(s, s_ref))

    return check


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


def _check_rope_kv(gen):
    b, nh, nkv, hd, cap = 2, 4, 2, 32, 16
    qkv = _rand(gen, b, (nh + 2 * nkv) * hd)
    ang = torch.rand(cap, hd // 2, generator=gen, device="cuda") * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    pos = torch.tensor([5], device="cuda")
    kc, vc = _rand(gen, b, nkv, cap, hd), _rand(gen, b, nkv, cap, hd)
    kr, vr = kc.clone(), vc.clone()
    q = rope_kv_write_triton(qkv, cos, sin, kc, vc, pos, nh, nkv)
    q_ref = _decode_refs.rope_kv_write_ref(qkv, cos, sin, kr, vr, pos, nh, nkv)
    return max(_rel(q, q_ref), _rel(kc, kr), _rel(vc, vr))


def _check_decode_attention(gen):
    b, nh, nkv, hd, cap = 2, 8, 2, 32, 300
    q, kc, vc = _rand(gen, b, nh, hd), _rand(gen, b, nkv, cap, hd), _rand(gen, b, nkv, cap, hd)
    length = torch.tensor([217], device="cuda")
    out = decode_attention_triton(q, kc, vc, length, hd**-0.5)
    ref = _decode_refs.decode_attention_ref(q.double(), kc.double(), vc.double(), length, hd**-0.5)
    return _rel(out, ref)


def _register() -> None:
    reg = ops.register_fast
    mamba = f"mamba_ssm-triton {_module_version('mamba_ssm')}"
    reg("ssd_scan", mamba, ssd_scan_mamba, _probe(_check_ssd, "mamba_ssm.ops.triton.ssd_combined", tol=5e-3))
    reg("ssm_step", mamba, ssm_step_mamba,
        _probe(_check_ssm_step, "mamba_ssm.ops.triton.selective_state_update"))
    reg("rmsnorm_gated", mamba, rmsnorm_gated_mamba,
        _probe(_check_gated_norm, "mamba_ssm.ops.triton.layernorm_gated"))
    reg("rmsnorm", mamba, rmsnorm_mamba, _probe(_check_rmsnorm, "mamba_ssm.ops.triton.layer_norm", tol=1e-4))
    conv_pkg = f"causal-conv1d {_module_version('causal_conv1d')}"
    reg("causal_conv1d", conv_pkg, causal_conv1d_pkg, _probe(_check_conv_pkg, "causal_conv1d"))
    reg("causal_conv1d_update", conv_pkg, causal_conv1d_update_pkg,
        _probe(_check_conv_update(causal_conv1d_update_pkg), "causal_conv1d"))
    ours = "mamballama-triton"
    reg("causal_conv1d_update", ours, conv_update_triton, _probe(_check_conv_update(conv_update_triton)))
    reg("conv_update_inplace", ours, conv_update_inplace_triton,
        _probe(_check_conv_update(conv_update_inplace_triton, inplace=True)))
    reg("add_rmsnorm", ours, add_rmsnorm_triton, _probe(_check_add_rmsnorm))
    reg("swiglu", ours, swiglu_triton, _probe(_check_swiglu))
    reg("ssm_step_gated", ours, ssm_step_gated_triton, _probe(_check_ssm_step_gated))
    reg("rope_kv_write", ours, rope_kv_write_triton, _probe(_check_rope_kv))
    reg("decode_attention", ours, decode_attention_triton, _probe(_check_decode_attention))


_register()


# ================================================================================================
# `mamballama env`
# ================================================================================================
def environment_report(device: str | None = None) -> dict:
    """Versions, devices and, per op, the backend that runs on ``device`` (cuda when present) and why."""
    import os
    import platform
    import sys

    from mamballama_cli import __version__
    from mamballama_cli.evaluation.speed import package_version

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    versions = {"mamballama": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "torch_cuda": torch.version.cuda}
    for name in ("transformers", "triton", "mamba_ssm", "causal_conv1d", "accelerate", "safetensors"):
        versions[name] = package_version(name)
    devices = [{"device": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"device": f"cuda:{i}", "name": p.name, "capability": f"{p.major}.{p.minor}",
                            "memory_bytes": int(p.total_memory), "multiprocessors": p.multi_processor_count})
    rows = []
    for row in ops.backend_report(dev):
        if row["backend"] == "torch-ref":
            if dev.type != "cuda":
                why = "reference on CPU (fast kernels are CUDA-only)"
            elif ops.forced_reference():
                why = "MAMBALLAMA_KERNELS=ref forces the reference"
            elif row["candidates"]:
                why = "no fast kernel usable: " + "; ".join(row["candidates"])
            else:
                why = "no fast kernel registered"
        else:
            why = next((c.split(": ", 1)[1] for c in row["candidates"] if c.startswith(row["backend"] + ":")), "ok")
        rows.append({"op": row["op"], "backend": row["backend"], "why": why, "candidates": row["candidates"]})
    return {"versions": versions, "executable": sys.executable, "devices": devices, "report_device": str(dev),
            "ops": rows}


def format_environment(report: dict) -> str:
    v = report["versions"]
    lines = [f"mamballama {v['mamballama']}  python {v['python']}  torch {v['torch']}"
             + (f" (CUDA {v['torch_cuda']})" if v.get("torch_cuda") else " (no CUDA build)")]
    lines.append("  ".join(f"{k} {v[k] or 'not installed'}"
                           for k in ("transformers", "triton", "mamba_ssm", "causal_conv1d", "accelerate")))
    lines.append("devices:")
    for d in report["devices"]:
        if d["device"] == "cpu":
            lines.append(f"  cpu      {d['name']}, {d['cores']} cores")
        else:
            lines.append(f"  {d['device']:8} {d['name']}, compute {d['capability']}, "
                         f"{d['memory_bytes'] / 2**30:.0f} GiB, {d['multiprocessors']} SMs")
    if len(report["devices"]) == 1:
        lines.append("  (no CUDA device)")
    lines.append(f"kernels on {report['report_device']}:")
    width = max(len(r["op"]) for r in report["ops"])
    bwidth = max(len(r["backend"]) for r in report["ops"])
    for r in report["ops"]:
        lines.append(f"  {r['op']:{width}}  {r['backend']:{bwidth}}  {r['why']}")
    return "\n".join(lines)
