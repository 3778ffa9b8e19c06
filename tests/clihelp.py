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


def one_line_error(r: Result, *needles: str, code: int | None = None) -> str:
    """The run failed (with exit ``code`` when given) on exactly one ``error:`` line, no traceback, holding
    every needle; returns that line."""
    assert r.code != 0, r.err
    if code is not None:
        assert r.code == code, (r.code, r.err)
    lines = [ln for ln in r.err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.err
    assert "Traceback" not in r.err, r.err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
