"""Refuse a `mamballama data build` output that skipped a source, before a study spends GPU time on it.

    python benchmarks/check_data.py DATA_DIR

A source is skipped when its package is missing (the build says which and how to install it). A study on such a
build trains and measures on a different, thinner data set (2026-12-05: pydoc alone gave 2 held-out chat prompts
instead of 43 and 4 held-out texts instead of 45), and its numbers do not compare with earlier ones. PARTIAL_DATA=1
lets it through.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def skipped_sources(data: Path) -> dict[str, str]:
    manifest = json.loads((data / "manifest.json").read_text())
    return {name: src["skipped"] for name, src in manifest.get("sources", {}).items() if "skipped" in src}


def main() -> int:
    data = Path(sys.argv[1])
    skipped = skipped_sources(data)
    if skipped and os.environ.get("PARTIAL_DATA") != "1":
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        print(f"error: the data build in {data} skipped {len(skipped)} source(s) ({why}); install them and run "
              "`mamballama data build` again, or set PARTIAL_DATA=1 to study on it anyway", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
