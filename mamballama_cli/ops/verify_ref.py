"""Pure-PyTorch references of the multi-token ops of a speculative verify call (design.md section 4).

A verify call runs a window of T = K + 1 tokens at positions pos .. pos + T - 1 through the target. These
ops are what the attention and Mamba-2 mixers' window steps (``Attention.step``, ``Mamba2Mixer.step``)
run per layer besides the GEMMs and the replay op; each is the T-token generalisation of a one-token decode
op of :mod:`mamballama_cli.ops.decode` and equals it at T = 1. The fused Triton kernels live in
:mod:`mamballama_cli.ops.triton_attention` (attention) and :mod:`mamballama_cli.ops.triton_conv` (conv).
Positions are read from device tensors, so every op can run inside a captured CUDA graph.

rope_kv_write_window(qkv, cos_table, sin_table, k_cache, v_cache, pos, n_heads, n_kv) -> q
    qkv: (batch, T, (n_heads + 2 n_kv) * head_dim) as [q | k | v]; cos/sin_table: (capacity, rotary_dim)
    in qkv's dtype; k_cache, v_cache: (batch, n_kv, capacity, head_dim); pos: int64 on the device, one
    for the whole batch ((1,) or ()) or one per row ((batch,): rows of a batch may sit at different positions).
    Token t sits at position pos + t: q and k are rotated with table row pos + t (``apply_rotary`` of
    ops/rope_ops.py: q * cos + rotate_half(q) * sin, each product rounded to the activation dtype, the
    dims past rotary_dim passed through), k and v are written into the caches at pos + t. Returns the
    rotated q as (batch, T, n_heads, head_dim).

window_attention(q, k_cache, v_cache, pos, scale) -> out
    q: (batch, T, n_heads, head_dim); caches and pos as above. Query t attends to cache positions [0, pos + t]
    (causal within the window), head h to KV head h // (n_heads // n_kv). Returns (batch, T, n_heads,
    head_dim) in q's dtype. No sliding window (the runner keeps its masked SDPA for those models).

spec_conv(xbc, conv_buf, shift, offset, weight, bias, activation) -> post
    xbc: (batch, T, conv_dim), any strides (a column slice of in_proj's output); conv_buf: (batch,
    conv_dim, w1 + window) with w1 = width - 1; shift: (batch,) int64 on the device; offset: a Python int;
    weight: (conv_dim, width); bias: (conv_dim,) or None; activation: "silu" or None.
    prefix = conv_buf[:, :, offset + shift : offset + shift + w1] (per row), seq = [prefix | xbc^T] along
    time, post[:, t] = act(bias + sum_j weight[:, j] * seq[:, t + j]) for the T new positions (a causal
    depthwise conv), and conv_buf[:, :, offset : offset + w1 + T] = seq in place. Returns post contiguous
    (batch, T, conv_dim). A rebase step of the replay layer is (offset 0, shift = accepted count), a
    continue step (offset = window length, shift 0).

add_rmsnorm_gemv_spec_conv(x, residual, norm_weight, eps, weight, bias, conv_buf, shift, offset, conv_weight,
                           conv_bias, start, activation) -> (y, post, h)
    A Mamba-2 layer's in_proj of the window (``add_rmsnorm_gemv``), then ``spec_conv`` on its columns start ..
    start + conv_dim: the window's form of ops/decode.py's ``add_rmsnorm_gemv_conv``, one op so that the conv can
    run in the GEMV's epilogue (ops/triton_gemv_conv.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mamballama_cli.ops.conv import causal_conv1d_ref
from mamballama_cli.ops.decode import add_rmsnorm_gemv_ref, write_positions
from mamballama_cli.ops.rope_ops import apply_rotary


def _positions(pos: Tensor, T: int) -> Tensor:
    """(1 or batch, T) int64: pos, pos + 1, ..., pos + T - 1 per row of ``pos`` on its device (no host sync)."""
    return pos.reshape(-1, 1).to(torch.long) + torch.arange(T, device=pos.device)


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def rope_kv_write_window_ref(qkv: Tensor, cos_table: Tensor, sin_table: Tensor, k_cache: Tensor, v_cache: Tensor,
                             pos: Tensor, n_heads: int, n_kv: int) -> Tensor:
    """Rotate T new tokens' q and k at positions pos + t, write k and v into the caches; return q (module doc)."""
    b, T, _ = qkv.shape
    hd = k_cache.shape[-1]
    idx = _positions(pos, T)
    q, k, v = qkv.split([n_heads * hd, n_kv * hd, n_kv * hd], dim=-1)
    q = q.reshape(b, T, n_heads, hd).transpose(1, 2)  # (b, heads, T, hd): apply_rotary's layout
    k = k.reshape(b, T, n_kv, hd).transpose(1, 2)
    v = v.reshape(b, T, n_kv, hd).transpose(1, 2)
    cos = cos_table[idx].expand(b, T, -1)  # (b, T, rotary_dim)
    sin = sin_table[idx].expand(b, T, -1)
    q, k = apply_rotary(q, k, cos, sin)
    write_positions(k_cache, idx, k)
    write_positions(v_cache, idx, v)
    return q.transpose(1, 2)


def window_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, scale: float) -> Tensor:
    """Causal attention of T window queries over the cache prefix [0, pos + t] (see the module docstring)."""
    T, nh = q.shape[1], q.shape[2]
    n_kv, cap = k_cache.shape[1], k_cache.shape[2]
    idx = _positions(pos, T)
    # Attend over the live prefix only when its length can be read (a host sync; not while capturing a
    # graph, which then attends over the whole buffer under the same mask).
    L = cap if _capturing(q) else min(cap, int(pos.max()) + T)
    kj = torch.arange(L, device=q.device)
    mask = kj <= idx[:, :, None]  # (1 or b, T, L): a new token sees everything up to itself
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache[:, :, :L].to(q.dtype), v_cache[:, :, :L].to(q.dtype), attn_mask=mask[:, None],
        scale=scale, enable_gqa=n_kv != nh,
    )  # (b, nh, T, hd)
    return out.transpose(1, 2)


def spec_conv_ref(xbc: Tensor, conv_buf: Tensor, shift: Tensor, offset: int, weight: Tensor,
                  bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """Causal depthwise conv of T new inputs after a buffered prefix; updates ``conv_buf`` (module doc)."""
    b, T, dim = xbc.shape
    w1 = weight.shape[-1] - 1
    start = shift.reshape(b, 1).to(device=conv_buf.device, dtype=torch.long) + offset
    idx = (start + torch.arange(w1, device=conv_buf.device))[:, None, :].expand(b, dim, w1)
    prefix = conv_buf.gather(2, idx)  # (b, dim, w1): the w1 inputs before the new ones
    seq = torch.cat([prefix, xbc.transpose(1, 2)], dim=-1)  # (b, dim, w1 + T)
    # A causal conv from zeros over [prefix, new] gives the new positions exactly their conv outputs.
    post, _ = causal_conv1d_ref(seq, weight, bias, None, activation)
    conv_buf[:, :, offset : offset + w1 + T].copy_(seq)
    return post[..., w1:].transpose(1, 2).contiguous()


def add_rmsnorm_gemv_spec_conv_ref(x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float,
                                   weight: Tensor, bias: Tensor | None, conv_buf: Tensor, shift: Tensor, offset: int,
                                   conv_weight: Tensor, conv_bias: Tensor | None = None, start: int = 0,
                                   activation: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A Mamba-2 layer's first ops of a verify window: ``add_rmsnorm_gemv`` (in_proj of the T rows), then
    ``spec_conv`` on the projection's columns ``start .. start + C`` (C = conv_buf's channels: [x | B | C]), which
    rewrites ``conv_buf`` in place. Returns (the projection, the conv's output (batch, T, C), residual + x); what
    the projection holds in the conv's columns is unspecified (the fast twin, ops/triton_gemv_conv.py, runs the conv
    in the several-row GEMV's epilogue where that was timed faster)."""
    y, h = add_rmsnorm_gemv_ref(x, residual, norm_weight, eps, weight, bias)
    post = spec_conv_ref(y[..., start: start + conv_buf.shape[1]], conv_buf, shift, offset, conv_weight, conv_bias,
                         activation)
    return y, post, h


VERIFY_REFERENCES = {
    "rope_kv_write_window": rope_kv_write_window_ref,
    "window_attention": window_attention_ref,
    "spec_conv": spec_conv_ref,
    "add_rmsnorm_gemv_spec_conv": add_rmsnorm_gemv_spec_conv_ref,
}


def _register() -> None:
    from mamballama_cli import ops

    for name, fn in VERIFY_REFERENCES.items():
        if name not in ops.REFERENCES:
            ops.register_reference(name, fn)


_register()
