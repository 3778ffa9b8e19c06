"""What the prefix cache (generation/prefix_cache.py) saves `serve` and `chat`: the time to read a prompt into a
slot (a request's time to its first token, less queueing) when the prompt extends a kept state, against reading it
whole, at a model shape with random weights.

    python benchmarks/prefix_cache.py --shape llama3-8b --ratio 0.25 --context 4096 --turn 128 --json out.json

For each repetition: a conversation of ``--context`` tokens is read into a slot (cold, kept as an entry), then the
next turn (those tokens and ``--turn`` more) is read from the kept state, the same prompt again is read whole with
the cache off, and the first prompt is read again from its kept state (a retry, or ``n`` choices: no forward).
Then three requests that share their first ``--context`` tokens (a system prompt) and end in ``--turn`` tokens of
their own: the second finds the shared blocks and, for a hybrid, reads its prompt in two pieces and keeps the state
there (``branch_second``); the third resumes there (``branch_third``).
Times are CUDA-synchronised wall seconds of ``SlotDecoder.join``; the first of each kind is a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> dict:
    import torch
    from bench_common import finish, run_facts, write_profile

    from mamballama_cli.convert.placement import resolve_attention_layers
    from mamballama_cli.evaluation.shapes import hybrid_config, random_model, teacher_config
    from mamballama_cli.generation.continuous import SlotDecoder
    from mamballama_cli.models.modeling import MamballamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--context", type=int, default=4096, help="tokens of the conversation so far")
    ap.add_argument("--turn", type=int, default=128, help="tokens the next turn adds")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--pieces", choices=("graph", "walk", "forward"), default=None,
                    help="how a prompt of at most 1,024 tokens is read (Runtime.read_on): the layer walk in one CUDA "
                         "graph per piece length (default on CUDA), the walk eagerly, or the model's forward "
                         "(default on CPU); every repetition also times a next turn through the forward (the A/B)")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="also profile one more next turn read from the kept state (torch.profiler) into FILE")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    tc = teacher_config(args.shape)
    hc = hybrid_config(tc, resolve_attention_layers(tc.num_hidden_layers, args.ratio, None))
    model = random_model(MamballamaForCausalLM, hc, dtype, dev)
    cap = args.context + args.turn + 8
    pieces = args.pieces or ("graph" if dev.type == "cuda" else "forward")
    hot = SlotDecoder(model, 1, cap, capture=False, prefix_cache_bytes=16 << 30, pieces=pieces)
    cold = SlotDecoder(model, 1, cap, capture=False)
    gen = torch.Generator().manual_seed(0)

    def timed(dec, prompt) -> tuple[float, int]:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        slot, _ = dec.join(prompt)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds, cached = time.perf_counter() - t0, dec.cached[slot]
        dec.leave(slot)
        return seconds, cached

    rows = []
    for rep in range(args.reps + 1):
        first = torch.randint(3, hc.vocab_size, (args.context,), generator=gen).tolist()
        nxt = first + torch.randint(3, hc.vocab_size, (args.turn,), generator=gen).tolist()
        row = {"rep": rep}
        row["first_cold_s"], _ = timed(hot, first)
        row["next_turn_kept_s"], row["next_turn_cached_tokens"] = timed(hot, nxt)
        hot.stage.pieces = "forward"  # the A/B: another next turn of the same conversation through the forward
        other = first + torch.randint(3, hc.vocab_size, (args.turn,), generator=gen).tolist()
        row["next_turn_kept_forward_s"], _ = timed(hot, other)
        hot.stage.pieces = pieces
        row["next_turn_whole_s"], _ = timed(cold, nxt)
        row["repeat_kept_s"], row["repeat_cached_tokens"] = timed(hot, first)
        head = torch.randint(3, hc.vocab_size, (args.context,), generator=gen).tolist()
        a, b, c = (head + torch.randint(3, hc.vocab_size, (args.turn,), generator=gen).tolist() for _ in range(3))
        timed(hot, a)
        row["branch_second_s"], row["branch_second_cached_tokens"] = timed(hot, b)
        row["branch_third_s"], row["branch_third_cached_tokens"] = timed(hot, c)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    phases = phase_times(hot, dev, lambda: torch.randint(3, hc.vocab_size, (args.context,), generator=gen).tolist(),
                         lambda: torch.randint(3, hc.vocab_size, (args.turn,), generator=gen).tolist(), timed)
    print("a next turn's phases, synchronised (ms):", {k: round(v * 1e3, 2) for k, v in phases.items()}, flush=True)
    agree = same_logits(hot.stage, pieces, torch.randint(3, hc.vocab_size, (args.context + args.turn,), generator=gen),
                        args.context)
    print(f"a next turn's logits, {pieces} against the forward:", agree, flush=True)
    if args.profile:
        first = torch.randint(3, hc.vocab_size, (args.context,), generator=gen).tolist()
        timed(hot, first)
        nxt = first + torch.randint(3, hc.vocab_size, (args.turn,), generator=gen).tolist()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        write_profile(lambda: hot.leave(hot.join(nxt)[0]), sync, args.profile, "a next turn from the kept state")
    measured = rows[1:]
    out = {**run_facts(argv), "shape": args.shape, "ratio": args.ratio, "attn_layers": hc.attn_layers,
           "context": args.context, "turn": args.turn, "dtype": args.dtype, "pieces": pieces, "rows": rows,
           "next_turn_phases_s": phases, "next_turn_pieces_vs_forward": agree}
    for key in ("first_cold_s", "next_turn_kept_s", "next_turn_kept_forward_s", "next_turn_whole_s", "repeat_kept_s",
                "branch_second_s", "branch_third_s"):
        out[key + "_median"] = statistics.median(r[key] for r in measured)
    out["next_turn_speedup"] = out["next_turn_whole_s_median"] / out["next_turn_kept_s_median"]
    out["prefix_cache_bytes"] = hot.prefix.bytes
    ms = {k: out[k + "_s_median"] * 1e3 for k in ("next_turn_kept", "next_turn_kept_forward", "next_turn_whole",
                                                    "repeat_kept", "branch_second", "branch_third")}
    return finish(out, f"{args.shape} {args.ratio:.0%} attention, {args.context} + {args.turn} tokens: next turn "
                  f"{ms['next_turn_kept']:.1f} ms from the kept state ({pieces}; "
                  f"{ms['next_turn_kept_forward']:.1f} through the forward) vs {ms['next_turn_whole']:.1f} ms whole "
                  f"({out['next_turn_speedup']:.1f}x); a repeated prompt {ms['repeat_kept']:.2f} ms; a shared beginning: "
                  f"the second request {ms['branch_second']:.1f} ms, the third {ms['branch_third']:.1f} ms", args.json)


def same_logits(stage, pieces: str, tokens, context: int) -> dict:
    """Whether a next turn read ``pieces``'s way gives the forward's logits: the first ``context`` of ``tokens`` read
    on the staging runtime, the rest read on from there, once each way (the relative error of the logits, and
    whether their argmax agrees)."""
    import torch

    ids = tokens[None].to(stage.device)
    got = {}
    with torch.no_grad():  # as the slot decoder reads (its warning on the H100: no graph of autograd wanted here)
        for mode in (pieces, "forward"):
            stage.pieces = "forward"
            stage.prefill(ids[:, :context])
            stage.pieces = mode
            got[mode] = stage.prefill(ids[:, context:], resume=True).float()
    stage.pieces = pieces
    a, b = got[pieces], got["forward"]
    return {"rel_err": float((a - b).norm() / b.norm().clamp_min(1e-30)),
            "same_argmax": bool(torch.equal(a.argmax(-1), b.argmax(-1)))}


def phase_times(dec, dev, context, turn, timed) -> dict[str, float]:
    """Where one next turn's time goes: a conversation is read and kept, then its next turn joins with each step of
    the prompt read (``SlotDecoder.begin`` and ``advance``) wrapped in a device-synchronised timer: the lookup, the restore into the
    staging cache, the prefill piece, the copy into the slot, the new entry's allocation and its copy. Seconds per
    phase (summed where a phase runs twice), and ``join_s`` for the whole join with the timers in place."""
    import torch

    from mamballama_cli.models.cache import HybridCache

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    spent: dict[str, float] = {}
    first = context()
    timed(dec, first)  # kept as an entry

    def clocked(name, fn):
        def run(*a, **kw):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
            return out
        return run

    stage, slots = dec.stage.cache, dec.runtime.cache
    patched = [(dec.prefix, "lookup"), (dec.prefix, "shared"), (stage, "copy_row"), (dec.stage, "prefill"),
               (slots, "copy_row"), (dec.prefix, "put")]
    names = ["lookup", "shared", "restore", "prefill", "slot_copy_in", "put"]
    for (obj, attr), name in zip(patched, names):
        setattr(obj, attr, clocked(name, getattr(obj, attr)))
    real_init = HybridCache.__init__

    def init(self, *a, **kw):  # the new entry's one-row cache (the only HybridCache a join makes)
        clocked("put_alloc", real_init)(self, *a, **kw)
    HybridCache.__init__ = init
    try:
        spent["join_s"], cached = timed(dec, first + turn())
    finally:
        HybridCache.__init__ = real_init
        for obj, attr in patched:
            delattr(obj, attr)  # the instance attribute goes; the class's method is back
    if cached != len(first):
        raise RuntimeError(f"the next turn resumed from {cached} tokens, not the {len(first)} kept")
    if "put" in spent and "put_alloc" in spent:
        spent["put"] -= spent["put_alloc"]  # put's own time apart from the allocation inside it
    return spent


if __name__ == "__main__":
    main()
