"""Pure-PyTorch reference for the gated RMSNorm used before a Mamba-2 mixer's out_proj."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rmsnorm_gated_ref(
    y: Tensor,
    z: Tensor | None,
    weight: Tensor,
    eps: float = 1e-6,
    group_size: int | None = None,
) -> Tensor:
    """out = rmsnorm(y * silu(z)) * weight, the RMS taken over groups of ``group_size`` channels.

    y, z: (..., dim); weight: (dim,). Computed in float32, returned in y's dtype.
    """
    dtype = y.dtype
    h = y.float()
    if z is not None:
        h = h * F.silu(z.float())
    dim = h.shape[-1]
    group_size = group_size or dim
    hg = h.reshape(*h.shape[:-1], dim // group_size, group_size)
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    return (hg.reshape(h.shape) * weight.float()).to(dtype)


def rmsnorm_ref(x: Tensor, weight: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> Tensor:
    """Llama's RMSNorm: normalise in float32, round to the input dtype, scale by the weight.

    The result has the promoted dtype of input and weight, or ``out_dtype`` when given (the model asks for the
    autocast dtype, which is what every consumer of the norm would cast it to).
    """
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if out_dtype is None else out.to(out_dtype)
