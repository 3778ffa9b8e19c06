"""The machine code of the gemv tiles for Hopper (sm90), compiled here without a GPU: what each tile's inner loop
issues per weight element, its barriers and shared-memory round trips, registers and spills.

Triton compiles for a named target without a device (ptxas and cuobjdump ship with triton), so a session without a
GPU can still see what a kernel change does to the loop that streams the weights: a decode GEMV reads each weight
once, and at 4 TB/s an SM has about 16 instruction slots a thread per weight element (7.6 elements a clock, 4 warp
instructions a clock), fewer once latency is counted. ``tests/test_kernel_codegen.py`` pins the properties the
fast tiles rely on.

    python3 benchmarks/kernel_sass.py                          # every candidate and EXTRA tile, 5 rows and 1 row
    python3 benchmarks/kernel_sass.py --rows 5 --tiles 16,256,4,4,dot 4,256,4,1,acc --show
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROW = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)")
BRANCH = re.compile(r"BRA\s.*?0x([0-9a-f]+)")


def _tools() -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin")


def available() -> bool:
    """Whether triton's CUDA backend and its cuobjdump are here (they ship with the triton wheel)."""
    try:
        return os.path.exists(os.path.join(_tools(), "cuobjdump"))
    except Exception:  # noqa: BLE001 - no triton, or a build without the CUDA backend
        return False


def compile_tile(rows: int, tile: tuple, k: int = 4096, pdl: bool = False, arch: int = 90):
    """One gemv tile compiled for ``sm<arch>`` as it would be at run time on a bf16 (rows, K) x (N, K)^T call with
    the sizes multiples of 16 (the divisibility triton specialises on)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mamballama_cli.ops import triton_gemv as g

    if rows == 1:
        bn, bk, warps = tile
        stages, fn = 1, g._gemv_kernel
        sig = dict.fromkeys(("X", "W", "BIAS", "Y"), "*bf16") | dict.fromkeys(("N", "K", "stride_wn"), "i32")
        const = {"HAS_BIAS": False, "BLOCK_N": bn, "BLOCK_K": bk, "EVEN_K": k % bk == 0, "PDL": pdl}
    else:
        bn, bk, warps, stages, mode = tile
        fn = g._skinny_kernel
        sig = dict.fromkeys(("X", "W", "BIAS", "Y"), "*bf16") | dict.fromkeys(
            ("M", "N", "K", "stride_xm", "stride_wn", "stride_ym"), "i32")
        a, b = g._row_split(rows)
        const = {"HAS_BIAS": False, "BLOCK_N": bn, "BLOCK_K": bk, "EVEN_K": k % bk == 0, "MODE": g.MODES[mode],
                 "ROWS_A": a, "ROWS_B": b, "ROWS_BP": max(1, b),
                 "PDL": pdl}
    names = list(sig) + list(const)
    sig |= dict.fromkeys(const, "constexpr")
    aligned = [n for n in sig if sig[n] != "constexpr" and n != "M"]  # M (the rows) is small and odd
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def _objdump(kernel, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([os.path.join(_tools(), "cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def loop_body(sass: str) -> list[str]:
    """The instructions of the largest loop (the span of the longest backward branch): the weight-streaming loop."""
    rows = [(int(m.group(1), 16), line) for line in sass.splitlines() if (m := ROW.match(line))]
    best: list[str] = []
    for at, line in rows:
        m = BRANCH.search(line)
        if m and int(m.group(1), 16) < at:
            body = [text for a, text in rows if int(m.group(1), 16) <= a <= at]
            best = body if len(body) > len(best) else best
    return best


def opcode_counts(lines) -> collections.Counter:
    """Opcode (without modifiers) -> how many times it is in ``lines``."""
    return collections.Counter(m.group(3).split(".")[0] for line in lines if (m := ROW.match(line)))


def report(rows: int, tile: tuple, k: int = 4096, pdl: bool = False) -> dict:
    """The loop of one tile: instructions, instructions per weight element a thread holds, its opcode counts, and
    the kernel's registers, local memory (spills) and whether 16-byte weight loads are used."""
    kernel = compile_tile(rows, tile, k, pdl)
    sass = _objdump(kernel, "-sass")
    body = loop_body(sass)
    ops = opcode_counts(body)
    res = _objdump(kernel, "-res-usage")
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    per_thread = tile[0] * tile[1] / (32 * tile[2])
    return {"rows": rows, "tile": ",".join(map(str, tile)), "loop_instructions": len(body),
            "per_weight_element": round(len(body) / per_thread, 2), "registers": regs, "local_bytes": local,
            "barriers": ops["BAR"], "shared_round_trips": ops["STS"] + ops["STSM"],
            "wide_loads": sum(".128" in line for line in body if "LDG" in line or "LDGSTS" in line),
            "pdl_wait": "griddepcontrol.wait" in kernel.asm["ptx"], "ops": dict(ops.most_common(10)),
            "body": body}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[5, 1], help="rows of the call (default: 5 1)")
    ap.add_argument("--k", type=int, default=4096, help="the reduction length K (default: 4096)")
    ap.add_argument("--tiles", nargs="*", default=None, help="tiles as benchmarks/gemv_tiles.py reads them "
                    "(default: every candidate for the rows)")
    ap.add_argument("--pdl", action="store_true", help="the programmatic-dependent-launch form")
    ap.add_argument("--show", action="store_true", help="print each loop's instructions")
    args = ap.parse_args(argv)
    if not available():
        print("error: no triton CUDA backend with cuobjdump here; pip install triton", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gemv_tiles import parse_tile

    from mamballama_cli.ops import triton_gemv as g

    for rows in args.rows:
        tiles = [parse_tile(t) for t in args.tiles] if args.tiles else list(g.CONFIGS if rows == 1 else g.SKINNY + g.EXTRA)
        for tile in tiles:
            if (len(tile) == 3) != (rows == 1):
                continue
            try:
                r = report(rows, tile, args.k, args.pdl)
            except Exception as exc:  # noqa: BLE001 - a tile that does not compile is a line of the table
                print(f"rows {rows} {tile}: error {type(exc).__name__}: {str(exc)[:200]}")
                continue
            print(f"rows {rows} {r['tile']:>18}: {r['per_weight_element']:6.2f} instr/weight element, "
                  f"{r['loop_instructions']:4d} in loop, {r['registers']:3d} regs, spill {r['local_bytes']} B, "
                  f"{r['barriers']} BAR, {r['shared_round_trips']} STS, {r['wide_loads']} 16-B loads  {r['ops']}",
                  flush=True)
            if args.show:
                print("\n".join("    " + line.split(";")[0].strip() for line in r["body"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
