"""The largest batch that fits, per context length (``mamballama eval speed --max-batch``).

A long context is where a hybrid pays off: its Mamba layers keep a state of fixed size while the teacher's
K/V grows with every token, so at 32K tokens the hybrid fits a much larger batch, and decode throughput in all
is what a server sees. This module finds that batch for one model on the static engine, by doubling and then
bisecting: a batch fits when its estimated memory (cache, Mamba state, one prefill piece's activations) is
inside the budget, its run does not fail (out of memory, say), and, with ``--memory-limit``, its measured peak
stays under the limit. Every probe is kept in the row, and a context where even batch 1 does not fit becomes a
row with an error, so one failure loses nothing else.
"""

from __future__ import annotations

from typing import Callable

UPPER = 4096  # the search stops here: a larger batch is not a decode benchmark any more


def _size(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def estimate_bytes(model, batch: int, prompt_len: int, new_tokens: int, prefill_chunk: int | None) -> int:
    """What a static decoder of ``batch`` rows adds to the weights: K/V and token history for prompt + new
    tokens, the Mamba state, and the activations of one prefill piece (each layer's widest tensor, twice, plus
    the last position's logits in float32)."""
    from mamballama_cli.generation.fast import static_cache_bytes
    from mamballama_cli.models.cache import HybridCache
    from mamballama_cli.models.runtime import auto_prefill_chunk

    cfg = model.config
    elt = model.lm_head.weight.element_size()
    cache = static_cache_bytes(model, batch, prompt_len + new_tokens)
    one = HybridCache(model, 1, dtype=model.lm_head.weight.dtype, device="meta", max_length=1)
    state = one.memory_bytes()["state_bytes"] * batch
    piece = min(prefill_chunk or auto_prefill_chunk(cfg, batch), prompt_len)
    h = cfg.hidden_size
    wide = 4 * h + max(int(getattr(cfg, "intermediate_size", 0) or 0), 4 * h)
    act = 2 * batch * piece * wide * elt + batch * cfg.vocab_size * 4
    return int(cache + state + act)


def largest_batch(attempt: Callable[[int], dict], upper: int = UPPER) -> tuple[int, dict | None, list[dict]]:
    """Double from 1 while ``attempt(b)`` returns a row without "error", then bisect the last step.

    Returns (largest batch that fitted or 0, its row, every probe as {"batch", "ok"[, "error"]})."""
    probes: list[dict] = []

    def probe(b: int) -> dict:
        row = attempt(b)
        probes.append({"batch": b, "ok": "error" not in row, **({"error": row["error"]} if "error" in row else {})})
        return row

    best, best_row, bad = 0, None, None
    b = 1
    while True:
        row = probe(b)
        if "error" in row:
            bad = b
            break
        best, best_row = b, row
        if b >= upper:
            break
        b = min(2 * b, upper)
    if bad is not None:
        lo, hi = best, bad
        while hi - lo > 1:
            mid = (lo + hi) // 2
            row = probe(mid)
            if "error" in row:
                hi = mid
            else:
                lo, best_row = mid, row
        best = lo
    return best, best_row, probes


def fits_attempt(run: Callable[[int], dict], model, prompt_len: int, new_tokens: int, prefill_chunk: int | None,
                 budget: int | None, limit: int | None, peak_of: Callable[[dict], int | None]):
    """``attempt(b)`` for :func:`largest_batch`: the estimate against ``budget`` (bytes beyond the weights;
    None: no estimate check), then the run (``run(b)`` returns a row or one with "error"), then its measured
    peak against ``limit`` (total bytes; None: not checked)."""

    def attempt(b: int) -> dict:
        need = estimate_bytes(model, b, prompt_len, new_tokens, prefill_chunk)
        if budget is not None and need > budget:
            return {"error": f"estimated {_size(need)} beyond the weights > budget {_size(budget)}"}
        row = run(b)
        if "error" in row:
            return row
        peak = peak_of(row)
        if limit is not None and peak is not None and peak > limit:
            return {"error": f"peak {_size(peak)} > --memory-limit {_size(limit)}"}
        return {**row, "estimated_bytes": need}

    return attempt
