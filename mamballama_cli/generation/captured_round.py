"""Speculative rounds with nothing on the host inside a round: one CUDA graph per round (issue 18).

The loop of :func:`~mamballama_cli.generation.speculative.speculative_generate` pays host work every round: the
runners keep their positions in Python, each draft step and the verify call is its own graph launch, and the
accepted counts come back to the host before the next round can start. At 135M parameters that host work
costs about as much as a target step. Here a whole round lives on the device:

1. the draft (a hybrid, :class:`~mamballama_cli.generation.runners.HybridRunner` with a live window) reads two
   pending tokens, then proposes K tokens one step at a time;
2. the target verifies the last token and the K drafts in one window call;
3. acceptance (greedy, or lossless rejection sampling with Gumbel-max draws) gives each row its count;
4. both models commit per row: positions and kept counts are device tensors (a row sits at its own position);
   the accepted tokens go into a device history, a row that meets a stop token or its budget freezes.

The draft always reads two tokens per round (its window holds K + 1): the token before the correction (which it
un-commits when it had already read it) and the correction, so every round has one shape and one graph. On CUDA
the round is captured once per K; the host replays it ``sync_every`` times, then reads whether every row is done.
Off CUDA the same computation runs eagerly (what the CPU tests check).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from mamballama_cli.errors import UsageError
from mamballama_cli.generation.acceptance import accept_greedy, accept_sampled, gumbel_draw
from mamballama_cli.generation.runners import HybridRunner, as_hybrid, is_hybrid
from mamballama_cli.generation.sampling import SamplingConfig, probabilities
from mamballama_cli.models.runtime import capture_graph
from mamballama_cli.ops.commit import commit_round, record_tokens_ref


def acceptance_by_position(hist: list[int]) -> list[float | None]:
    """From counts of rounds that accepted 0..K drafts: for each position i = 1..K, the share of rounds that
    accepted draft i among those that accepted drafts 1..i-1 (acceptance stops at the first rejected draft), so
    ``[p1, p2, ...]``: p1 how often the first proposal is right, p2 how often the second is, given the first was."""
    out = []
    for i in range(1, len(hist)):
        reached = sum(hist[i - 1:])
        out.append(round(sum(hist[i:]) / reached, 4) if reached else None)  # None: no round got that far
    return out


class CapturedRounds:
    """Speculative decoding of ``target`` with ``draft`` (both mamballama hybrids), a round per graph replay."""

    def __init__(self, target, draft, batch_size: int, max_length: int, k: int, sampling: SamplingConfig | None = None,
                 stop_tokens=(), capture: bool | None = None):
        if not is_hybrid(target) and getattr(target, "config", None) is not None:
            target = as_hybrid(target) or target  # a Llama-family model runs exactly as an all-attention hybrid
        draft = self._check_draft(draft)
        if not is_hybrid(target):
            raise UsageError("captured rounds need a mamballama hybrid (or a Llama-family model) as target and as "
                             "draft")
        if k < 1:
            raise UsageError(f"-k {k}: the draft must propose at least one token per round")
        self.k, self.b = int(k), int(batch_size)
        self.sampling = sampling or SamplingConfig(temperature=0.0)
        self.device = target.lm_head.weight.device
        self.capture = (self.device.type == "cuda") if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise UsageError("captured rounds need a CUDA device; run them eagerly elsewhere (capture=False)")
        self.max_length = int(max_length)
        self.t = HybridRunner(target, self.b, self.max_length, window=self.k + 1, static=True)
        self.d = self._draft_runner(draft)
        z = lambda: torch.zeros(self.b, dtype=torch.long, device=self.device)  # noqa: E731
        self.t_start, self.t_keep, self.d_start, self.d_keep = z(), z(), z(), z()
        self.pending = torch.zeros(self.b, 2, dtype=torch.long, device=self.device)
        self.finished = torch.zeros(self.b, dtype=torch.bool, device=self.device)
        # what the graph reads besides the models' state: fixed buffers, refilled by every generate()
        self.stops = torch.tensor(sorted({int(s) for s in stop_tokens}), dtype=torch.long, device=self.device)
        self.hist = torch.zeros(self.b, self.max_length, dtype=torch.long, device=self.device)
        self.hist_len = z()
        self.max_new = torch.zeros((), dtype=torch.long, device=self.device)
        self.accepted = torch.zeros((), dtype=torch.long, device=self.device)  # over live rows and rounds
        self.row_rounds = torch.zeros((), dtype=torch.long, device=self.device)
        self.acc_hist = torch.zeros(self.k + 1, dtype=torch.long, device=self.device)  # live rows per accepted count
        self.graph = None

    def _check_draft(self, draft):
        """The draft as a hybrid (a Llama-family model runs as an all-attention one), or a UsageError."""
        if not is_hybrid(draft) and getattr(draft, "config", None) is not None:
            draft = as_hybrid(draft) or draft
        if not is_hybrid(draft):
            raise UsageError("captured rounds need a mamballama hybrid (or a Llama-family model) as target and as "
                             "draft")
        return draft

    def _draft_runner(self, draft) -> HybridRunner | None:
        return HybridRunner(draft, self.b, self.max_length, window=self.k + 1, keep_live=True, static=True)

    # --- one round, all on the device ------------------------------------------------------------------------
    def _pick(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.sampling.greedy:
            return logits.argmax(-1), None
        probs = probabilities(logits, self.sampling)
        return gumbel_draw(probs), probs

    def _round(self) -> None:
        # 1. Draft: the two pending tokens (rebase: replay what it kept last round), then K - 1 more steps.
        self.d_start.add_(self.d_keep)
        logits = self.d._walk(self.pending, self.d_start, self.d_keep, True, 0, None)[:, -1]
        d, qs = self._propose(logits, lambda j, tok: self.d._walk(tok[:, None], self.d_start + 2 + j, self.d_keep,
                                                                   False, 2 + j, None)[:, 0])
        # 2. Verify the last token and the K drafts in one call.
        ids = torch.cat([self.pending[:, 1:], d], dim=1)  # (b, K + 1)
        self.t_start.add_(self.t_keep)
        t_logits = self.t._walk(ids, self.t_start, self.t_keep, True, 0, None)
        # 3. and 4. Acceptance and the commit.
        self._accept_and_commit(d, qs, t_logits)

    def _propose(self, logits: Tensor, after) -> tuple[Tensor, list]:
        """The K drafts (b, K), and their distributions when sampling: the first from ``logits``, each next one
        from ``after(j, token j)``, the draft's logits after reading its j-th proposal."""
        drafts, qs = [], []
        for j in range(self.k):
            tok, q = self._pick(logits)
            drafts.append(tok)
            qs.append(q)
            if j < self.k - 1:
                logits = after(j, tok)
        return torch.stack(drafts, dim=1), qs

    def _accept_and_commit(self, d: Tensor, qs: list, t_logits: Tensor) -> Tensor:
        """Acceptance of the drafts ``d`` against the verify call's logits, then the commit per row (ops/commit.py:
        one kernel on CUDA; a finished row keeps nothing and stays put). Returns the accepted counts (b,)."""
        if self.sampling.greedy:
            acc, nxt = accept_greedy(d, t_logits)
        else:
            acc, nxt = accept_sampled(d, torch.stack(qs, dim=1), probabilities(t_logits, self.sampling), None,
                                      sampler=gumbel_draw)
        live = (~self.finished).long()  # the rows this round counts for, as commit_round's totals
        commit_round(d, acc, nxt, self.pending, self.finished, self.t_keep, self.d_keep, self.hist, self.hist_len,
                     self.stops, self.max_new, self.accepted, self.row_rounds)
        self.acc_hist.index_add_(0, acc, live)
        return acc

    def _record(self, out: Tensor, kept: Tensor, live: Tensor) -> None:
        """Append each live row's ``kept`` tokens of ``out`` to its history; freeze rows that are done."""
        record_tokens_ref(self.hist, self.hist_len, self.finished, out, kept, live, self.stops, self.max_new)

    # --- the loop ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: Tensor, max_new_tokens: int, sync_every: int = 4):
        """New tokens per row (lists, cut after the first stop token and at ``max_new_tokens``) and statistics:
        rounds, acceptance (accepted drafts over drafted, live rows only), tokens per verify call, seconds (all,
        and of the two prefills and the first token: ``prefill_s``), and ``accepted_hist``: how many live row-rounds
        accepted 0, 1, ..., K drafts (:func:`acceptance_by_position` turns it into acceptance per position)."""
        b, n = input_ids.shape
        if b != self.b:
            raise UsageError(f"batch of {b} prompts, but these rounds were built for {self.b}")
        if n < 2:
            raise UsageError("captured rounds need a prompt of at least 2 tokens (the draft re-reads the last one)")
        if n + max_new_tokens + 2 * (self.k + 1) > self.max_length:
            raise UsageError(f"prompt {n} + {max_new_tokens} new tokens do not fit a {self.max_length}-token cache")
        ids = input_ids.to(self.device)
        if self.capture and self.graph is None:
            self._warm(ids)
        self.max_new.fill_(int(max_new_tokens))  # after the capture, whose warm-up sets its own
        start = time.perf_counter()
        first, _ = self._pick(self._prefill(ids))
        self.pending.copy_(torch.stack([ids[:, -1], first], dim=1))
        self._record(first[:, None], torch.ones_like(self.hist_len), torch.ones_like(self.finished))
        self._started()
        if ids.is_cuda:
            torch.cuda.synchronize(self.device)
        prefilled = time.perf_counter()
        rounds = 0
        while not bool(self.finished.all()):
            for _ in range(sync_every):
                self._next_round()
                rounds += 1
        elapsed = time.perf_counter() - start
        lens, hist = self.hist_len.tolist(), self.hist.tolist()
        stops = set(self.stops.tolist())
        out = []
        for row, m in zip(hist, lens):
            toks = row[: min(m, max_new_tokens)]
            for i, t in enumerate(toks):
                if t in stops:
                    toks = toks[: i + 1]
                    break
            out.append(toks)
        acc, rr = int(self.accepted), int(self.row_rounds)
        return out, {"rounds": rounds, "seconds": elapsed, "prefill_s": prefilled - start,
                     "new_tokens": sum(len(o) for o in out),
                     "accepted": acc, "row_rounds": rr, "accepted_hist": self.acc_hist.tolist(),
                     "acceptance_rate": acc / (rr * self.k) if rr else float("nan"),
                     "tokens_per_call": (acc + rr) / rr if rr else float("nan")}

    def _started(self) -> None:
        """After the prefill and the first token, before the first round (a subclass's hook)."""

    def _next_round(self) -> None:
        """One round: the captured graph's replay, or the round run eagerly (off CUDA)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._round()

    def _prefill(self, ids: Tensor) -> Tensor:
        """Read the prompt into both models (the draft all but its last token, which it re-reads with the first new
        one) and put every device-side position, count and flag at the start. Returns the target's last logits."""
        logits = self.t.prefill(ids)
        self.d.prefill(ids[:, :-1])
        self._begin(ids.shape[1])
        return logits

    def _begin(self, n: int) -> None:
        self.t_start.fill_(n)
        self.d_start.fill_(n - 1)
        for t in (self.t_keep, self.d_keep, self.finished, self.hist_len, self.accepted, self.row_rounds,
                  self.acc_hist):
            t.zero_()

    def _warm(self, ids: Tensor) -> None:
        """Record the round in a CUDA graph on a prefilled state (the warm-up scribbles; generate() re-prefills)."""
        self.graph = self._capture(ids, self._round)

    def _capture(self, ids: Tensor, fn):
        """A CUDA graph of ``fn``, a round, recorded on a prefilled state."""
        n = ids.shape[1]
        self._prefill(ids)
        self.max_new.fill_(self.max_length)
        rng = torch.cuda.get_rng_state(self.device)

        def reset():
            self._begin(n)
            self.max_new.fill_(self.max_length)

        graph, _ = capture_graph(fn, self.device, warmup=2, before=reset)
        torch.cuda.set_rng_state(rng, self.device)
        return graph
