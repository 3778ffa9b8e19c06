"""Acceptance of a speculative round (design.md section 4): greedy, and lossless rejection sampling.

Shared by the host loop (generation/speculative.py) and the captured round (generation/captured_round.py), which
draws with :func:`gumbel_draw` because a CUDA graph can record it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def gumbel_draw(probs: Tensor) -> Tensor:
    """One sample per row of probs (..., V) by Gumbel-max on the default generator (graph-safe)."""
    u = torch.rand(probs.shape, device=probs.device, dtype=torch.float32).clamp_(min=torch.finfo(torch.float32).tiny)
    return (probs.float().clamp(min=1e-38).log() - torch.log(-torch.log(u))).argmax(-1)


def draw(probs: Tensor, gen: torch.Generator | None) -> Tensor:
    """One sample per row: probs (..., V) -> (...)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])


def accept_greedy(drafts: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    """drafts (b, K), target_logits (b, K+1, V) -> (accepted (b,), next token (b,)).

    Accept while the draft equals the target's argmax; the next token is the target's argmax right after.
    """
    best = target_logits.argmax(-1)  # (b, K+1)
    accepted = (drafts == best[:, :-1]).long().cumprod(-1).sum(-1)
    return accepted, best.gather(1, accepted[:, None])[:, 0]


def accept_sampled(drafts: Tensor, q: Tensor, p: Tensor, gen: torch.Generator | None,
                   sampler: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Lossless rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

    drafts (b, K) drawn from q (b, K, V); p (b, K+1, V) the target's processed distributions. Draft j is
    kept with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the next token is drawn from
    norm(max(0, p_j - q_j)); when all K are kept it is drawn from p_{K+1} (the bonus).
    ``sampler`` draws a token per row from probabilities (default: :func:`draw` with ``gen``).
    Returns (accepted (b,), next token (b,)).
    """
    b, K = drafts.shape
    pd = p[:, :K].gather(-1, drafts[..., None])[..., 0]
    qd = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(b, K, generator=gen, device=p.device)
    keep = u * qd < pd  # u < p/q without dividing by a zero q
    accepted = keep.long().cumprod(-1).sum(-1)  # (b,)
    rows = torch.arange(b, device=p.device)
    at = accepted.clamp(max=K - 1)
    residual = (p[rows, at] - q[rows, at]).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    # p == q leaves no residual mass; rejection then had probability 0, but guard the division anyway.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p[rows, at])
    fix = torch.where((accepted == K)[:, None], p[:, K], residual)
    return accepted, (sampler(fix) if sampler is not None else draw(fix, gen))


# --- what greedy rounds should accept, from the draft's teacher-forced agreement ---------------------------------
def teacher_forced_agreement(draft, prompt: list[int], tokens: list[int]) -> list[bool]:
    """Whether the draft, reading the prompt and ``tokens[:j]``, predicts ``tokens[j]`` (its argmax), for every j:
    one parallel forward over the whole sequence. ``agree[0]`` is the prediction from the prompt alone, which a
    round never uses (the first new token is the target's)."""
    if not tokens:
        return []
    param = next(draft.parameters())
    ids = torch.tensor([list(prompt) + list(tokens[:-1])], device=param.device)
    with torch.no_grad():
        logits = draft(input_ids=ids).logits[0, len(prompt) - 1 :]
    return (logits.argmax(-1).cpu() == torch.tensor(tokens)).tolist()


def greedy_rounds(agree: list[bool], k: int, n_new: int) -> list[int]:
    """The accepted count of every verify call when greedy speculative decoding writes ``n_new`` tokens with a
    draft whose teacher-forced agreement with the target's greedy tokens is ``agree`` (above).

    Under greedy acceptance a round's proposals are read only while the ones before them were right, so each is
    the draft's prediction after a prefix of the target's own tokens: a round that starts with ``have`` tokens
    written accepts the run of agreements from position ``have`` on, at most k, and writes that many plus one.
    Positions past ``agree`` count as disagreeing (the last round of a sequence may then accept fewer than the
    engine, which sees further)."""
    counts, have = [], 1  # the first new token comes from the target's prefill
    while have < n_new:
        m = 0
        while m < k and have + m < len(agree) and agree[have + m]:
            m += 1
        counts.append(m)
        have += m + 1
    return counts


def accepted_hist(counts: list[int], k: int) -> list[int]:
    """How many verify calls accepted 0, 1, ..., k drafts (the captured round's ``accepted_hist``)."""
    hist = [0] * (k + 1)
    for m in counts:
        hist[m] += 1
    return hist
