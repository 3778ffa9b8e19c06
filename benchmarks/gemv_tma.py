"""The TMA GEMV experiment (ops/triton_gemv_tma.py) timed against cuBLAS and our GEMV kernels (CUDA machine only).

On a verify window's GEMVs at the 8B shape (5 rows): every tile of ``TMA_TILES`` (or ``--tiles``), cuBLAS, the
five-row kernel of ops/triton_gemv.py at its tile of the last H200 run, and its one-row kernel on the same weight.

The question: can a weight loaded by TMA, a few warps keeping several tiles in flight, bring five rows to the
bandwidth of one? On an H200 the five-row kernels of ops/triton_gemv.py read the weights at about 3.55-3.8 TB/s,
the one-row kernel at 3.9-4.1: the one-row time is the target. Each entry is checked against cuBLAS (relative
error under 1e-2, else "disagrees") and then timed by :func:`mamballama_cli.ops.graph_timing.graph_call_us`:
calls recorded in a CUDA graph over copies of the weight that together pass twice the L2 cache (``l2_copies``), as
a verify window runs them, the best of three graphs. The baselines are timed before and after the tiles (both kept;
the faster counts), so that a clock that moved shows. Bandwidth: the weight's bytes over the time, in TB/s.
``:glu`` after a shape: the weight is [gate; up] (N rows, N/2 outputs) and the result silu(gate) * up, cuBLAS's
baseline then being ``F.linear`` and the ``swiglu`` op that the decode step dispatches (its backend is recorded).
The JSON (per shape: ``baselines`` {name: us, tbps, tile, before, after}, ``tiles`` {name: {us, tbps,
rel_err} or {error}}, ``best_tile``, ``best_us`` and ``best_over_current`` / ``_one_row`` / ``_cublas``, the best
tile's time over the baseline's: below 1, TMA is faster) is written after every shape, so that a deadline or a
crash keeps what was done.

    python3 benchmarks/gemv_tma.py --output out/gemv-tma.json
    python3 benchmarks/gemv_tma.py --output out/gemv-tma.json --shapes 5x4096x14336 --tiles 64,128,4,4,tmaw
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's package, installed or not
from bench_common import write_result

from mamballama_cli.ops.triton_gemv_tma import TMA_MODES, TMA_TILES

SHAPES = ("5x10272x4096", "5x6144x4096", "5x4096x4096", "5x4096x14336", "5x28672x4096:glu")
# Weight shape (N x K[:glu]) -> the baselines' tiles: the five-row kernel's of the last H200 run ("current",
# gemv_launch's SKINNY / GLU_TILES form) and the one-row kernel's ("one_row", CONFIGS' form). Edit to override.
BASELINE_TILES = {
    "10272x4096": {"current": (64, 128, 4, 4, "dotw"), "one_row": (4, 1024, 4)},
    "6144x4096": {"current": (16, 512, 2, 3, "dot"), "one_row": (4, 1024, 4)},
    "4096x4096": {"current": (32, 256, 2, 4, "dotw"), "one_row": (16, 1024, 8)},
    "4096x14336": {"current": (16, 512, 2, 3, "dot"), "one_row": (16, 1024, 8)},
    "28672x4096:glu": {"current": (32, 128, 4, 4, "dotwp"), "one_row": (2, 2048, 4)},
}


def parse_shape(text: str) -> tuple[int, int, int, bool]:
    """``"5x28672x4096:glu"`` -> (rows, weight rows, K, glu)."""
    body, _, suffix = text.lower().partition(":")
    try:
        m, n, k = (int(v) for v in body.split("x"))
    except ValueError:
        raise SystemExit(f"error: shape {text!r}: give ROWSxNxK, with :glu for a [gate; up] weight") from None
    return m, n, k, suffix == "glu"


def parse_tile(text: str) -> tuple:
    """``"64,128,4,4,tmaw"`` -> (64, 128, 4, 4, "tmaw")."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 5 or parts[4] not in TMA_MODES:
        raise SystemExit(f"error: tile {text!r}: give BLOCK_N,BLOCK_K,warps,stages,mode ({' or '.join(TMA_MODES)})")
    return (*(int(p) for p in parts[:4]), parts[4])


def tile_name(tile) -> str:
    return ",".join(str(v) for v in tile)


def timed(calls) -> float:
    """Microseconds per call of ``calls`` (one closure per weight copy): the best of three CUDA graphs."""
    from mamballama_cli.ops.graph_timing import graph_call_us

    return min(graph_call_us(calls) for _ in range(3))


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:200]}"


def run_entry(fn, ws, ref, nbytes: int) -> dict:
    """``fn(w)`` checked against ``ref`` on the first weight, then timed over all of ``ws``: {us, tbps, rel_err},
    or {error} (a tile that does not build here, such as too much shared memory, or one that disagrees)."""
    try:
        y = fn(ws[0])
        torch.cuda.synchronize()
        err = float((y.float() - ref.float()).norm() / ref.float().norm())
        if not err < 1e-2:
            return {"error": f"disagrees: relative error {err:.2e}"}
        us = timed([lambda w=w: fn(w) for w in ws])
    except Exception as exc:  # noqa: BLE001 - a tile that fails is a row of the table
        return {"error": one_line(exc)}
    return {"us": round(us, 2), "tbps": round(nbytes / (us * 1e-6) / 1e12, 3), "rel_err": float(f"{err:.3g}")}


def show(shape: str, name: str, entry: dict) -> None:
    if "error" in entry:
        print(f"{shape:>18} {name:>22}  error {entry['error']}", flush=True)
    else:
        print(f"{shape:>18} {name:>22}  {entry['us']:9.2f} us  {entry['tbps']:6.3f} TB/s", flush=True)


def bench_shape(out: dict, m: int, n: int, k: int, glu: bool, tiles: list, late) -> None:
    """One shape into ``out``: the baselines before and after the tiles, each tile, the best tile and its ratios to
    the baselines (below 1: the TMA kernel is faster). ``late()``: whether the deadline has passed."""
    from mamballama_cli import ops
    from mamballama_cli.ops.decode import swiglu_ref
    from mamballama_cli.ops.graph_timing import l2_copies
    from mamballama_cli.ops.triton_gemv import gemv_launch
    from mamballama_cli.ops.triton_gemv_tma import gemv_tma, tma_supported

    dev = torch.device("cuda")
    shape = f"{m}x{n}x{k}" + (":glu" if glu else "")
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) / k**0.5
    nbytes = w.numel() * w.element_size()
    copies = l2_copies(dev, nbytes, 16)
    ws = [w] + [w.clone() for _ in range(copies - 1)]
    ref, ref_one = ((swiglu_ref(F.linear(xx, w)) if glu else F.linear(xx, w)) for xx in (x, x[:1]))
    base = BASELINE_TILES.get(f"{n}x{k}" + (":glu" if glu else ""), {})
    swiglu = ops.dispatch("swiglu", dev)[1]  # the decode step's swiglu op, after cuBLAS's [gate; up] GEMV
    out.update(weight_bytes=nbytes, copies=copies, supported=tma_supported(x, w), baselines={}, tiles={})
    runs = {"cublas": (lambda wt: swiglu(F.linear(x, wt)) if glu else F.linear(x, wt), ref)}
    if "current" in base:
        runs["current"] = (lambda wt: gemv_launch(x, wt, config=base["current"], glu=glu), ref)
    if "one_row" in base:
        runs["one_row"] = (lambda wt: gemv_launch(x[:1], wt, config=base["one_row"], glu=glu), ref_one)

    def baselines(when: str) -> None:
        # each baseline's entry before and after the tiles; its us and TB/s: the faster of the two
        for name, (fn, want) in runs.items():
            entry = run_entry(fn, ws, want, nbytes)
            show(shape, f"{name} ({when})", entry)
            kept = out["baselines"].setdefault(name, {"tile": list(base[name])} if name in base else {})
            kept[when] = entry
            times = [kept[t]["us"] for t in ("before", "after") if "us" in kept.get(t, {})]
            if times:
                kept.update(us=min(times), tbps=round(nbytes / (min(times) * 1e-6) / 1e12, 3))

    baselines("before")
    for tile in tiles:
        if late():
            out["tiles"][tile_name(tile)] = {"error": "skipped: deadline"}
            continue
        entry = run_entry(lambda wt, tile=tile: gemv_tma(x, wt, tile, glu=glu), ws, ref, nbytes)
        out["tiles"][tile_name(tile)] = entry
        show(shape, tile_name(tile), entry)
    if not late():
        baselines("after")
    timed_tiles = {name: e["us"] for name, e in out["tiles"].items() if "us" in e}
    if timed_tiles:
        best = min(timed_tiles, key=timed_tiles.get)
        out.update(best_tile=best, best_us=timed_tiles[best], best_tbps=out["tiles"][best]["tbps"])
        for name in ("current", "one_row", "cublas"):
            if "us" in out["baselines"].get(name, {}):
                out[f"best_over_{name}"] = round(timed_tiles[best] / out["baselines"][name]["us"], 3)
        print(f"{shape:>18} best {best}: {timed_tiles[best]:.2f} us, x{out.get('best_over_current', float('nan'))} "
              f"of the current five-row tile, x{out.get('best_over_one_row', float('nan'))} of one row", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="ROWSxNxK[:glu] each (default: %(default)s)")
    ap.add_argument("--tiles", nargs="+", default=None, help="BLOCK_N,BLOCK_K,warps,stages,mode each "
                    "(default: ops/triton_gemv_tma.py's TMA_TILES)")
    ap.add_argument("--output", required=True, metavar="JSON", help="write the results here (after every shape)")
    ap.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                    help="time no new entry after this many seconds from the start; what was done is written")
    args = ap.parse_args(argv)
    shapes = [(s, *parse_shape(s)) for s in args.shapes]
    tiles = list(TMA_TILES) if args.tiles is None else [parse_tile(t) for t in args.tiles]
    if not torch.cuda.is_available():
        print("error: gemv_tma needs a CUDA device; run it on the GPU machine", file=sys.stderr)
        return 2
    import triton

    from mamballama_cli import ops

    start = time.monotonic()

    def late() -> bool:
        return args.deadline is not None and time.monotonic() - start > args.deadline

    dev = torch.device("cuda")
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {"benchmark": "gemv_tma", "date": now.isoformat(timespec="seconds"),
              "command": sys.argv if argv is None else [sys.argv[0], *argv],
              "machine": {"device": torch.cuda.get_device_name(dev),
                          "capability": list(torch.cuda.get_device_capability(dev)),
                          "torch": torch.__version__, "triton": triton.__version__},
              "tiles": [tile_name(t) for t in tiles], "swiglu_backend": ops.dispatch("swiglu", dev)[0], "shapes": {}}
    for shape, m, n, k, glu in shapes:
        out = result["shapes"][shape] = {"rows": m, "weight": [n, k], "glu": glu, "outputs": n // 2 if glu else n}
        if late():
            out["skipped"] = "deadline"
            continue
        bench_shape(out, m, n, k, glu, tiles, late)
        write_result(result, args.output)
        torch.cuda.empty_cache()
    write_result(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
