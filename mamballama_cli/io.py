"""Filesystem helpers: output-directory guards, atomic writes, the user cache directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from mamballama_cli.errors import UsageError


def cache_dir() -> Path:
    """Where mamballama keeps converted teachers and other reusable artefacts (never inside the repo)."""
    root = os.environ.get("MAMBALLAMA_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mamballama"


def check_output_dir(path: str | Path, force: bool, flag: str = "--output") -> Path:
    """Refuse a non-empty output directory unless ``force``; call before any expensive work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} exists and is a file; choose a directory path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UsageError(
            f"{flag} {path} exists and is not empty; pass --force to replace it or choose another directory"
        )
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    A crash leaves ``path`` as it was (plus a ``.tmp`` sibling that the next run removes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
