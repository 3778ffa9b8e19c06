"""End-to-end speculative decoding vs plain decoding of the same target over held-out prompts (issue 18).

    python benchmarks/spec_eval.py TARGET --draft DRAFT -k 4 --data DATA --prompts 128 --max-new-tokens 128 \
        --json spec-eval.json

Prompts: the chat prompts of DATA/prompts-heldout.jsonl (through the chat template), then windows of
DATA/text-heldout.jsonl records (``--text-window`` tokens each, at spread offsets) until there are ``--prompts``.
Each prompt decodes ``--max-new-tokens`` tokens, greedy, no stop token (every engine writes the same number of
tokens), batch 1, three ways on the same target:

* plain: the static decoder (one captured CUDA graph per step on GPU);
* speculative, host loop: ``speculative_generate`` (a CUDA graph per draft step and per verify call);
* speculative, captured round: ``CapturedRounds`` (the whole round in one CUDA graph).

Reported per engine: decode tokens/s over all prompts (tokens after the first over the time after the first
token), and for the speculative engines acceptance, tokens per verify call, the speedup over plain, and how many
prompts gave exactly the plain greedy tokens (bf16 verify and decode round differently, so a near-tie can flip).
For a draft that reads tokens only (not a feature draft), ``simulated`` beside each speculative engine is what its
quality allows: the accepted counts that greedy rounds must give over the plain tokens, from one teacher-forced
pass of the draft over them (``generation.acceptance.greedy_rounds``); a measured acceptance well below it points
at the round, not at the draft.
Every engine runs one untimed prompt first (compilation, graph capture). Then the parts of a round on their own
(benchmarks/round_parts.py, at the first prompt's length): plain step, verify call on K+1 tokens, draft step, and
the captured round replayed (and replayed again with the commit's reference instead of its kernel: the
kernel's share), so that a speedup short of its aim can be traced to what a round costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import run_facts, write_result  # noqa: E402
from round_parts import cuda_time, round_parts  # noqa: E402

from mamballama_cli.ops.graph_timing import kernel_choices


def held_out_prompts(tok, data: Path, n: int, window: int) -> list[list[int]]:
    from mamballama_cli.generation.plain import encode_prompt

    out = []
    chat = data / "prompts-heldout.jsonl"
    if chat.exists():
        for line in chat.read_text().splitlines():
            if line.strip() and len(out) < n:
                out.append(encode_prompt(tok, json.loads(line)["prompt"], chat=True)[0].tolist())
    texts = [json.loads(x)["text"] for x in (data / "text-heldout.jsonl").read_text().splitlines() if x.strip()]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = [t for t in ids if len(t) >= window + 1]
    k = 0
    while len(out) < n and ids:
        t = ids[k % len(ids)]
        turn = k // len(ids)  # later passes take later windows of each record
        start = (turn * window * 3) % max(1, len(t) - window)
        out.append(t[start : start + window])
        k += 1
    return out[:n]


def parse_ks(text: str) -> list[int]:
    """``-k``: one window or a comma list, each at least 1."""
    try:
        ks = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise SystemExit(f"-k {text!r}: give the draft window, or a comma list such as 2,3,4 (each at least 1)")
    return ks


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("--draft", required=True)
    ap.add_argument("-k", default="4", help="the draft window, or a comma list (2,3,4): each K measured in this one "
                    "process against one plain run (one model load and one warm-up for all)")
    ap.add_argument("--data", required=True, help="a `mamballama data build` output (held-out files)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--text-window", type=int, default=192)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--engines", default="plain,loop,round")
    ap.add_argument("--parts-iters", type=int, default=100,
                    help="calls per part when timing a round's parts on their own (0: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ks = parse_ks(args.k)

    from mamballama_cli.generation.acceptance import teacher_forced_agreement
    from mamballama_cli.generation.captured_round import acceptance_by_position
    from mamballama_cli.generation.fast import StaticDecoder
    from mamballama_cli.generation.lookup import is_lookup_draft
    from mamballama_cli.generation.speculative_run import prepare_pair
    from mamballama_cli.loading import load_causal_lm
    from mamballama_cli.models.feature_draft import is_feature_draft

    target, tok, path = load_causal_lm(args.target, dtype=args.dtype, device=args.device)
    target, draft, draft_name = prepare_pair(target, tok, path, args.target, args.draft, args.dtype, args.device)
    device = target.lm_head.weight.device
    prompts = held_out_prompts(tok, Path(args.data), args.prompts, args.text_window)
    n_new = args.max_new_tokens
    capacity = -(-(max(map(len, prompts)) + n_new + 2 * (max(ks) + 1)) // 256) * 256
    engines = args.engines.split(",")
    if (is_feature_draft(draft) or is_lookup_draft(draft)) and "loop" in engines:  # the verify call's features,
        engines.remove("loop")  # or the device-side history
        print(f"the {draft_name} draft runs in captured rounds only: the host loop is skipped", file=sys.stderr)
    print(f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), {n_new} new tokens, "
          f"K={','.join(map(str, ks))}, {device}", file=sys.stderr)

    results: dict = {}
    plain_tokens: list[list[int]] = []
    if "plain" in engines:
        dec = StaticDecoder(target, 1, capacity)

        def plain(ids):
            first = dec.prefill(ids)
            first.tolist()
            t = time.perf_counter()
            dec.decode(n_new - 1, sync_every=1 << 30)
            sync(device)
            return dec.tokens_so_far()[0].tolist(), time.perf_counter() - t, {}

        results["plain"] = run_engine("plain", plain, prompts, device)
        plain_tokens = results["plain"].pop("_tokens")
        dec = None
    agreement = None
    # what the draft's quality allows (a feature draft's later proposals read its own features, which a
    # teacher-forced pass cannot give; the lookup draft has its own simulation below)
    if plain_tokens and not is_feature_draft(draft) and not is_lookup_draft(draft):
        agreement = [teacher_forced_agreement(draft, p, t) for p, t in zip(prompts, plain_tokens)]
        print(f"draft's teacher-forced agreement with the plain greedy tokens: {agreement_share(agreement):.4f}",
              file=sys.stderr)
    runs = []
    for K in ks:  # the plain engine is measured once and compared with every K
        if len(ks) > 1:
            print(f"K={K}", file=sys.stderr)
        speculative = speculative_at(target, draft, K, prompts, n_new, capacity, engines, args.parts_iters, device)
        engines_k = {**({"plain": results["plain"]} if "plain" in results else {}), **speculative.pop("engines")}
        for name in ("loop", "round"):
            r = engines_k.get(name)
            if not r:
                continue
            toks = r.pop("_tokens")
            if plain_tokens:
                r["matches_plain"] = sum(a == b for a, b in zip(toks, plain_tokens))
                r["speedup"] = round(r["decode_tok_s"] / results["plain"]["decode_tok_s"], 3)
            r["acceptance_rate"] = round(r["accepted"] / max(1, r["drafted"]), 4)
            r["tokens_per_call"] = round((r["accepted"] + r["calls"]) / max(1, r["calls"]), 3)
            if "accepted_hist" in r:  # p_i: draft i accepted, given drafts 1..i-1 were
                r["acceptance_by_position"] = acceptance_by_position(r["accepted_hist"])
            if agreement is not None:
                r["simulated"] = simulated_rounds(agreement, K, n_new)
            elif plain_tokens and is_lookup_draft(draft):
                r["simulated"] = simulated_lookup(draft, prompts, plain_tokens, K)
        runs.append({"k": K, "engines": engines_k, "parts": speculative["parts"]})
        if len(ks) > 1:  # each window's result on disk as it finishes: a run cut short keeps the ones done
            write_result(sweep_result(args, target, draft_name, device, ks, prompts, n_new, runs), args.json)
    result = sweep_result(args, target, draft_name, device, ks, prompts, n_new, runs)
    if len(runs) == 1:  # one K: the flat layout of the earlier results
        del result["runs"], result["done"]
        result.update(k=runs[0]["k"], engines=runs[0]["engines"], parts=runs[0]["parts"])
    else:
        for run in runs:
            r = run["engines"].get("round") or run["engines"].get("loop") or {}
            print(f"K={run['k']}: speedup {r.get('speedup')}, tokens per call {r.get('tokens_per_call')}, "
                  f"by position {r.get('acceptance_by_position')}; the draft's agreement allows "
                  f"{(r.get('simulated') or {}).get('tokens_per_call')}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    write_result(result, args.json)


def agreement_share(agreement: list[list[bool]]) -> float:
    """The share of positions (the first of each prompt left out: a round never uses it) where the draft agrees."""
    return sum(sum(a[1:]) for a in agreement) / max(1, sum(len(a) - 1 for a in agreement))


def simulated_rounds(agreement: list[list[bool]], K: int, n_new: int) -> dict:
    """What greedy rounds at window K accept over the plain run's tokens, given the draft's teacher-forced agreement
    with them (``generation.acceptance.greedy_rounds``): the engine should accept this (its last round per prompt
    may accept a little more, seeing past the plain tokens); much less points at the round, not the draft."""
    from mamballama_cli.generation.acceptance import greedy_rounds

    counts = [m for a in agreement for m in greedy_rounds(a, K, n_new)]
    return {"agreement": round(agreement_share(agreement), 4), **rounds_summary(counts, K)}


def simulated_lookup(draft, prompts, plain_tokens, K: int) -> dict:
    """What greedy lookup rounds accept over the plain run's tokens (``generation.lookup.simulate_lookup``, the
    plain-Python twin of the proposals): the engine should accept exactly this where its tokens equal plain's."""
    from mamballama_cli.generation.lookup import simulate_lookup

    counts, used, steps = [], [], []
    for p, t in zip(prompts, plain_tokens):
        counts += simulate_lookup(p, t, K, draft, from_table=used, gate=draft.gate, steps=steps)
    calls = [c for c, s in zip(counts, steps) if not s]  # a gated draft's one-token rounds apart
    out = rounds_summary(calls, K)
    if draft.gate:
        out["step_calls"] = sum(steps)
    if draft.loaded is not None:
        out.update(table_split(calls, [u for u, s in zip(used, steps) if not s], K))
    return out


def table_split(counts: list[int], from_table: list[bool], K: int) -> dict:
    """With an n-gram table: the share of rounds whose first proposal the table wrote, and tokens per call in those
    rounds and in the others (the context's)."""
    table = [c for c, u in zip(counts, from_table) if u]
    ctx = [c for c, u in zip(counts, from_table) if not u]

    def per_call(cs):
        return rounds_summary(cs, K)["tokens_per_call"] if cs else None

    return {"table_rounds": round(len(table) / max(1, len(counts)), 4), "table_tokens_per_call": per_call(table),
            "context_tokens_per_call": per_call(ctx)}


def rounds_summary(counts: list[int], K: int) -> dict:
    """Accepted counts of simulated rounds -> their histogram, tokens per call and acceptance by position."""
    from mamballama_cli.generation.acceptance import accepted_hist
    from mamballama_cli.generation.captured_round import acceptance_by_position

    hist = accepted_hist(counts, K)
    return {"accepted_hist": hist, "tokens_per_call": round((sum(counts) + len(counts)) / max(1, len(counts)), 3),
            "acceptance_by_position": acceptance_by_position(hist)}


def sweep_result(args, target, draft_name, device, ks, prompts, n_new: int, runs: list) -> dict:
    """The JSON of a run over several windows, with the ``runs`` finished so far (``done`` of ``k``)."""
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"benchmark": "spec_eval", **run_facts(None), "machine": machine, "dtype": str(target.dtype),
            "target": args.target, "draft": draft_name, "k": ks, "done": [run["k"] for run in runs],
            "prompts": len(prompts), "new_tokens": n_new, "runs": runs, **kernel_choices()}


def speculative_at(target, draft, K: int, prompts, n_new: int, capacity: int, engines, parts_iters: int,
                   device) -> dict:
    """The speculative engines at window K over the prompts, and a round's parts timed on their own:
    ``{"engines": {"loop": ..., "round": ...}, "parts": ...}`` (the rows still hold their ``_tokens``)."""
    from mamballama_cli.generation.feature_round import make_rounds
    from mamballama_cli.generation.speculative import speculative_generate

    results: dict = {}
    round_ms = round_ms_commit_ref = step_round_ms = None
    if "loop" in engines:
        def loop(ids):
            res = speculative_generate(target, draft, ids, k=K, max_new_tokens=n_new)
            s = res.stats
            return res.tokens[0], s.total_s - s.time_to_first_token_s, {"accepted": s.accepted, "drafted": s.drafted,
                                                                         "calls": s.row_rounds}

        results["loop"] = run_engine("speculative, host loop", loop, prompts, device)
    if "round" in engines:
        rounds = make_rounds(target, draft, 1, capacity, K)

        def captured(ids):
            out, st = rounds.generate(ids, n_new)
            return out[0], st["seconds"] - st["prefill_s"], {"accepted": st["accepted"],
                                                              "drafted": K * st["row_rounds"],
                                                              "calls": st["row_rounds"],
                                                              "accepted_hist": st["accepted_hist"],
                                                              # a gated lookup draft's one-token rounds
                                                              "step_calls": st.get("step_row_rounds", 0)}

        results["round"] = run_engine("speculative, captured round", captured, prompts, device)
        if parts_iters:  # the round replayed (eagerly off CUDA): the same work whatever is accepted
            round_ms = cuda_time(rounds.graph.replay if rounds.graph is not None else rounds._round, parts_iters)
            if getattr(getattr(rounds, "lookup", None), "gate", 0):
                step = rounds.step_graph.replay if rounds.step_graph is not None else rounds._step_round
                step_round_ms = cuda_time(step, parts_iters)  # a gated lookup draft's one-token round
        free_rounds(rounds)
        rounds = None
        if parts_iters:  # the same round with the commit's reference instead of its kernel (A/B)
            try:
                round_ms_commit_ref = replayed_round_ms(target, draft, capacity, K, prompts[0], device,
                                                        parts_iters, "ref:commit_round")
            except Exception as exc:  # an auxiliary number must not cost the run its results
                print(f"commit A/B skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
    parts = None
    if parts_iters:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        parts = round_parts(target, draft, torch.tensor([prompts[0]], device=device), K, capacity, parts_iters)
        parts = {k: ({r: (round(x, 4) if isinstance(x, float) else x) for r, x in v.items()} if isinstance(v, dict) else
                     round(v, 4) if isinstance(v, float) else v) for k, v in parts.items()}
        parts["sum_ms"] = round(K * parts["draft_step_ms"] + parts["verify_step_ms"][K + 1], 4)
        if "round" in results:
            r = results["round"]
            parts["round_ms_end_to_end"] = round(r["decode_s"] * 1000 / max(1, r["calls"] + r.get("step_calls", 0)),
                                                 4)  # per round, one-token rounds (a gated draft's) included
            if round_ms is not None:
                parts["round_ms_replayed"] = round(round_ms, 4)
            if step_round_ms is not None:
                parts["step_round_ms_replayed"] = round(step_round_ms, 4)
            if round_ms_commit_ref is not None:
                parts["round_ms_replayed_commit_ref"] = round(round_ms_commit_ref, 4)
        print("parts: " + json.dumps(parts), file=sys.stderr)
    return {"engines": results, "parts": parts}


def replayed_round_ms(target, draft, capacity: int, K: int, prompt, device, iters: int, kernels: str) -> float:
    """A captured round's replay time with the op choice ``kernels`` (``ops.configure``) at its capture."""
    from mamballama_cli import ops
    from mamballama_cli.generation.feature_round import make_rounds

    saved = {k: os.environ.get(k) for k in ("MAMBALLAMA_KERNELS", "MAMBALLAMA_REF_OPS")}  # configure() sets these
    ops.configure(kernels)
    try:
        rounds = make_rounds(target, draft, 1, capacity, K)
        rounds.generate(torch.tensor([prompt], device=device), 8)
        ms = cuda_time(rounds.graph.replay if rounds.graph is not None else rounds._round, iters)
        free_rounds(rounds)
        return ms
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_rounds(rounds) -> None:
    """Drop the rounds' runtimes (their static buffers) before the next measurement allocates its own."""
    for runner in (rounds.t, rounds.d):
        if runner is not None:  # a lookup round has no draft runner
            runner.runtime = None


def run_engine(label: str, fn, prompts, device) -> dict:
    fn(torch.tensor([prompts[0]], device=device))  # untimed: compilation and graph capture
    tokens, total_new, total_s, extra = [], 0, 0.0, {"accepted": 0, "drafted": 0, "calls": 0}
    for p in prompts:
        out, seconds, more = fn(torch.tensor([p], device=device))
        tokens.append(out)
        total_new += max(0, len(out) - 1)
        total_s += seconds
        for key, v in more.items():  # counts, or lists of counts (accepted_hist), added up over the prompts
            if isinstance(v, list):
                extra[key] = [a + b for a, b in zip(extra.get(key) or [0] * len(v), v)]
            else:
                extra[key] = extra.get(key, 0) + v
    rate = total_new / total_s if total_s > 0 else float("nan")
    print(f"{label}: {total_new} decode tokens in {total_s:.2f} s = {rate:.1f} tok/s", file=sys.stderr)
    row = {"decode_tokens": total_new, "decode_s": round(total_s, 4), "decode_tok_s": round(rate, 2),
           "_tokens": tokens}
    if extra["drafted"] or extra.get("step_calls"):  # a speculative engine (a gated one may not have verified)
        row.update(extra)
    return row


if __name__ == "__main__":
    main()
