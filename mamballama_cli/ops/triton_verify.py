"""Fused Triton kernels for the speculative verify ops (references: :mod:`mamballama_cli.ops.verify_ref`).

A verify call runs T = K + 1 tokens through the target. Unfused, each attention layer spends a dozen
small kernels on table lookups, rotary elementwise ops, two index copies, a mask and a masked SDPA over
the whole static buffer, and each Mamba-2 layer a gather, a cat, a conv, an activation and copies. Here:

* ``rope_kv_write_window``: one kernel rotates q and k of every window token with its table row
  pos + t (the roundings of ``apply_rotary``, as the one-token kernel of ops/triton_decode.py)
  and writes k and v into the caches at pos + t;
* ``window_attention``: split-K ("flash-decoding") over the buffer, one program per (sequence, KV head,
  slice of positions) handling the group's query heads times the T queries as the rows of one tile, each
  row masked to its causal limit pos + t; the slices are merged by log-sum-exp with the one-token
  decode kernel's combine step. Rows that see no valid key in a tile or a slice are guarded (no
  -inf - -inf), and the position is read on the device, so the call lives in a CUDA graph;
* ``spec_conv``: one kernel reads the buffered conv prefix (at a per-row device-side shift) and the new
  inputs, writes the causal depthwise conv + activation of the new positions and stores the sequence
  back into the conv buffer. A program owns whole channels and loads everything it reads before its
  first store, so the in-place update has no hazard.

Inference only (no autograd): with inputs that need gradients the launchers run the references. Importing
this module registers the kernels on CUDA; it is skipped (and the references used) without Triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mamballama_cli import ops
from mamballama_cli.ops.common import _device_guard, _needs_grad, _next_pow2, _probe, _rand, _rel
from mamballama_cli.ops.triton_decode import DECODE_BLOCK_T, _decode_attn_combine_kernel, decode_splits
from mamballama_cli.ops.verify_ref import (  # also registers the ops' references
    rope_kv_write_window_ref,
    spec_conv_ref,
    window_attention_ref,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (kernel debugging)


def _check_device(*tensors) -> None:
    assert all(t.is_cuda for t in tensors) or _INTERPRET, "the Triton verify kernels need CUDA tensors"


# ================================================================================================
# Kernels
# ================================================================================================
@triton.jit
def _rope_window_kernel(QKV, COS, SIN, POS, QOUT, KC, VC, T, n_heads, n_kv, headdim, half_rot,
                        qkv_sb, qkv_st, cos_st, sin_st, q_sb, q_st, q_sh,
                        kc_sb, kc_sh, kc_st, vc_sb, vc_sh, vc_st,
                        BLOCK_D: tl.constexpr):
    # Program (sequence x token, head): heads 0..n_heads-1 are query heads (rotated, written to QOUT), the
    # next n_kv key heads (rotated, written with their value head into the caches at pos + t).
    pbt = tl.program_id(0)
    j = tl.program_id(1)
    pb = pbt // T
    t = pbt % T
    pos = tl.load(POS).to(tl.int32) + t
    d = tl.arange(0, BLOCK_D)
    md = d < headdim
    row = QKV + pb * qkv_sb + t * qkv_st  # [q heads | k heads | v heads], contiguous within a row
    base = row + j * headdim
    x = tl.load(base + d, mask=md, other=0.0)
    in_rot = d < 2 * half_rot
    first = d < half_rot
    partner = tl.where(first, d + half_rot, d - half_rot)
    xp = tl.load(base + partner, mask=md & in_rot, other=0.0)
    c = tl.load(COS + pos * cos_st + d, mask=md & in_rot, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos * sin_st + d, mask=md & in_rot, other=0.0).to(tl.float32)
    # q * cos + rotate_half(q) * sin, each product rounded to the activation dtype as torch does
    a = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32)
    xpf = xp.to(tl.float32)
    rh = tl.where(first, -xpf, xpf)  # negated in float32 (exact; Triton's interpreter cannot negate bf16)
    b = (rh * s).to(x.dtype).to(tl.float32)
    out = tl.where(in_rot, (a + b).to(x.dtype), x)
    if j < n_heads:
        tl.store(QOUT + pb * q_sb + t * q_st + j * q_sh + d, out.to(QOUT.dtype.element_ty), mask=md)
    else:
        kh = j - n_heads
        tl.store(KC + pb * kc_sb + kh * kc_sh + pos * kc_st + d, out.to(KC.dtype.element_ty), mask=md)
        v = tl.load(row + (n_heads + n_kv + kh) * headdim + d, mask=md, other=0.0)
        tl.store(VC + pb * vc_sb + kh * vc_sh + pos * vc_st + d, v.to(VC.dtype.element_ty), mask=md)


@triton.jit
def _window_attn_split_kernel(Q, K, V, POS, OP, LSE, scale, T, n_kv, group, headdim, split_len,
                              q_sb, q_st, q_sh, k_sb, k_sh, k_st, v_sb, v_sh, v_st,
                              op_sb, op_st, op_sh, op_ss, lse_sb, lse_st, lse_sh,
                              BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                              IEEE: tl.constexpr):
    # Program (sequence x KV head, slice): the rows of the tile are (query head of the group, window query)
    # pairs, row r = g * T + t; row r sees keys 0 .. pos + t.
    pbk = tl.program_id(0)
    ps = tl.program_id(1)
    pb = pbk // n_kv
    kh = pbk % n_kv
    r = tl.arange(0, BLOCK_R)
    mr = r < group * T
    tq = r % T
    heads = kh * group + r // T
    d = tl.arange(0, BLOCK_D)
    md = d < headdim
    mq = mr[:, None] & md[None, :]
    q = tl.load(Q + pb * q_sb + tq[:, None] * q_st + heads[:, None] * q_sh + d[None, :], mask=mq, other=0.0)
    pos = tl.load(POS).to(tl.int32)
    last = pos + tq  # (BLOCK_R,) the last position each row sees
    start = ps * split_len
    end = tl.minimum(start + split_len, pos + T)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        kt = t0 + tl.arange(0, BLOCK_T)
        mt = kt < end
        m2 = mt[:, None] & md[None, :]
        k = tl.load(K + pb * k_sb + kh * k_sh + kt[:, None] * k_st + d[None, :], mask=m2, other=0.0).to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        valid = mt[None, :] & (kt[None, :] <= last[:, None])
        s = tl.where(valid, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with no valid key so far keeps m = -inf: shift by 0 there (exp(-inf) = 0, never -inf - -inf)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + pb * v_sb + kh * v_sh + kt[:, None] * v_st + d[None, :], mask=m2, other=0.0).to(q.dtype)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    has = l_i > 0.0
    safe_l = tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log(safe_l), float("-inf"))  # -inf: this slice adds nothing to the row
    o = acc / safe_l[:, None]
    tl.store(OP + pb * op_sb + tq[:, None] * op_st + heads[:, None] * op_sh + ps * op_ss + d[None, :], o, mask=mq)
    tl.store(LSE + pb * lse_sb + tq * lse_st + heads * lse_sh + ps, lse, mask=mr)


@triton.jit
def _spec_conv_kernel(X, BUF, SHIFT, W, BIAS, OUT, T, dim, offset,
                      x_sb, x_st, x_sd, b_sb, b_sd, b_st, w_sd, w_sw, o_sb, o_st, o_sd,
                      WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    # Program (sequence, block of channels). seq[i] = BUF[offset + shift + i] for i < WIDTH - 1, else
    # X[i - (WIDTH - 1)]; out[t] = act(bias + sum_j W[j] seq[t + j]); then BUF[offset + i] = seq[i].
    pb = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < dim
    src = offset + tl.load(SHIFT + pb).to(tl.int32)  # buffer index of seq[0]
    buf_row = BUF + pb * b_sb + d[:, None] * b_sd
    x_row = X + pb * x_sb + d[:, None] * x_sd
    t = tl.arange(0, BLOCK_T)
    mt = t < T
    acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        i = t + j
        from_buf = i < WIDTH - 1
        vb = tl.load(buf_row + (src + i)[None, :] * b_st, mask=md[:, None] & (mt & from_buf)[None, :], other=0.0)
        vx = tl.load(x_row + (i - (WIDTH - 1))[None, :] * x_st, mask=md[:, None] & (mt & ~from_buf)[None, :],
                     other=0.0)
        val = tl.where(from_buf[None, :], vb.to(tl.float32), vx.to(tl.float32))
        wj = tl.load(W + d * w_sd + j * w_sw, mask=md, other=0.0).to(tl.float32)
        acc += wj[:, None] * val
    if HAS_BIAS:
        acc += tl.load(BIAS + d, mask=md, other=0.0).to(tl.float32)[:, None]
    out = acc.to(OUT.dtype.element_ty)  # the conv rounds to the activation dtype, then the activation
    if SILU:
        of = out.to(tl.float32)
        out = (of * tl.sigmoid(of)).to(OUT.dtype.element_ty)
    tl.store(OUT + pb * o_sb + t[None, :] * o_st + d[:, None] * o_sd, out, mask=md[:, None] & mt[None, :])
    # The whole sequence back into the buffer: read it all before the first store (the prefix may overlap
    # the destination when shift > 0; every position of these channels belongs to this program).
    s = tl.arange(0, BLOCK_S)
    ms = s < WIDTH - 1 + T
    s_buf = s < WIDTH - 1
    sb = tl.load(buf_row + (src + s)[None, :] * b_st, mask=md[:, None] & s_buf[None, :], other=0.0)
    sx = tl.load(x_row + (s - (WIDTH - 1))[None, :] * x_st, mask=md[:, None] & (ms & ~s_buf)[None, :], other=0.0)
    seq = tl.where(s_buf[None, :], sb, sx.to(sb.dtype))
    tl.debug_barrier()
    tl.store(buf_row + (offset + s)[None, :] * b_st, seq.to(BUF.dtype.element_ty), mask=md[:, None] & ms[None, :])


# ================================================================================================
# Launchers (same signatures as the references)
# ================================================================================================
def rope_kv_write_window_triton(qkv, cos_table, sin_table, k_cache, v_cache, pos, n_heads, n_kv):
    """Same contract as :func:`mamballama_cli.ops.verify_ref.rope_kv_write_window_ref`."""
    if _needs_grad(qkv):
        return rope_kv_write_window_ref(qkv, cos_table, sin_table, k_cache, v_cache, pos, n_heads, n_kv)
    b, T, width = qkv.shape
    hd = k_cache.shape[-1]
    rot = cos_table.shape[-1]
    assert width == (n_heads + 2 * n_kv) * hd and rot % 2 == 0 and rot <= hd, (qkv.shape, k_cache.shape, rot)
    assert k_cache.shape[1] == n_kv and v_cache.shape == k_cache.shape and pos.numel() == 1
    _check_device(qkv, k_cache, v_cache, pos)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos_table = cos_table if cos_table.stride(-1) == 1 else cos_table.contiguous()
    sin_table = sin_table if sin_table.stride(-1) == 1 else sin_table.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = torch.empty(b, T, n_heads, hd, dtype=qkv.dtype, device=qkv.device)
    with _device_guard(qkv):
        _rope_window_kernel[(b * T, n_heads + n_kv)](
            qkv, cos_table, sin_table, pos, q, k_cache, v_cache, T, n_heads, n_kv, hd, rot // 2,
            qkv.stride(0), qkv.stride(1), cos_table.stride(0), sin_table.stride(0), q.stride(0), q.stride(1),
            q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            BLOCK_D=_next_pow2(hd), num_warps=1,
        )
    return q


def window_attention_triton(q, k_cache, v_cache, pos, scale):
    """Same contract as :func:`mamballama_cli.ops.verify_ref.window_attention_ref`."""
    if _needs_grad(q):
        return window_attention_ref(q, k_cache, v_cache, pos, scale)
    b, T, nh, hd = q.shape
    n_kv, cap = k_cache.shape[1], k_cache.shape[2]
    assert nh % n_kv == 0 and v_cache.shape == k_cache.shape and k_cache.shape[-1] == hd and pos.numel() == 1
    _check_device(q, k_cache, v_cache, pos)
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    group = nh // n_kv
    n_splits, split_len = decode_splits(cap, b, n_kv)
    # Partials as (b, T, nh, split, hd): viewed as (b, T * nh, split, hd) they are the one-token combine
    # kernel's (b, heads, split, hd) input with "head" t * nh + h, which is also where out (b, T, nh, hd) keeps it.
    part = torch.empty(b, T, nh, n_splits, hd, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, T, nh, n_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(b, T, nh, hd, dtype=q.dtype, device=q.device)
    with _device_guard(q):
        _window_attn_split_kernel[(b * n_kv, n_splits)](
            q, k_cache, v_cache, pos, part, lse, float(scale), T, n_kv, group, hd, split_len,
            q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            part.stride(0), part.stride(1), part.stride(2), part.stride(3), lse.stride(0), lse.stride(1),
            lse.stride(2),
            BLOCK_R=max(16, _next_pow2(group * T)), BLOCK_T=DECODE_BLOCK_T, BLOCK_D=max(16, _next_pow2(hd)),
            IEEE=q.dtype == torch.float32, num_warps=4,
        )
        _decode_attn_combine_kernel[(b, T * nh)](
            part, lse, out, n_splits, hd, part.stride(0), part.stride(2), part.stride(3),
            lse.stride(0), lse.stride(2), out.stride(0), out.stride(2),
            BLOCK_S=_next_pow2(n_splits), BLOCK_D=_next_pow2(hd), num_warps=4,
        )
    return out


SPEC_CONV_BLOCK_D = 64


def spec_conv_triton(xbc, conv_buf, shift, offset, weight, bias=None, activation=None):
    """Same contract as :func:`mamballama_cli.ops.verify_ref.spec_conv_ref`."""
    if _needs_grad(xbc, weight, bias) or activation not in (None, "identity", "silu", "swish"):
        return spec_conv_ref(xbc, conv_buf, shift, offset, weight, bias, activation)
    b, T, dim = xbc.shape
    width = weight.shape[-1]
    assert weight.shape == (dim, width) and width >= 2, (weight.shape, xbc.shape)
    assert conv_buf.shape[:2] == (b, dim) and offset + width - 1 + T <= conv_buf.shape[2], (conv_buf.shape, offset, T)
    assert shift.numel() == b and not shift.is_floating_point()
    _check_device(xbc, conv_buf, shift, weight)
    shift = shift.reshape(b)
    out = torch.empty(b, T, dim, dtype=xbc.dtype, device=xbc.device)
    with _device_guard(xbc):
        _spec_conv_kernel[(b, triton.cdiv(dim, SPEC_CONV_BLOCK_D))](
            xbc, conv_buf, shift, weight, bias if bias is not None else weight, out, T, dim, int(offset),
            *xbc.stride(), *conv_buf.stride(), weight.stride(0), weight.stride(1), *out.stride(),
            WIDTH=width, HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"),
            BLOCK_D=SPEC_CONV_BLOCK_D, BLOCK_T=_next_pow2(T), BLOCK_S=_next_pow2(width - 1 + T), num_warps=2,
        )
    return out


# ================================================================================================
# Probes: run once on small random CUDA inputs and compare with the reference
# ================================================================================================
def _check_rope_window(gen):
    b, T, nh, nkv, hd, cap = 2, 5, 4, 2, 32, 40
    qkv = _rand(gen, b, T, (nh + 2 * nkv) * hd)
    ang = torch.rand(cap, hd // 2, generator=gen, device="cuda") * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    pos = torch.tensor([31], device="cuda")
    kc, vc = _rand(gen, b, nkv, cap, hd), _rand(gen, b, nkv, cap, hd)
    kr, vr = kc.clone(), vc.clone()
    q = rope_kv_write_window_triton(qkv, cos, sin, kc, vc, pos, nh, nkv)
    q_ref = rope_kv_write_window_ref(qkv, cos, sin, kr, vr, pos, nh, nkv)
    return max(_rel(q, q_ref), _rel(kc, kr), _rel(vc, vr))


def _check_window_attention(gen):
    b, T, nh, nkv, hd, cap = 2, 5, 8, 2, 32, 300
    q = _rand(gen, b, T, nh, hd)
    kc, vc = _rand(gen, b, nkv, cap, hd), _rand(gen, b, nkv, cap, hd)
    pos = torch.tensor([190], device="cuda")  # the window straddles a slice boundary (split_len 64)
    out = window_attention_triton(q, kc, vc, pos, hd**-0.5)
    ref = window_attention_ref(q.double(), kc.double(), vc.double(), pos, hd**-0.5)
    return _rel(out, ref)


def _check_spec_conv(gen):
    b, T, dim, width, window = 3, 5, 200, 4, 5
    full = _rand(gen, b, T, dim + 16)
    xbc = full[..., 8 : 8 + dim]  # a strided column slice, as in the replay layer
    buf = _rand(gen, b, dim, width - 1 + window)
    w, bias = _rand(gen, dim, width), _rand(gen, dim)
    shift = torch.tensor([0, 2, 5], device="cuda")
    got_buf, ref_buf = buf.clone(), buf.clone()
    out = spec_conv_triton(xbc, got_buf, shift, 0, w, bias, "silu")
    ref = spec_conv_ref(xbc, ref_buf, shift, 0, w, bias, "silu")
    if not torch.equal(got_buf, ref_buf):
        return float("inf")  # the buffer update is a copy: exact
    return _rel(out, ref)


def _register() -> None:
    ours = "mamballama-triton"
    ops.register_fast("rope_kv_write_window", ours, rope_kv_write_window_triton, _probe(_check_rope_window))
    ops.register_fast("window_attention", ours, window_attention_triton, _probe(_check_window_attention))
    ops.register_fast("spec_conv", ours, spec_conv_triton, _probe(_check_spec_conv))


_register()
