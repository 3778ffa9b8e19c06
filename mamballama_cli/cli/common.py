"""Shared CLI plumbing: the results stream, error reporting, stdin prompts."""

from __future__ import annotations

import functools
import sys

from mamballama_cli.output import results_to_stdout_only

STATE = {"verbose": False}


def command_io(fn):
    """Run a command with stdout reserved for results (mamballama_cli.output explains why)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with results_to_stdout_only():
            return fn(*args, **kwargs)

    return wrapper


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
