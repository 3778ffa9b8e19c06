"""The candidates of the gemv kernels (:mod:`mamballama_cli.ops.triton_gemv`): the tiles the autotuners time, the
acc mode's row groups, and how a tuned tile is named in the benchmarks' JSONs. Plain Python: no Triton needed."""

from __future__ import annotations

import torch

DTYPES = (torch.bfloat16, torch.float16)
MAX_ROWS = 8  # rows (tokens) one call may hold: a verify window of K + 1 <= 8 at batch 1, or a small batch
# (BLOCK_N, BLOCK_K, num_warps[, num_stages]): the candidates the autotuner times per shape on CUDA; the CPU tests run
# every one of them against the reference under Triton's interpreter. CONFIGS: one row; SKINNY: 2..MAX_ROWS rows.
CONFIGS = ((4, 1024, 4), (8, 512, 4), (8, 1024, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 4), (2, 2048, 4))
# SKINNY: (BLOCK_N, BLOCK_K, num_warps, num_stages, mode), mode "dot", "acc" or "dotw" (above, MODES). How each
# tile earned its place (H200 timings, sm90 instruction counts) is in docs/gpu.md, "How SKINNY came to be".
SKINNY = ((16, 256, 4, 4, "dot"), (32, 256, 4, 4, "dot"), (64, 128, 4, 4, "dot"), (32, 128, 4, 6, "dot"),
          (16, 512, 4, 3, "dot"), (64, 256, 8, 3, "dot"),
          (2, 512, 4, 1, "acc"), (2, 1024, 8, 1, "acc"),
          (16, 512, 2, 3, "dot"), (64, 128, 4, 6, "dot"),
          (16, 128, 2, 6, "dotw"), (32, 256, 2, 4, "dotw"), (64, 128, 4, 4, "dotw"))
# the kernel's MODE; dotw: as dot, the weight tile as tl.dot's first operand; dotp, dotwp: the SwiGLU GEMV's dot and
# dotw over one weight tile of paired gate and up rows (PAIRED_TILES)
MODES = {"dot": 0, "acc": 1, "dotw": 2, "dotp": 3, "dotwp": 4}
MODE_NAMES = {v: k for k, v in MODES.items()}  # the kernel's MODE -> its name in a tile
MODES_PLAIN = ("dot", "acc", "dotw")  # the modes of the GEMV without the SwiGLU
DOT_MODES = ("dot", "dotw")  # the tensor-core modes over one weight's rows (also the window conv GEMV's)
PAIRED_MODES = ("dotp", "dotwp")  # the SwiGLU GEMV's tensor-core modes over paired gate and up rows
GLU_MODES = DOT_MODES + PAIRED_MODES  # the modes that take [gate; up] with the SwiGLU epilogue at 2..8 rows
# The SwiGLU GEMV's paired tiles: BLOCK_N outputs a program, a weight tile of their 2 x BLOCK_N gate and up rows, one
# tensor-core product a K tile, as the plain GEMV's loop (the dot modes with GLU keep two tiles and two products).
# Each is a plain SKINNY tile of 2 x BLOCK_N outputs: at five rows on an H100 the plain [gate; up] GEMV ran at 83.55
# us in CUDA graphs and the SwiGLU GEMV's best dot tile at 86.08 (2026-12-06).
PAIRED_TILES = ((8, 512, 2, 3, "dotp"), (16, 512, 2, 3, "dotp"), (16, 256, 4, 4, "dotp"), (32, 128, 4, 6, "dotp"),
                (32, 256, 8, 3, "dotp"), (8, 128, 2, 6, "dotwp"), (16, 256, 2, 4, "dotwp"), (32, 128, 4, 4, "dotwp"))
GLU_TILES = tuple(t for t in SKINNY if t[-1] in DOT_MODES) + PAIRED_TILES  # the SwiGLU GEMV's, 2..MAX_ROWS rows
# Tiles the autotuner does not try yet, timed by benchmarks/gemv_tiles.py (gpu_session.sh gemvtiles) or offered to it
# (speculative_verify.py --gemv-extra) to decide what goes into SKINNY (docs/gpu.md); the CPU tests run each under the
# interpreter as they run the candidates.
EXTRA = ((16, 256, 2, 4, "dot"), (16, 128, 2, 6, "dot"), (32, 256, 2, 4, "dot"), (32, 256, 4, 6, "dot"),
         (16, 256, 2, 4, "dotw"), (16, 512, 2, 3, "dotw"), (32, 256, 4, 4, "dotw"),
         (64, 64, 4, 8, "dotw"), (128, 64, 4, 8, "dotw"), (64, 64, 4, 12, "dotw"), (32, 64, 2, 8, "dotw"))


def row_groups(m: int, mode: int = MODES["acc"]) -> dict:
    """The acc mode's row constexprs at ``m`` rows: the two groups (:func:`_row_split`) and the second's tile size
    (at least 1). The dot modes (``mode``, a :data:`MODES` value) read none of them and get one set for every ``m``,
    so that their tiles compile once for any number of rows, not once a row count."""
    if mode != MODES["acc"]:
        return {"ROWS_A": 1, "ROWS_B": 0, "ROWS_BP": 1}
    a, b = _row_split(m)
    return {"ROWS_A": a, "ROWS_B": b, "ROWS_BP": max(1, b)}


def _row_split(m: int) -> tuple[int, int]:
    """The acc mode's two groups of rows: the largest power of two <= m, then a power of two >= the rest (0 if
    none): 5 -> (4, 1), 6 -> (4, 2), 7 -> (4, 4), 3 -> (2, 1), 8 -> (8, 0)."""
    a = 1 << (int(m).bit_length() - 1)
    rest = int(m) - a
    return a, (1 << (rest - 1).bit_length()) if rest else 0


def tile_name(config) -> str:
    """An autotuner config as the tile it came from: ``"BLOCK_N,BLOCK_K,warps"`` (one row, :data:`CONFIGS`) or
    ``"BLOCK_N,BLOCK_K,warps,stages,mode"`` (:data:`SKINNY`), as ``benchmarks/gemv_tiles.py --extra`` reads it."""
    kw = config.kwargs
    if "MODE" not in kw:
        return f"{kw['BLOCK_N']},{kw['BLOCK_K']},{config.num_warps}"
    mode = MODE_NAMES[kw["MODE"]]
    return f"{kw['BLOCK_N']},{kw['BLOCK_K']},{config.num_warps},{config.num_stages},{mode}"


def median_ms(timing) -> float:
    """An autotuner's timing of one candidate as a number: do_bench's (median, ...) or a bare median."""
    return float(timing[0] if isinstance(timing, (list, tuple)) else timing)


def tuned_tiles(tuner, before=None) -> dict:
    """What the autotuner chose on its last run (``tile``) and, if that run timed the candidates afresh (its timing
    table is no longer ``before``), every candidate's median microseconds (``tiles_us``, one call at a time, as the
    autotuner times them): the data for pruning candidates that never win. Empty where triton keeps neither."""
    out = {}
    best = getattr(tuner, "best_config", None)
    if best is not None:
        out["tile"] = tile_name(best)
    timings = getattr(tuner, "configs_timings", None)
    if timings and timings is not before:
        # a tile that failed to run is timed inf by the autotuner: None here, so that the JSON stays strict
        out["tiles_us"] = {tile_name(c): round(1000.0 * median_ms(v), 2) if median_ms(v) < float("inf") else None
                           for c, v in timings.items()}
    return out
