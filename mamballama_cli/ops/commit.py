"""The commit of a speculative round (generation/captured_round.py), as an op: reference here, a Triton kernel in
:mod:`mamballama_cli.ops.triton_commit`.

After the acceptance rule has given each row its accepted count ``acc`` and next token ``nxt``, a round's commit
is some thirty small tensor operations (keep counts, the two pending tokens, the token history, stop tokens, the
counters). In a captured round each is a kernel of a few microseconds, which at the default teacher's size is
about 5% of the round; the Triton kernel does all of it in one launch, one program per row.

    commit_round(drafts, acc, nxt, pending, finished, t_keep, d_keep, hist, hist_len, stops, max_new,
                 accepted, row_rounds) -> None     (in place)

drafts (b, K) the round's drafts; acc, nxt (b,) from the acceptance rule; pending (b, 2) the last kept token and
the next one (the first of this round's verified tokens was ``pending[:, 1]``); finished (b,) bool; t_keep, d_keep
(b,) what target and draft keep of this round (acc + 1 for a live row, 0 for a finished one); hist (b, L) and
hist_len (b,) each row's new tokens (the caller leaves room: hist_len + K + 1 <= L); stops (S,) stop tokens;
max_new, accepted, row_rounds 0-dim counters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mamballama_cli import ops


def record_tokens_ref(hist: Tensor, hist_len: Tensor, finished: Tensor, out: Tensor, kept: Tensor, live: Tensor,
                      stops: Tensor, max_new: Tensor) -> None:
    """Append each live row's first ``kept`` tokens of ``out`` (b, T) to its history; a row is finished once it
    has written a stop token or ``max_new`` tokens."""
    j = torch.arange(out.shape[1], device=out.device)
    idx = (hist_len[:, None] + j).clamp(max=hist.shape[1] - 1)
    valid = j[None, :] < kept[:, None]
    hist.scatter_(1, idx, torch.where(valid, out, hist.gather(1, idx)))
    hit = (valid & (out[..., None] == stops).any(-1)).any(-1) if stops.numel() else torch.zeros_like(live)
    hist_len.add_(kept)
    finished.copy_(finished | (live & hit) | (hist_len >= max_new))


def commit_round_ref(drafts: Tensor, acc: Tensor, nxt: Tensor, pending: Tensor, finished: Tensor, t_keep: Tensor,
                     d_keep: Tensor, hist: Tensor, hist_len: Tensor, stops: Tensor, max_new: Tensor,
                     accepted: Tensor, row_rounds: Tensor) -> None:
    live = ~finished
    acc = torch.where(live, acc, 0)
    kept = torch.where(live, acc + 1, 0)  # a finished row keeps nothing and stays where it is
    accepted.add_(acc.sum())
    row_rounds.add_(live.sum())
    t_keep.copy_(kept)
    d_keep.copy_(kept)  # of the 2 + K - 1 tokens the draft read: 2 pending + acc drafts - the one re-read
    verified = torch.cat([pending[:, 1:], drafts], dim=1)  # the K + 1 tokens the target read this round
    new_pending = torch.stack([verified.gather(1, acc[:, None])[:, 0], nxt], dim=1)
    pending.copy_(torch.where(live[:, None], new_pending, pending))
    out = torch.cat([drafts, drafts[:, :1]], dim=1).scatter(1, acc[:, None], nxt[:, None])  # d[:acc], nxt
    record_tokens_ref(hist, hist_len, finished, out, kept, live, stops, max_new)


ops.register_reference("commit_round", commit_round_ref)


def commit_round(drafts, acc, nxt, pending, finished, t_keep, d_keep, hist, hist_len, stops, max_new, accepted,
                 row_rounds) -> None:
    ops.dispatch("commit_round", drafts.device)[1](drafts, acc, nxt, pending, finished, t_keep, d_keep, hist,
                                                   hist_len, stops, max_new, accepted, row_rounds)
