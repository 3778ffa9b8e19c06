"""Losses as sums over target tokens (or pairs); the trainer divides by the count of the whole global batch.

Returning sums rather than means is what makes gradient accumulation exact: a mean per micro-batch weighs a
token of a short micro-batch more than one of a long micro-batch, and dividing by the number of micro-batches
instead of by tokens is the off-by-one-micro-batch family of bugs of the reference code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mamballama_cli import ops
from mamballama_cli.ops.kd import kd_loss  # noqa: F401  (the reference lives beside its kernel; registers the op)


def kd_loss_auto(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, target_mask: Tensor, *,
                 w_kl: float = 1.0, w_rkl: float = 0.0, w_ce: float = 0.0, temperature: float = 1.0,
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`kd_loss` through op dispatch: the fused Triton kernel of :mod:`mamballama_cli.ops.kd_triton` on CUDA
    when its probe passes, :func:`kd_loss` itself elsewhere or with ``MAMBALLAMA_KERNELS=ref``. Same contract."""
    _, fn = ops.dispatch("kd_loss", student_logits.device)
    return fn(student_logits, teacher_logits, targets, target_mask, w_kl=w_kl, w_rkl=w_rkl, w_ce=w_ce,
              temperature=temperature)


def sequence_logps(logits: Tensor, targets: Tensor, target_mask: Tensor) -> Tensor:
    """Sum of log p(target) over the masked positions of each row: (batch, seqlen, vocab) -> (batch,)."""
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None].expand_as(target_mask)[target_mask]
    logp = torch.log_softmax(logits[target_mask].float(), dim=-1)  # (n, vocab): response positions only
    picked = logp.gather(-1, targets[target_mask].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(logits.shape[0], device=logits.device, dtype=picked.dtype).index_add(0, rows, picked)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float, label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Sigmoid DPO (Rafailov et al. 2023), summed over pairs. Inputs are (pairs,) summed response log-probs.

    loss = -log sigmoid(beta * margin) with margin = (pi_c - ref_c) - (pi_r - ref_r); with label smoothing e
    (conservative DPO) it is -(1 - e) log sigmoid(beta m) - e log sigmoid(-beta m).
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    logits = beta * margin
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    metrics = {
        "loss": losses.sum().detach(),
        "margin": margin.sum().detach(),  # chosen-minus-rejected log-ratio, summed over pairs
        "accuracy": (margin > 0).float().sum().detach(),
        "reward_chosen": (beta * (policy_chosen - ref_chosen)).sum().detach(),
        "reward_rejected": (beta * (policy_rejected - ref_rejected)).sum().detach(),
    }
    return losses.sum(), metrics
