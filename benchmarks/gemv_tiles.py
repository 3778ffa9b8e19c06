"""Every gemv tile on the decode and verify shapes of the 8B model, each timed against cuBLAS (CUDA machine only).

The autotuner keeps only the winner of each shape (``TIMINGS`` in ops/triton_gemv.py has its time and cuBLAS's);
this table has every candidate and the tiles of ``EXTRA`` (or ``--extra``), so that a tile that never wins can be dropped (each one costs compile and autotune
time on every fresh machine) and the shapes where the kernel loses say what kind of tile is missing. Each time is
:func:`mamballama_cli.ops.triton_gemv.graph_ab_us`: calls recorded in a CUDA graph over copies of the weight that
together pass twice the L2 cache, interleaved with cuBLAS's, as a decode step runs them.

    python3 benchmarks/gemv_tiles.py --json out/gemv-tiles.json
    python3 benchmarks/gemv_tiles.py --shapes 5x4096x4096 --extra 16,256,2,4,dot 32,256,4,5,dotw
    python3 benchmarks/gemv_tiles.py --shapes 5x28672x4096 --only 16,128,2,6,dotw --extra 16,64,4,1,acc

``--only TILE ...`` times those tiles (and ``--extra``'s) instead of the candidates: a probe of a few new tiles
beside the one that serves the shape now, without compiling the rest on a fresh machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = ("1x4096x4096", "5x4096x4096", "5x6144x4096", "5x4096x14336", "5x28672x4096", "2x4096x4096")


def parse_tile(text: str) -> tuple:
    """``"16,256,4,4,dot"`` (a SKINNY tile) or ``"4,1024,4"`` (a one-row tile) -> the tuple."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 5):
        raise SystemExit(f"error: tile {text!r}: give BLOCK_N,BLOCK_K,warps for one row or "
                         "BLOCK_N,BLOCK_K,warps,stages,mode (dot/sum/acc) for more")
    nums = tuple(int(p) for p in parts[:4])
    return nums if len(parts) == 3 else (*nums, parts[4])


def tiles_for(rows: int, candidates_one: tuple, candidates_skinny: tuple, extra: list, only: list | None) -> list:
    """The tiles timed at ``rows``: the candidates of that row count (or ``only``, where given), then ``extra``,
    each kept only where its kind fits the rows (three numbers for one row, five for more)."""
    base = list(only) if only is not None else list(candidates_one if rows == 1 else candidates_skinny)
    return [t for t in base + list(extra) if (len(t) == 3) == (rows == 1)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="ROWSxNxK each (default: %(default)s)")
    ap.add_argument("--extra", nargs="*", default=None, help="tiles to time besides the candidates (see parse_tile; "
                    "default: ops/triton_gemv.py's EXTRA)")
    ap.add_argument("--only", nargs="+", default=None, help="time these tiles (and --extra's) instead of the "
                    "autotuner's candidates")
    ap.add_argument("--json", default=None, help="write the table here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gemv_tiles needs a CUDA device; run it on the GPU machine", file=sys.stderr)
        return 2
    from mamballama_cli.ops import triton_gemv as g

    extra = list(g.EXTRA) if args.extra is None else [parse_tile(t) for t in args.extra]
    only = None if args.only is None else [parse_tile(t) for t in args.only]
    dev = torch.device("cuda")
    rows_out = []
    for shape in args.shapes:
        m, n, k = (int(v) for v in shape.lower().split("x"))
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) / k ** 0.5
        ref = F.linear(x, w)
        tiles = tiles_for(m, g.CONFIGS, g.SKINNY, extra, only)
        for tile in tiles:
            t0 = time.time()
            entry = {"shape": shape, "tile": list(tile)}
            try:
                y = g.gemv_launch(x, w, config=tile)
                err = float((y.float() - ref.float()).norm() / ref.float().norm())
                if not err < 1e-2:  # a tile that is wrong on the device is not timed (the interpreter tests passed)
                    raise ValueError(f"disagrees with cuBLAS: relative error {err:.2e}")
                ours, theirs, copies = g.graph_ab_us(lambda wt, x=x, tile=tile: g.gemv_launch(x, wt, config=tile),
                                                     lambda wt, x=x: F.linear(x, wt), w)
                gbs = n * k * 2 / (ours * 1e-6) / 1e12
                entry.update(kernel_us=round(ours, 2), cublas_us=round(theirs, 2), rel_err=err,
                             tb_per_s=round(gbs, 2), ratio=round(ours / theirs, 3), copies=copies)
            except Exception as exc:  # noqa: BLE001 - a tile that does not build here is a row of the table
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            entry["seconds"] = round(time.time() - t0, 1)
            rows_out.append(entry)
            if "error" in entry:
                print(f"{shape:>14} {tile!s:>28}  error {entry['error']}", flush=True)
            else:
                print(f"{shape:>14} {tile!s:>28}  {entry['kernel_us']:8.2f} us  cuBLAS {entry['cublas_us']:8.2f}"
                      f"  x{entry['ratio']:.3f}  {entry['tb_per_s']:.2f} TB/s  ({entry['seconds']} s)", flush=True)
        torch.cuda.empty_cache()
    best = {}
    for e in rows_out:
        if "kernel_us" in e and (e["shape"] not in best or e["kernel_us"] < best[e["shape"]]["kernel_us"]):
            best[e["shape"]] = e
    for shape, e in best.items():
        print(f"best {shape}: {e['tile']} {e['kernel_us']} us (cuBLAS {e['cublas_us']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows_out,
                       "best": best}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
