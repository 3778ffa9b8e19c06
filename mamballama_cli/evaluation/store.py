"""The eval output directory: who may reuse it, and the per-cell cache that makes a rerun resume.

A *cell* is one finished unit of work (task x model x setting: one perplexity file, one retrieval
(length, depth) for one model, one lm-eval task for one model, one chat answer, one judgment). Each
is a JSON file under ``cells/``, written atomically the moment it finishes; a rerun with the same
models loads it instead of recomputing. Cell file names carry a hash of every setting that changes
the result, so a rerun with other settings computes new cells beside the old ones.

Reuse rule for ``--output``: a missing or empty directory is used; a directory holding
``eval_manifest.json`` from a run on the *same* student checkpoint (by content hash) is resumed;
anything else (another student, unrelated files) is refused unless ``--force``, which empties it.
Teacher cells carry the teacher's hash in their settings, so another --teacher computes new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from mamballama_cli.errors import UsageError
from mamballama_cli.io import refuse_to_replace, write_json_atomic
from mamballama_cli.output import log

MANIFEST = "eval_manifest.json"
KIND = "mamballama-eval"


def settings_hash(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)[:80] or "cell"


def prepare_output(path: str | Path, force: bool, student_hash: str) -> tuple[Path, bool]:
    """Apply the reuse rule; returns (directory, resumed)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} exists and is a file; choose a directory path")
    resumed = False
    if out.is_dir() and any(out.iterdir()):
        manifest = _read_manifest(out)
        if force:
            refuse_to_replace(out)
            log(f"--force: emptying {out}")
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        elif manifest is None:
            raise UsageError(f"--output {out} is not empty and holds no previous `mamballama eval` run; pass --force "
                             "to replace its contents or choose another directory")
        elif manifest.get("student_sha256") != student_hash:
            raise UsageError(
                f"--output {out} holds an eval of another checkpoint (sha256 "
                f"{str(manifest.get('student_sha256'))[:12]}, "
                f"this one is {student_hash[:12]}); pass --force to discard it or choose another directory"
            )
        else:
            resumed = True
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MANIFEST, {"kind": KIND, "version": 1, "student_sha256": student_hash})
    return out, resumed


def _read_manifest(out: Path) -> dict | None:
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == KIND else None


class CellStore:
    """Finished cells as JSON files: ``get`` returns a cached result or None; ``put`` writes one atomically."""

    def __init__(self, root: Path, repro: dict):
        self.root = root / "cells"
        self.repro = repro
        self.reused = 0
        self.reused_seconds = 0.0  # what the reused cells cost when they were computed
        self.computed = 0

    def path(self, task: str, role: str, name: str, settings: dict) -> Path:
        return self.root / _safe(task) / _safe(role) / f"{_safe(name)}-{settings_hash(settings)}.json"

    def get(self, task: str, role: str, name: str, settings: dict) -> Any | None:
        p = self.path(task, role, name, settings)
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text())
        except ValueError:  # a torn file cannot happen with atomic writes, but a hand-edited one can
            log(f"warning: ignoring unreadable cell {p}")
            return None
        self.reused += 1
        self.reused_seconds += float(data.get("seconds") or 0.0)
        return data["result"]

    def put(self, task: str, role: str, name: str, settings: dict, result: Any, seconds: float) -> None:
        p = self.path(task, role, name, settings)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(p, {"task": task, "role": role, "name": name, "settings": settings, "result": result,
                              "seconds": round(seconds, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "repro": self.repro})
        self.computed += 1

    def run(self, task: str, role: str, name: str, settings: dict, compute) -> Any:
        """Cached result, or compute() and store it (exceptions propagate: nothing half-written is kept)."""
        cached = self.get(task, role, name, settings)
        if cached is not None:
            return cached
        t0 = time.perf_counter()
        result = compute()
        self.put(task, role, name, settings, result, time.perf_counter() - t0)
        return result


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
