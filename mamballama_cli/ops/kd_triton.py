"""Fused Triton kernel for the distillation loss (reference: :func:`mamballama_cli.ops.kd.kd_loss`).

Op ``kd_loss(student_logits, teacher_logits, targets, target_mask, *, w_kl, w_rkl, w_ce, temperature)
-> (total, metrics)``, the contract of the reference:

* student_logits: (..., vocab) float32 or bfloat16/float16, the tensor the gradient goes to;
  teacher_logits: the same shape (any float dtype) or None (then cross-entropy only);
  targets: (...) integer ids; target_mask: (...) bool, True on the positions that count.
* total: 0-dim float32, ``w_kl * KL(p_t || p_s) + w_rkl * KL(p_s || p_t) + w_ce * CE`` summed over the
  masked positions, KL between temperature-softened distributions times T^2, CE at temperature 1.
  Differentiable with respect to ``student_logits`` only.
* metrics: detached float32 sums: "ce" always, "kl" whenever there is a teacher, "rkl" when ``w_rkl`` is
  non-zero (and there is a teacher), "loss" (= total).

One program per position (row). It streams the row over vocabulary blocks of ``BLOCK_V`` in fp32
registers: pass 1 keeps running maxima and sums of exponentials (online log-sum-exp) of z/T, of z (when
T != 1) and of u/T; pass 2 computes the per-row KL / reverse-KL sums exactly as the reference does
(p * (log p - log q) per element, after the log-sum-exps are known) and, unless the reverse KL is
weighted, writes the gradient w.r.t. the student logits; pass 3 (only when ``w_rkl != 0`` and a gradient
is wanted) writes the gradient once the row's reverse KL is known, since d rkl / dz needs it. The
gradient is stored in the student logits' dtype during the forward; the backward scales it by
grad_output in place (a second small kernel, fp32 arithmetic). Masked-off rows store zero loss terms
and a zero gradient. No boolean indexing and no host sync: the op can be captured in a CUDA graph.

Per row (z student, u teacher, y target, T temperature, p_s = softmax(z/T), p_t = softmax(u/T)):
    d fkl / dz = T (p_s - p_t)
    d rkl / dz = T p_s (log p_s - log p_t - rkl / T^2)
    d ce  / dz = softmax(z) - onehot(y)
Targets outside [0, vocab) (e.g. -100, cross_entropy's ignore_index) contribute no CE and no CE gradient.

Importing this module registers the kernel for ``kd_loss`` on CUDA (after its reference, ops/kd.py); without
Triton it registers nothing.
"""

from __future__ import annotations

import torch

from mamballama_cli import ops
from mamballama_cli.ops.common import INTERPRETING as _INTERPRET  # Triton's CPU interpreter (kernel debugging)
from mamballama_cli.ops.common import _device_guard
from mamballama_cli.ops.kd import kd_loss as _kd_loss_reference  # registers the op's reference

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  # pragma: no cover - a broken install registers nothing
    triton = tl = None

DEFAULT_BLOCK_V = 4096


if triton is not None:

    @triton.jit
    def _student_terms(z, cols, y_safe, lse_s, lse_1, inv_t, ce_w, UNIT_T: tl.constexpr):
        # One tile of a row's student logits z: log p_s at temperature T, p_s, and the CE part of the gradient
        # (softmax at T = 1 minus the one-hot target, times the CE weight).
        if UNIT_T:
            log_ps = z - lse_s
        else:
            log_ps = z * inv_t - lse_s
        ps = tl.exp(log_ps)
        if UNIT_T:
            g = ce_w * ps
        else:
            g = ce_w * tl.exp(z - lse_1)
        return log_ps, ps, tl.where(cols == y_safe, g - ce_w, g)

    @triton.jit
    def _kd_fwd_kernel(Z, U, Y, M, TERMS, G,
                       L, z_sb, z_sl, u_sb, u_sl,
                       inv_t, t2, c_kl, c_rkl, w_ce,
                       V: tl.constexpr, HAS_TEACHER: tl.constexpr, UNIT_T: tl.constexpr, HAS_RKL: tl.constexpr,
                       WRITE_GRAD: tl.constexpr, GRAD_PASS2: tl.constexpr, GRAD_PASS3: tl.constexpr,
                       BLOCK_V: tl.constexpr):
        # Z, U: (B, L, V) logits with unit last stride; Y, M: (B*L,) targets and mask (uint8);
        # TERMS: (B*L, 3) fp32 per-row [ce, fkl, rkl]; G: (B*L, V) contiguous gradient (student dtype).
        # c_kl = w_kl * T and c_rkl = w_rkl * T (0 when the term is off); w_ce the CE weight.
        # The vocabulary size V is a compile-time constant: one compile per vocabulary, and loops whose
        # bound Triton's CPU interpreter can run (it cannot iterate up to a runtime scalar argument).
        row = tl.program_id(0).to(tl.int64)
        bi = row // L
        li = row - bi * L
        zrow = Z + bi * z_sb + li * z_sl
        urow = U + bi * u_sb + li * u_sl
        grow = G + row * V
        offs = tl.arange(0, BLOCK_V)
        active = tl.load(M + row) != 0
        if active:
            y = tl.load(Y + row).to(tl.int64)
            valid_y = (y >= 0) & (y < V)
            y_safe = tl.where(valid_y, y, 0)
            ce_w = tl.where(valid_y, w_ce, 0.0)

            # ---- pass 1: online log-sum-exp of z/T, z (T != 1) and u/T -------------------------------
            m_s = float("-inf")
            l_s = 0.0
            m_1 = float("-inf")
            l_1 = 0.0
            m_t = float("-inf")
            l_t = 0.0
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                msk = cols < V
                z = tl.load(zrow + cols, mask=msk, other=float("-inf")).to(tl.float32)
                if UNIT_T:
                    zt = z
                else:
                    zt = z * inv_t
                    mn1 = tl.maximum(m_1, tl.max(z, axis=0))
                    l_1 = l_1 * tl.exp(m_1 - mn1) + tl.sum(tl.exp(z - mn1), axis=0)
                    m_1 = mn1
                mns = tl.maximum(m_s, tl.max(zt, axis=0))
                l_s = l_s * tl.exp(m_s - mns) + tl.sum(tl.exp(zt - mns), axis=0)
                m_s = mns
                if HAS_TEACHER:
                    ut = tl.load(urow + cols, mask=msk, other=float("-inf")).to(tl.float32) * inv_t
                    mnt = tl.maximum(m_t, tl.max(ut, axis=0))
                    l_t = l_t * tl.exp(m_t - mnt) + tl.sum(tl.exp(ut - mnt), axis=0)
                    m_t = mnt
            lse_s = m_s + tl.log(l_s)
            if UNIT_T:
                lse_1 = lse_s
            else:
                lse_1 = m_1 + tl.log(l_1)
            lse_t = m_t + tl.log(l_t)

            # ---- pass 2: the row's KL sums (and the gradient when it does not need them) ---------------
            acc_f = tl.zeros([BLOCK_V], dtype=tl.float32)
            acc_r = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                msk = cols < V
                z = tl.load(zrow + cols, mask=msk, other=0.0).to(tl.float32)
                log_ps, ps, g = _student_terms(z, cols, y_safe, lse_s, lse_1, inv_t, ce_w, UNIT_T)
                if HAS_TEACHER:
                    u = tl.load(urow + cols, mask=msk, other=0.0).to(tl.float32)
                    log_pt = u * inv_t - lse_t
                    pt = tl.exp(log_pt)
                    diff = log_pt - log_ps
                    acc_f += tl.where(msk, pt * diff, 0.0)
                    if HAS_RKL:
                        acc_r += tl.where(msk, ps * (0.0 - diff), 0.0)
                    g += c_kl * (ps - pt)
                if GRAD_PASS2:
                    tl.store(grow + cols, g.to(G.dtype.element_ty), mask=msk)
            fkl = tl.sum(acc_f, axis=0)  # KL / T^2
            rkl = tl.sum(acc_r, axis=0)

            # ---- pass 3: the gradient, now that the row's reverse KL is known -------------------------
            if GRAD_PASS3:
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    msk = cols < V
                    z = tl.load(zrow + cols, mask=msk, other=0.0).to(tl.float32)
                    u = tl.load(urow + cols, mask=msk, other=0.0).to(tl.float32)
                    log_ps, ps, g = _student_terms(z, cols, y_safe, lse_s, lse_1, inv_t, ce_w, UNIT_T)
                    log_pt = u * inv_t - lse_t
                    pt = tl.exp(log_pt)
                    g += c_kl * (ps - pt) + c_rkl * ps * (log_ps - log_pt - rkl)
                    tl.store(grow + cols, g.to(G.dtype.element_ty), mask=msk)

            zy = tl.load(zrow + y_safe).to(tl.float32)
            tl.store(TERMS + row * 3, tl.where(valid_y, lse_1 - zy, 0.0))
            tl.store(TERMS + row * 3 + 1, fkl * t2)
            tl.store(TERMS + row * 3 + 2, rkl * t2)
        else:
            tl.store(TERMS + row * 3, 0.0)
            tl.store(TERMS + row * 3 + 1, 0.0)
            tl.store(TERMS + row * 3 + 2, 0.0)
            if WRITE_GRAD:
                zeros = tl.zeros([BLOCK_V], dtype=tl.float32).to(G.dtype.element_ty)
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    tl.store(grow + cols, zeros, mask=cols < V)

    @triton.jit
    def _scale_kernel(G, S, n, BLOCK: tl.constexpr):
        # G (n,) *= S[0] in fp32, in place.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        msk = offs < n
        s = tl.load(S).to(tl.float32)
        g = tl.load(G + offs, mask=msk, other=0.0).to(tl.float32)
        tl.store(G + offs, (g * s).to(G.dtype.element_ty), mask=msk)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (B, L, V) with unit last stride, a view whenever possible (row strides go to the kernel)."""
    if x.dim() != 3:
        x = x.reshape(1, -1, x.shape[-1]) if x.dim() <= 2 else x.reshape(-1, x.shape[-1]).unsqueeze(0)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _kd_forward(student, teacher, targets, mask, *, c_kl, c_rkl, w_ce, temperature, has_rkl, write_grad,
                block_v=None):
    """Launch the fused kernel: -> (terms (rows, 3) fp32 [ce, fkl, rkl], gradient like student or None)."""
    V = student.shape[-1]
    assert mask.shape == student.shape[:-1] and targets.shape == mask.shape, (student.shape, targets.shape,
                                                                              mask.shape)
    assert teacher is None or teacher.shape == student.shape, (teacher.shape, student.shape)
    assert (student.is_cuda or _INTERPRET), "the fused kd_loss kernel needs CUDA tensors"
    z = _as_3d(student)
    u = _as_3d(teacher) if teacher is not None else z
    rows = z.shape[0] * z.shape[1]
    m = mask.reshape(-1)
    m = m.view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)
    y = targets.reshape(-1)
    terms = torch.empty(rows, 3, dtype=torch.float32, device=student.device)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if write_grad else None
    if rows == 0:
        return terms, grad
    if block_v is None:
        block_v = min(DEFAULT_BLOCK_V, triton.next_power_of_2(V))
    num_warps = 8 if block_v >= 2048 else 4
    T = float(temperature)
    with _device_guard(student):
        _kd_fwd_kernel[(rows,)](
            z, u, y, m, terms, grad if grad is not None else terms,
            z.shape[1], z.stride(0), z.stride(1), u.stride(0), u.stride(1),
            1.0 / T, T * T, float(c_kl), float(c_rkl), float(w_ce),
            V=V, HAS_TEACHER=teacher is not None, UNIT_T=T == 1.0, HAS_RKL=has_rkl,
            WRITE_GRAD=write_grad, GRAD_PASS2=write_grad and not has_rkl, GRAD_PASS3=write_grad and has_rkl,
            BLOCK_V=block_v, num_warps=num_warps,
        )
    return terms, grad


def _scale_inplace(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale (a 0-dim tensor), computed in fp32, without a host sync."""
    flat = grad.view(-1)
    n = flat.numel()
    if n:
        block = 4096
        with _device_guard(grad):
            _scale_kernel[(triton.cdiv(n, block),)](flat, scale.reshape(1).float(), n, BLOCK=block, num_warps=8)
    return grad


class _KDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, targets, mask, w_kl, w_rkl, w_ce, temperature, write_grad, block_v):
        has_teacher = teacher is not None
        has_rkl = has_teacher and w_rkl != 0
        T = float(temperature)
        terms, grad = _kd_forward(
            student, teacher, targets, mask, c_kl=w_kl * T if has_teacher else 0.0,
            c_rkl=w_rkl * T if has_rkl else 0.0, w_ce=w_ce, temperature=T, has_rkl=has_rkl,
            write_grad=write_grad, block_v=block_v,
        )
        sums = terms.sum(0)  # [ce, kl, rkl]
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for weight, i, on in ((w_ce, 0, True), (w_kl, 1, has_teacher), (w_rkl, 2, has_rkl)):
            if weight and on:
                total = total + weight * sums[i]
        ctx.grad = grad
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_sums):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("kd_loss_fused: the gradient was not stored (the forward ran without grad) or "
                               "was already consumed (the stored gradient is scaled in place: backward runs "
                               "once, so retain_graph is not supported)")
        ctx.grad = None  # scaled in place and handed over: backward runs once
        return _scale_inplace(grad, grad_total), None, None, None, None, None, None, None, None, None


def kd_loss_fused(student_logits, teacher_logits, targets, target_mask, *, w_kl: float = 1.0,
                  w_rkl: float = 0.0, w_ce: float = 0.0, temperature: float = 1.0, block_v: int | None = None):
    """Same contract as :func:`mamballama_cli.ops.kd.kd_loss` (module docstring); one fused kernel.

    ``block_v`` overrides the vocabulary block (a power of two; tests use a small one to exercise the
    streaming over several blocks).
    """
    if triton is None:
        raise RuntimeError("kd_loss_fused needs Triton")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if teacher_logits is not None:
        teacher_logits = teacher_logits.detach()
    write_grad = torch.is_grad_enabled() and student_logits.requires_grad
    total, sums = _KDLossFunction.apply(student_logits, teacher_logits, targets.detach(), target_mask.detach(),
                                        float(w_kl), float(w_rkl), float(w_ce), float(temperature), write_grad,
                                        block_v)
    metrics = {"ce": sums[0]}
    if teacher_logits is not None:
        metrics["kl"] = sums[1]
        if w_rkl:
            metrics["rkl"] = sums[2]
    metrics["loss"] = total.detach()
    return total, metrics


# ------------------------------------------------------------------------------------------------
# Probe and registration
# ------------------------------------------------------------------------------------------------
def _check_kd(gen):
    """Largest relative error of the fused op against the reference (total, metrics, gradient)."""
    from mamballama_cli.ops.common import _rand, _rel

    b, L, V = 2, 19, 1000
    s = _rand(gen, b, L, V) * 3
    t = _rand(gen, b, L, V) * 3
    y = torch.randint(0, V, (b, L), generator=gen, device="cuda")
    mask = torch.rand(b, L, generator=gen, device="cuda") > 0.3
    kw = {"w_kl": 1.0, "w_rkl": 0.5, "w_ce": 0.25, "temperature": 2.0}
    errs = []
    with torch.enable_grad():
        sf = s.clone().requires_grad_(True)
        total, m = kd_loss_fused(sf, t, y, mask, **kw)
        (g,) = torch.autograd.grad(total * 1.5, sf)
        sr = s.clone().requires_grad_(True)
        total_ref, m_ref = _kd_loss_reference(sr, t, y, mask, **kw)
        (g_ref,) = torch.autograd.grad(total_ref * 1.5, sr)
    if set(m) != set(m_ref):
        return float("inf")
    errs += [_rel(total.detach(), total_ref.detach()), _rel(g, g_ref)] + [_rel(m[k], m_ref[k]) for k in m_ref]
    return max(errs)


def _register() -> None:
    from mamballama_cli.ops.common import _probe

    ops.register_fast("kd_loss", "mamballama-triton", kd_loss_fused, _probe(_check_kd, tol=1e-4))


if triton is not None:
    _register()
