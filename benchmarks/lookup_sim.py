"""What the lookup draft allows a model, without a GPU: tokens per verify call of greedy lookup rounds over the model's
own greedy continuations of spec_eval's held-out prompts (generation/lookup.py, docs/speculative.md).

    python benchmarks/lookup_sim.py default --data DATA --prompts 128 --max-new-tokens 128 --ks 3,4,6,8 \
        --ngrams 2,3,4 --tokens greedy.jsonl [--table TABLE.safetensors]

The continuations are decoded once (``--tokens`` keeps them: a second run with the same file only simulates), then
for each K and longest n-gram N, :func:`~mamballama_cli.generation.lookup.simulate_lookup` replays the rounds a
greedy speculative decoder would run over them, the chat prompts and the text windows apart. The modelled speedup
is tokens per call over the round's cost in plain steps (``--round-cost``, the verify call and commit; the lookup's
own cost left out). ``--table`` adds rows with an n-gram table (`mamballama data ngrams`, generation/ngram_table.py):
the lookup draft ``lookup:N:TABLE``.

Each row also splits the rounds by the length of the context's match (``by_match``: rounds and tokens per call),
and ``--gate 2,3`` adds rows for rounds that speculate only where the match is at least that long and otherwise
decode one token, at ``--step-cost`` plain steps (a one-token window walk with its commit). The modelled speedup is
then tokens over (verify calls x round cost + one-token rounds x step cost). Rounds that yield fewer tokens than a
verify call costs in plain steps are worth less than a plain step: on the CPU over the default teacher's greedy
tokens, rounds with no match yield 1.0 token a call (docs/speculative.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_eval import held_out_prompts, parse_ks, rounds_summary, table_split  # noqa: E402


def continuations(model, prompts, n_new: int, path: Path | None) -> list[list[int]]:
    done = []
    if path is not None and path.exists():
        done = [json.loads(x)["new"] for x in path.read_text().splitlines() if x.strip()]
    device = next(model.parameters()).device
    start = time.perf_counter()
    for i, p in enumerate(prompts[len(done):], start=len(done)):
        with torch.no_grad():
            out = model.generate(torch.tensor([p], device=device), max_new_tokens=n_new, min_new_tokens=n_new,
                                 do_sample=False, eos_token_id=None, pad_token_id=None,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device))
        new = out[0, len(p):].tolist()
        done.append(new)
        if path is not None:
            with path.open("a") as f:
                f.write(json.dumps({"prompt": p, "new": new}) + "\n")
        print(f"[{i + 1}/{len(prompts)}] {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return done[: len(prompts)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--text-window", type=int, default=192)
    ap.add_argument("--ks", default="3,4,6,8")
    ap.add_argument("--ngrams", default="2,3,4")
    ap.add_argument("--round-cost", type=float, default=1.23, help="a round's cost in plain steps (2026-12-04: 1.23)")
    ap.add_argument("--gate", default="0", help="context match lengths below which a round decodes one token "
                    "instead of speculating, comma-separated (0: always speculate)")
    ap.add_argument("--step-cost", type=float, default=1.18, help="a one-token round's cost in plain steps (an H100 "
                    "at the 50%% student, 2026-12-06: 0.708 ms window walk + 0.016 ms commit over a 0.612 ms step)")
    ap.add_argument("--tokens", default=None, help="a JSONL file that keeps the continuations (resumable)")
    ap.add_argument("--table", default=None, help="an n-gram table (`mamballama data ngrams`): rows with it too")
    ap.add_argument("--table-passes-gate", action="store_true", help="with --table and a gate: also rows where a "
                    "round whose first proposal the table wrote speculates (a study; not built on the device)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ks, ngrams = parse_ks(args.ks), parse_ks(args.ngrams)
    gates = [int(g) for g in args.gate.split(",") if g.strip().isdigit()]
    if len(gates) != len(args.gate.split(",")):
        raise SystemExit(f"error: --gate {args.gate!r}: give match lengths (0 or more), comma-separated, e.g. 0,2,3")

    from mamballama_cli.generation.lookup import LookupDraft, simulate_lookup
    from mamballama_cli.loading import load_causal_lm

    model, tok, _ = load_causal_lm(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    prompts = held_out_prompts(tok, Path(args.data), args.prompts, args.text_window)
    n_chat = sum(1 for x in (Path(args.data) / "prompts-heldout.jsonl").read_text().splitlines() if x.strip()) \
        if (Path(args.data) / "prompts-heldout.jsonl").exists() else 0
    n_chat = min(n_chat, len(prompts))
    new = continuations(model, prompts, args.max_new_tokens, Path(args.tokens) if args.tokens else None)
    groups = {"chat": range(n_chat), "text": range(n_chat, len(prompts)), "all": range(len(prompts))}
    rows = []
    for k in ks:
        for n in ngrams:
            variants = [(t, g, False) for t in [None] + ([args.table] if args.table else []) for g in gates]
            if args.table and args.table_passes_gate:
                variants += [(args.table, g, True) for g in gates if g]
            for table, gate, passes in variants:
                draft = LookupDraft(max_ngram=n, table=table)
                row = {"k": k, "max_ngram": n, "table": table, "gate": gate, "table_passes": passes}
                for name, idx in groups.items():
                    counts, used, matches, steps = [], [], [], []
                    for i in idx:
                        counts += simulate_lookup(prompts[i], new[i], k, draft, from_table=used, matches=matches,
                                                  gate=gate, steps=steps, table_passes=passes)
                    calls = [c for c, s in zip(counts, steps) if not s]
                    row[name] = rounds_summary(calls, k)["tokens_per_call"] if calls else None
                    if name == "all":
                        row.update(gate_split(counts, matches, steps, args.round_cost, args.step_cost))
                    if table and name == "all" and not gate:
                        row.update(table_split(counts, used, k))
                rows.append(row)
                split = (f" (the table wrote {row['table_rounds']:.1%} of first proposals: "
                         f"{row['table_tokens_per_call']} tokens per call there)") if "table_rounds" in row else ""
                gated = (f", one-token rounds {row['step_rounds']:.1%} (gate {gate}"
                         f"{', the table passes' if passes else ''})") if gate else ""
                print(f"K={k} {draft}: tokens per call chat {row['chat']} text {row['text']} all {row['all']}; "
                      f"modelled {row['modelled_speedup']}x at a round of {args.round_cost} plain steps{gated}{split}")
                if not gate:
                    print("  by match length: " + ", ".join(f"{m}: {v[0]} rounds, {v[1]} tokens/call"
                                                            for m, v in row["by_match"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "lookup_sim", "model": args.model, "prompts": len(prompts),
                                               "chat_prompts": n_chat, "new_tokens": args.max_new_tokens,
                                               "dtype": args.dtype, "round_cost": args.round_cost,
                                               "step_cost": args.step_cost, "rows": rows},
                                              indent=2))


def gate_split(counts: list[int], matches: list[int], steps: list[bool], round_cost: float,
               step_cost: float) -> dict:
    """Rounds by the context match they started from (``by_match``: length -> [rounds, tokens per call]), the share of
    one-token rounds, and the modelled speedup: tokens over the rounds' cost in plain steps."""
    by = {}
    for c, m in zip(counts, matches):
        n, tok = by.get(m, (0, 0))
        by[m] = (n + 1, tok + c + 1)
    cost = sum(step_cost if s else round_cost for s in steps)
    return {"by_match": {m: [n, round(tok / n, 3)] for m, (n, tok) in sorted(by.items())},
            "step_rounds": round(sum(steps) / len(steps), 4) if steps else 0.0,
            "modelled_speedup": round((sum(counts) + len(counts)) / cost, 3) if cost else None}


if __name__ == "__main__":
    main()
