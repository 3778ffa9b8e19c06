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


def feature_draft_loss(d_logits: Tensor, d_features: Tensor, t_logits: Tensor, t_features: Tensor, targets: Tensor,
                       target_mask: Tensor, valid: Tensor, *, w_kl: float = 1.0, w_rkl: float = 0.0,
                       w_ce: float = 0.0, temperature: float = 1.0, w_feature: float = 0.0,
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """A feature draft's loss (models/feature_draft.py), as sums like :func:`kd_loss_auto`'s.

    The target ran over ids (batch, T): ``t_logits``, ``t_features`` (f) at positions 0..T-1, ``t_logits[:, t]``
    predicting ``targets[:, t]`` = ids[:, t + 1]; ``target_mask`` and ``valid`` (real tokens) are (batch, T) as
    :func:`~mamballama_cli.training.data.collate` makes them. The draft ran over ids[:, 1:] with f[:, :-1]: its
    position j reads x_{j+1} and f_j, so ``d_logits[:, j]`` predicts x_{j+2} = ``targets[:, j + 1]``, as
    ``t_logits[:, j + 1]`` does, and ``d_features[:, j]`` is trained towards f_{j+1}.

    KL, reverse KL and CE: :func:`kd_loss_auto` on those shifted logits, targets and mask (the weights and the
    temperature mean what they mean there). ``feature``: smooth L1 between the draft's and the target's features
    (mean over the hidden dim) averaged over the real positions, then counted per loss position as the other
    terms are (times the loss positions of the batch), the way the alignment term of ``w_hidden`` is. ``agree``:
    the loss positions where the draft's and the target's most likely tokens are the same (a count)."""
    mask = target_mask[:, 1:]
    total, metrics = kd_loss_auto(d_logits, t_logits[:, 1:], targets[:, 1:], mask, w_kl=w_kl, w_rkl=w_rkl,
                                  w_ce=w_ce, temperature=temperature)
    v = valid[:, 1:].to(torch.float32)
    per_position = F.smooth_l1_loss(d_features.float(), t_features[:, 1:].float(), reduction="none").mean(-1)
    feature = (per_position * v).sum() / v.sum().clamp_min(1.0) * mask.sum().to(torch.float32)
    if w_feature:
        total = total + w_feature * feature
    metrics["feature"] = feature.detach()
    # greedy agreement with the target at the loss positions (a sum, as the other terms): what greedy drafting
    # would accept there, given the inputs this pass read
    with torch.no_grad():
        same = d_logits.argmax(-1) == t_logits[:, 1:].argmax(-1)
        metrics["agree"] = (same & mask).sum().to(torch.float32)
    metrics["loss"] = total.detach()
    return total, metrics


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
