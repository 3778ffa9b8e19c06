"""Where the gpu suite's time goes, from the JSON lines that ``MAMBALLAMA_GPU_TIMES=FILE pytest ...`` writes
(tests/gpu_times.py; ``benchmarks/gpu_session.sh`` writes ``times-PART.jsonl`` for each part).

    python benchmarks/gpu_test_times.py out/times-part3.jsonl [more.jsonl ...] [--top 10] [--json summary.json]

Per file: the tests, the sum of their wall times (several pytest-xdist workers overlap, so the sum exceeds the
part's own time), and how much of it went to Triton compiling (``compiled``: calls that did not find the kernel in
the cache), to the autotuners' benchmarks, to the ops' timed per-shape choices, and to the rest (building models,
references, the tests' own decoding). Then the slowest tests, split the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PARTS = ("compile_s", "autotune_s", "choice_s")


def load(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{n}: not a JSON line ({e.msg}); give the files MAMBALLAMA_GPU_TIMES "
                             "wrote") from None
        if not isinstance(row, dict) or "test" not in row or "wall_s" not in row:
            raise SystemExit(f"error: {path}:{n}: a row needs 'test' and 'wall_s'; give the files "
                             "MAMBALLAMA_GPU_TIMES wrote")
        rows.append(row)
    return rows


def split(rows: list[dict]) -> dict:
    """Sums over ``rows``: wall, each part, the rest (wall less the parts, never below 0), compiles and tests."""
    out = {"tests": len(rows), "wall_s": sum(r["wall_s"] for r in rows),
           "compiled": sum(r.get("compiled", 0) for r in rows)}
    for p in PARTS:
        out[p] = sum(r.get(p, 0.0) for r in rows)
    out["rest_s"] = sum(max(0.0, r["wall_s"] - sum(r.get(p, 0.0) for p in PARTS)) for r in rows)
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


def _line(name: str, s: dict) -> str:
    return (f"{s['wall_s']:>8.1f} {s['compile_s']:>8.1f} {s['compiled']:>6} {s['autotune_s']:>8.1f} "
            f"{s['choice_s']:>7.1f} {s['rest_s']:>7.1f}  {name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=10, help="the slowest tests to list (default 10)")
    ap.add_argument("--json", type=Path, default=None, help="also write the sums and the slowest tests here")
    args = ap.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        raise SystemExit(f"error: no such file: {', '.join(missing)} (MAMBALLAMA_GPU_TIMES=FILE pytest -m gpu ... "
                         "writes one)")
    if args.top < 0:
        raise SystemExit(f"error: --top {args.top}: give 0 or more")
    head = f"{'wall s':>8} {'compile':>8} {'kernels':>6} {'autotune':>8} {'choice':>7} {'rest':>7}  what"
    summary, everything = {}, []
    print(head)
    for f in args.files:
        rows = load(f)
        everything += rows
        summary[f.name] = split(rows)
        print(_line(f"{f.name} ({len(rows)} tests)", summary[f.name]))
    slow = sorted(everything, key=lambda r: -r["wall_s"])[:args.top]
    if slow:
        print(f"\nthe {len(slow)} slowest tests:\n{head}")
        for r in slow:
            print(_line(r["test"], split([r])))
    if args.json:
        args.json.write_text(json.dumps({"files": summary, "slowest": slow}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
