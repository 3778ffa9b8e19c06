"""Triton kernels of the captured decode step (:class:`mamballama_cli.generation.fast.StaticDecoder`).

Fused residual-add + RMSNorm, SwiGLU, the conv-window update, the whole Mamba-2 recurrence step with GQA
indexing + D + gated RMSNorm, RoPE + K/V write at a device-side position, and split-K decode attention over
a static K/V buffer with a device-side length. Each has a pure-PyTorch twin in :mod:`mamballama_cli.ops.decode`
(or the ops package for ``causal_conv1d_update``) that its probe and the gpu tests compare it with. The
launchers are decode-only: under autograd they fall back to the reference.

Importing this module registers the decode ops' references (ops/decode.py) and, on CUDA, these kernels.
"""

from __future__ import annotations

import math

import torch

from mamballama_cli import ops
from mamballama_cli.ops import decode as _decode_refs  # registers the decode ops' references
from mamballama_cli.ops.common import (
    _check_conv_update,
    _device_guard,
    _needs_grad,
    _next_pow2,
    _probe,
    _rand,
    _rel,
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
