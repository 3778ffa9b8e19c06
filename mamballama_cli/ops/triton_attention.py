"""Triton kernels of the attention step over static K/V buffers: decode (one token) and windows (T tokens).

One pair of kernels serves all four attention-step ops, so a decode step and a speculative verify call run
the same code (references: :mod:`mamballama_cli.ops.decode` for the one-token ops,
:mod:`mamballama_cli.ops.verify_ref` for the window ops):

* ``_rope_kv_kernel``: rotates q and k of each new token with its table row (the roundings of
  ``apply_rotary``: each product in the activation dtype) and writes k and v into the caches at its
  position. ``rope_kv_write`` is the window of one token.
* ``_attn_split_kernel`` + ``_attn_combine_kernel``: split-K ("flash-decoding") attention. A program owns
  (sequence, KV head, slice of positions) and takes the group's query heads times the T window queries as
  the rows of one tile, each row masked to its own last position; the slices are merged by log-sum-exp.
  Rows that see no valid key in a slice are guarded (no -inf - -inf). ``decode_attention`` is the window of
  one token whose last visible position is ``length - 1``.

Positions are read on the device (one for the whole batch, or one per row: rows of a continuously batched
or speculative batch sit at different positions), so every call can live in a CUDA graph. Offsets that can
pass 2^31 elements (a batch of long K/V buffers) are computed in 64 bits.

Inference only: with inputs that need gradients the launchers run the references. Importing this module
registers the kernels on CUDA; it is skipped (and the references used) without Triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mamballama_cli import ops
from mamballama_cli.ops import decode as _decode_refs  # registers the decode ops' references
from mamballama_cli.ops.common import INTERPRETING as _INTERPRET  # Triton's CPU interpreter (kernel debugging)
from mamballama_cli.ops.common import (_device_guard, _gdc_on, _grid_launch_dependents, _needs_grad, _next_pow2,
                                       _probe, _rand, _rel)
from mamballama_cli.ops.verify_ref import rope_kv_write_window_ref, window_attention_ref  # registers the window ops

BLOCK_T = 64  # key positions per tile; slices are whole tiles


def _check_device(*tensors) -> None:
    assert all(t.is_cuda for t in tensors) or _INTERPRET, "the Triton attention kernels need CUDA tensors"


def _pos_stride(pos: torch.Tensor, batch: int) -> int:
    """0 when one position serves the whole batch, else the stride between the rows' positions."""
    assert pos.dim() <= 1 and not pos.is_floating_point() and pos.numel() in (1, batch), (pos.shape, batch)
    return 0 if pos.numel() == 1 else pos.stride(0)


# ================================================================================================
# Kernels
# ================================================================================================
@triton.jit
def _rope_kv_kernel(QKV, COS, SIN, POS, pos_sb, QOUT, KC, VC, T, n_heads, n_kv, headdim, half_rot,
                    qkv_sb, qkv_st, cos_st, sin_st, q_sb, q_st, q_sh,
                    kc_sb, kc_sh, kc_st, vc_sb, vc_sh, vc_st,
                    BLOCK_D: tl.constexpr):
    # Program (sequence x token, head): heads 0..n_heads-1 are query heads (rotated, written to QOUT), the
    # next n_kv key heads (rotated, written with their value head into the caches at pos + t).
    pbt = tl.program_id(0)
    j = tl.program_id(1)
    pb = (pbt // T).to(tl.int64)
    t = pbt % T
    pos = tl.load(POS + pb * pos_sb).to(tl.int64) + t
    d = tl.arange(0, BLOCK_D)
    md = d < headdim
    row = QKV + pb * qkv_sb + t * qkv_st  # [q heads | k heads | v heads], contiguous within a row
    base = row + j * headdim
    x = tl.load(base + d, mask=md, other=0.0)
    # a key head's value head, loaded with the rest (a load after the key's store would wait a round trip of its
    # own); nothing is read for a query head
    v = tl.load(row + (n_kv + j) * headdim + d, mask=md & (d * 0 + j >= n_heads), other=0.0)
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
        tl.store(VC + pb * vc_sb + kh * vc_sh + pos * vc_st + d, v.to(VC.dtype.element_ty), mask=md)


@triton.jit
def _attn_split_kernel(Q, K, V, POS, pos_sb, pos_off, OP, LSE, scale, T, n_kv, group, headdim, split_len,
                       q_sb, q_st, q_sh, k_sb, k_sh, k_st, v_sb, v_sh, v_st,
                       op_sb, op_st, op_sh, op_ss, lse_sb, lse_st, lse_sh,
                       BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                       IEEE: tl.constexpr):
    # Program (sequence x KV head, slice): the rows of the tile are (query head of the group, window query)
    # pairs, row r = g * T + t; row r sees keys 0 .. POS[row's sequence] + pos_off + t.
    pbk = tl.program_id(0)
    ps = tl.program_id(1)
    pb = (pbk // n_kv).to(tl.int64)
    kh = pbk % n_kv
    r = tl.arange(0, BLOCK_R)
    mr = r < group * T
    tq = r % T
    heads = kh * group + r // T
    d = tl.arange(0, BLOCK_D)
    md = d < headdim
    mq = mr[:, None] & md[None, :]
    q = tl.load(Q + pb * q_sb + tq[:, None] * q_st + heads[:, None] * q_sh + d[None, :], mask=mq, other=0.0)
    pos = tl.load(POS + pb * pos_sb).to(tl.int32) + pos_off
    last = pos + tq  # (BLOCK_R,) the last position each row sees
    start = ps * split_len
    end = tl.minimum(start + split_len, pos + T)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    k_base = K + pb * k_sb + kh * k_sh
    v_base = V + pb * v_sb + kh * v_sh
    for t0 in range(start, end, BLOCK_T):
        kt = t0 + tl.arange(0, BLOCK_T)
        mt = kt < end
        m2 = mt[:, None] & md[None, :]
        k = tl.load(k_base + kt[:, None].to(tl.int64) * k_st + d[None, :], mask=m2, other=0.0).to(q.dtype)
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
        v = tl.load(v_base + kt[:, None].to(tl.int64) * v_st + d[None, :], mask=m2, other=0.0).to(q.dtype)
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
def _attn_combine_kernel(OP, LSE, OUT, n_splits, headdim, op_sb, op_sh, op_ss, lse_sb, lse_sh,
                         o_sb, o_sh, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, TRIGGER: tl.constexpr):
    # Program (sequence, head row): merge the slices' partial outputs by their log-sum-exp. TRIGGER (sm90 and
    # later): o_proj after it, launched with programmatic dependent launch, may start loading its weights now.
    if TRIGGER:
        _grid_launch_dependents()
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


# ================================================================================================
# Launchers (same signatures as the references)
# ================================================================================================
def attention_splits(capacity: int, batch: int, n_kv: int, target_programs: int = 256, max_splits: int = 64):
    """(n_splits, split_len) for a K/V buffer of ``capacity`` positions: enough programs to fill the GPU."""
    blocks = max(1, math.ceil(capacity / BLOCK_T))
    n_splits = max(1, min(max_splits, blocks, math.ceil(target_programs / max(1, batch * n_kv))))
    split_len = math.ceil(blocks / n_splits) * BLOCK_T
    return math.ceil(capacity / split_len), split_len


def _rope_kv(qkv, cos_table, sin_table, k_cache, v_cache, pos, n_heads, n_kv):
    """qkv (b, T, width) -> rotated q (b, T, n_heads, head_dim); k, v written at pos + t."""
    b, T, width = qkv.shape
    hd = k_cache.shape[-1]
    rot = cos_table.shape[-1]
    assert width == (n_heads + 2 * n_kv) * hd and rot % 2 == 0 and rot <= hd, (qkv.shape, k_cache.shape, rot)
    assert k_cache.shape[1] == n_kv and v_cache.shape == k_cache.shape
    pos_sb = _pos_stride(pos, b)
    _check_device(qkv, k_cache, v_cache, pos)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos_table = cos_table if cos_table.stride(-1) == 1 else cos_table.contiguous()
    sin_table = sin_table if sin_table.stride(-1) == 1 else sin_table.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = torch.empty(b, T, n_heads, hd, dtype=qkv.dtype, device=qkv.device)
    with _device_guard(qkv):
        _rope_kv_kernel[(b * T, n_heads + n_kv)](
            qkv, cos_table, sin_table, pos, pos_sb, q, k_cache, v_cache, T, n_heads, n_kv, hd, rot // 2,
            qkv.stride(0), qkv.stride(1), cos_table.stride(0), sin_table.stride(0), q.stride(0), q.stride(1),
            q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            BLOCK_D=_next_pow2(hd), num_warps=1,
        )
    return q


def tile_rows(group: int, T: int) -> int:
    """The split kernel's tile rows: the query heads of a KV group times the window's queries, padded to a power of
    two, at least 16 (tl.dot's)."""
    return max(16, _next_pow2(group * T))


def _attention(q, k_cache, v_cache, pos, pos_off, scale):
    """q (b, T, nh, hd): row t of sequence i attends to positions [0, pos[i] + pos_off + t]."""
    b, T, nh, hd = q.shape
    n_kv, cap = k_cache.shape[1], k_cache.shape[2]
    assert nh % n_kv == 0 and v_cache.shape == k_cache.shape and k_cache.shape[-1] == hd
    pos_sb = _pos_stride(pos, b)
    _check_device(q, k_cache, v_cache, pos)
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    group = nh // n_kv
    n_splits, split_len = attention_splits(cap, b, n_kv)
    # Partials as (b, T, nh, split, hd): viewed as (b, T * nh, split, hd) they are the combine kernel's
    # (b, rows, split, hd) input with row t * nh + h, which is also where out (b, T, nh, hd) keeps it.
    part = torch.empty(b, T, nh, n_splits, hd, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, T, nh, n_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(b, T, nh, hd, dtype=q.dtype, device=q.device)
    with _device_guard(q):
        _attn_split_kernel[(b * n_kv, n_splits)](
            q, k_cache, v_cache, pos, pos_sb, pos_off, part, lse, float(scale), T, n_kv, group, hd, split_len,
            q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            part.stride(0), part.stride(1), part.stride(2), part.stride(3), lse.stride(0), lse.stride(1),
            lse.stride(2),
            BLOCK_R=tile_rows(group, T), BLOCK_T=BLOCK_T, BLOCK_D=max(16, _next_pow2(hd)),
            IEEE=q.dtype == torch.float32, num_warps=4,
        )
        _attn_combine_kernel[(b, T * nh)](
            part, lse, out, n_splits, hd, part.stride(0), part.stride(2), part.stride(3),
            lse.stride(0), lse.stride(2), out.stride(0), out.stride(2),
            BLOCK_S=_next_pow2(n_splits), BLOCK_D=_next_pow2(hd), num_warps=4, TRIGGER=_gdc_on(q),
        )
    return out


def rope_kv_write_window_triton(qkv, cos_table, sin_table, k_cache, v_cache, pos, n_heads, n_kv):
    """Same contract as :func:`mamballama_cli.ops.verify_ref.rope_kv_write_window_ref`."""
    if _needs_grad(qkv):
        return rope_kv_write_window_ref(qkv, cos_table, sin_table, k_cache, v_cache, pos, n_heads, n_kv)
    return _rope_kv(qkv, cos_table, sin_table, k_cache, v_cache, pos, n_heads, n_kv)


def window_attention_triton(q, k_cache, v_cache, pos, scale):
    """Same contract as :func:`mamballama_cli.ops.verify_ref.window_attention_ref`."""
    if _needs_grad(q):
        return window_attention_ref(q, k_cache, v_cache, pos, scale)
    return _attention(q, k_cache, v_cache, pos, 0, scale)


def rope_kv_write_triton(qkv, cos_table, sin_table, k_cache, v_cache, pos, n_heads, n_kv):
    """Same contract as :func:`mamballama_cli.ops.decode.rope_kv_write_ref`: the window of one token."""
    if _needs_grad(qkv):
        return _decode_refs.rope_kv_write_ref(qkv, cos_table, sin_table, k_cache, v_cache, pos, n_heads, n_kv)
    return _rope_kv(qkv[:, None], cos_table, sin_table, k_cache, v_cache, pos, n_heads, n_kv)[:, 0]


def decode_attention_triton(q, k_cache, v_cache, length, scale):
    """Same contract as :func:`mamballama_cli.ops.decode.decode_attention_ref`: the window of one query whose
    last visible position is ``length - 1``."""
    if _needs_grad(q):
        return _decode_refs.decode_attention_ref(q, k_cache, v_cache, length, scale)
    return _attention(q[:, None], k_cache, v_cache, length, -1, scale)[:, 0]


# ================================================================================================
# Probes: run once on small random CUDA inputs and compare with the reference
# ================================================================================================
def _tables(gen, cap, hd):
    ang = torch.rand(cap, hd // 2, generator=gen, device="cuda") * 6
    return torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)


def _check_rope(fn, ref, T):
    def check(gen):
        b, nh, nkv, hd, cap = 2, 4, 2, 32, 40
        qkv = _rand(gen, b, T, (nh + 2 * nkv) * hd) if T else _rand(gen, b, (nh + 2 * nkv) * hd)
        cos, sin = _tables(gen, cap, hd)
        pos = torch.tensor([31, 7], device="cuda")  # one position per row
        kc, vc = _rand(gen, b, nkv, cap, hd), _rand(gen, b, nkv, cap, hd)
        kr, vr = kc.clone(), vc.clone()
        q = fn(qkv, cos, sin, kc, vc, pos, nh, nkv)
        q_ref = ref(qkv, cos, sin, kr, vr, pos, nh, nkv)
        return max(_rel(q, q_ref), _rel(kc, kr), _rel(vc, vr))

    return check


def _check_attention(fn, ref, T):
    def check(gen):
        b, nh, nkv, hd, cap = 2, 8, 2, 32, 300
        q = _rand(gen, b, T, nh, hd) if T else _rand(gen, b, nh, hd)
        kc, vc = _rand(gen, b, nkv, cap, hd), _rand(gen, b, nkv, cap, hd)
        pos = torch.tensor([190, 61], device="cuda")  # windows straddling a slice boundary (split_len 64)
        out = fn(q, kc, vc, pos, hd**-0.5)
        return _rel(out, ref(q.double(), kc.double(), vc.double(), pos, hd**-0.5))

    return check


def _register() -> None:
    ours, reg = "mamballama-triton", ops.register_fast
    reg("rope_kv_write", ours, rope_kv_write_triton,
        _probe(_check_rope(rope_kv_write_triton, _decode_refs.rope_kv_write_ref, 0)))
    reg("decode_attention", ours, decode_attention_triton,
        _probe(_check_attention(decode_attention_triton, _decode_refs.decode_attention_ref, 0)))
    reg("rope_kv_write_window", ours, rope_kv_write_window_triton,
        _probe(_check_rope(rope_kv_write_window_triton, rope_kv_write_window_ref, 5)))
    reg("window_attention", ours, window_attention_triton,
        _probe(_check_attention(window_attention_triton, window_attention_ref, 5)))


_register()
