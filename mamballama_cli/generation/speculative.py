"""Speculative decoding built for recurrent state (design.md section 4): the loop and the acceptance rule.

A round: the draft proposes K tokens one at a time; the target verifies all of them in one call on K+1
tokens (the last committed token plus the K drafts); standard lossless acceptance keeps a prefix of the
drafts and adds one token of the target's own (a correction, or a bonus when all K were accepted).

The target needs to forget rejected tokens. Attention layers write K+1 K/V entries and move the length
back. A Mamba layer cannot un-absorb a token, so each one keeps a replay window (its mixer's own,
models/step.py): the checkpoint at the start of the last window, that window's SSM inputs and a conv buffer.
The next call first replays the steps accepted last round from the checkpoint, then runs the new steps.
Rejection costs nothing when it happens. The same windows serve hybrid drafts, whose window grows one token
at a time over a round ("continue" steps) and is rolled back the same way.

Every model sits behind a runner (generation/runners.py): ``prefill(ids) -> last logits``,
``extend(ids, rebase) -> logits`` and ``commit(r)``. The command around this loop is in
generation/speculative_run.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable

import torch
from torch import Tensor

from mamballama_cli.errors import UsageError
from mamballama_cli.generation.runners import HybridRunner, as_hybrid, is_hybrid, make_runner  # noqa: F401
from mamballama_cli.generation.acceptance import accept_greedy, accept_sampled, draw  # noqa: F401
from mamballama_cli.generation.sampling import SamplingConfig, probabilities
from mamballama_cli.generation.lookup import is_lookup_draft
from mamballama_cli.models.feature_draft import is_feature_draft


# --------------------------------------------------------------------------------------------------------
# Acceptance: generation/acceptance.py (shared with the captured round)
# --------------------------------------------------------------------------------------------------------
def lockstep(accepted: Tensor, nxt: Tensor, drafts: Tensor) -> tuple[int, Tensor]:
    """Batched rows advance together by the smallest accepted count m: a row that kept more emits its
    (accepted) draft token at position m+1 instead. Each emitted token is still the output of that row's
    own lossless procedure at that position, decided without looking at it, so the output stays exact."""
    m = int(accepted.min())
    if m == int(accepted.max()):
        return m, nxt
    K = drafts.shape[1]
    ahead = accepted > m
    return m, torch.where(ahead, drafts[:, min(m, K - 1)], nxt)


def _commit_per_row(t_runner, d_runner, fed_pending: int, verify_ids: Tensor, acc: Tensor, nxt: Tensor,
                    live: Tensor, kr: int) -> tuple[Tensor, int]:
    """Commit a round whose rows kept different counts ``acc`` (b,); returns (the draft's next input, the
    smallest count among live rows, for the adaptive window).

    The target keeps each row's verified token and its accepted drafts (a finished row keeps nothing: it stays
    where it is). The draft was fed ``fed_pending`` tokens then kr - 1 drafts; its next input must have one
    length for every row. When no live row kept all kr drafts, that is the correction alone. Otherwise the rows
    that did need two tokens (the last draft, never fed, and the bonus), so every row gets two: the token before
    its correction (``verify_ids[acc]``: the last kept draft, or the round's first token when none was kept),
    which the draft then un-commits, and the correction."""
    t_runner.commit(torch.where(live, acc + 1, 0))
    if bool(((acc == kr) & live).any()):
        d_runner.commit(torch.where(live, fed_pending + acc - 1, 0))
        pending = torch.stack([verify_ids.gather(1, acc[:, None])[:, 0], nxt], dim=1)
    else:
        d_runner.commit(torch.where(live, fed_pending + acc, 0))
        pending = nxt[:, None]
    return pending, int(acc[live].min()) if bool(live.any()) else 0


# --------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------
@dataclass
class SpecStats:
    k: int
    rounds: int = 0  # target verify calls
    drafted: int = 0
    accepted: int = 0
    produced: int = 0  # row-tokens out of verify calls, before truncation at max_new_tokens / a stop token
    row_rounds: int = 0  # verify calls times the rows still decoding in each
    new_tokens: int = 0
    prompt_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    draft_calls: int = 0
    target_calls: int = 0
    # per window position j (0-based): row-rounds whose first j drafts were all kept (draft j was judged), and
    # of those, the row-rounds that kept draft j too; and how many rounds ran with each window length K
    position_reached: list[int] = field(default_factory=list)
    position_accepted: list[int] = field(default_factory=list)
    rounds_by_k: dict[int, int] = field(default_factory=dict)

    @property
    def acceptance_by_position(self) -> list[float]:
        """P(draft j kept | drafts 0..j-1 kept), per position j of the window."""
        return [a / r if r else float("nan") for a, r in zip(self.position_accepted, self.position_reached)]

    def record(self, accepted: Tensor, k: int) -> None:
        """One round's accepted counts per row (b,) with a window of ``k`` drafts."""
        while len(self.position_reached) < k:
            self.position_reached.append(0)
            self.position_accepted.append(0)
        for j in range(k):
            self.position_reached[j] += int((accepted >= j).sum())
            self.position_accepted[j] += int((accepted > j).sum())
        self.rounds_by_k[k] = self.rounds_by_k.get(k, 0) + 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_call(self) -> float:
        """Tokens a row gets from one verify call, on average."""
        return self.produced / self.row_rounds if self.row_rounds else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        dt = self.total_s - self.time_to_first_token_s
        return (self.new_tokens - 1) / dt if self.new_tokens > 1 and dt > 0 else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, tokens_per_call=self.tokens_per_call,
                 tokens_per_s=self.tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s)
        d["rounds_by_k"] = {str(k): v for k, v in sorted(self.rounds_by_k.items())}

        def clean(v):  # NaN (nothing drafted: the first token already stopped generation) is written as null
            return (round(v, 4) if math.isfinite(v) else None) if isinstance(v, float) else v

        d["acceptance_by_position"] = [clean(v) for v in self.acceptance_by_position]
        return {k: clean(v) for k, v in d.items()}


def next_k(k: int, accepted: int, k_max: int) -> int:
    """Adaptive window (``adaptive=True``): one more draft after a round that kept all of them, one fewer after a
    round that kept fewer than half; within 1 .. k_max. The choice uses only past rounds, so decoding stays
    lossless."""
    if accepted >= k:
        return min(k + 1, k_max)
    if 2 * accepted < k:
        return max(1, k - 1)
    return k


@dataclass
class SpecResult:
    tokens: list[list[int]]  # new tokens per batch row
    stats: SpecStats
    text: str = ""
    extra: dict = field(default_factory=dict)


def _sync(device) -> None:
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def speculative_generate(
    target,
    draft,
    input_ids: Tensor,
    *,
    k: int = 4,
    max_new_tokens: int = 128,
    sampling: SamplingConfig | None = None,
    stop_tokens: list[int] | tuple[int, ...] = (),
    seed: int | None = None,
    cuda_graphs: bool | None = None,
    draft_runner: str = "auto",
    on_tokens: Callable[[list[int]], None] | None = None,
    static: bool = False,
    adaptive: bool = False,
    captured_round: bool = False,
) -> SpecResult:
    """Speculative decoding of ``target`` (a MamballamaForCausalLM, or any runner) with ``draft``.

    input_ids (batch, prompt_len): rows of one batch share the prompt length (no padding). When both models
    run on :class:`HybridRunner` (``per_row``), each row keeps its own accepted count every round and sits at
    its own position; otherwise rows advance in lockstep (:func:`lockstep`). At temperature 0 the output equals the target's greedy decoding; when sampling it follows
    the target's processed distribution. ``on_tokens`` receives row 0's new tokens as they are accepted.
    ``cuda_graphs`` (default: on CUDA) captures the verify and draft steps; ``static`` runs the captured
    computation eagerly (what the CPU tests use to check it). ``adaptive``: ``k`` is the largest window, and
    each round's window follows the acceptance of the rounds before (:func:`next_k`). ``captured_round``: the
    whole round (draft steps, verify, acceptance, commit) runs on the device, one CUDA graph per round on CUDA
    (generation/captured_round.py; hybrid target and draft, fixed ``k``); tokens reach ``on_tokens`` at the end.
    """
    # a feature draft reads the verify call's features, the lookup draft the device-side history: rounds only
    if captured_round or is_feature_draft(draft) or is_lookup_draft(draft):
        return _captured(target, draft, input_ids, k, max_new_tokens, sampling, stop_tokens, seed, cuda_graphs,
                         adaptive, on_tokens)
    if k < 1:
        raise UsageError(f"-k {k}: the draft must propose at least one token per round")
    sampling = sampling or SamplingConfig()
    device = input_ids.device
    b, n_prompt = input_ids.shape
    window = k + 1
    max_length = n_prompt + max_new_tokens + 2 * window
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise UsageError("--cuda-graphs needs a CUDA device; drop it or use --device cuda")
    if draft_runner == "auto" and cuda_graphs and not is_hybrid(draft) and not hasattr(draft, "extend"):
        draft_runner = "hybrid" if as_hybrid(draft) is not None else "auto"

    t_runner = make_runner(target, b, max_length, window, keep_live=False, kind="auto", static=static)
    d_runner = make_runner(draft, b, max_length, window, keep_live=True, kind=draft_runner, static=static)
    if cuda_graphs:
        if isinstance(t_runner, HybridRunner):
            t_runner.capture([(j + 1, True, 0) for j in (range(1, k + 1) if adaptive else [k])])
        if isinstance(d_runner, HybridRunner):
            shapes = [(1, True, 0), (2, True, 0)] + [(1, False, j) for j in range(1, k + 1)]
            d_runner.capture(shapes)

    gen = None
    if seed is not None:
        gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    stats = SpecStats(k=k, prompt_tokens=n_prompt)
    out: list[list[int]] = [[] for _ in range(b)]
    finished = torch.zeros(b, dtype=torch.bool, device=device)

    def pick(logits: Tensor) -> tuple[Tensor, Tensor | None]:
        if sampling.greedy:
            return logits.argmax(-1), None
        probs = probabilities(logits, sampling)
        return draw(probs, gen), probs

    def emit(tokens) -> bool:
        """tokens (b, n), or a list of b lists, new for every row; returns True when generation is over."""
        nonlocal finished
        rows = tokens.tolist() if isinstance(tokens, Tensor) else tokens
        for row in range(b):
            if bool(finished[row]):
                continue
            for tok in rows[row]:
                if len(out[row]) >= max_new_tokens:
                    break
                out[row].append(tok)
                if stops.numel() and tok in stops.tolist():
                    finished[row] = True
                    break
            if len(out[row]) >= max_new_tokens:
                finished[row] = True
        if on_tokens is not None:
            on_tokens(out[0])
        return bool(finished.all())

    _sync(device)
    start = time.perf_counter()
    first_logits = t_runner.prefill(input_ids)
    d_runner.prefill(input_ids)
    last, _ = pick(first_logits)  # (b,) the first new token comes from the target itself
    done = emit(last[:, None])
    _sync(device)
    stats.time_to_first_token_s = time.perf_counter() - start
    pending = last[:, None]  # tokens the draft has not seen yet (1, or 2 after a full acceptance)

    kr = k  # this round's window (fixed unless adaptive)
    per_row = b > 1 and getattr(t_runner, "per_row", False) and getattr(d_runner, "per_row", False)
    while not done:
        # 1. Draft K tokens.
        drafts, qs = [], []
        logits = d_runner.extend(pending, rebase=True)[:, -1]
        for j in range(kr):
            tok, q = pick(logits)
            drafts.append(tok)
            qs.append(q)
            if j < kr - 1:
                logits = d_runner.extend(tok[:, None], rebase=False)[:, -1]
        d = torch.stack(drafts, dim=1)  # (b, K)

        # 2. Verify: the last committed token plus the K drafts, in one call.
        verify_ids = torch.cat([last[:, None], d], dim=1)  # (b, K+1)
        t_logits = t_runner.extend(verify_ids, rebase=True)
        if sampling.greedy:
            accepted, nxt = accept_greedy(d, t_logits)
        else:
            accepted, nxt = accept_sampled(d, torch.stack(qs, dim=1), probabilities(t_logits, sampling), gen)
        if per_row:
            live = ~finished
            acc = torch.where(live, accepted, 0)
            pending, m = _commit_per_row(t_runner, d_runner, pending.shape[1], verify_ids, acc, nxt, live, kr)
            n_live = int(live.sum())
            stats.drafted += kr * n_live
            stats.accepted += int(acc.sum())
            stats.produced += int(acc.sum()) + n_live
            stats.row_rounds += n_live
            stats.record(accepted[live], kr)
            acc_host = acc.tolist()
            done = emit([row[:a] + [t] for row, a, t in zip(d.tolist(), acc_host, nxt.tolist())])
        else:
            m, nxt = lockstep(accepted, nxt, d)
            # 3. Commit: the target keeps the last token and m drafts; the draft keeps what it fed correctly.
            t_runner.commit(m + 1)
            d_runner.commit(pending.shape[1] + min(m, kr - 1))
            pending = torch.cat([d[:, kr - 1 :], nxt[:, None]], dim=1) if m == kr else nxt[:, None]
            stats.drafted += kr * b
            stats.accepted += int(accepted.sum())
            stats.produced += (m + 1) * b
            stats.row_rounds += b
            stats.record(accepted, kr)
            done = emit(torch.cat([d[:, :m], nxt[:, None]], dim=1))
        last = nxt
        stats.rounds += 1
        if adaptive:
            kr = next_k(kr, m, k)

    _sync(device)
    stats.total_s = time.perf_counter() - start
    stats.new_tokens = len(out[0])
    stats.target_calls = getattr(t_runner, "calls", 0)
    stats.draft_calls = getattr(d_runner, "calls", 0)
    extra = {"cuda_graphs": bool(cuda_graphs), "draft_runner": type(d_runner).__name__,
             "target_runner": type(t_runner).__name__, "batch_size": b, "adaptive_k": bool(adaptive),
             "per_row": bool(per_row)}
    return SpecResult(out, stats, extra=extra)


def _captured(target, draft, input_ids, k, max_new_tokens, sampling, stop_tokens, seed, cuda_graphs, adaptive,
              on_tokens) -> SpecResult:
    """speculative_generate(captured_round=True): the rounds of generation/captured_round.py (or of
    generation/feature_round.py for a feature draft, generation/lookup.py for the lookup draft)."""
    from mamballama_cli.generation.feature_round import make_rounds

    if adaptive:
        raise UsageError("--adaptive-k changes the window between rounds; a captured round has one window: "
                         "drop one of them")
    device = input_ids.device
    capture = device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
    if seed is not None:
        torch.manual_seed(seed)
    b, n = input_ids.shape
    rounds = make_rounds(target, draft, b, n + max_new_tokens + 2 * (k + 1), k, sampling=sampling or SamplingConfig(),
                         stop_tokens=stop_tokens, capture=capture)
    out, st = rounds.generate(input_ids, max_new_tokens)
    lookup = is_lookup_draft(draft)
    stats = SpecStats(k=k, rounds=st["rounds"], drafted=k * st["row_rounds"], accepted=st["accepted"],
                      produced=st["accepted"] + st["row_rounds"], row_rounds=st["row_rounds"],
                      new_tokens=len(out[0]), prompt_tokens=n, total_s=st["seconds"],
                      draft_calls=0 if lookup else st["rounds"] * k, target_calls=st["rounds"] + 1)
    stats.rounds_by_k[k] = st["rounds"]
    if on_tokens is not None:
        on_tokens(out[0])
    extra = {"cuda_graphs": capture, "draft_runner": str(draft) if lookup else "HybridRunner",
             "round_kind": type(rounds).__name__,
             "target_runner": "HybridRunner",
             "batch_size": b, "adaptive_k": False, "per_row": True, "captured_round": True}
    if "step_rounds" in st:  # a gated lookup draft: rounds that decoded one token without proposals
        extra.update(step_rounds=st["step_rounds"], step_row_rounds=st["step_row_rounds"])
    return SpecResult(out, stats, extra=extra)
