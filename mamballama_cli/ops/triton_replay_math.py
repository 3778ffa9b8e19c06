"""The Triton functions of the Mamba-2 replay kernel (:mod:`mamballama_cli.ops.triton_replay`): the step size, tile
pointers, rows of a window tile, FORM 2's loads, the gated norm, and the chunked form's dots (FORM 3).

The step forms run the window's steps one after another: at the default teacher's head (64 x 64, one program a head,
nine heads) a call is a chain of 2K + 2 dependent steps on nine SMs, each new step with its own reductions for the
output and the gated norm, so the call costs its latency (on an H100, 10.4 us at K = 6 against 4.9 us for a
one-token window). The chunked form writes the same recurrence as a few matrix products over the window, the way
the SSD scan does over a chunk, so the chain is a handful of dots whatever K is:

    replay:  S_r = exp(L) S_0 + sum_t exp(L - L_t) dt_t x_t B_t^T            (L_t: the sum of dt_u A for u <= t)
    outputs: y_t = exp(c_t) S_r C_t + sum_{j <= t} exp(c_t - c_j) dt_j (C_t . B_j) x_j + D x_t
    final:   S_T = exp(c_T) S_r + sum_j exp(c_T - c_j) dt_j x_j B_j^T          (c_t: the same sum over the new steps)

The old steps past the row's count have dt = 0 (the identity, as in the step forms), so every exponent is at most 0.
The dots are float32 with IEEE products (no TF32), so a call agrees with the step forms to float32 rounding; the
gated RMSNorm runs once for all the window's rows. The window's rows are padded to 16, the least a ``tl.dot`` takes.
The kernel offers it where a head fits one program (at the 8B head a chunked form lost to the step form, 13.6-17.8
against 9.4-12.3 us, the seventeenth session). Inference only.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    # log1p(exp(x)) to full float32 accuracy for very negative x (the usual log(1 + u) loses it when u is
    # tiny): log1p(u) = log(w) * u / (w - 1) with w = 1 + u (Goldberg); torch uses x itself above 20.
    u = tl.exp(x)
    w = 1.0 + u
    lp = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _tile(ptr, rows, s_row, cols, s_col):
    """Pointers of a (rows x cols) tile at ``ptr``."""
    return ptr + rows[:, None] * s_row + cols[None, :] * s_col


@triton.jit
def _row(tile, rows, t):
    """Row ``t`` of a (steps x block) tile, as a block: exact, the other rows add zeros."""
    return tl.sum(tl.where(rows[:, None] == t, tile, 0.0), axis=0)


@triton.jit
def _at(vec, rows, t):
    """Entry ``t`` of a vector of steps."""
    return tl.sum(tl.where(rows == t, vec, 0.0), axis=0)


@triton.jit
def _new_step(xb, dtb, Bb, Cb, zb, t, x_st, dt_st, B_st, C_st, z_st, mask_p, mask_n, HAS_Z: tl.constexpr):
    """FORM 2's loads of new step ``t`` from the row's base pointers: raw x, raw dt, raw B, C and z in float32 (z
    stands in as C without HAS_Z, unread)."""
    x = tl.load(xb + t * x_st, mask=mask_p, other=0.0)
    dt = tl.load(dtb + t * dt_st)
    B = tl.load(Bb + t * B_st, mask=mask_n, other=0.0)
    C = tl.load(Cb + t * C_st, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(zb + t * z_st, mask=mask_p, other=0.0).to(tl.float32)
    else:
        z = C
    return x, dt, B, C, z


@triton.jit
def _gated_norm(y, z, nw, mask_p, eps, headdim, out_dtype: tl.constexpr, HAS_Z: tl.constexpr):
    """The Mamba-2 mixer's gated RMSNorm over a head's row (the last axis) of ``y``: one row (headdim,) or a window's
    rows (steps, headdim). ``y`` is first rounded to the activation dtype, as the unfused path hands it over."""
    y = y.to(out_dtype).to(tl.float32)
    if HAS_Z:
        y = y * (z * tl.sigmoid(z))
    var = tl.sum(tl.where(mask_p, y * y, 0.0), axis=-1, keep_dims=True) / headdim
    return y * tl.rsqrt(var + eps) * nw


@triton.jit
def _chunked_replay(s, xo, dto, Bo, rw, A):
    """FORM 3's replay: the state after the accepted old steps (dto 0 past the count), each step weighted by its
    decay to the count's end, in one dot."""
    lo = dto * A
    after = tl.sum(tl.where(rw[None, :] > rw[:, None], lo[None, :], 0.0), axis=1)  # sum of dt A over later steps
    w = tl.exp(after) * dto
    return s * tl.exp(tl.sum(lo, axis=0)) + tl.dot(tl.trans(xo * w[:, None]), Bo, input_precision="ieee")


@triton.jit
def _chunked_window(s, xn, dtn, Bn, Cn, rt, A, T: tl.constexpr, RETURN_FINAL: tl.constexpr):
    """FORM 3's new steps from the replayed state ``s`` (dtn 0 past T): their outputs (steps, headdim) without D,
    from the state's part and each earlier step's through C_t . B_j, and the state after them (``s`` itself
    without RETURN_FINAL, unused)."""
    causal = rt[None, :] <= rt[:, None]  # (t, j): j <= t
    c = tl.sum(tl.where(causal, (dtn * A)[None, :], 0.0), axis=1)  # dt A summed through step t
    G = tl.dot(Cn, tl.trans(Bn), input_precision="ieee")  # (t, j): C_t . B_j
    M = tl.where(causal, tl.exp(tl.where(causal, c[:, None] - c[None, :], 0.0)) * dtn[None, :] * G, 0.0)
    y = tl.exp(c)[:, None] * tl.dot(Cn, tl.trans(s), input_precision="ieee") + tl.dot(M, xn, input_precision="ieee")
    if RETURN_FINAL:
        last = tl.sum(tl.where(rt == T - 1, c, 0.0), axis=0)  # 0 when T = 0: the final state is the replayed one
        w = tl.where(rt < T, tl.exp(last - c) * dtn, 0.0)
        s = s * tl.exp(last) + tl.dot(tl.trans(xn * w[:, None]), Bn, input_precision="ieee")
    return y, s
