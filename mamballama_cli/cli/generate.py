"""`mamballama generate MODEL --prompt TEXT` (text to stdout as produced, timing to stderr)."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

HELP = "Generate text from a hybrid or Transformer checkpoint (stdout: text, stderr: timing)."


def command(
    model: str = typer.Argument(..., help="Checkpoint directory (hybrid or transformers model), or 'default'."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text; '-' reads stdin."),
    chat: bool = typer.Option(False, "--chat", help="Apply the tokenizer's chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (with --chat)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    top_k: int = typer.Option(0, "--top-k", min=0, help="0 = off."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    stats_json: Optional[str] = typer.Option(None, "--stats-json", help="Write timing statistics as JSON here."),
):
    from mamballama_cli.cli.common import err, read_prompt
    from mamballama_cli.generation.plain import SamplingConfig, encode_prompt, generate
    from mamballama_cli.loading import load_causal_lm

    text = read_prompt(prompt)
    lm, tok, path = load_causal_lm(model, dtype=dtype, device=device)
    if tok is None:
        from mamballama_cli.errors import MamballamaError

        raise MamballamaError(f"model {model!r} has no tokenizer files; convert it again or copy the teacher's")
    ids = encode_prompt(tok, text, chat, system)
    sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k, seed)

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(lm, tok, ids, sampling, on_text=emit)
    sys.stdout.write("\n")
    sys.stdout.flush()
    stats = {
        "model": str(path),
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        "time_to_first_token_s": round(result.time_to_first_token_s, 4),
        "total_s": round(result.total_s, 4),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
        "device": str(next(lm.parameters()).device),
        "dtype": str(next(lm.parameters()).dtype).replace("torch.", ""),
    }
    err(f"[{stats['prompt_tokens']} prompt tokens, {stats['new_tokens']} new; first token "
        f"{stats['time_to_first_token_s']:.3f} s; decode {stats['decode_tokens_per_s']:.1f} tok/s on "
        f"{stats['device']} {stats['dtype']}]")
    if stats_json:
        from mamballama_cli.io import write_json_atomic

        write_json_atomic(stats_json, stats)
