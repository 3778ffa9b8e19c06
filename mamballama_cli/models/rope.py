"""Rotary position embeddings for the attention layers, matching transformers' Llama conventions.

Supported ``rope_type``: default, linear, llama3 (Llama 3.1+ long-context scaling). The teacher's own
rotary tables are reproduced exactly (tests compare against transformers' LlamaRotaryEmbedding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mamballama_cli.ops.rope_ops import apply_rotary, rotate_half  # noqa: F401  (re-exported)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(params: dict, head_dim: int) -> tuple[Tensor, float]:
    """Inverse frequencies (head_dim * partial_rotary_factor / 2,) and the cos/sin scaling factor."""
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    base = float(params.get("rope_theta", 10000.0))
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    def __init__(self, params: dict, head_dim: int):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(params, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids (batch, seqlen) -> cos, sin (batch, seqlen, rotary_dim), in float32 then ``dtype``."""
        freqs = position_ids[..., None].float() * self.inv_freq.float().to(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)
