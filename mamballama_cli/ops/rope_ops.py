"""Pure-PyTorch rotary position embedding (transformers' Llama convention), the reference of the ``rotary`` op."""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (batch, heads, seqlen, head_dim); cos, sin: (batch, seqlen, rotary_dim). The dims past rotary_dim
    pass through; the result has the promoted dtype of x and the tables."""
    cos, sin = cos[:, None], sin[:, None]
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q, k: (batch, heads, seqlen, head_dim); cos, sin: (batch, seqlen, rotary_dim). Result in the promoted dtype
    of q and the tables (float32 under autocast, where the tables are float32)."""
    return rotate(q, cos, sin), rotate(k, cos, sin)


def rotary_ref(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The ``rotary`` op: :func:`apply_rotary` with both results in q's dtype (under autocast attention would
    cast them to it anyway; doing it here keeps the op's output dtype that of its input on every backend)."""
    q_out, k_out = apply_rotary(q, k, cos, sin)
    return q_out.to(q.dtype), k_out.to(q.dtype)
