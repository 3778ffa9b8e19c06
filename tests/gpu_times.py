"""Where a gpu test's time goes: Triton's compiles, the autotuners' benchmarking, the ops' own timed choices
(ops/graph_timing.py) and the rest.

``MAMBALLAMA_GPU_TIMES=FILE pytest -m gpu ...`` (``benchmarks/gpu_session.sh`` sets it for each part) appends one
JSON line per test to FILE: its node id, its wall seconds (setup, call and teardown) and, per kind, the seconds
spent there and the number of calls. A kind nested in another (a compile inside an autotuner's benchmark) counts
in the inner kind only. ``benchmarks/gpu_test_times.py FILE`` prints the table. The gpu suite's parts take minutes
on a fresh machine; this says whether compiling, tuning or the tests' own work is what to cut.
"""

from __future__ import annotations

import json
import os
import time

KINDS = ("compile", "autotune", "choice")
SLOW_COMPILE_S = 0.05  # a compile call longer than this compiled; shorter ones found the kernel in the cache


class Ledger:
    """Seconds and calls per kind for the test that runs now, exclusive of nested kinds."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.totals = {k: [0.0, 0] for k in KINDS}
        self.compiled = 0
        self._stack = []  # [kind, start, seconds of nested kinds]

    def timed(self, kind: str, fn):
        """``fn`` wrapped so that its calls count under ``kind``."""

        def wrapper(*args, **kwargs):
            self._stack.append([kind, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                _, start, nested = self._stack.pop()
                spent = time.perf_counter() - start
                self.totals[kind][0] += spent - nested
                self.totals[kind][1] += 1
                if kind == "compile" and spent > SLOW_COMPILE_S:
                    self.compiled += 1
                if self._stack:
                    self._stack[-1][2] += spent

        wrapper.gpu_times_kind = kind
        wrapper.__wrapped__ = fn
        return wrapper

    def record(self, nodeid: str, wall: float, worker: str) -> dict:
        row = {"test": nodeid, "wall_s": round(wall, 3), "worker": worker, "compiled": self.compiled}
        for kind, (seconds, calls) in self.totals.items():
            row[f"{kind}_s"], row[f"{kind}_calls"] = round(seconds, 3), calls
        return row


LEDGER = Ledger()


def wrap(owner, name: str, kind: str, ledger: Ledger = LEDGER) -> bool:
    """Replace ``owner.name`` by its timed twin (once); False where ``owner`` has no such attribute."""
    fn = getattr(owner, name, None)
    if fn is None:
        return False
    if getattr(fn, "gpu_times_kind", None) is None:
        setattr(owner, name, ledger.timed(kind, fn))
    return True


def install(ledger: Ledger = LEDGER) -> list[str]:
    """Wrap what exists: Triton's ``compile`` (both names the JIT may bind it by), the autotuner's per-config
    benchmark, and the project's once-per-shape timed choice. Must run before the ops modules import ``chosen``
    (the test session's conftest does). Returns what it wrapped."""
    done = []
    try:
        import triton.compiler as tc
        import triton.compiler.compiler as tcc
        from triton.runtime import autotuner
    except ImportError:
        tc = tcc = autotuner = None
    if tc is not None:
        # one wrapper under both names: wrap the module's function, then point the package's name at it
        if wrap(tcc, "compile", "compile", ledger):
            tc.compile = tcc.compile
            done.append("triton.compile")
        if wrap(autotuner.Autotuner, "_bench", "autotune", ledger):
            done.append("Autotuner._bench")
    from mamballama_cli.ops import graph_timing

    fn = graph_timing.chosen
    if getattr(fn, "gpu_times_kind", None) is None:  # only a shape's first use decides (and times); the rest look up
        deciding = ledger.timed("choice", fn)

        def chosen(choices, key, x, decide):
            return choices[key] if key in choices else deciding(choices, key, x, decide)

        chosen.gpu_times_kind, chosen.__wrapped__ = "choice", fn
        graph_timing.chosen = chosen
    done.append("graph_timing.chosen")
    return done


def write(path: str, row: dict) -> None:
    """Append ``row`` as one JSON line (one write: lines from several pytest-xdist workers do not interleave)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def worker_id() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")
