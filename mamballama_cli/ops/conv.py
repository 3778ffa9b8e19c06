"""Pure-PyTorch references for the causal depthwise convolution of Mamba mixers.

Shapes (channels first, as causal-conv1d):
    x:      (batch, dim, seqlen)
    weight: (dim, width)
    bias:   (dim,) or None
    conv_state: (batch, dim, width - 1)   the last width-1 inputs seen, oldest first
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _activate(y: Tensor, activation: str | None) -> Tensor:
    if activation in (None, "identity"):
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"unknown activation {activation!r}; use 'silu' or None")


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, initial_state: Tensor | None = None,
                      activation: str | None = None) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv over time, continuing from ``initial_state`` (zeros when None).

    Returns (y, final_state): y (batch, dim, seqlen), final_state (batch, dim, width - 1).
    """
    b, dim, seqlen = x.shape
    width = weight.shape[-1]
    if initial_state is None and seqlen >= width - 1:
        # From zeros (training, prefill): let the conv pad instead of concatenating a copy of x.
        y = F.conv1d(x, weight.to(x.dtype)[:, None, :], bias.to(x.dtype) if bias is not None else None,
                     padding=width - 1, groups=dim)[..., :seqlen]
        return _activate(y, activation), x[..., seqlen - (width - 1):]
    if initial_state is None:
        initial_state = x.new_zeros(b, dim, width - 1)
    xx = torch.cat([initial_state.to(x.dtype), x], dim=-1)  # (b, dim, width - 1 + seqlen)
    y = F.conv1d(xx, weight.to(x.dtype)[:, None, :], bias.to(x.dtype) if bias is not None else None, groups=dim)
    final_state = xx[..., xx.shape[-1] - (width - 1):]
    return _activate(y, activation), final_state


def causal_conv1d_update_ref(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                             activation: str | None = None) -> tuple[Tensor, Tensor]:
    """Feed ``seqlen`` new inputs (usually 1) through the conv, given the carried state.

    x: (batch, dim) or (batch, dim, seqlen). Returns (y, new_conv_state); y has the shape of x.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x[..., None]
    y, new_state = causal_conv1d_ref(x, weight, bias, conv_state, activation)
    return (y[..., 0] if squeeze else y), new_state
