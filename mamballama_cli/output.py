"""Where results go: the real stdout, kept apart from library chatter.

While a CLI command runs, ``sys.stdout`` points at stderr (see :func:`results_to_stdout_only`) so that
libraries printing while they load (DeepSpeed announces its accelerator on stdout, for one) cannot pollute
piped output such as `mamballama convert ... --json | jq`. Results are written with :func:`out` or
:func:`console`, which use the real stdout; progress and diagnostics with :func:`log`, on stderr.
``STATE["verbose"]`` says whether library chatter is wanted.
"""

from __future__ import annotations

import contextlib
import sys

_RESULTS: list = [None]

# Process-wide switches of the CLI that lower layers read too (set by the top-level callback in cli/main.py).
STATE = {"verbose": False}


@contextlib.contextmanager
def results_to_stdout_only():
    real = sys.stdout
    _RESULTS[0], sys.stdout = real, sys.stderr
    try:
        yield
    finally:
        sys.stdout, _RESULTS[0] = real, None


def results_stream():
    return _RESULTS[0] or sys.stdout


def out(text: str = "", end: str = "\n") -> None:
    """Write a result (not a log line) to the real stdout."""
    stream = results_stream()
    stream.write(text + end)
    stream.flush()


def log(msg: str, main: bool = True) -> None:
    """A progress or diagnostic line on stderr (never a result); ``main=False`` (a process other than the main
    one of a distributed run) writes nothing."""
    if main:
        print(msg, file=sys.stderr, flush=True)


def every(seconds: float, what: str):
    """A progress callback ``(done, total)`` that logs ``what done/total (N s)`` at most every ``seconds`` (the first
    line after ``seconds`` too), and never for the last item: for loops that run long only on slow machines."""
    import time

    t0 = last = time.perf_counter()

    def tick(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if done < total and now - last >= seconds:
            last = now
            log(f"{what} {done}/{total} ({now - t0:.0f} s)")

    return tick


def console():
    """A rich console on the results stream (for tables that are results, not progress)."""
    from rich.console import Console

    return Console(file=results_stream())
