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
    ap.add_argument("--tokens", default=None, help="a JSONL file that keeps the continuations (resumable)")
    ap.add_argument("--table", default=None, help="an n-gram table (`mamballama data ngrams`): rows with it too")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ks, ngrams = parse_ks(args.ks), parse_ks(args.ngrams)

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
            for table in [None] + ([args.table] if args.table else []):
                draft = LookupDraft(max_ngram=n, table=table)
                row = {"k": k, "max_ngram": n, "table": table}
                for name, idx in groups.items():
                    counts, used = [], []
                    for i in idx:
                        counts += simulate_lookup(prompts[i], new[i], k, draft, from_table=used)
                    row[name] = rounds_summary(counts, k)["tokens_per_call"] if counts else None
                    if table and name == "all":
                        row.update(table_split(counts, used, k))
                row["modelled_speedup"] = round(row["all"] / args.round_cost, 3)
                rows.append(row)
                split = (f" (the table wrote {row['table_rounds']:.1%} of first proposals: "
                         f"{row['table_tokens_per_call']} tokens per call there)") if table else ""
                print(f"K={k} {draft}: tokens per call chat {row['chat']} text {row['text']} all {row['all']}; "
                      f"modelled {row['modelled_speedup']}x at a round of {args.round_cost} plain steps{split}")
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "lookup_sim", "model": args.model, "prompts": len(prompts),
                                               "chat_prompts": n_chat, "new_tokens": args.max_new_tokens,
                                               "dtype": args.dtype, "round_cost": args.round_cost, "rows": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
