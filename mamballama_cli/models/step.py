"""The inference protocol every mixer implements: what one step call carries, and the op table it reads.

A mixer (attention, Mamba-2, Mamba-1) is stepped by :class:`~mamballama_cli.models.runtime.Runtime` through two
methods, besides its parallel ``forward`` (training and prefill):

``inference_state(cache, window=0, keep_live=False)``
    The state its ``step`` reads and writes, for one :class:`~mamballama_cli.models.cache.HybridCache`:
    ``window == 0`` (decode) views of the cache itself; ``window > 0`` (speculative verification) the
    buffers of a replay window of that many tokens, which the runtime fills from the cache after the prompt
    with ``state.load(cache)``. Attention keeps its K/V in the cache in both cases (it rolls back by length).
``step(x, state, step: Step) -> Tensor``
    The mixer's output for the new tokens. ``x`` is the normed input (a tensor), or, from the runtime, a
    :class:`NormedInput` whose norm the mixer's first projection applies (:func:`project_in`, which every mixer
    calls for that projection). ``step.window`` False: one token per row,
    x (batch, hidden), the state updated in place (the decode step, captured in a CUDA graph on CUDA). True:
    T tokens, x (batch, T, hidden): with ``step.rebase``, first replay ``step.keep`` (batch,) steps of the
    last window from its checkpoint and start a new window; else append to the window (``step.wlen``
    entries so far, hybrid drafts only). Positions and replay counts are device tensors (no host sync), so
    one captured graph serves every position and every accepted count. ``step.piece`` True: T tokens of a prompt,
    x (batch, T, hidden), at ``step.pos`` onwards: each mixer's parallel form read on from its decode state, which
    it updates in place (:meth:`~mamballama_cli.models.runtime.Runtime.read_on`: a prompt without the model's
    host-bound forward, one graph per piece length).

Every op a step runs comes from :class:`OpTable`, the op dispatch of :mod:`mamballama_cli.ops` resolved once
per device: the Triton kernels on CUDA, the PyTorch references elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mamballama_cli import ops
from mamballama_cli.ops import decode as _decode  # noqa: F401  (registers the decode ops)
from mamballama_cli.ops import replay as _replay  # noqa: F401  (registers ssm_replay)
from mamballama_cli.ops import verify_ref as _verify  # noqa: F401  (registers the verify ops)


class OpTable(dict):
    """op name -> the function :func:`mamballama_cli.ops.dispatch` picks on ``device``, resolved on first use.

    ``backends`` records the backend of every op resolved so far. Assigning an entry replaces that op for
    this table only (tests use it to check an op is not called).
    """

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        self.backends: dict[str, str] = {}

    def __missing__(self, op: str):
        backend, fn = ops.dispatch(op, self.device)
        self.backends[op] = backend
        self[op] = fn
        return fn

    def resolve(self, names) -> OpTable:
        for name in names:
            self[name]  # noqa: B018  (resolves it)
        return self


@dataclass
class Step:
    """What one walk over the layers hands every mixer besides its input and its state.

    pos: int64 on the device, one for the batch ((1,) or ()) or one per row ((batch,): continuous batching,
    speculative rows that accepted different counts); decode: the position of the new token; window: the
    position of the first new token. length: decode only, pos + 1, the attended length. cos, sin: the rotary tables
    (capacity, rotary_dim), indexed by position on the device. keep, rebase, wlen: window only (module doc).
    kv_len: window only, how much of the K/V buffer a sliding-window layer attends over (None: all of it,
    as a captured graph must). slot: window only, which of its two slots every Mamba-2 window writes this call
    ((1,) on the device; the runtime flips it once before a rebase walk); None: each window flips its own.
    piece: a prompt piece of T tokens from ``pos`` over decode states (module doc).
    """

    fns: OpTable
    window: bool = False
    pos: Tensor | None = None
    length: Tensor | None = None
    cos: Tensor | None = None
    sin: Tensor | None = None
    keep: Tensor | None = None
    rebase: bool = True
    wlen: int = 0
    kv_len: int | None = None
    slot: Tensor | None = None
    piece: bool = False


class NormedInput:
    """A layer's input before its norm, as the runtime hands it to a mixer's ``step``: (hidden, residual) and the
    norm's weight. The mixer's first projection applies the norm (:func:`project_in`: the ``add_rmsnorm_gemv``
    op, one kernel on CUDA where that was timed faster than the two apart), which also gives the layer's new
    residual; the runtime reads it after the step (:meth:`residual_out`)."""

    def __init__(self, hidden: Tensor, residual: Tensor | None, weight: Tensor, eps: float):
        self.hidden, self.residual, self.weight, self.eps = hidden, residual, weight, eps
        self.new_residual: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def residual_out(self, mixer) -> Tensor:
        if self.new_residual is None:
            raise RuntimeError(f"{type(mixer).__name__}.step did not read its input through project_in")
        return self.new_residual


def project_in(x, weight: Tensor, bias: Tensor | None, fns: OpTable) -> Tensor:
    """A mixer's first projection of its input: ``gemv`` of a normed tensor, or, for a :class:`NormedInput`, the
    norm and the projection in one op (the new residual kept on ``x``)."""
    if isinstance(x, NormedInput):
        y, x.new_residual = fns["add_rmsnorm_gemv"](x.hidden, x.residual, x.weight, x.eps, weight, bias)
        return y
    return fns["gemv"](x, weight, bias)


def project_in_conv(x, weight: Tensor, bias: Tensor | None, conv_state: Tensor, conv_weight: Tensor,
                    conv_bias: Tensor | None, start: int, activation: str | None,
                    fns: OpTable) -> tuple[Tensor, Tensor]:
    """:func:`project_in`, then the conv step on the projection's columns ``start .. start + C`` (a Mamba-2 layer's
    [x | B | C]; ``conv_state`` (batch, C, width - 1) slid in place): (the projection, the conv's output); what the
    projection holds in the conv's columns is unspecified. For a :class:`NormedInput`, the norm, the projection and
    the conv are one op (``add_rmsnorm_gemv_conv``: at one row on CUDA, the conv in the GEMV's epilogue where that
    was timed faster)."""
    if isinstance(x, NormedInput):
        y, xbc, x.new_residual = fns["add_rmsnorm_gemv_conv"](x.hidden, x.residual, x.weight, x.eps, weight, bias,
                                                              conv_state, conv_weight, conv_bias, start, activation)
        return y, xbc
    y = fns["gemv"](x, weight, bias)
    xbc = y[..., start: start + conv_state.shape[1]]
    return y, fns["conv_update_inplace"](xbc, conv_state, conv_weight, conv_bias, activation)


def project_in_window_conv(x, weight: Tensor, bias: Tensor | None, conv_buf: Tensor, shift: Tensor, offset: int,
                           conv_weight: Tensor, conv_bias: Tensor | None, start: int, activation: str | None,
                           fns: OpTable) -> tuple[Tensor, Tensor]:
    """:func:`project_in_conv`'s form for a verify window: the projection of the window's rows, then ``spec_conv``
    on its columns ``start .. start + C`` (``conv_buf`` rewritten from ``offset``; ops/verify_ref.py): (the
    projection, the conv's output (batch, T, C)). For a :class:`NormedInput`, one op
    (``add_rmsnorm_gemv_spec_conv``: at batch 1 on CUDA, the conv in the several-row GEMV's epilogue where that was
    timed faster)."""
    if isinstance(x, NormedInput):
        y, post, x.new_residual = fns["add_rmsnorm_gemv_spec_conv"](
            x.hidden, x.residual, x.weight, x.eps, weight, bias, conv_buf, shift, offset, conv_weight, conv_bias,
            start, activation)
        return y, post
    y = fns["gemv"](x, weight, bias)
    return y, fns["spec_conv"](y[..., start: start + conv_buf.shape[1]], conv_buf, shift, offset, conv_weight,
                               conv_bias, activation)


def one_token_step(device) -> Step:
    """A decode :class:`Step` without positions: what a Mamba mixer's ``forward`` uses for one cached token. Its
    ops are looked up at this call (as every op of ``forward`` is), so ``MAMBALLAMA_KERNELS`` applies at once."""
    return Step(OpTable(device))


def fuse_linears(owner: torch.nn.Module, names: list[str], column_major: bool = False) -> tuple[Tensor, Tensor | None]:
    """One buffer holding the weights (and biases) of ``owner.<names>`` stacked by rows; the Linear
    parameters become views into it, so the model and its state_dict keep their layout and values.

    A step then runs one GEMM where it ran two or three ([gate; up], [q; k; v]). The buffer is kept on the
    module (a plain attribute: not a parameter, not in the state_dict); moving the model with ``.to()``
    un-shares the views, and the next call fuses again. ``column_major``: the buffer is stored transposed
    when that reads faster on a CPU (see :func:`column_major`).
    """
    key = "_mamballama_fused_" + "_".join(names)
    lins = [getattr(owner, n) for n in names]
    transposed = column_major and wide(sum(lin.out_features for lin in lins), lins[0].in_features)
    cached = owner.__dict__.get(key)
    if cached is not None:
        W, bias = cached
        start, ok = 0, (W.stride(0) == 1) == transposed
        for lin in lins:
            ok = ok and lin.weight.data_ptr() == W[start].data_ptr() and lin.weight.dtype == W.dtype
            start += lin.weight.shape[0]
        if ok:
            return cached
    with torch.no_grad():
        W = torch.cat([lin.weight.data for lin in lins], dim=0)
        if transposed:
            W = W.t().contiguous().t()
        bias = None
        if any(lin.bias is not None for lin in lins):
            bias = torch.cat([lin.bias.data if lin.bias is not None
                              else W.new_zeros(lin.weight.shape[0]) for lin in lins])
        start = 0
        for lin in lins:
            rows = lin.weight.shape[0]
            lin.weight.data = W[start:start + rows]
            if lin.bias is not None:
                lin.bias.data = bias[start:start + rows]
            start += rows
    owner.__dict__[key] = (W, bias)
    return W, bias


def wide(out_features: int, in_features: int) -> bool:
    """Whether a CPU reads an (out, in) weight faster column-major in a one-token GEMM: when out >= in.

    Measured on one core (x86, float32, 2026-12-04): [gate; up] 3072 x 576 in 349 us column-major against
    619 us row-major, lm_head 49152 x 576 about 2x faster, 576 x 576 even; down_proj 576 x 1536 slower
    (307 against 244 us)."""
    return out_features >= in_features


def column_major(linear: torch.nn.Linear) -> None:
    """Store ``linear``'s weight (out, in) transposed in memory (strides (1, out)) when :func:`wide`; shape
    and values unchanged. A decode step on a CPU is mostly one-token GEMMs, which then read the weight at
    about twice the bandwidth."""
    w = linear.weight
    if w.dim() == 2 and w.stride(0) != 1 and wide(*w.shape):
        with torch.no_grad():
            w.data = w.data.t().contiguous().t()


def _contiguous_entries(module, state_dict, prefix, local_metadata) -> None:
    for name in module._parameters:
        value = state_dict.get(prefix + name)
        if value is not None and not value.is_contiguous():
            state_dict[prefix + name] = value.contiguous()


def contiguous_state_dict(module: torch.nn.Module) -> None:
    """``module.state_dict()`` gives contiguous copies of its own parameters that are stored transposed (what
    checkpoint writers expect); registered once per module."""
    if module.__dict__.get("_mamballama_contiguous_state"):
        return
    register = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
    register(_contiguous_entries)
    module.__dict__["_mamballama_contiguous_state"] = True


class ReplayWindow:
    """What the Mamba mixers' replay windows share: ``ckpt`` (the SSM state at the window's start), ``live``
    (the running state, or None), ``conv`` (the conv inputs, the first ``w1`` columns carried over) and the mixer."""

    mixer: torch.nn.Module
    ckpt: Tensor
    live: Tensor | None
    conv: Tensor
    w1: int

    def load(self, cache) -> None:
        """Start from the layer's state in ``cache`` (after the prompt)."""
        state = cache.mamba_state(self.mixer.layer_idx)
        self.ckpt.copy_(state["ssm"])
        if self.live is not None:
            self.live.copy_(state["ssm"])
        self.conv[:, :, : self.w1].copy_(state["conv"])
