"""Pure-PyTorch reference of the multi-step replay op used by speculative verification (design.md section 4).

A Mamba layer cannot drop rejected draft tokens the way attention crops its K/V: its one state has already
absorbed them. Instead each layer keeps the state at the last position known to be correct (the
"checkpoint") and the per-step SSM inputs of the last verified window. One call then

1. replays the first ``n_replay`` steps of the old window from the checkpoint (the tokens accepted last
   round; elementwise recurrence, no GEMMs) -> the new checkpoint, and
2. runs the new steps from that state, producing their outputs (and, on request, the state after them).

Rejection therefore costs nothing at the time it happens; it is folded into the next call.

One head h reads group g = h // (nheads // ngroups) of x and B (GQA kept) and its own C group:
    dt_t = softplus(dt_raw_t + dt_bias),   s_t = exp(dt_t * A) s_{t-1} + dt_t * x_t B_t^T,   y_t = s_t C_t + D x_t
The window keeps the raw dt (what in_proj produced); the step size is computed in float32 exactly as the
plain decode step computes it.

Shapes:
    state:    (batch, nheads, headdim, dstate)     float32 checkpoint
    x_old:    (batch, W, ngroups, headdim)          inputs of the last window (post-conv x)
    dt_old:   (batch, W, nheads)                    raw dt of the last window (before dt_bias and softplus)
    B_old:    (batch, W, ngroups, dstate)
    n_replay: (batch,) integer in [0, W]            how many old steps to replay per row
    x_new:    (batch, T, ngroups, headdim)
    dt_new:   (batch, T, nheads)
    B_new:    (batch, T, ngroups, dstate)
    C_new:    (batch, T, cgroups, dstate)           cgroups divides nheads (= nheads for our Mamba-2 mixer)
    A, dt_bias, D: (nheads,)                        A negative (-exp(A_log)); D may be None
Returns (y, replayed_state, final_state): y (batch, T, nheads, headdim) in x_new's dtype; the states in
``state``'s dtype; final_state is None unless ``return_final``. ``state_out`` / ``final_out``, when given,
receive the states in place (``state_out`` may be ``state`` itself) and are what is returned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _heads(t: Tensor, nheads: int) -> Tensor:
    """(batch, steps, groups, n) -> (batch, steps, nheads, n): head i reads group i // (nheads // groups)."""
    groups = t.shape[-2]
    return t if groups == nheads else t.repeat_interleave(nheads // groups, dim=-2)


def ssm_replay_ref(state: Tensor, x_old: Tensor, dt_old: Tensor, B_old: Tensor, n_replay: Tensor, x_new: Tensor,
                   dt_new: Tensor, B_new: Tensor, C_new: Tensor, A: Tensor, dt_bias: Tensor, D: Tensor | None = None, *,
                   return_final: bool = False, state_out: Tensor | None = None, final_out: Tensor | None = None,
                   slot: Tensor | None = None, offset: int = 0,
                   read_old: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Replay ``n_replay`` old steps from ``state``, then run the new steps (see the module docstring).

    With ``slot`` (a (1,) integer tensor on the device, 0 or 1), x_old, dt_old and B_old are a window's two slots
    ((2, batch, L, ...) each): the old steps are read from slot 1 - slot (all L of them; none unless
    ``read_old``), and the new steps' x, raw dt and B are written into slot ``slot`` at ``offset``. The caller flips
    the slot before a call that starts a new window, so the window is kept without copies after the call."""
    if slot is not None:
        bufs, cur = (x_old, dt_old, B_old), slot.reshape(1).long()
        x_old, dt_old, B_old = (t.index_select(0, 1 - cur)[0] if read_old else t[0, :, :0] for t in bufs)
        out = ssm_replay_ref(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, dt_bias, D,
                             return_final=return_final, state_out=state_out, final_out=final_out)
        save_window(bufs, (x_new, dt_new, B_new), cur, offset)
        return out
    b, h, p, _ = state.shape
    W, T = x_old.shape[1], x_new.shape[1]
    sdtype = state.dtype  # float32 checkpoints: the same arithmetic as the plain decode step
    A = A.to(sdtype)
    s = state.to(sdtype)

    # 1. Replay: rows whose count is used up keep their state (per-row counts, so batches may differ).
    if W:
        dto = F.softplus(dt_old.to(sdtype) + dt_bias.to(sdtype))  # (b, W, h)
        dAo = torch.exp(dto * A)  # (b, W, h)
        dxo = dto[..., None] * _heads(x_old, h).to(sdtype)  # (b, W, h, p)
        Bo = _heads(B_old, h).to(sdtype)  # (b, W, h, n)
        counts = n_replay.to(device=state.device, dtype=torch.long).reshape(b)
        steps = W
        if not (state.is_cuda and torch.cuda.is_current_stream_capturing()):
            steps = min(W, int(counts.max()))  # skip the steps no row replays (a sync, so not while capturing)
        for t in range(steps):
            stepped = s * dAo[:, t, :, None, None] + dxo[:, t, :, :, None] * Bo[:, t, :, None, :]
            s = torch.where((t < counts)[:, None, None, None], stepped, s)
    replayed = s

    # 2. New steps from the replayed state, producing outputs.
    xn = _heads(x_new, h).to(sdtype)
    dtn = F.softplus(dt_new.to(sdtype) + dt_bias.to(sdtype))
    dAn = torch.exp(dtn * A)  # (b, T, h)
    dxn = dtn[..., None] * xn  # (b, T, h, p)
    Bn = _heads(B_new, h).to(sdtype)
    Cn = _heads(C_new, h).to(sdtype)
    ys = []
    for t in range(T):
        s = s * dAn[:, t, :, None, None] + dxn[:, t, :, :, None] * Bn[:, t, :, None, :]
        ys.append((s @ Cn[:, t, :, :, None])[..., 0])  # (b, h, p)
    if ys:
        y = torch.stack(ys, dim=1)
        if D is not None:
            y = y + xn * D.to(sdtype)[:, None]
        y = y.to(x_new.dtype)
    else:
        y = x_new.new_zeros(b, 0, h, p)

    return y, *hand_out(replayed, s, return_final, state_out, final_out)


def save_window(bufs, news, cur: Tensor, offset: int) -> None:
    """Write each new tensor (batch, T, ...) into its two-slot buffer (2, batch, L, ...) at [cur, :, offset:]: one
    slot read, changed and written back (device-side indices: graph-safe, no sync)."""
    for buf, new in zip(bufs, news):
        part = buf.index_select(0, cur)
        part[0, :, offset : offset + new.shape[1]] = new.to(buf.dtype)
        buf.index_copy_(0, cur, part)


def hand_out(replayed: Tensor, final: Tensor, return_final: bool, state_out: Tensor | None,
             final_out: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A replay op's (replayed_state, final_state) as its contract says: written into ``state_out`` /
    ``final_out`` when given (and those returned), final None unless asked for."""
    if state_out is not None:
        state_out.copy_(replayed)
        replayed = state_out
    if not (return_final or final_out is not None):
        return replayed, None
    if final_out is not None:
        final_out.copy_(final)
        final = final_out
    return replayed, final


def ssm_replay_gated_ref(state: Tensor, x_old: Tensor, dt_old: Tensor, B_old: Tensor, n_replay: Tensor,
                         x_new: Tensor, dt_new: Tensor, B_new: Tensor, C_new: Tensor, A: Tensor, dt_bias: Tensor,
                         D: Tensor | None, z: Tensor | None, norm_weight: Tensor, eps: float, *,
                         return_final: bool = False, state_out: Tensor | None = None, final_out: Tensor | None = None,
                         slot: Tensor | None = None, offset: int = 0,
                         read_old: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`ssm_replay_ref`, then the Mamba-2 mixer's gated RMSNorm over each head (``rmsnorm_gated`` with groups
    of headdim channels): y (batch, T, nheads * headdim) in x_new's dtype, what out_proj reads. z: (batch, T,
    nheads * headdim) or None; norm_weight: (nheads * headdim,)."""
    from mamballama_cli.ops.norm import rmsnorm_gated_ref

    y, replayed, final = ssm_replay_ref(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A,
                                        dt_bias, D, return_final=return_final, state_out=state_out,
                                        final_out=final_out, slot=slot, offset=offset, read_old=read_old)
    b, T, h, p = y.shape
    return rmsnorm_gated_ref(y.reshape(b, T, h * p), z, norm_weight, eps, p), replayed, final


def _register() -> None:
    from mamballama_cli import ops

    if "ssm_replay" not in ops.REFERENCES:
        ops.register_reference("ssm_replay", ssm_replay_ref)
    if "ssm_replay_gated" not in ops.REFERENCES:
        ops.register_reference("ssm_replay_gated", ssm_replay_gated_ref)


_register()


def ssm_replay(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, dt_bias, D=None, *,
               return_final=False, state_out=None, final_out=None, **slots):
    """Dispatching entry point (the fused Triton kernel on CUDA when usable, else the reference)."""
    from mamballama_cli import ops

    return ops.dispatch("ssm_replay", x_new.device)[1](
        state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, dt_bias, D,
        return_final=return_final, state_out=state_out, final_out=final_out, **slots,
    )
