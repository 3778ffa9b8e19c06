"""How far can a hybrid's long-context throughput go past its teacher's? A bytes-per-step model (issue 17).

At a long context and a large batch, a decode step of the static engine is bound by memory traffic: every
step reads the weights once, each sequence's K/V (attention layers) and reads and writes each sequence's Mamba
state. At the teacher's bandwidth efficiency, throughput is then tokens per byte moved:

    tokens per step / bytes per step = B / (weights read + B * (K/V per sequence + 2 * state per sequence))

This script builds the models on the meta device (no memory, no GPU), takes each one's bytes from the same
accounting the engine uses (``static_cache_bytes``, the cache's ``memory_bytes``, the weights read per token),
finds each one's largest batch under a memory budget (``estimate_bytes``, as ``eval speed --max-batch`` does),
or takes the batches measured, and prints the hybrid-over-teacher ratio that the byte counts allow. A measured
ratio below it is bandwidth efficiency lost; a target above it cannot be met at that attention ratio.

    python benchmarks/kv_budget.py --shape llama3-8b --context 32768 --ratios 0.5,0.25,0.125
    python benchmarks/kv_budget.py --batches teacher=24,0.25=110     # the H200's measured largest batches
"""

from __future__ import annotations

import argparse
import json
import sys


def model_bytes(shape: str, ratio: float | None, context: int, new_tokens: int, gate: bool = True) -> dict:
    """A model of ``shape`` with ``ratio`` of its layers keeping attention (None: the teacher, all attention,
    as the engine runs it; ``gate``: Mamba-2's z projection, False as convert --no-gate): the bytes one decode
    step moves per sequence and in all."""
    import torch

    from mamballama_cli.convert.placement import attention_layers_for_ratio
    from mamballama_cli.evaluation.shapes import hybrid_config, random_model, teacher_config
    from mamballama_cli.generation.fast import static_cache_bytes
    from mamballama_cli.models.cache import HybridCache
    from mamballama_cli.models.modeling import MamballamaForCausalLM

    tc = teacher_config(shape)
    n = tc.num_hidden_layers
    layers = list(range(n)) if ratio is None else attention_layers_for_ratio(n, ratio)
    config = hybrid_config(tc, layers, **({} if gate else {"mamba_gate": False}))
    model = random_model(MamballamaForCausalLM, config, torch.bfloat16, torch.device("meta"))
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tied = emb is head
    read = total - (0 if tied else emb.numel() * emb.element_size())  # an untied table: one row per token
    one = HybridCache(model, 1, dtype=torch.bfloat16, device="meta", max_length=1)
    cfg, cap = model.config, context + new_tokens
    return {"model": model, "attention_layers": len(layers), "weights": total, "weights_read": read,
            # a sequence's K/V at the full context (what the last decode step reads), and what a sequence adds
            # to the static cache (its K/V and token history; the rotary tables are shared)
            "kv_per_seq": 2 * len(layers) * cfg.num_key_value_heads * cap * cfg.head_dim * 2,
            "cache_per_seq": static_cache_bytes(model, 2, cap) - static_cache_bytes(model, 1, cap),
            "state_per_seq": one.memory_bytes()["state_bytes"]}


def largest_batch(m: dict, context: int, new_tokens: int, budget: float) -> int:
    """The largest batch whose weights plus ``estimate_bytes`` (cache, state, one prefill piece) fit ``budget``:
    the search of ``eval speed --max-batch``, on the estimate alone."""
    from mamballama_cli.evaluation import speed_limit

    def attempt(b):
        fits = m["weights"] + speed_limit.estimate_bytes(m["model"], b, context, new_tokens, None) <= budget
        return {} if fits else {"error": "over budget"}

    return speed_limit.largest_batch(attempt)[0]


def step(m: dict, batch: int) -> dict:
    traffic = m["weights_read"] + batch * (m["kv_per_seq"] + 2 * m["state_per_seq"])
    return {"batch": batch, "bytes_per_step": traffic, "tokens_per_gb": batch / traffic * 1e9,
            "kv_bytes": batch * m["kv_per_seq"], "state_bytes": batch * m["state_per_seq"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=32, help="decode tokens after the context (as --max-batch)")
    ap.add_argument("--ratios", default="0.25", help="attention ratios of the hybrids, comma-separated (a trailing "
                    "'ng', e.g. 0.25ng: that hybrid without Mamba-2's z projection, convert --no-gate)")
    ap.add_argument("--memory-gb", type=float, default=150.7, help="device memory (the H200's: 143,771 MiB)")
    ap.add_argument("--batches", default=None,
                    help="measured largest batches instead of the estimate, e.g. teacher=24,0.25=110")
    ap.add_argument("--bandwidth-tbs", type=float, default=None,
                    help="also predict tokens/s at this read bandwidth (e.g. the teacher's measured one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    given = dict(kv.split("=") for kv in args.batches.split(",")) if args.batches else {}
    names = ["teacher"] + [r.strip() for r in args.ratios.split(",") if r.strip()]
    rows = {}
    for name in names:
        ratio = None if name == "teacher" else float(name.removesuffix("ng"))
        m = model_bytes(args.shape, ratio, args.context, args.new_tokens, gate=not name.endswith("ng"))
        b = int(given[name]) if name in given else largest_batch(m, args.context, args.new_tokens,
                                                                args.memory_gb * 1e9)
        row = {"attention_layers": m["attention_layers"], "weights_read": m["weights_read"],
               "kv_per_seq": m["kv_per_seq"], "cache_per_seq": m["cache_per_seq"], "state_per_seq": m["state_per_seq"],
               "batch_from": "given" if name in given else "estimate", **step(m, b)}
        if args.bandwidth_tbs:
            row["tok_s_at_bandwidth"] = args.bandwidth_tbs * 1e3 * row["tokens_per_gb"]
        rows[name] = row
    t = rows["teacher"]["tokens_per_gb"]
    for name in names[1:]:
        rows[name]["over_teacher_at_equal_efficiency"] = rows[name]["tokens_per_gb"] / t
    result = {"benchmark": "kv_budget", "command": " ".join(["python", *sys.argv]) if argv is None else argv,
              "shape": args.shape, "context": args.context, "new_tokens": args.new_tokens,
              "memory_gb": args.memory_gb, "rows": rows}
    print(f"{args.shape}, context {args.context} + {args.new_tokens}: bytes per decode step at the largest batch")
    print(f"{'model':>8} {'attn':>4} {'batch':>6} {'K/V/seq':>9} {'state/seq':>9} {'GB/step':>8} {'tok/GB':>7} "
          f"{'x teacher':>9}")
    for name, r in rows.items():
        ratio = r.get("over_teacher_at_equal_efficiency")
        print(f"{name:>8} {r['attention_layers']:>4} {r['batch']:>6} {r['kv_per_seq'] / 1e9:>8.3f}G "
              f"{r['state_per_seq'] / 1e6:>8.1f}M {r['bytes_per_step'] / 1e9:>8.1f} {r['tokens_per_gb']:>7.3f} "
              f"{'' if ratio is None else f'{ratio:.2f}x':>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
