"""Pure-PyTorch rotary position embedding (transformers' Llama convention), the reference of the ``rotary`` op."""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q, k: (batch, heads, seqlen, head_dim); cos, sin: (batch, seqlen, rotary_dim). Result in the promoted dtype
    of q and the tables (float32 under autocast, where the tables are float32)."""
    cos, sin = cos[:, None], sin[:, None]
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_rot = q_rot * cos + rotate_half(q_rot) * sin
    k_rot = k_rot * cos + rotate_half(k_rot) * sin
    return torch.cat([q_rot, q_pass], dim=-1), torch.cat([k_rot, k_pass], dim=-1)


def rotary_ref(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The ``rotary`` op: :func:`apply_rotary` with both results in q's dtype (under autocast attention would
    cast them to it anyway; doing it here keeps the op's output dtype that of its input on every backend)."""
    q_out, k_out = apply_rotary(q, k, cos, sin)
    return q_out.to(q.dtype), k_out.to(q.dtype)
