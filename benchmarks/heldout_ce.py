"""Held-out cross-entropy and perplexity of one model on a data file, computed exactly as `distill --eval-data`
computes its eval_ce (same reading, templating, truncation to --seq-len, loss positions), so that a teacher can be
put beside its students' training curves.

    python benchmarks/heldout_ce.py default --data DATA/text-heldout.jsonl --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="checkpoint directory or 'default'")
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()

    from mamballama_cli.training.data import as_items, collate, encode_records, read_records
    from mamballama_cli.training.models import load_frozen

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, name = load_frozen(args.model, torch.float32 if device.type == "cpu" else torch.bfloat16, device,
                                   "model")
    items = as_items(encode_records(tok, read_records(args.data), args.seq_len))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(items), args.batch):
            b = collate(items[s:s + args.batch], pad)
            logits = model(input_ids=b["input_ids"].to(device)).logits.float()
            m = b["target_mask"].to(device)
            nll = torch.nn.functional.cross_entropy(logits[m], b["targets"].to(device)[m], reduction="sum")
            total += float(nll)
            count += int(m.sum())
    ce = total / count
    print(json.dumps({"model": str(name), "data": args.data, "seq_len": args.seq_len, "tokens": count,
                      "ce": ce, "perplexity": math.exp(ce)}))


if __name__ == "__main__":
    main()
