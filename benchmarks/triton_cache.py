"""Carry Triton's compiled kernels from one device session to the next.

A fresh GPU machine compiles every kernel the gpu suite and the benchmarks launch; on 2026-12-06 each part of the
suite took about 300 s on a cold H100 (docs/gpu.md). The device returns files of at most 16 MiB and a call carries
at most 64 MiB, so the cache travels as gzip pieces of what a cache hit needs: each kernel's binary (``.cubin``),
its metadata and group files (``.json``) and the compiled launchers (``.so``); the IR text stages stay behind.

    python benchmarks/triton_cache.py pack --out OUT      # on the device: $TRITON_CACHE_DIR -> OUT/tcache.tgz.partNN
    python benchmarks/triton_cache.py unpack PIECE...     # on a later machine: the pieces -> $TRITON_CACHE_DIR

Triton's group files name their members by absolute path; ``unpack`` rewrites them to the new cache folder and
drops the members that stayed behind. A
piece set packed under other versions of Triton or the kernels' sources just misses: Triton's cache key covers
both, and it compiles what it does not find.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from pathlib import Path

KEEP = (".cubin", ".json", ".so")
ROOT_MEMBER = "TCACHE_ROOT"  # the folder the cache was packed from, for unpack's rewrite of the group files
PIECE = "tcache.tgz.part"


def cache_dir() -> Path:
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def pack(src: Path, out: Path, piece_bytes: int = 15 << 20) -> tuple[list[Path], int]:
    """The kept files of ``src`` as one tar.gz, cut into ``out/tcache.tgz.partNN``; and the number of kernels."""
    if not src.is_dir():
        raise SystemExit(f"error: no Triton cache at {src}: set TRITON_CACHE_DIR to the folder the kernels went to")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in KEEP)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        root = str(src.resolve()).encode()
        info = tarfile.TarInfo(ROOT_MEMBER)
        info.size = len(root)
        tar.addfile(info, io.BytesIO(root))
        for p in files:
            tar.add(p, arcname=str(p.relative_to(src)), recursive=False)
    data = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    pieces = []
    for i in range(0, max(len(data), 1), piece_bytes):
        piece = out / f"{PIECE}{len(pieces):02d}"
        piece.write_bytes(data[i:i + piece_bytes])
        pieces.append(piece)
    return pieces, sum(p.suffix == ".cubin" for p in files)


def unpack(pieces: list[Path], dest: Path) -> int:
    """Join ``pieces`` (in name order), extract them into ``dest`` and point the group files at ``dest``; returns
    the number of kernels."""
    missing = [str(p) for p in pieces if not p.is_file()]
    if missing or not pieces:
        raise SystemExit(f"error: no such piece: {', '.join(missing) or '(none given)'}; give the "
                         f"{PIECE}NN files that `pack` wrote")
    data = b"".join(p.read_bytes() for p in sorted(pieces, key=lambda p: p.name))
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            old = tar.extractfile(ROOT_MEMBER).read().decode()
            members = [m for m in tar.getmembers() if m.name != ROOT_MEMBER]
            tar.extractall(dest, members=members, filter="data")  # no absolute paths, no escapes from dest
    except (tarfile.TarError, KeyError, EOFError, OSError) as e:
        raise SystemExit(f"error: the pieces do not make a packed cache ({e}); give every {PIECE}NN of one "
                         "`pack`") from None
    new = str(dest.resolve())
    for grp in dest.rglob("__grp__*.json"):
        meta = json.loads(grp.read_text())
        paths = meta.get("child_paths", {})
        moved = {k: new + v[len(old):] if v.startswith(old + os.sep) else v for k, v in paths.items()}
        meta["child_paths"] = {k: v for k, v in moved.items() if os.path.exists(v)}  # the IR stages left behind
        grp.write_text(json.dumps(meta))
    return sum(1 for _ in dest.rglob("*.cubin"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="$TRITON_CACHE_DIR -> OUT/tcache.tgz.partNN")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--piece-mb", type=int, default=15, help="size of a piece (default 15; the device returns 16)")
    u = sub.add_parser("unpack", help="pieces -> $TRITON_CACHE_DIR")
    u.add_argument("pieces", nargs="+", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        if args.piece_mb < 1:
            raise SystemExit(f"error: --piece-mb {args.piece_mb}: give 1 or more")
        pieces, kernels = pack(cache_dir(), args.out, args.piece_mb << 20)
        size = sum(p.stat().st_size for p in pieces)
        print(f"triton cache: {kernels} kernels, {size / 2**20:.1f} MiB in {len(pieces)} piece(s) in {args.out}")
    else:
        kernels = unpack(args.pieces, cache_dir())
        print(f"triton cache: {kernels} kernels in {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
