"""The distillation loss's reference (pure PyTorch): the ground truth of the fused kernel in kd_triton.py.

Sums over the target tokens, not means: the trainer divides by the count of the whole global batch
(training/losses.py says why). Importing this module registers ``kd_loss`` as the op's reference;
training reaches it through :func:`mamballama_cli.training.losses.kd_loss_auto` (op dispatch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mamballama_cli import ops


def kd_loss(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, target_mask: Tensor, *,
            w_kl: float = 1.0, w_rkl: float = 0.0, w_ce: float = 0.0, temperature: float = 1.0,
            ) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted forward KL, reverse KL and cross-entropy, summed over the masked positions.

    student_logits, teacher_logits: (batch, seqlen, vocab), position t predicting ``targets[:, t]``.
    target_mask: (batch, seqlen) bool, True only where the target is a response token; prompt, padding and
    the last position are False, so neither KL nor CE ever sees them.

    forward KL = KL(p_teacher || p_student), reverse KL = KL(p_student || p_teacher), both between the
    temperature-softened distributions and scaled by T^2 (gradients then keep their size as T changes).
    CE is on the hard targets at temperature 1. Returns (weighted sum, detached per-term sums).
    """
    s = student_logits[target_mask].float()  # (n, vocab): only response positions are ever materialised in fp32
    y = targets[target_mask]
    metrics: dict[str, Tensor] = {}
    total = s.new_zeros(())
    if w_ce:
        ce = F.cross_entropy(s, y, reduction="sum")
        total = total + w_ce * ce
        metrics["ce"] = ce.detach()
    else:
        with torch.no_grad():
            metrics["ce"] = F.cross_entropy(s, y, reduction="sum")
    if teacher_logits is not None:
        t = teacher_logits[target_mask].float()
        T = float(temperature)
        log_ps = F.log_softmax(s / T, dim=-1)
        log_pt = F.log_softmax(t / T, dim=-1)
        scale = T * T
        if w_kl:
            fkl = (log_pt.exp() * (log_pt - log_ps)).sum() * scale
            total = total + w_kl * fkl
            metrics["kl"] = fkl.detach()
        else:
            with torch.no_grad():
                metrics["kl"] = (log_pt.exp() * (log_pt - log_ps)).sum() * scale
        if w_rkl:
            rkl = (log_ps.exp() * (log_ps - log_pt)).sum() * scale
            total = total + w_rkl * rkl
            metrics["rkl"] = rkl.detach()
    metrics["loss"] = total.detach()
    return total, metrics


ops.register_reference("kd_loss", kd_loss)
