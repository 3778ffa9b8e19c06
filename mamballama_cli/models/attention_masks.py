"""Attention masks and the lower-right causal attention of a prefill piece read after cached positions
(``Attention.forward`` in models/modeling.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_mask_4d(
    q_len: int, kv_len: int, padding_mask: Tensor | None, sliding_window: int | None, device
):
    """Boolean mask (batch or 1, 1, q_len, kv_len), True = attend; None when plain causal suffices.

    Queries are the last ``q_len`` of ``kv_len`` positions. Each query may always see itself, so rows of
    left padding never become all-masked (which would give NaN). A later piece of a chunked prefill (no
    padding, no sliding window) gets :data:`LOWER_RIGHT` instead of a tensor (:func:`lower_right_attention`).
    """
    offset = kv_len - q_len
    if padding_mask is None and sliding_window is None:
        if q_len == 1 or offset == 0:
            return None  # decode step (sees everything) or plain causal prefill (is_causal)
        return LOWER_RIGHT  # a later piece of a chunked prefill: Attention.forward runs lower_right_attention
    qi = torch.arange(q_len, device=device)[:, None] + offset
    kj = torch.arange(kv_len, device=device)[None, :]
    mask = kj <= qi
    if sliding_window is not None:
        mask = mask & (kj > qi - sliding_window)
    mask = mask[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, None, :kv_len].bool()
        mask = mask | (kj == qi)[None, None]
    return mask


LOWER_RIGHT = "lower-right causal"  # attention_mask_4d's answer for a prefill piece after cached positions
SCORES_BUDGET = 1 << 28  # score elements one materialised attention block may hold


def lower_right_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, gqa: bool) -> Tensor:
    """Causal attention of q (b, h, Lq, d), the last Lq of Lk positions, over k, v (b, hk, Lk, d).

    A later piece of a chunked prefill. With a (Lq, Lk) tensor mask SDPA materialises (b, h, Lq, Lk) scores: 64
    GiB for 64 rows x 1,024 queries x 70,000 keys, an out-of-memory error on the H200. Where SDPA has a fused
    kernel for lower-right causal attention (``torch.nn.attention.bias.causal_lower_right``) it runs that: flash
    with GQA as it is, the memory-efficient kernel (no GQA) with K/V repeated per query head. Otherwise the
    queries go through in blocks whose scores stay under :data:`SCORES_BUDGET` elements."""
    b, h, Lq, _ = q.shape
    Lk = k.shape[2]
    if q.is_cuda:
        from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
        from torch.nn.attention.bias import causal_lower_right

        if can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, gqa)):  # flash takes GQA as it is
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Lq, Lk), scale=scale,
                                                  enable_gqa=gqa)
        if gqa:  # the memory-efficient kernel (float32, say) has no GQA: a K/V head per query head
            k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
            gqa = False
        if can_use_efficient_attention(SDPAParams(q, k, v, None, 0.0, False, False)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Lq, Lk), scale=scale)
    rows = max(1, SCORES_BUDGET // max(1, b * h * Lk))
    kj = torch.arange(Lk, device=q.device)
    outs = []
    for s in range(0, Lq, rows):
        qi = torch.arange(s, min(Lq, s + rows), device=q.device) + (Lk - Lq)
        mask = (kj <= qi[:, None])[None, None]
        outs.append(F.scaled_dot_product_attention(q[:, :, s : s + rows], k, v, attn_mask=mask, scale=scale,
                                                   enable_gqa=gqa))
    return torch.cat(outs, dim=2)
