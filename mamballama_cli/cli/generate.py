"""`mamballama generate MODEL --prompt TEXT` (text to stdout as produced, timing to stderr)."""

from __future__ import annotations

import math
from typing import Optional

import typer

from mamballama_cli.output import out

HELP = "Generate text from a hybrid or Transformer checkpoint (stdout: text, stderr: timing)."


def command(
    model: str = typer.Argument(..., help="Checkpoint directory (hybrid or transformers model), or 'default'."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text; '-' reads stdin."),
    chat: bool = typer.Option(False, "--chat", help="Apply the tokenizer's chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (with --chat)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="New tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling: keep the most likely "
                                "tokens until their mass reaches this probability, with every token tied at the "
                                "cut (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="0 = off."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (with --temperature > 0)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    stats_json: Optional[str] = typer.Option(None, "--stats-json", help="Write timing statistics as JSON here."),
    # --- speculative decoding (generation/speculative.py) ---
    speculative: bool = typer.Option(False, "--speculative", help="Speculative decoding (lossless), with --draft "
                                     "or, without it, lookup:3:gate=2."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Draft: lookup[:N][:TABLE][:gate=M] (no model: copies "
                                        "from the context, TABLE from `data ngrams`), a checkpoint dir sharing the "
                                        "tokenizer (e.g. from `convert --draft-layers`), or a provider NAME[:ARG] "
                                        "(self, teacher, layers:0,29, or a mamballama.drafts plugin). Implies "
                                        "--speculative."),
    draft_k: int | None = typer.Option(None, "-k", "--draft-tokens", help="Draft tokens per target call (K; "
                                          "default 6 with a lookup draft, 4 with a model)."),
    adaptive_k: bool = typer.Option(False, "--adaptive-k", help="With --speculative: -k is the largest window; "
                                    "each round's grows after a fully kept window and shrinks after one that "
                                    "kept fewer than half (still lossless)."),
    round_graph: bool = typer.Option(False, "--round-graph", help="With --speculative: run each whole round "
                                     "(draft steps, verify, acceptance, commit) on the device, one CUDA graph per "
                                     "round on GPU; hybrid target and draft, fixed -k; text comes at the end."),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs",
                                               help="Capture the verify and draft steps in CUDA graphs (default: "
                                               "on with CUDA)."),
    compare_plain: bool = typer.Option(True, "--compare-plain/--no-compare-plain",
                                       help="With --speculative, also time the target's plain decoding of the same "
                                       "prompt and length (speedup in the statistics)."),
    draft_runner: str = typer.Option("auto", "--draft-runner", help="auto, hybrid, transformers or refeed."),
    engine: str = typer.Option("auto", "--engine", help="Plain decoding: auto (hybrids on the static decoder: a "
                               "CUDA-graph step on GPU, the same step eagerly on CPU; other models on "
                               "transformers), static, transformers."),
):
    from mamballama_cli.cli.common import err, read_prompt
    from mamballama_cli.generation.plain import check_request, encode_prompt, generate
    from mamballama_cli.generation.sampling import SamplingConfig
    from mamballama_cli.loading import load_causal_lm

    text = read_prompt(prompt)
    if stats_json:  # a path that cannot be written fails now, not after loading and decoding
        from mamballama_cli.io import check_output_file

        check_output_file(stats_json, "--stats-json")
    if speculative or draft:
        from mamballama_cli.config import merge_config
        from mamballama_cli.generation.speculative_run import SpeculativeConfig, format_stats, run_speculative

        cfg = merge_config(SpeculativeConfig, overrides=dict(
            target=model, draft=draft or "", k=draft_k, prompt=text, chat=chat, system=system,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            dtype=dtype, device=device, cuda_graphs=cuda_graphs, compare_plain=compare_plain,
            draft_runner=draft_runner, adaptive_k=adaptive_k or None,
            round_graph=round_graph or None))
        spec_stats = run_speculative(cfg, on_text=lambda piece: out(piece, end=""))
        out()
        err(format_stats(spec_stats))
        if stats_json:
            from mamballama_cli.io import write_json_atomic

            write_json_atomic(stats_json, {k: v for k, v in spec_stats.items() if k != "text"})
        return
    lm, tok, path = load_causal_lm(model, dtype=dtype, device=device)
    if tok is None:
        from mamballama_cli.errors import MamballamaError

        raise MamballamaError(f"model {model!r} has no tokenizer files; convert it again or copy the teacher's")
    ids = encode_prompt(tok, text, chat, system)
    check_request(lm, ids.shape[1], max_new_tokens, engine)
    sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k, seed)

    def emit(piece: str) -> None:
        out(piece, end="")

    result = generate(lm, tok, ids, sampling, on_text=emit, engine=engine)
    out()
    rate = result.decode_tokens_per_s
    stats = {
        "model": str(path),
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        "time_to_first_token_s": round(result.time_to_first_token_s, 4),
        "total_s": round(result.total_s, 4),
        "decode_tokens_per_s": round(rate, 2),  # NaN under two new tokens: null in the file (write_json_atomic)
        "device": str(next(lm.parameters()).device),
        "dtype": str(next(lm.parameters()).dtype).replace("torch.", ""),
        "engine": result.engine,
    }
    decode = f"decode {rate:.1f} tok/s" if math.isfinite(rate) else "no decode rate (fewer than 2 new tokens)"
    err(f"[{stats['prompt_tokens']} prompt tokens, {stats['new_tokens']} new; first token "
        f"{stats['time_to_first_token_s']:.3f} s; {decode} on {stats['device']} {stats['dtype']}, {stats['engine']}]")
    if stats_json:
        from mamballama_cli.io import write_json_atomic

        write_json_atomic(stats_json, stats)
