"""Captured speculative rounds with a draft that reads its target's features (EAGLE-style; docs/speculative.md).

The draft (:mod:`mamballama_cli.models.feature_draft`) takes the pair (token x_t, the target's feature f_{t-1}) at
each position and predicts x_{t+1} and f_t. A round keeps one shape whatever each row accepted, as
:class:`~mamballama_cli.generation.captured_round.CapturedRounds` does:

1. one draft window over the K + 1 pairs of the last verify call: (v_{i+1}, F_i), with v the verified tokens and
   F their features, and each row's correction in place of v at its accepted count a. Only the first a + 1
   pairs are true; the draft's next token and feature come from the output at index a (gathered per row), and
   the K/V it wrote past that are rewritten before they are read;
2. K - 1 one-token draft steps, each reading the token it drafted with the feature it predicted;
3. the target's verify call, which also writes the features of its K + 1 tokens for the next round;
4. acceptance and the commit of :class:`CapturedRounds`.

A draft position is its token's position minus one (the prompt's first token has no pair); RoPE only sees
differences, and every draft position is shifted alike. The draft is attention only, so it rolls back by
position alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mamballama_cli.errors import UsageError
from mamballama_cli.generation.captured_round import CapturedRounds
from mamballama_cli.generation.lookup import LookupRounds, is_lookup_draft
from mamballama_cli.models.feature_draft import is_feature_draft


class FeatureRounds(CapturedRounds):
    """:class:`CapturedRounds` of ``target`` with a feature draft (``config.feature_draft``)."""

    def __init__(self, target, draft, batch_size: int, max_length: int, k: int, **kw):
        if not is_feature_draft(draft):
            raise UsageError("FeatureRounds needs a feature draft (convert TARGET --feature-draft)")
        if draft.config.mamba_layers:
            raise UsageError("a feature draft must be attention only (it rolls back by position)")
        h, ht = draft.config.hidden_size, target.config.hidden_size
        if h != ht or draft.config.vocab_size != target.config.vocab_size:
            raise UsageError(f"feature draft of hidden {h} / vocabulary {draft.config.vocab_size} for a target of "
                             f"hidden {ht} / vocabulary {target.config.vocab_size}: make the draft from this target")
        super().__init__(target, draft, batch_size, max_length, k, **kw)
        b, K, dev, dt = self.b, self.k, self.device, self.t.dtype
        self.F = torch.zeros(b, K + 1, h, dtype=dt, device=dev)  # the target's features of its last verify call
        self.G = torch.zeros(b, K + 1, h, dtype=self.d.dtype, device=dev)  # the draft window's predicted features
        self.g1 = torch.zeros(b, 1, h, dtype=self.d.dtype, device=dev)  # a one-token draft step's feature
        self.v = torch.zeros(b, K + 1, dtype=torch.long, device=dev)  # the tokens of the last verify call
        self.acc = torch.zeros(b, dtype=torch.long, device=dev)  # each row's accepted count in it
        self.w_start = torch.zeros(b, dtype=torch.long, device=dev)  # the draft position of its first pair
        self.drafts = torch.zeros(b, K, dtype=torch.long, device=dev)  # the last round's proposals (tests, stats)
        self._idx = torch.arange(K + 1, device=dev)

    def _round(self) -> None:
        b = self.b
        # 1. The draft window: the last verify call's tokens one ahead of their features, each row's correction at
        #    its accepted count.
        nxt = self.pending[:, 1:]
        toks = torch.cat([self.v[:, 1:], nxt], dim=1)
        toks = torch.where(self._idx[None] == self.acc[:, None], nxt, toks)
        logits_w = self.d._walk(toks, self.w_start, self.acc, True, 0, None, features=self.F, features_out=self.G)
        at = self.acc[:, None, None]
        logits = logits_w.gather(1, at.expand(b, 1, logits_w.shape[-1]))[:, 0]
        feature = [self.G.gather(1, at.expand(b, 1, self.G.shape[-1]))]  # the feature the next step reads
        base = self.w_start + self.acc + 1  # the draft position of the first proposal

        def after(j, tok):  # 2. a one-token step on the draft's own token and feature
            out = self.d._walk(tok[:, None], base + j, self.acc, True, 0, None, features=feature[0],
                               features_out=self.g1)[:, 0]
            feature[0] = self.g1
            return out

        d, qs = self._propose(logits, after)
        self.drafts.copy_(d)
        # 3. Verify the correction and the K drafts; their features feed the next round's window.
        ids = torch.cat([nxt, d], dim=1)  # (b, K + 1)
        self.t_start.add_(self.t_keep)
        t_logits = self.t._walk(ids, self.t_start, self.t_keep, True, 0, None, features_out=self.F)
        self.v.copy_(ids)
        self.w_start.copy_(self.t_start)
        # 4. Acceptance and the commit.
        self.acc.copy_(self._accept_and_commit(d, qs, t_logits))

    def _prefill(self, ids: Tensor) -> Tensor:
        """The target reads the prompt and hands out its features; the draft reads the pairs (x_t, f_{t-1}) of
        t = 1 .. n-1; the first round's window holds one true pair, (first new token, f_{n-1})."""
        b, n = ids.shape
        feats = torch.empty(b, n, self.F.shape[-1], dtype=self.F.dtype, device=self.device)
        logits = self.t.prefill(ids, features_out=feats)
        self.d.prefill(ids[:, 1:], features=feats[:, :-1])
        self._begin(n)
        self.F.zero_()
        self.F[:, 0].copy_(feats[:, -1])
        self.v.zero_()
        self.v[:, 0].copy_(ids[:, -1])
        self.acc.zero_()
        self.w_start.fill_(n - 1)
        return logits


def make_rounds(target, draft, batch_size: int, max_length: int, k: int, **kw) -> CapturedRounds:
    """The captured rounds for this pair: :class:`FeatureRounds` for a feature draft,
    :class:`~mamballama_cli.generation.lookup.LookupRounds` for the lookup draft, else :class:`CapturedRounds`."""
    cls = FeatureRounds if is_feature_draft(draft) else LookupRounds if is_lookup_draft(draft) else CapturedRounds
    return cls(target, draft, batch_size, max_length, k, **kw)
