"""References of the decode-step ops (pure PyTorch): the CPU path of the static decoder and the ground truth
of the Triton kernels in :mod:`mamballama_cli.ops.triton_decode` (the attention
ops: :mod:`mamballama_cli.ops.triton_attention`).

Importing this module registers each as its op's reference; :data:`DECODE_OPS` names the ops one decode step
uses (the mixers' one-token steps and the runtime's walk, models/step.py and models/runtime.py, dispatch
each of them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mamballama_cli import ops
from mamballama_cli.ops.conv import _activate
from mamballama_cli.ops.norm import rmsnorm_gated_ref, rmsnorm_ref
from mamballama_cli.ops.rope_ops import rotate


def add_rmsnorm_ref(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """h = residual + x (x alone when residual is None); returns (rmsnorm(h) * weight, h).

    x, residual: (..., hidden); weight: (hidden,). Numerics as the model's layer: the sum in x's dtype,
    then Llama's RMSNorm.
    """
    h = x if residual is None else residual + x
    return rmsnorm_ref(h, weight, eps), h


def gemv_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A decode step's linear: ``F.linear(x, weight, bias)``, x (batch, in) or (batch, T, in). The fast twin
    (ops/triton_gemv.py) takes the batch-1 tall ones and hands the rest back to this."""
    return F.linear(x, weight, bias)


def swiglu_ref(gate_up: Tensor) -> Tensor:
    """gate_up (..., 2 * inter) = [gate | up] -> silu(gate) * up (..., inter)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def add_rmsnorm_gemv_ref(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor,
                         bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``add_rmsnorm`` then ``gemv``: (rmsnorm(residual + x) * norm_weight @ weight^T + bias, residual + x). The
    fast twin (ops/triton_gemv_fused.py) does both in one kernel where that is timed faster."""
    normed, h = add_rmsnorm_ref(x, residual, norm_weight, eps)
    return gemv_ref(normed, weight, bias), h


def gemv_swiglu_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``gemv`` with weight = [gate; up], then ``swiglu``: the MLP's activation from its normed input
    (ops/triton_gemv.py: one kernel at one row, the SwiGLU in its epilogue)."""
    return swiglu_ref(gemv_ref(x, weight, bias))


def add_rmsnorm_gemv_swiglu_ref(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor,
                                bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``add_rmsnorm``, ``gemv`` with weight = [gate; up], then ``swiglu``: (the MLP's activation, residual + x), what
    down_proj reads (ops/triton_gemv_fused.py: one kernel)."""
    gate_up, h = add_rmsnorm_gemv_ref(x, residual, norm_weight, eps, weight, bias)
    return swiglu_ref(gate_up), h


def conv_update_inplace_ref(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                            activation: str | None = None) -> Tensor:
    """causal_conv1d_update for one new input x (batch, dim) that slides ``conv_state`` (batch, dim, width-1)
    in place; returns y (batch, dim).

    The same sum as :func:`~mamballama_cli.ops.conv.causal_conv1d_update_ref`, written as elementwise ops and
    accumulated in at least float32: a one-token ``F.conv1d`` costs about 100 us of setup on a CPU core, this a fifth.
    """
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=-1)  # (batch, dim, width)
    acc = torch.promote_types(x.dtype, torch.float32)
    y = (window.to(acc) * weight.to(acc)).sum(-1)
    if bias is not None:
        y = y + bias.to(acc)
    conv_state.copy_(window[..., 1:])
    return _activate(y, activation).to(x.dtype)


def add_rmsnorm_gemv_conv_ref(x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, weight: Tensor,
                              bias: Tensor | None, conv_state: Tensor, conv_weight: Tensor,
                              conv_bias: Tensor | None = None, start: int = 0,
                              activation: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A Mamba-2 layer's first ops of a decode step: ``add_rmsnorm_gemv`` (in_proj), then ``conv_update_inplace`` on
    the projection's columns ``start .. start + C`` (C = conv_state's channels: [x | B | C]), which slides
    ``conv_state`` in place. Returns (the projection, the conv's output (..., C), residual + x); what the
    projection holds in the conv's columns is unspecified (the fast twin, ops/triton_gemv_conv.py, which applies the
    conv in the one-row GEMV's epilogue where that was timed faster, writes the conv's output there and returns a
    view of it)."""
    y, h = add_rmsnorm_gemv_ref(x, residual, norm_weight, eps, weight, bias)
    xbc = y[..., start: start + conv_state.shape[1]]
    return y, conv_update_inplace_ref(xbc, conv_state, conv_weight, conv_bias, activation), h


def ssm_step_gated_ref(state: Tensor, x: Tensor, B: Tensor, C: Tensor, dt_raw: Tensor, dt_bias: Tensor,
                       A_log: Tensor, D: Tensor | None, z: Tensor | None, norm_weight: Tensor | None,
                       eps: float) -> Tensor:
    """One Mamba-2 recurrence step for GQA-tied x and B, followed by the gated RMSNorm. Updates ``state``.

    state: (batch, nheads, headdim, dstate) float32; x: (batch, ngroups, headdim); B: (batch, ngroups, dstate);
    C: (batch, nheads, dstate); dt_raw: (batch, nheads) before dt_bias and softplus; dt_bias, A_log, D:
    (nheads,); z: (batch, nheads, headdim) or None; norm_weight: (nheads * headdim,) or None (no norm, no
    gate). Head i reads x and B of group i // (nheads / ngroups). Returns (batch, nheads * headdim) in x's
    dtype, what out_proj reads. Same arithmetic as ``ssm_step`` followed by ``rmsnorm_gated`` (the state in
    its own dtype, dt in float32), with heads grouped by broadcasting instead of repeated copies.
    """
    b, h, p, n = state.shape
    g = x.shape[1]
    r = h // g
    sdtype = state.dtype
    dt = F.softplus(dt_raw.float() + dt_bias.float()).to(sdtype)  # (b, h)
    dA = torch.exp(dt * (-torch.exp(A_log.float())).to(sdtype))
    xs = x.to(sdtype)[:, :, None]  # (b, g, 1, p): head (group, j) reads group x
    dx = (dt.view(b, g, r, 1) * xs)[..., None]  # (b, g, r, p, 1)
    Bs = B.to(sdtype).view(b, g, 1, 1, n)
    if torch.is_grad_enabled():  # autograd saves the old state: read it from a copy, then overwrite it
        new_state = state.clone().view(b, g, r, p, n) * dA.view(b, g, r, 1, 1) + dx * Bs
        state.copy_(new_state.view(b, h, p, n))
    else:  # in place: no new state per step
        new_state = state.view(b, g, r, p, n).mul_(dA.view(b, g, r, 1, 1)).addcmul_(dx, Bs)
    y = torch.einsum("bgrpn,bgrn->bgrp", new_state, C.to(sdtype).view(b, g, r, n))
    if D is not None:
        y = y + xs * D.to(sdtype).view(g, r, 1)
    y = y.to(x.dtype).reshape(b, h * p)
    if norm_weight is not None:
        y = rmsnorm_gated_ref(y, z.reshape(b, h * p) if z is not None else None, norm_weight, eps, p)
    return y


def rope_kv_write_ref(qkv: Tensor, cos_table: Tensor, sin_table: Tensor, k_cache: Tensor, v_cache: Tensor,
                      pos: Tensor, n_heads: int, n_kv: int) -> Tensor:
    """Rotate q and k of one new token, write k and v into the caches at ``pos``; return rotated q.

    qkv: (batch, (n_heads + 2 n_kv) * head_dim) as [q | k | v]; cos/sin_table: (capacity, rotary_dim);
    k_cache, v_cache: (batch, n_kv, capacity, head_dim); pos: int64 on the device, (1,) for the whole batch
    or (batch,) for a position per row. Returns q as (batch, n_heads, head_dim).
    """
    b, hd = qkv.shape[0], k_cache.shape[-1]
    n_qk = (n_heads + n_kv) * hd
    qk = qkv[:, :n_qk].reshape(b, n_heads + n_kv, 1, hd)  # q and k rotate alike: one pass over both
    v = qkv[:, n_qk:].reshape(b, n_kv, 1, hd)
    rows = pos.reshape(-1)
    cos = cos_table.index_select(0, rows)[:, None]  # (1 or batch, 1, rotary_dim): rotate's (batch, seqlen, dim)
    sin = sin_table.index_select(0, rows)[:, None]
    qk = rotate(qk, cos, sin)
    write_positions(k_cache, rows[:, None], qk[:, n_heads:])
    write_positions(v_cache, rows[:, None], v)
    return qk[:, :n_heads, 0]


def write_positions(cache: Tensor, idx: Tensor, values: Tensor) -> None:
    """cache (batch, heads, capacity, head_dim)[:, :, idx] = values (batch, heads, T, head_dim), in place.

    idx: (1, T) positions shared by every row, or (batch, T) a row's own positions."""
    values = values.to(cache.dtype)
    if idx.shape[0] == 1:
        cache.index_copy_(2, idx[0], values)
    else:
        b, h, T, d = values.shape
        cache.scatter_(2, idx[:, None, :, None].expand(b, h, T, d), values)


def decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: Tensor, scale: float) -> Tensor:
    """Attention of one query per head over the first ``length`` positions of static K/V buffers.

    q: (batch, n_heads, head_dim); k_cache, v_cache: (batch, n_kv, capacity, head_dim); length: int64 on the
    device (no host sync), (1,) for the whole batch or (batch,) per row. Returns (batch, n_heads, head_dim) in
    q's dtype. Off CUDA (where reading the length costs nothing and nothing is captured) only the longest
    row's live prefix is read.
    """
    nh, n_kv, cap = q.shape[1], k_cache.shape[1], k_cache.shape[2]
    lengths = length.reshape(-1, 1).to(q.device)  # (1 or batch, 1)
    L = cap if q.is_cuda else min(cap, int(lengths.max()))
    k, v = k_cache[:, :, :L].to(q.dtype), v_cache[:, :, :L].to(q.dtype)
    if lengths.shape[0] == 1 and not q.is_cuda:
        out = F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=n_kv != nh)
        return out[:, :, 0]
    if n_kv != nh:
        k, v = k.repeat_interleave(nh // n_kv, dim=1), v.repeat_interleave(nh // n_kv, dim=1)
    valid = torch.arange(L, device=q.device)[None, :] < lengths  # (1 or batch, L)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=valid[:, None, None], scale=scale)
    return out[:, :, 0]


DECODE_REFERENCES = {
    "add_rmsnorm": add_rmsnorm_ref,
    "swiglu": swiglu_ref,
    "gemv": gemv_ref,
    "gemv_swiglu": gemv_swiglu_ref,
    "add_rmsnorm_gemv": add_rmsnorm_gemv_ref,
    "add_rmsnorm_gemv_swiglu": add_rmsnorm_gemv_swiglu_ref,
    "conv_update_inplace": conv_update_inplace_ref,
    "add_rmsnorm_gemv_conv": add_rmsnorm_gemv_conv_ref,
    "ssm_step_gated": ssm_step_gated_ref,
    "rope_kv_write": rope_kv_write_ref,
    "decode_attention": decode_attention_ref,
}
for _name, _fn in DECODE_REFERENCES.items():
    if _name not in ops.REFERENCES:
        ops.register_reference(_name, _fn)

# The ops one decode step uses.
DECODE_OPS = tuple(DECODE_REFERENCES)
