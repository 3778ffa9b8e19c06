"""Run the real CLI entry point in-process (same code path as the console script) and capture its output."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(args, capsys, stdin: str | None = None, monkeypatch=None) -> Result:
    from mamballama_cli.cli.main import main
    from mamballama_cli.output import STATE

    STATE["verbose"] = False
    old_argv = sys.argv
    sys.argv = ["mamballama", *[str(a) for a in args]]
    if stdin is not None:
        import io

        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)
