"""Cost of one speculative verify call vs one plain decode step, and the speedup they imply.

Target: a Llama-3-8B-shape hybrid with 25% attention (layers 3, 7, ..., 31), random weights, bf16.
Draft: a 4-layer Llama of the same width (what `convert --draft-layers 0,10,20,31` cuts), random weights,
run as an all-attention hybrid exactly as `generate --speculative` runs it on CUDA.

Measured on CUDA with every step captured in a CUDA graph and timed with CUDA events:
  plain_step_ms   one plain decode step of the target (generation/fast.py's StaticDecoder graph, the
                  engine `mamballama generate` uses on CUDA)
  verify_step_ms  one verify call on K+1 tokens (generation/speculative.py's graph: replay + K+1 steps)
  draft_step_ms   one draft step (one token)
  loop            an end-to-end `speculative_generate` run (random weights: the draft is almost never
                  accepted, so it measures the per-round cost including host-side acceptance)
Implied speedup at per-token acceptance a: tokens per call E = (1 - a^(K+1)) / (1 - a), and
  speedup = E * plain_step / (K * draft_step + verify_step + host overhead per round).

Usage (on the GPU machine):
  python benchmarks/speculative_verify.py --k 4 --context 512 --json runs/speculative_verify.json
  python benchmarks/speculative_verify.py --shape tiny --device cpu     # smoke test of the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from round_parts import cuda_time, no_replay_ms, round_parts  # noqa: E402

from mamballama_cli.ops.graph_timing import kernel_choices

SHAPES = {
    # Llama-3-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads, head dim 128, MLP 14336, vocab 128256.
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0),
}


def build_models(shape: str, ratio: float, draft_layers: int, dtype, device, gate: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    import mamballama_cli  # noqa: F401
    from mamballama_cli.convert.placement import attention_layers_for_ratio
    from mamballama_cli.generation.runners import as_hybrid
    from mamballama_cli.models.configuration import MamballamaConfig
    from mamballama_cli.models.modeling import MamballamaForCausalLM

    s = dict(SHAPES[shape])
    theta = s.pop("rope_theta")
    attn = attention_layers_for_ratio(s["num_hidden_layers"], ratio)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: an 8B model never exists in fp32
    try:
        with torch.device(device):
            torch.manual_seed(0)
            target = MamballamaForCausalLM(MamballamaConfig(
                **s, attn_layers=attn, rope_parameters={"rope_type": "default", "rope_theta": theta},
                tie_word_embeddings=False, rms_norm_eps=1e-5, mamba_gate=gate)).eval()
            dcfg = LlamaConfig(**{**s, "num_hidden_layers": draft_layers}, rope_theta=theta, rms_norm_eps=1e-5,
                               tie_word_embeddings=False)
            draft_llama = LlamaForCausalLM(dcfg).eval()
    finally:
        torch.set_default_dtype(old)
    draft = as_hybrid(draft_llama)
    return target, draft, attn


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def profile_tables(runner, pos: int, K: int, target, capacity: int, prompt, path: str, steps: int = 5) -> None:
    """Kernel tables of the verify call (K+1 tokens, all replayed) and of the plain decode step, both eager."""
    from mamballama_cli.generation.fast import StaticDecoder

    acts = [torch.profiler.ProfilerActivity.CUDA]
    tables = []
    ids = torch.zeros(1, K + 1, dtype=torch.long, device=runner.device)
    runner.pos_t.fill_(pos)
    runner.keep_t.fill_(K + 1)
    for _ in range(2):
        runner._walk(ids, runner.pos_t, runner.keep_t, True, 0, kv_len=None)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            runner._walk(ids, runner.pos_t, runner.keep_t, True, 0, kv_len=None)
        torch.cuda.synchronize()
    tables.append(f"verify call, K+1 = {K + 1}, eager, {steps} calls")
    tables.append(prof.key_averages().table(sort_by="device_time_total", row_limit=45, max_name_column_width=90))
    dec = StaticDecoder(target, 1, capacity, capture=False)
    dec.prefill(prompt)
    dec.decode(2)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            dec._step()
        torch.cuda.synchronize()
    tables.append(f"plain decode step (StaticDecoder), eager, {steps} steps")
    tables.append(prof.key_averages().table(sort_by="device_time_total", row_limit=45, max_name_column_width=90))
    dec = None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n\n".join(tables) + "\n")
    print(f"profiles written to {path}", file=sys.stderr)


def window_switches(args) -> dict:
    """Set the verify window's A/B switches from the options, before any kernel is chosen, and return them for the
    JSON: the window conv in the in_proj GEMV (``spec_conv``), the replay's early trigger (``replay_trigger``) and
    the split-norm replay tile's margin (``replay_norm_margin``), and whether the SwiGLU GEMV's autotuner has the
    paired tiles (``paired_glu``). The defaults leave every switch as it is."""
    from mamballama_cli.ops import replay_tiles

    if args.replay_norm_margin is not None:
        if not 0.0 <= args.replay_norm_margin < 1.0:
            raise SystemExit(f"error: --replay-norm-margin {args.replay_norm_margin}: give a share in [0, 1), "
                             "e.g. 0.05")
        replay_tiles.NORM_IN_KERNEL_MARGIN = args.replay_norm_margin
    out = {"replay_norm_margin": replay_tiles.NORM_IN_KERNEL_MARGIN}
    try:  # the Triton kernels' modules; without Triton nothing runs them, and the switches are moot
        from mamballama_cli.ops import triton_gemv_conv, triton_replay
    except Exception:  # noqa: BLE001 - no Triton here
        return {**out, "spec_conv": None, "replay_trigger": None, "paired_glu": None}
    from mamballama_cli.ops import gemv_tuning

    if args.no_paired_glu:
        gemv_tuning.without_paired()
    if args.no_spec_conv:
        triton_gemv_conv.SPEC_CONV = False
    if args.no_replay_trigger:
        triton_replay.EARLY_TRIGGER = False
    return {**out, "spec_conv": triton_gemv_conv.SPEC_CONV, "replay_trigger": triton_replay.EARLY_TRIGGER,
            "paired_glu": gemv_tuning.paired_offered()}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.25, help="attention fraction of the target")
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=512, help="prompt tokens before the timed steps")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--loop-tokens", type=int, default=128, help="new tokens of the end-to-end run (0: skip)")
    ap.add_argument("--no-gate", action="store_true",
                    help="the target's Mamba-2 mixers without the z projection and gate (convert --no-gate)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--gemv-extra", action="store_true",
                    help="offer the gemv op's EXTRA tiles (ops/gemv_candidates.py) to its 2-8-row autotuner beside "
                    "its candidates: the verify call with them (CUDA)")
    ap.add_argument("--gemv-graph-tiles", action="store_true",
                    help="choose each 2-8-row shape's tile again, for every GEMV kernel a verify call runs (plain, "
                    "SwiGLU, fused norm + GEMV, the conv epilogue), among its autotuner's fastest few by timing "
                    "them in CUDA graphs (ops/gemv_tuning.py): the verify call with those tiles (CUDA)")
    ap.add_argument("--no-spec-conv", action="store_true",
                    help="run a verify window's in_proj and conv apart, not the conv in the in_proj GEMV's epilogue "
                    "(ops/triton_gemv_conv.py SPEC_CONV): that epilogue's A/B over a verify call")
    ap.add_argument("--no-replay-trigger", action="store_true",
                    help="the replay kernel does not let the projection after it start early (ops/triton_replay.py "
                    "EARLY_TRIGGER): that launch's A/B over a verify call")
    ap.add_argument("--no-paired-glu", action="store_true",
                    help="the several-row SwiGLU GEMV's autotuner without its paired tiles (dotp, dotwp: gate and up "
                    "rows in one weight tile; ops/gemv_candidates.py PAIRED_TILES): their A/B over a verify call")
    ap.add_argument("--replay-norm-margin", type=float, default=None, metavar="SHARE",
                    help="keep a split-norm replay tile over the fastest tile unless that one is faster by more "
                    "than SHARE (ops/replay_tiles.py NORM_IN_KERNEL_MARGIN, default 0.05; 0: the fastest tile)")
    ap.add_argument("--no-replay-call", action="store_true",
                    help="also time a call on K+1 tokens without the replay (continuing a window from its live state, "
                    "round_parts' no_replay): the most a verify call could gain if the replay left the layer walk")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="write kernel tables (torch.profiler, eager) of the plain and verify steps here")
    ap.add_argument("--tuning", default=None, metavar="FILE",
                    help="take the kernels' tiles and per-shape choices from this tuning table where it was made on "
                    "the same code, software and GPU, and write this run's back to it (ops/tuning.py; the JSON's "
                    "'tuning' says whether it was used)")
    args = ap.parse_args()

    from mamballama_cli import ops
    from mamballama_cli.ops import tuning as tables

    if args.tuning:
        ab = [f for f, on in (("--gemv-extra", args.gemv_extra), ("--gemv-graph-tiles", args.gemv_graph_tiles),
                              ("--no-spec-conv", args.no_spec_conv), ("--no-replay-trigger", args.no_replay_trigger),
                              ("--no-paired-glu", args.no_paired_glu),
                              ("--replay-norm-margin", args.replay_norm_margin is not None)) if on]
        if ab:
            ap.error(f"{ab[0]} with --tuning: a kernel A/B times the choices afresh, which the table would hand both "
                     f"sides; leave --tuning out")
        tables.open_table(args.tuning)
    from mamballama_cli.generation.speculative import speculative_generate

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    graphs = device.type == "cuda"
    extra = []
    if (args.gemv_extra or args.gemv_graph_tiles) and graphs:
        from mamballama_cli.ops import gemv_tuning

        if args.gemv_extra:
            extra = gemv_tuning.offer_extra()
            print(f"gemv: {len(extra)} EXTRA tiles offered to the 2-8-row autotuner", file=sys.stderr)
        if args.gemv_graph_tiles:
            gemv_tuning.use_graph_tiles()
            print(f"gemv: every GEMV kernel's 2-8-row tiles chosen again among its autotuner's {gemv_tuning.TOP} "
                  "fastest in CUDA graphs", file=sys.stderr)
    switches = window_switches(args)
    K = args.k
    t0 = time.perf_counter()
    target, draft, attn = build_models(args.shape, args.ratio, args.draft_layers, dtype, device,
                                       gate=not args.no_gate)
    print(f"built target ({params(target) / 1e9:.2f}B params, attention layers {attn}) and draft "
          f"({params(draft) / 1e9:.2f}B params, {args.draft_layers} layers) in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, target.config.vocab_size, (1, args.context), generator=gen).to(device)
    capacity = args.context + 4 * args.iters + 64 + 2 * (K + 1)

    # 1-3. The plain decode step of `mamballama generate` (StaticDecoder), the same step through the speculative
    # runner, one verify call on K+1 tokens, one draft step: each captured the way speculative_generate runs it.
    profile = (lambda runner, pos: profile_tables(runner, pos, K, target, capacity, prompt, args.profile)) \
        if args.profile else None
    parts = round_parts(target, draft, prompt, K, capacity, args.iters, on_runner=profile)
    plain_ms, plain_engine = parts["plain_step_ms"], parts["plain_engine"]
    runner_plain_ms, verify_ms = parts["runner_plain_step_ms"], parts["verify_step_ms"]
    draft_ms = parts["draft_step_ms"]
    # printed now, so that a run cut short later (the loop and the captured round compile more) keeps its ratio
    print(f"[{time.perf_counter() - t0:.0f} s] parts: verify (K+1={K + 1}) {verify_ms[K + 1]:.3f} ms = "
          f"{verify_ms[K + 1] / plain_ms:.3f}x plain step {plain_ms:.3f} ms; draft step {draft_ms:.3f} ms",
          file=sys.stderr, flush=True)

    verify = verify_ms[K + 1]  # the most replay work a call can have (all K drafts and the bonus kept)

    def results(loop, captured) -> dict:
        """The JSON: the parts, and the end-to-end loop and captured round where they ran (``complete``)."""
        overhead = max(loop["host_overhead_ms_per_round"], 0.0) if loop else 0.0
        implied = {}
        for a in (0.6, 0.7, 0.8):
            e = (1 - a ** (K + 1)) / (1 - a)
            round_cost = K * draft_ms + verify
            implied[str(a)] = {"tokens_per_call": round(e, 3),
                               "speedup": round(e * plain_ms / round_cost, 3),
                               "speedup_with_host_overhead": round(e * plain_ms / (round_cost + overhead), 3)}
            if captured:
                implied[str(a)]["speedup_captured_round"] = round(e * plain_ms / captured["round_ms"], 3)
        result = {
            "benchmark": "speculative_verify",
            "date": datetime.date.today().isoformat(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"device": torch.cuda.get_device_name(device) if graphs else platform.processor() or "cpu",
                        "torch": torch.__version__, "python": platform.python_version()},
            "shape": args.shape, "dtype": args.dtype, "k": K, "context": args.context,
            "mamba_gate": not args.no_gate,
            "target_attention_layers": attn, "target_params": params(target), "draft_params": params(draft),
            "replay_backend": ops.dispatch("ssm_replay", device)[0],
            "verify_backends": parts["verify_backends"],
            "gemv_extra_offered": extra,
            "gemv_graph_tiles": bool(args.gemv_graph_tiles and graphs),
            "window_switches": switches,
            **kernel_choices(),
            "plain_engine": plain_engine,
            "plain_step_ms": round(plain_ms, 4),
            "runner_plain_step_ms": round(runner_plain_ms, 4),
            "verify_step_ms": round(verify, 4),
            "verify_step_ms_replay1": round(verify_ms[1], 4),
            **({"verify_step_ms_no_replay": round(parts["verify_step_ms_no_replay"], 4),
                "no_replay_over_plain": round(parts["verify_step_ms_no_replay"] / plain_ms, 3)}
               if "verify_step_ms_no_replay" in parts else {}),
            "draft_step_ms": round(draft_ms, 4),
            "verify_over_plain": round(verify / plain_ms, 3),
            "verify_target_met": verify / plain_ms <= 1.25,
            "implied": implied,
            "loop": loop,
            "captured_round": captured,
        }
        return result

    # written now, so that a run cut short later (the loop and the captured round compile more) keeps its parts
    write_json(args.json, {**results(None, None), "complete": False})
    if args.no_replay_call:  # after the verify call's own JSON: it compiles the replay op's no-old-steps form
        if graphs:
            torch.cuda.empty_cache()
        parts["verify_step_ms_no_replay"] = no_rep = no_replay_ms(target, prompt, K, capacity, args.iters)
        print(f"[{time.perf_counter() - t0:.0f} s] without the replay: {no_rep:.3f} ms = {no_rep / plain_ms:.3f}x",
              file=sys.stderr, flush=True)
        write_json(args.json, {**results(None, None), "complete": False})

    # 4. End to end (random weights: drafts are almost never accepted; this is the per-round cost).
    loop = None
    if args.loop_tokens:
        torch.cuda.empty_cache() if graphs else None
        res = speculative_generate(target, draft, prompt, k=K, max_new_tokens=args.loop_tokens,
                                   cuda_graphs=graphs)
        s = res.stats
        round_ms = (s.total_s - s.time_to_first_token_s) * 1000 / max(s.rounds, 1)
        loop = {"rounds": s.rounds, "acceptance_rate": round(s.acceptance_rate, 4),
                "tokens_per_call": round(s.tokens_per_call, 3), "round_ms": round(round_ms, 3),
                "host_overhead_ms_per_round": round(round_ms - K * draft_ms - verify_ms[1], 3),
                "tokens_per_s": round(s.tokens_per_s, 2)}

    # 5. The captured round (generation/captured_round.py): K draft steps, verify, acceptance and commit in one
    # graph. A round does the same work whatever is accepted, so replaying the graph times it.
    print(f"[{time.perf_counter() - t0:.0f} s] host loop: {loop}", file=sys.stderr, flush=True)
    captured = None
    if graphs and args.loop_tokens:
        from mamballama_cli.generation.captured_round import CapturedRounds

        torch.cuda.empty_cache()
        rr = CapturedRounds(target, draft, 1, capacity, K)
        _, st = rr.generate(prompt, args.loop_tokens)
        round_ms_captured = cuda_time(rr.graph.replay, args.iters)
        captured = {"round_ms": round(round_ms_captured, 4), "rounds": st["rounds"],
                    "acceptance_rate": round(st["acceptance_rate"], 4),
                    "round_over_parts": round(round_ms_captured / (K * draft_ms + verify_ms[K + 1]), 3)}
        rr.t.runtime = rr.d.runtime = None

    result = {**results(loop, captured), "complete": True}
    print(json.dumps(result, indent=2))
    print(f"verify (K+1={K + 1}) {verify:.3f} ms = {verify / plain_ms:.2f}x plain step {plain_ms:.3f} ms "
          f"({'meets' if result['verify_target_met'] else 'MISSES'} <= 1.25x); draft step {draft_ms:.3f} ms; "
          + ", ".join(f"a={a}: {v['speedup']}x" for a, v in result["implied"].items()), file=sys.stderr)
    write_json(args.json, result)


def write_json(path, result: dict) -> None:
    """Write the results to ``path`` (if given), atomically: a temporary name, then a rename."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
