"""A draft without weights: proposals copied from the context (prompt lookup; docs/speculative.md).

Greedy text repeats itself: names, code, phrases of the prompt, and the loops a small model falls into. The lookup
draft finds the most recent earlier place where the context's last n tokens occurred (the longest n from
``max_ngram`` down to ``min_ngram`` that occurs) and proposes the K tokens that followed it there. When the
continuation runs into the present (the match ends P tokens before the last token and P < K), it repeats with
period P, as a loop would. With no match it proposes the last token again.

A proposal costs a few element-wise passes over the context, not K forward passes of a model: at the default
teacher's size (135M) a model draft step costs about 0.2 of a target step, so a round with K = 4 model drafts
pays 0.8 of a step for drafting alone. The proposals need no training and share any tokenizer.

The proposal is the op ``lookup_draft`` (ops/lookup.py: the reference, ``lookup_propose`` over the context
[prompt | new tokens]; ops/triton_lookup.py: one launch per round on CUDA), run on the device inside a captured
round (:class:`LookupRounds`). :func:`propose_host` is its plain-Python twin (the tests check the two against each
other) and :func:`simulate_lookup` what greedy rounds accept over known tokens (benchmarks/spec_eval.py's
``simulated``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mamballama_cli.errors import UsageError
from mamballama_cli.generation.captured_round import CapturedRounds
from mamballama_cli.generation.ngram_table import NgramTable
from mamballama_cli.ops.commit import commit_round
from mamballama_cli.ops.lookup import MAX_NGRAM, lookup_draft


@dataclass(frozen=True)
class LookupDraft:
    """``--draft lookup`` (or ``lookup:N``, the longest n-gram tried; ``lookup:TABLE`` or ``lookup:N:TABLE`` with an
    n-gram table, generation/ngram_table.py; any of them with ``:gate=M``): the marker a round dispatches on.
    ``table`` is the file; the loaded table rides along (``loaded``, left out of comparisons). The table proposes
    where the context's longest match is shorter than ``below`` tokens. ``gate`` M > 0: a round speculates only
    where some live row's context match is at least M tokens long, and otherwise decodes one token with no
    proposals (:class:`LookupRounds`)."""

    max_ngram: int = MAX_NGRAM
    min_ngram: int = 1
    table: str | None = None
    below: int = 2
    gate: int = 0
    loaded: NgramTable | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram <= 16:
            raise UsageError(f"--draft lookup:{self.max_ngram}: the n-gram length must be 1 to 16, e.g. lookup:3")
        if not 0 <= self.gate <= self.max_ngram:
            raise UsageError(f"--draft {self}: gate={self.gate} must be 0 (off) to the longest n-gram, "
                             f"{self.max_ngram} (a match is never longer), e.g. lookup:{self.max_ngram}:gate=2")
        if self.table is not None and self.loaded is None:
            object.__setattr__(self, "loaded", NgramTable.load(self.table))

    def __str__(self) -> str:
        return (f"lookup:{self.max_ngram}" + (f":{self.table}" if self.table else "")
                + (f":gate={self.gate}" if self.gate else ""))


def is_lookup_draft(draft) -> bool:
    return isinstance(draft, LookupDraft)


def parse_lookup(arg: str | None) -> LookupDraft:
    """``lookup``, ``lookup:N``, ``lookup:TABLE`` or ``lookup:N:TABLE``, each optionally ending in ``:gate=M`` (or
    ``lookup:gate=M``) -> a LookupDraft (a one-line error naming the value otherwise)."""
    gate = 0
    if arg and (arg.startswith("gate=") or ":gate=" in arg):
        arg, _, value = arg.rpartition("gate=")
        arg = arg.removesuffix(":")
        if not value.isdigit():
            raise UsageError(f"--draft lookup:...gate={value}: the gate is a match length in tokens, e.g. "
                             "lookup:3:gate=2")
        gate = int(value)
    if not arg:
        return LookupDraft(gate=gate)
    head, _, rest = arg.partition(":")
    if head.isdigit():
        return LookupDraft(max_ngram=int(head), table=rest or None, gate=gate)
    if rest or head.lstrip("-").isdigit() or not head.endswith(".safetensors"):
        raise UsageError(f"--draft lookup:{arg}: expected lookup:N, lookup:TABLE.safetensors or "
                         "lookup:N:TABLE.safetensors, each optionally with :gate=M, e.g. lookup:3:gate=2 (N: the "
                         "longest n-gram; M: the shortest match a round speculates from)")
    return LookupDraft(table=arg, gate=gate)


def propose_host(ctx: list[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = 1,
                 table: NgramTable | None = None, below: int = 2) -> list[int]:
    """:func:`~mamballama_cli.ops.lookup.lookup_propose` for one row, in plain Python (the reference the device
    version is tested against)."""
    return _propose(ctx, k, max_ngram, min_ngram, table, below)[0]


def _propose(ctx: list[int], k: int, max_ngram: int, min_ngram: int, table: NgramTable | None,
             below: int) -> tuple[list[int], bool, int]:
    """:func:`propose_host`'s proposal, whether the table's chain wrote its first token, and the length of the
    context's match (0: none)."""
    last = len(ctx) - 1
    out, n_match = None, 0
    for n in range(max_ngram, min_ngram - 1, -1):
        if n > last:  # the suffix and an earlier match cannot both fit
            continue
        key = ctx[last - n + 1:]
        for e in range(last - 1, n - 2, -1):
            if ctx[e - n + 1: e + 1] == key:
                period = last - e
                out, n_match = [ctx[e + 1 + j % period] for j in range(k)], n
                break
        if out is not None:
            break
    if out is None:
        e = max(last - 1, 0)
        out = [ctx[min(e + 1 + j % max(last - e, 1), last)] for j in range(k)]
    if table is None or n_match >= below:
        return out, False, n_match
    a, b = (ctx[last - 1] if last >= 1 else None), ctx[last]
    for j in range(k):  # the table's chain, until the first step it has nothing for
        nxt = table.next_host(a, b)
        if nxt < 0:
            return out, j > 0, n_match
        out[j] = nxt
        a, b = b, nxt
    return out, k > 0, n_match


def simulate_lookup(prompt: list[int], tokens: list[int], k: int, draft: LookupDraft,
                    n_new: int | None = None, from_table: list | None = None, matches: list | None = None,
                    gate: int = 0, steps: list | None = None, table_passes: bool = False) -> list[int]:
    """The accepted counts of greedy lookup rounds whose target writes ``tokens`` after ``prompt`` (the first token
    comes from the prefill) until ``n_new`` tokens (default: all of them): what a round must accept when it decodes
    exactly these tokens. Tokens past ``n_new`` let the last round accept what a verify call sees beyond it.
    ``from_table``, a list: gets, per round, whether the n-gram table proposed its first token; ``matches``: the
    length of the context's match (0: none).

    ``gate`` (a study of rounds that speculate only where the draft has support): a round whose context match is
    shorter than ``gate`` tokens decodes one token with no proposals (count 0), and ``steps`` gets True for it;
    with ``table_passes`` (a study: the device's gated rounds do not do it), a round whose first proposal the table
    wrote speculates too."""
    seq = list(prompt) + list(tokens)
    t, end, counts = len(prompt) + 1, len(seq), []
    stop = len(prompt) + (len(tokens) if n_new is None else min(n_new, len(tokens)))
    while t < stop:
        d, used, n_match = _propose(seq[:t], k, draft.max_ngram, draft.min_ngram, draft.loaded, draft.below)
        speculate = n_match >= gate or (table_passes and used)
        for out, v in ((from_table, used), (matches, n_match), (steps, not speculate)):
            if out is not None:
                out.append(v)
        a = 0
        while speculate and a < k and t + a < end and d[a] == seq[t + a]:
            a += 1
        counts.append(a)
        t += a + 1
    return counts


class LookupRounds(CapturedRounds):
    """:class:`CapturedRounds` with the lookup draft: a round is the proposal over [prompt | new tokens], the
    target's verify call, acceptance and the commit. The draft keeps no state, so nothing rolls back but the
    target. Sampling is lossless as for any draft: a lookup proposal is a draw from a one-hot q.

    With ``gate`` M (``--draft lookup:3:gate=2``) a round speculates only where the context supports it. A round
    without a match keeps 1.0 token per call and one with a 1-token match 1.7 (the CPU simulation over the default
    teacher's tokens, docs/speculative.md), less than a verify call of K + 1 tokens costs in plain steps. Each round
    ends by proposing for the next one and noting whether some live row's match is at least M tokens long. The
    host reads that flag (a sync every round) and runs the next round as a verify round (its own graph) or as a
    one-token round (another graph: the target walks the pending token alone, its next token is picked as plain
    decoding would, and the commit keeps that one). Both are lossless, greedy or sampled."""

    def __init__(self, target, draft: LookupDraft, batch_size: int, max_length: int, k: int, **kw):
        if not is_lookup_draft(draft):
            raise UsageError("LookupRounds needs a lookup draft (--draft lookup)")
        self.lookup = draft
        super().__init__(target, draft, batch_size, max_length, k, **kw)
        self.prompt = torch.zeros(self.b, self.max_length, dtype=torch.long, device=self.device)
        self.prompt_len = torch.zeros((), dtype=torch.long, device=self.device)
        self.table = draft.loaded.arrays(self.device, draft.below) if draft.loaded is not None else None
        vocab = getattr(getattr(target, "config", None), "vocab_size", None)
        if self.table is not None and vocab is not None and draft.loaded.vocab > vocab:
            raise UsageError(f"--draft {draft}: the table's vocabulary ({draft.loaded.vocab}) is larger than the "
                             f"target's ({vocab}); build the table from data the target's tokenizer wrote")
        # the gate's state: the next round's proposals and match lengths, whether it speculates, the one-token
        # rounds' own counters (their commit keeps no draft, so they stay out of the verify calls' statistics)
        self.d_next = torch.zeros(self.b, self.k, dtype=torch.long, device=self.device)
        self.match = torch.zeros(self.b, dtype=torch.long, device=self.device)
        self.speculate = torch.ones((), dtype=torch.bool, device=self.device)
        self.step_rows = torch.zeros((), dtype=torch.long, device=self.device)
        self.step_accepted = torch.zeros((), dtype=torch.long, device=self.device)  # stays 0: nothing is drafted
        self.step_graph = None
        self.step_rounds = 0

    def _check_draft(self, draft):
        return draft

    def _draft_runner(self, draft) -> None:
        return None

    def _lookup(self, match_out: Tensor | None = None) -> Tensor:
        return lookup_draft(self.prompt, self.prompt_len, self.hist, self.hist_len, self.k, self.lookup.max_ngram,
                            self.lookup.min_ngram, self.table, match_out)

    def _lookahead(self) -> None:
        """The next round's proposals, and whether it speculates: some live row's match reaches the gate."""
        self.d_next.copy_(self._lookup(self.match))
        self.speculate.copy_(((self.match >= self.lookup.gate) & ~self.finished).any())

    def _round(self) -> None:
        d = self.d_next if self.lookup.gate else self._lookup()
        ids = torch.cat([self.pending[:, 1:], d], dim=1)  # (b, K + 1): the last kept token and the K proposals
        self.t_start.add_(self.t_keep)
        t_logits = self.t._walk(ids, self.t_start, self.t_keep, True, 0, None)
        qs = [None] * self.k
        if not self.sampling.greedy:
            qs = list(F.one_hot(d, t_logits.shape[-1]).to(torch.float32).unbind(1))
        self._accept_and_commit(d, qs, t_logits)
        if self.lookup.gate:
            self._lookahead()

    def _step_round(self) -> None:
        """A one-token round (the gate): the target reads the pending token alone, its next token is picked from
        its logits, and the commit keeps that token (no draft accepted; its counters apart from the verify calls')."""
        self.t_start.add_(self.t_keep)
        nxt, _ = self._pick(self.t._walk(self.pending[:, 1:], self.t_start, self.t_keep, True, 0, None)[:, 0])
        commit_round(self.d_next, torch.zeros_like(nxt), nxt, self.pending, self.finished, self.t_keep, self.d_keep,
                     self.hist, self.hist_len, self.stops, self.max_new, self.step_accepted, self.step_rows)
        self._lookahead()

    def _started(self) -> None:
        if self.lookup.gate:  # the first round's proposals and flag, over the prompt and the first token
            self._lookahead()

    def _next_round(self) -> None:
        if not self.lookup.gate:
            return super()._next_round()
        if bool(self.speculate):  # a sync: the last round's lookahead
            return super()._next_round()
        self.step_rounds += 1
        if self.step_graph is not None:
            self.step_graph.replay()
        else:
            self._step_round()

    def _warm(self, ids: Tensor) -> None:
        super()._warm(ids)
        if self.lookup.gate:
            self.step_graph = self._capture(ids, self._step_round)

    def _begin(self, n: int) -> None:
        super()._begin(n)
        self.step_rows.zero_()
        self.step_rounds = 0

    def generate(self, input_ids: Tensor, max_new_tokens: int, sync_every: int = 4):
        """:meth:`CapturedRounds.generate`; with a gate, its statistics also count the one-token rounds
        (``step_rounds``: the host's rounds; ``step_row_rounds``: live rows in them). ``rounds`` counts both kinds;
        ``row_rounds``, ``accepted``, ``accepted_hist`` and ``tokens_per_call`` the verify calls only."""
        out, stats = super().generate(input_ids, max_new_tokens, sync_every)
        if self.lookup.gate:
            stats.update(step_rounds=self.step_rounds, step_row_rounds=int(self.step_rows))
        return out, stats

    def _prefill(self, ids: Tensor) -> Tensor:
        n = ids.shape[1]
        logits = self.t.prefill(ids)
        self._begin(n)
        self.prompt[:, :n].copy_(ids)
        self.prompt_len.fill_(n)
        return logits
