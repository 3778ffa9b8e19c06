"""Carry Triton's compiled kernels from one device session to the next.

A fresh GPU machine compiles every kernel the gpu suite and the benchmarks launch; on 2026-12-06 each part of the
suite took about 300 s on a cold H100 (docs/gpu.md). The device returns files of at most 16 MiB and a call carries
at most 64 MiB, so the cache travels as gzip pieces of what a cache hit needs: each kernel's binary (``.cubin``),
its metadata and group files (``.json``) and the compiled launchers (``.so``); the IR text stages stay behind.
A call carries the working tree (about 7 MiB) beside the pieces, so ``pack`` stops at ``--max-mib`` (default 48)
of pieces: it packs the kernels last used first (a kernel folder's newest access or change time; an unpacked
kernel's times are its packing's until a run reads it), so what it leaves out is what no recent run needed. The
twenty-seventh session's 61 MiB cache, with the tree, passed the 64 MiB a call carries.

    python benchmarks/triton_cache.py pack --out OUT      # on the device: $TRITON_CACHE_DIR -> OUT/tcache.tgz.partNN
    python benchmarks/triton_cache.py unpack PIECE...     # on a later machine: the pieces -> $TRITON_CACHE_DIR

Triton's group files name their members by absolute path; ``unpack`` rewrites them to the new cache folder and
drops the members that stayed behind. It adds only the kernel folders the cache lacks, by rename, so that a call
carrying the pieces while a detached study runs cannot write over a kernel that study has loaded. A
piece set packed under other versions of Triton or the kernels' sources just misses: Triton's cache key covers
both, and it compiles what it does not find.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

KEEP = (".cubin", ".json", ".so")
ROOT_MEMBER = "TCACHE_ROOT"  # the folder the cache was packed from, for unpack's rewrite of the group files
PIECE = "tcache.tgz.part"


def cache_dir() -> Path:
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def _last_used(files: list[Path]) -> float:
    return max(max(st.st_atime, st.st_mtime) for st in (p.stat() for p in files))


def pack(src: Path, out: Path, piece_bytes: int = 15 << 20,
         max_bytes: int | None = None) -> tuple[list[Path], int, int]:
    """The kept files of ``src`` as one tar.gz, cut into ``out/tcache.tgz.partNN``; the number of kernels packed and
    of kernels left out. With ``max_bytes`` the kernel folders go in last used first, and packing stops before the
    archive passes it."""
    if not src.is_dir():
        raise SystemExit(f"error: no Triton cache at {src}: set TRITON_CACHE_DIR to the folder the kernels went to")
    folders: dict[str, list[Path]] = {}
    for p in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in KEEP):
        folders.setdefault(p.relative_to(src).parts[0], []).append(p)
    order = sorted(folders, key=lambda k: (-_last_used(folders[k]), k))
    buf = io.BytesIO()
    packed = left = 0
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        root = str(src.resolve()).encode()
        info = tarfile.TarInfo(ROOT_MEMBER)
        info.size = len(root)
        tar.addfile(info, io.BytesIO(root))
        for k in order:
            files = folders[k]
            kernels = sum(p.suffix == ".cubin" for p in files)
            size = sum(p.stat().st_size for p in files)  # uncompressed: an upper bound on what the folder adds
            if max_bytes is not None and (left or buf.tell() + size + (1 << 16) > max_bytes):
                left += kernels  # the gzip stream may hold up to 64 KiB not yet written to buf
                continue
            for p in files:
                tar.add(p, arcname=str(p.relative_to(src)), recursive=False)
            packed += kernels
    data = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    pieces = []
    for i in range(0, max(len(data), 1), piece_bytes):
        piece = out / f"{PIECE}{len(pieces):02d}"
        piece.write_bytes(data[i:i + piece_bytes])
        pieces.append(piece)
    return pieces, packed, left


def unpack(pieces: list[Path], dest: Path) -> int:
    """Join ``pieces`` (in name order), extract them beside ``dest`` and move into ``dest`` the kernel folders it
    lacks, their group files pointing at ``dest``; returns the number of kernels in ``dest``.

    A kernel folder ``dest`` already holds stays as it is: a process running on this machine may have loaded its
    launcher or binary, and writing over a mapped file in place kills that process (the twenty-ninth session's two
    distill runs died with SIGSEGV the moment a later call unpacked the cache over theirs). New folders arrive by
    rename, whole."""
    missing = [str(p) for p in pieces if not p.is_file()]
    if missing or not pieces:
        raise SystemExit(f"error: no such piece: {', '.join(missing) or '(none given)'}; give the "
                         f"{PIECE}NN files that `pack` wrote")
    data = b"".join(p.read_bytes() for p in sorted(pieces, key=lambda p: p.name))
    dest.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))  # same file system: rename
    try:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
                old = tar.extractfile(ROOT_MEMBER).read().decode()
                members = [m for m in tar.getmembers() if m.name != ROOT_MEMBER]
                tar.extractall(stage, members=members, filter="data")  # no absolute paths, no escapes from stage
        except (tarfile.TarError, KeyError, EOFError, OSError) as e:
            raise SystemExit(f"error: the pieces do not make a packed cache ({e}); give every {PIECE}NN of one "
                             "`pack`") from None
        new = str(dest.resolve())
        for grp in stage.rglob("__grp__*.json"):
            meta = json.loads(grp.read_text())
            paths = meta.get("child_paths", {})
            here = {}
            for k, v in paths.items():  # a member of the packed cache, kept when extracted (not an IR stage)
                rel = v[len(old) + 1:] if v.startswith(old + os.sep) else None
                if rel is None and os.path.exists(v):
                    here[k] = v
                elif rel is not None and (stage / rel).exists():
                    here[k] = os.path.join(new, rel)
            meta["child_paths"] = here
            packed = grp.stat().st_mtime  # the packed time (the read above may have moved the access time)
            grp.write_text(json.dumps(meta))
            os.utime(grp, (packed, packed))  # as extracted: a later read marks a use, which pack's order reads
        for folder in sorted(stage.iterdir()):
            if not (dest / folder.name).exists():
                folder.rename(dest / folder.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return sum(1 for _ in dest.rglob("*.cubin"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="$TRITON_CACHE_DIR -> OUT/tcache.tgz.partNN")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--piece-mb", type=int, default=15, help="size of a piece (default 15; the device returns 16)")
    p.add_argument("--max-mib", type=int, default=48,
                   help="stop before the pieces pass this (default 48: with the working tree, under a call's 64)")
    u = sub.add_parser("unpack", help="pieces -> $TRITON_CACHE_DIR")
    u.add_argument("pieces", nargs="+", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        for name, v in (("--piece-mb", args.piece_mb), ("--max-mib", args.max_mib)):
            if v < 1:
                raise SystemExit(f"error: {name} {v}: give 1 or more")
        pieces, kernels, left = pack(cache_dir(), args.out, args.piece_mb << 20, args.max_mib << 20)
        size = sum(p.stat().st_size for p in pieces)
        print(f"triton cache: {kernels} kernels, {size / 2**20:.1f} MiB in {len(pieces)} piece(s) in {args.out}"
              + (f"; {left} kernels used least lately left out to stay under {args.max_mib} MiB" if left else ""))
    else:
        kernels = unpack(args.pieces, cache_dir())
        print(f"triton cache: {kernels} kernels in {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
