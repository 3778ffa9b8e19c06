"""Shared CLI plumbing: error reporting, stdin prompts, not-yet-built commands."""

from __future__ import annotations

import sys

import typer

STATE = {"verbose": False}


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def not_built(command: str, issue: int):
    """A command whose core is not built yet: one line, exit 2."""

    def _command(ctx: typer.Context):
        err(f"error: mamballama {command} is not built yet (tracked in issue {issue})")
        raise typer.Exit(2)

    _command.__doc__ = f"[not built yet: issue {issue}]"
    return _command


def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            from mamballama_cli.errors import UsageError

            raise UsageError("no prompt: pass --prompt TEXT, or --prompt - to read it from stdin")
        return sys.stdin.read()
    return prompt
