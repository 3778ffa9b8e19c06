"""Shared CLI plumbing: the results stream, error reporting, stdin prompts."""

from __future__ import annotations

import functools
import os
import sys

from mamballama_cli.output import results_to_stdout_only

# How the help of every command writes its placeholders (typer's notation), said under each command's help.
NOTATION = ("Notation: {model} is a required argument, [x] an optional one; <str>, <int>, <float>, <path> "
            "give the kind of value an option takes.")


def command_io(fn):
    """Run a command with stdout reserved for results (mamballama_cli.output explains why)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with results_to_stdout_only():
            return fn(*args, **kwargs)

    return wrapper


def library_output(verbose: bool) -> None:
    """Libraries' per-file progress bars (transformers' "Loading weights", "Writing model shards", the Hub's
    downloads) only with --verbose: a run shows the project's own progress. Set before transformers is imported
    (it reads the Hub's switch then), and switched directly when it already is (in-process callers)."""
    if not verbose:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar() if verbose else hf_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        enable_progress_bars() if verbose else disable_progress_bars()


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_prompt(prompt: str | None) -> str:
    """The prompt text: ``--prompt TEXT``, or stdin only when asked with ``--prompt -``; never empty."""
    from mamballama_cli.errors import UsageError

    if prompt is None:
        raise UsageError("no prompt: pass --prompt TEXT, or --prompt - to read it from stdin")
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        where = "stdin was empty" if prompt == "-" else "--prompt is empty"
        raise UsageError(f"{where}; give the text to continue, e.g. --prompt 'Once upon a time'")
    return text


def config_from_flags(cls, config_file, **flags):
    """A command's config: ``cls``'s defaults < the --config FILE < the flags (a flag whose value is None was not
    given; a plain switch passes ``switch or None`` so that leaving it off does not undo the file)."""
    from mamballama_cli.config import merge_config

    return merge_config(cls, config_file=config_file, overrides=flags)


def load_with_context(model: str, dtype: str, device: str, max_context: int | None, command: str):
    """(model, tokenizer, path, context) for a command that reads prompts (`serve`, `chat`): the tokenizer must be
    there, and the context is ``--max-context`` or the model's length up to 4096, never past the model's."""
    from mamballama_cli.errors import UsageError
    from mamballama_cli.loading import load_causal_lm

    lm, tok, path = load_causal_lm(model, dtype=dtype, device=device)
    if tok is None:
        raise UsageError(f"{model}: no tokenizer next to the weights; {command} needs one to read prompts")
    limit = int(getattr(lm.config, "max_position_embeddings", 4096) or 4096)
    ctx = max_context or min(limit, 4096)
    if ctx > limit:
        raise UsageError(f"--max-context {ctx} is longer than the model's context length {limit}; use {limit} or less")
    return lm, tok, path, ctx
