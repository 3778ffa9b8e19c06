"""The largest batch that fits, per context length (``mamballama eval speed --max-batch``).

A long context is where a hybrid pays off: its Mamba layers keep a state of fixed size while the teacher's
K/V grows with every token, so at 32K tokens the hybrid fits a much larger batch, and decode throughput in all
is what a server sees. This module finds that batch for one model on the static engine: a batch fits when its
estimated memory (cache, Mamba state, one prefill piece's activations) is inside the budget, its run does not
fail (out of memory, say), and, with ``--memory-limit``, its measured peak stays under the limit. The search runs
the largest batch the estimate allows first (on an H100 at 32K that was the answer for both models, 2026-12-06,
found after 10 and 6 decode runs by doubling), and bisects below it only if that run fails; with
``--max-batch-curve`` it doubles from batch 1 and then bisects, decoding at every step (tokens/s against batch).
Every probe is kept in the row, and a context where even batch 1 does not fit becomes a row with an error, so one
failure loses nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

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


def last_fitting(fits: Callable[[int], bool], upper: int = UPPER) -> int:
    """The largest batch in [1, upper] that ``fits`` (true up to some batch, false past it; no run), or 0: a
    bisection on a predicate alone, as :func:`estimate_largest` runs it on the memory estimate."""
    if not fits(1):
        return 0
    lo, hi = 1, upper + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def estimate_largest(model, prompt_len: int, new_tokens: int, prefill_chunk: int | None, budget: int,
                     upper: int = UPPER) -> int:
    """The largest batch whose :func:`estimate_bytes` is inside ``budget``, or 0."""
    return last_fitting(lambda b: estimate_bytes(model, b, prompt_len, new_tokens, prefill_chunk) <= budget,
                             upper)


def largest_batch(attempt: Callable[[int], dict], upper: int = UPPER,
                  start: int | None = None) -> tuple[int, dict | None, list[dict]]:
    """The largest batch for which ``attempt(b)`` returns a row without "error". With ``start`` (the largest batch
    the estimate allows): try it, then the next one, and bisect below ``start`` only if it failed. Without:
    double from 1, then bisect the last step.

    Returns (largest batch that fitted or 0, its row, every probe as {"batch", "ok"[, "error"]}, with the
    tokens/s and peak memory of a batch that ran: the curve of --max-batch-curve)."""
    probes: list[dict] = []

    def probe(b: int) -> dict:
        row = attempt(b)
        measured = {k: row[k] for k in ("aggregate_tok_s", "peak_mem_bytes") if row.get(k) is not None}
        probes.append({"batch": b, "ok": "error" not in row,
                       **({"error": row["error"]} if "error" in row else measured)})
        return row

    best, best_row, bad = 0, None, None
    b = 1
    if start:
        row = probe(start)
        if "error" in row:
            bad = start  # bisect (0, start) below
        else:
            best, best_row, b = start, row, min(start + 1, upper)  # the next one should fail by the estimate
    while bad is None and best < upper:
        row = probe(b)
        if "error" in row:
            bad = b
            break
        best, best_row = b, row
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


def bytes_per_step(row: dict, floor: dict | None) -> int | None:
    """What one decode step of a max-batch row moves at its context: the weights it reads (``floor``: the
    model's ``read_bytes_per_token``), every sequence's K/V, and every sequence's Mamba state read and written
    (benchmarks/kv_budget.py counts the same for any shape and ratio)."""
    if not floor or row.get("kv_bytes") is None:
        return None
    return int(floor["read_bytes_per_token"] + row["kv_bytes"] + 2 * (row.get("state_bytes") or 0))


def summarise_max_batch(rows, floors: dict | None = None) -> dict:
    """Per context: each model's largest batch, decode tokens/s in all there, and with ``floors`` (the run's
    per-model weight bytes) the bytes one step moves and the read bandwidth that makes; then the hybrid's
    multiple of the teacher, and the multiple their bytes allow at equal bandwidth (``bytes_bound_over_teacher``):
    the measured multiple over it is how much of the teacher's efficiency the hybrid kept."""
    out: dict = {"max_batch": {}}
    for r in rows:
        if r.get("section") != "max-batch":
            continue
        cell = out["max_batch"].setdefault(str(r["prompt_tokens"]), {})
        entry = cell[r["model"]] = {"batch": r.get("batch", 0), "aggregate_tok_s": r.get("aggregate_tok_s")}
        moved = bytes_per_step(r, (floors or {}).get(r["model"]))
        if moved and r.get("aggregate_tok_s") and r.get("batch"):
            entry["bytes_per_step"] = moved
            entry["read_bandwidth_bytes_per_s"] = moved * r["aggregate_tok_s"] / r["batch"]
    for cell in out["max_batch"].values():
        h, t = cell.get("hybrid", {}), cell.get("teacher", {})
        if h.get("aggregate_tok_s") and t.get("aggregate_tok_s"):
            cell["hybrid_over_teacher"] = h["aggregate_tok_s"] / t["aggregate_tok_s"]
        if h.get("bytes_per_step") and t.get("bytes_per_step"):
            cell["bytes_bound_over_teacher"] = (h["batch"] / h["bytes_per_step"]) / (t["batch"] / t["bytes_per_step"])
    return out
