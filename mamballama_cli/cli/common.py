"""Shared CLI plumbing: error reporting, stdin prompts."""

from __future__ import annotations

import sys

STATE = {"verbose": False}


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            from mamballama_cli.errors import UsageError

            raise UsageError("no prompt: pass --prompt TEXT, or --prompt - to read it from stdin")
        return sys.stdin.read()
    return prompt
