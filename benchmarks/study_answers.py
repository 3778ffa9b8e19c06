"""Greedy answers of several models to the same held-out prompts, side by side in one Markdown file.

    python benchmarks/study_answers.py --prompts DATA/prompts-heldout.jsonl -n 5 \
        --models teacher=default,d50=runs/study/run-d50 --output answers.md

Prompts are taken spread over the file (every len/n-th), so that every source of the data set shows up.
A model that does not exist (a run that failed) is listed as missing instead of stopping the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--models", required=True, help="name=spec,name=spec,...")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()

    from mamballama_cli.generation.plain import encode_prompt, generate
    from mamballama_cli.generation.sampling import SamplingConfig
    from mamballama_cli.loading import load_causal_lm

    rows = [json.loads(x) for x in Path(args.prompts).read_text().splitlines() if x.strip()]
    step = max(1, len(rows) // args.n)
    prompts = [rows[i]["prompt"] for i in range(0, len(rows), step)][: args.n]
    answers: dict[str, list[str]] = {}
    for item in args.models.split(","):
        name, _, spec = item.partition("=")
        try:
            if spec == "default":
                from mamballama_cli.convert.teacher import load_teacher

                model, tok, _ = load_teacher("default")
                model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
            else:
                model, tok, _ = load_causal_lm(spec)
        except Exception as exc:  # a failed run: say so and go on
            print(f"{name}: cannot load {spec}: {type(exc).__name__}: {exc}", file=sys.stderr)
            answers[name] = [f"(missing: {type(exc).__name__})"] * len(prompts)
            continue
        out = []
        for p in prompts:
            ids = encode_prompt(tok, p, chat=True)
            res = generate(model, tok, ids, SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0))
            out.append(res.text.strip())
        answers[name] = out
        print(f"{name}: {len(out)} answers", file=sys.stderr)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    lines = [f"# Greedy answers to {len(prompts)} held-out prompts ({args.max_new_tokens} new tokens at most)", ""]
    for i, p in enumerate(prompts):
        lines += [f"## Prompt {i + 1}", "", "> " + p.replace("\n", "\n> "), ""]
        for name, outs in answers.items():
            lines += [f"**{name}**", "", "```text", outs[i], "```", ""]
    Path(args.output).write_text("\n".join(lines))
    print(json.dumps({"prompts": len(prompts), "models": list(answers)}))


if __name__ == "__main__":
    main()
