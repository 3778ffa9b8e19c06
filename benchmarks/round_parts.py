"""What one speculative round is made of, timed on its own: a plain decode step of the target, one verify call on
K+1 tokens, one draft step (each captured in a CUDA graph on CUDA, timed with CUDA events over ``iters`` calls at
a steady position). Shared by benchmarks/speculative_verify.py (random 8B-shape pair) and
benchmarks/spec_eval.py (a real trained pair), so that a missed speedup can be traced to its parts."""

from __future__ import annotations

import time

import torch


def cuda_time(fn, iters: int, warmup: int = 5) -> float:
    """Mean milliseconds per call (CUDA events; host time elsewhere)."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) * 1000 / iters


def round_parts(target, draft, prompt: torch.Tensor, K: int, capacity: int, iters: int, on_runner=None) -> dict:
    """Milliseconds: ``plain_step_ms`` (the static decoder of `generate`), ``runner_plain_step_ms`` (the same step
    through the speculative runner), ``verify_step_ms`` by how many tokens it keeps (1 and K+1: the replay does
    more work the more it keeps), ``draft_step_ms``; ``plain_engine`` names the plain step's engine and
    ``verify_backends`` the implementation of each op the verify calls ran.
    ``on_runner(runner, pos)`` runs with the target's runner before its verify timings (kernel profiles)."""
    from mamballama_cli.generation.fast import StaticDecoder
    from mamballama_cli.generation.lookup import is_lookup_draft
    from mamballama_cli.generation.runners import as_hybrid, is_hybrid
    from mamballama_cli.models.feature_draft import is_feature_draft

    if not is_hybrid(draft) and not is_lookup_draft(draft):
        draft = as_hybrid(draft) or draft  # a Llama-family draft runs as an all-attention hybrid, as in a round
    device = prompt.device
    graphs = device.type == "cuda"
    pos = prompt.shape[1]
    dec = StaticDecoder(target, 1, capacity, capture=graphs)
    dec.prefill(prompt)
    plain_ms = cuda_time(dec.graph.replay if dec.graph is not None else dec._step, iters)
    out = {"plain_engine": dec.engine, "plain_step_ms": plain_ms}
    dec = None

    runner, call = timed_runner(target, prompt, K, capacity, [(1, True, 0), (K + 1, True, 0)])
    out["runner_plain_step_ms"] = cuda_time(call(1, 1), iters)
    if on_runner is not None:
        on_runner(runner, pos)
    out["verify_step_ms"] = {r: cuda_time(call(K + 1, r), iters) for r in (1, K + 1)}
    # which implementation ran each op of the verify walk (a kernel whose probe failed runs its reference)
    out["verify_backends"] = dict(sorted(runner.runtime.fns.backends.items()))
    runner.runtime = runner.cache = None  # free its buffers before the next one
    if is_lookup_draft(draft):  # all K proposals come from one pass: a K-th of it per draft token
        out["lookup_ms"] = lookup_ms(draft, prompt, K, capacity, iters)
        out["draft_step_ms"] = out["lookup_ms"] / K
    elif is_feature_draft(draft):
        out["draft_step_ms"] = feature_draft_step_ms(draft, prompt, K, capacity, iters)
    else:
        d_runner, d_call = timed_runner(draft, prompt, K, capacity, [(1, True, 0)], keep_live=True)
        out["draft_step_ms"] = cuda_time(d_call(1, 1), iters)
        d_runner.runtime = d_runner.cache = None
    if graphs:
        torch.cuda.empty_cache()
    return out


def timed_runner(model, prompt: torch.Tensor, K: int, capacity: int, shapes, keep_live: bool = False):
    """A speculative runner of ``model`` for windows of K+1 tokens, its graphs of ``shapes`` captured on CUDA, after
    ``prompt``; and ``call(T, keep, rebase=True)``, which makes a function feeding T tokens at the same position
    every time (a verify call keeping ``keep`` tokens of the last window, or with ``rebase`` False one continuing
    the window from its live state)."""
    from mamballama_cli.generation.speculative import HybridRunner

    device, pos = prompt.device, prompt.shape[1]
    runner = HybridRunner(model, 1, capacity, window=K + 1, keep_live=keep_live)
    if device.type == "cuda":
        runner.capture(shapes)
    runner.prefill(prompt)

    def call(T, keep, rebase=True):
        ids = torch.zeros(1, T, dtype=torch.long, device=device)

        def run():
            runner.start, runner.wlen, runner.keep = [pos], 0, [keep]  # same position every call
            runner.extend(ids, rebase=rebase)
        return run
    return runner, call


def no_replay_ms(target, prompt: torch.Tensor, K: int, capacity: int, iters: int) -> float:
    """Milliseconds of a call on K+1 tokens that continues a window from the state after it (a hybrid draft's
    call: the replay op without old steps, the state written once), on a runner of its own, captured on CUDA: what
    a verify call would cost if every layer's replay ran elsewhere, e.g. all layers' in one launch before the walk."""
    runner, call = timed_runner(target, prompt, K, capacity, [(K + 1, False, 0)], keep_live=True)
    ms = cuda_time(call(K + 1, K + 1, rebase=False), iters)
    runner.runtime = runner.cache = None
    return ms


def feature_draft_step_ms(draft, prompt: torch.Tensor, K: int, capacity: int, iters: int) -> float:
    """One step of a feature draft (a token and a feature in, at a steady position), captured on CUDA."""
    from mamballama_cli.generation.runners import HybridRunner
    from mamballama_cli.models.runtime import capture_graph

    device, n = prompt.device, prompt.shape[1]
    runner = HybridRunner(draft, 1, capacity, window=K + 1)
    h = draft.config.hidden_size
    runner.prefill(prompt[:, 1:], features=torch.zeros(1, n - 1, h, dtype=runner.dtype, device=device))
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    feats = torch.zeros(1, 1, h, dtype=runner.dtype, device=device)
    pos = torch.full((1,), n - 1, dtype=torch.long, device=device)

    def step():
        return runner._walk(ids, pos, runner.keep_t, True, 0, None, features=feats)

    fn = capture_graph(step, device)[0].replay if device.type == "cuda" else step
    ms = cuda_time(fn, iters)
    runner.runtime = runner.cache = None
    return ms


def lookup_ms(draft, prompt: torch.Tensor, K: int, capacity: int, iters: int) -> float:
    """The lookup draft's K proposals (the op ``lookup_draft``, as a round runs it) over a ``capacity``-token
    buffer holding the prompt and one new token, captured on CUDA. With an n-gram table, the table's chain runs
    whatever the match (its ``below`` past the longest n-gram): the slowest a proposal can be."""
    from mamballama_cli.models.runtime import capture_graph
    from mamballama_cli.ops.lookup import lookup_draft

    device, n = prompt.device, prompt.shape[1]
    buf = torch.zeros(1, capacity, dtype=torch.long, device=device)
    buf[:, :n] = prompt
    hist = torch.zeros(1, capacity, dtype=torch.long, device=device)
    plen = torch.full((), n, dtype=torch.long, device=device)
    hlen = torch.ones(1, dtype=torch.long, device=device)
    table = draft.loaded.arrays(device, below=draft.max_ngram + 1) if draft.loaded is not None else None

    def step():
        return lookup_draft(buf, plen, hist, hlen, K, draft.max_ngram, draft.min_ngram, table)

    fn = capture_graph(step, device)[0].replay if device.type == "cuda" else step
    return cuda_time(fn, iters)
