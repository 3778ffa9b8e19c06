"""Filesystem helpers: output-directory guards, atomic writes, the user cache directory."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from mamballama_cli.errors import UsageError


def cache_dir() -> Path:
    """Where mamballama keeps converted teachers and other reusable artefacts (never inside the repo)."""
    root = os.environ.get("MAMBALLAMA_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mamballama"


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_parent(path: str | Path, flag: str = "--output") -> None:
    """Fail now, not after the expensive work, when ``path`` could not be created: its nearest existing ancestor
    must be a directory this process can create entries in (probed, which also catches read-only mounts)."""
    path = Path(path).expanduser()
    base = _nearest_existing(path.parent)  # where the output (or its temporary sibling) gets created
    if not base.is_dir():
        raise UsageError(f"{flag} {path}: {base} is a file, not a directory; choose another path")
    try:
        probe = tempfile.mkdtemp(prefix=".mamballama-probe-", dir=base)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write in {base} ({exc.strerror or exc}); choose a writable "
                         "location") from None
    os.rmdir(probe)


def check_output_file(path: str | Path, flag: str) -> Path:
    """An output file's folder must exist and be writable; call before any expensive work."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file path")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {path.parent} does not exist; create it or choose another path")
    check_writable_parent(path, flag)
    return path


# Outputs as check_output_dir saw them, so that atomic_dir can tell when another run wrote one meanwhile.
_SEEN: dict[Path, tuple | None] = {}


def _fingerprint(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def refuse_to_replace(path: Path, flag: str = "--output") -> None:
    """``--force`` replaces (deletes) a non-empty output directory: refuse it where that is surely a slip, for the
    filesystem root, the home directory, the working directory or a folder above it, and a git repository."""
    where, here = path.expanduser().resolve(), Path.cwd().resolve()
    checks = (("the filesystem root", where == where.parent), ("your home directory", where == Path.home().resolve()),
              ("the working directory", where == here), ("a folder above the working directory", where in here.parents),
              ("a git repository", (where / ".git").exists()))
    why = next((name for name, hit in checks if hit), None)
    if why:
        raise UsageError(f"{flag} {path} is {why}, which --force would delete; give a new or dedicated folder, "
                         f"e.g. {flag} runs/NAME")


def check_output_dir(path: str | Path, force: bool, flag: str = "--output") -> Path:
    """Refuse a non-empty output directory unless ``force`` (never the places :func:`refuse_to_replace` names), or
    one that could not be written; call before any expensive work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} exists and is a file; choose a directory path")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise UsageError(
                f"{flag} {path} exists and is not empty; pass --force to replace it or choose another directory"
            )
        refuse_to_replace(path, flag)
    check_writable_parent(path, flag)
    _SEEN[path.absolute()] = _fingerprint(path)
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(path: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` siblings of ``path`` whose process is gone (killed runs)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)")
    removed = []
    for p in path.parent.iterdir() if path.parent.is_dir() else []:
        m = pattern.fullmatch(p.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or not pid_alive(pid):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def output_lock(path: Path, flag: str = "--output", wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``.NAME.lock`` beside ``path`` while writing it; another live holder is a one-line
    error naming its pid (or, with ``wait``, is waited for). The kernel drops the lock of a killed process, so no
    stale lock survives a crash."""
    try:
        import fcntl
    except ImportError:  # no flock here: the fingerprint check of atomic_dir still catches a concurrent writer
        yield
        return
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"{flag} {path} is being written by another mamballama process (pid {holder}); wait "
                             "for it to finish or choose another directory") from None
        try:  # the holder before us may have removed the file it locked: lock the one that is there now
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | Path, lock: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    A crash leaves ``path`` as it was, plus a ``.NAME.tmp-PID`` sibling that the next run removes once that
    process is gone. Writers of one ``path`` take turns through a lock file, and if ``path`` changed since
    :func:`check_output_dir` looked at it (another run wrote it meanwhile), nothing is replaced: an error says so.
    ``lock=False`` when the caller already holds :func:`output_lock` of ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path) if lock else contextlib.nullcontext():
        remove_stale_siblings(path)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            yield tmp
            seen = _SEEN.get(path.absolute(), "unseen")
            if seen != "unseen" and _fingerprint(path) != seen:
                raise UsageError(f"--output {path} was written by another run while this one was working; nothing "
                                 "was replaced. Check which result you want, then rerun with --force or another "
                                 "--output")
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
        _SEEN.pop(path.absolute(), None)


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, so that strict JSON parsers read it (null, not NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json_atomic(path: str | Path, data: Any) -> None:
    """``data`` as strict JSON (a non-finite float is null: :func:`finite_json`), written under a temporary name,
    then renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(finite_json(data), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | Path, label: str, hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a UTF-8 JSONL file; a line that is not JSON is a
    :class:`UsageError` "``label`` line N is not JSON``hint``"."""
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            raise UsageError(f"{label} line {n} is not JSON{hint}") from None
        yield n, value
