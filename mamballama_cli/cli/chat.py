"""`mamballama chat MODEL`: a conversation on stdin/stdout that keeps its decoding state between turns."""

from __future__ import annotations

import sys

import typer

from mamballama_cli.cli.options import device_option, dtype_option
from mamballama_cli.output import out

HELP = ("Chat with a checkpoint: each stdin line is a message, each answer one stdout line (stats on stderr); "
        "every turn resumes from the state the last one left, so it reads only its new tokens. /reset, /exit.")


def command(
    model: str = typer.Argument(..., help="Checkpoint directory (hybrid or transformers model), or 'default'."),
    system: str | None = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=1, help="Tokens per answer at most."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, max=2.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="0 = off."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Sampling seed of the first answer (the n-th "
                                       "uses seed + n - 1): the same conversation gives the same answers."),
    max_context: int | None = typer.Option(None, "--max-context", min=8, help="Conversation tokens kept at "
                                              "most (default: the model's context length, at most 4096); the "
                                              "earliest exchanges are left out beyond it."),
    prefix_cache_gb: float = typer.Option(1.0, "--prefix-cache-gb", min=0.0, help="Memory for the states kept "
                                          "between turns (0: every turn re-reads the conversation)."),
    dtype: str = dtype_option(default="auto"),
    device: str = device_option(default="auto"),
):
    from mamballama_cli.cli.common import err, load_with_context
    from mamballama_cli.errors import UsageError
    from mamballama_cli.generation.sampling import SamplingConfig
    from mamballama_cli.generation.session import ChatSession

    lm, tok, _, ctx = load_with_context(model, dtype, device, max_context, "chat")
    sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k, seed)
    try:
        session = ChatSession(lm, tok, sampling, ctx, system, prefix_cache_bytes=int(prefix_cache_gb * 1e9))
    except ValueError as exc:
        raise UsageError(f"{model}: {exc}") from None
    tty = sys.stdin.isatty()
    if tty:
        err(f"chatting with {model} ({session.engine}); /reset forgets, /exit or Ctrl-D ends")
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session.reset()
            err("[conversation reset]")
            continue
        if not text.strip():
            continue
        try:
            turn = session.reply(text, on_text=lambda piece: out(piece.replace("\n", " "), end=""))
        except ValueError as exc:
            if not tty:  # a pipeline stops at bad input; a person at the keyboard writes a shorter message
                raise UsageError(f"{exc}; send a shorter message") from None
            err(f"error: {exc}; send a shorter message")
            continue
        out()
        note = f"; {turn.dropped_turns} earliest exchange(s) left out to fit --max-context {ctx}" \
            if turn.dropped_turns else ""
        err(f"[turn {session.turns}: {turn.prompt_tokens} conversation tokens, {turn.cached_tokens} of them from "
            f"the kept state; {turn.new_tokens} new; first token {turn.time_to_first_token_s:.3f} s, "
            f"{turn.total_s:.3f} s in all{note}]")
