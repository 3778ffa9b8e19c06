"""Which attention layers a model needs for passkey retrieval: each layer's attention output zeroed in turn.

    python benchmarks/passkey_layers.py default --length 1024 --trials 2 --out passkey_layers.json

Builds the passkey prompts of `mamballama eval --tasks passkey` (evaluation/retrieval.py; depths 0, 0.5, 1,
``--trials`` each, seed 1234), appends the key, and scores the key's tokens teacher-forced: a trial is retrieved
when every key token is the argmax. Reports, for no layer zeroed and for each layer zeroed alone (and for any
``--sets`` of layers zeroed together), the keys retrieved and the mean log-probability of the key.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", help="a teacher spec (default, a local folder)")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--sets", default="", help="name=l1/l2/...;name=... layer sets to zero together")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from mamballama_cli.convert.teacher import load_teacher
    from mamballama_cli.evaluation.retrieval import PASSKEY, PromptBuilder

    model, tok, _ = load_teacher(args.teacher)
    model = model.float().eval()
    pb = PromptBuilder(PASSKEY, tok)
    trials = [pb.build(args.length, d, i, 1234) for d in (0.0, 0.5, 1.0) for i in range(args.trials)]
    batch = [(tok(t.prompt)["input_ids"], tok(" " + t.key, add_special_tokens=False)["input_ids"]) for t in trials]
    layers = model.model.layers

    def score(zero) -> dict:
        hooks = [layers[i].self_attn.register_forward_hook(
            lambda m, a, out: (torch.zeros_like(out[0]),) + tuple(out[1:])) for i in zero]
        hit, lp = 0, 0.0
        try:
            with torch.no_grad():
                for p, k in batch:
                    logits = model(input_ids=torch.tensor([p + k])).logits[0, len(p) - 1:-1].float().log_softmax(-1)
                    tgt = torch.tensor(k)
                    hit += int((logits.argmax(-1) == tgt).all())
                    lp += float(logits.gather(1, tgt[:, None]).sum())
        finally:
            for h in hooks:
                h.remove()
        return {"retrieved": hit, "of": len(batch), "mean_key_logprob": lp / len(batch)}

    res = {"length": args.length, "trials": len(batch), "none": score([])}
    print("none", res["none"], flush=True)
    for item in filter(None, args.sets.split(";")):
        name, _, spec = item.partition("=")
        res[name] = score([int(x) for x in spec.split("/")])
        print(name, res[name], flush=True)
    res["one_layer_zeroed"] = {}
    for i in range(len(layers)):
        res["one_layer_zeroed"][i] = score([i])
        print(i, res["one_layer_zeroed"][i], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
