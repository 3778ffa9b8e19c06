"""A/B tools over the several-row GEMV's autotuner (ops/triton_gemv.py), for the verify benchmark
(``benchmarks/speculative_verify.py``): offer it more tiles, or choose its tile again by timing in CUDA graphs.

Triton's autotuner times each candidate tile alone, one call at a time (``do_bench``). A verify call runs its GEMVs
back to back inside a CUDA graph, each weight cold in L2, and there the same tiles take other times: at the 8B
shape's five-row [gate; up] projection on an H100 the autotuner timed its pick at 92.45 us, and the graph timing
against cuBLAS found 83.39 us (2026-12-06). Whether the autotuner's order holds in a graph is what
:func:`graph_retile` lets a run find out: it times the autotuner's fastest few tiles in CUDA graphs and keeps the
fastest there. Both tools change only shapes tuned after they are switched on, in the process that switched them.
"""

from __future__ import annotations

import torch.nn.functional as F

from mamballama_cli.ops import triton_gemv as g
from mamballama_cli.ops.gemv_candidates import EXTRA, MODE_NAMES, MODES, median_ms, tile_name
from mamballama_cli.ops.graph_timing import graph_ab_us

TOP = 4  # the autotuner's fastest tiles that graph_retile times again


def offer_extra(tiles=EXTRA) -> list[str]:
    """Give the 2-8-row autotuner ``tiles`` (entries shaped as ``SKINNY``'s; default ``EXTRA``) besides its
    candidates, for shapes not yet tuned in this process (``speculative_verify.py --gemv-extra``: the verify call
    with them, against a run without); returns the names of the tiles added (those already there are skipped)."""
    added = []
    for n, k, w, st, mode in tiles:
        config = g.triton.Config({"BLOCK_N": n, "BLOCK_K": k, "MODE": MODES[mode]}, num_warps=w, num_stages=st)
        if tile_name(config) not in {tile_name(c) for c in g._skinny_tuned.configs}:
            g._skinny_tuned.configs.append(config)
            added.append(tile_name(config))
    return added


def _tile(config) -> tuple:
    """An autotuner config as ``gemv_launch``'s ``config`` tuple (an entry shaped as ``SKINNY``'s)."""
    kw = config.kwargs
    return kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages, MODE_NAMES[kw["MODE"]]


def graph_retile(x, weight, bias) -> dict:
    """For a shape the several-row autotuner has just tuned (``_kernel_is_faster`` calls this right after): time its
    :data:`TOP` fastest tiles, by its own timings, inside CUDA graphs over copies of the weight (each against
    ``F.linear``, interleaved, as ``graph_ab_us`` times), and make the fastest there the tuner's tile for this
    shape. Returns ``{"autotuned_tile": its pick, "graph_tiles_us": {tile: microseconds}}`` for the shape's
    timings; ``{}`` where the tuner kept no timings or no entry for the shape."""
    tuner = g._skinny_tuned
    timings = getattr(tuner, "configs_timings", None) or {}
    n, k = weight.shape
    rows = x.numel() // k
    keys = [key for key in tuner.cache if tuple(key[:3]) == (rows, n, k) and str(x.dtype) in key[3:]]
    if not timings or len(keys) != 1:
        return {}
    picked = tuner.cache[keys[0]]
    ranked = sorted(timings, key=lambda c: median_ms(timings[c]))[:TOP]
    graph_us = {}
    for config in ranked:
        tile = _tile(config)
        ours, _, _ = graph_ab_us(lambda w, tile=tile: g.gemv_launch(x, w, bias, config=tile),
                                 lambda w: F.linear(x, w, bias), weight)
        graph_us[config] = ours
    tuner.cache[keys[0]] = min(graph_us, key=graph_us.get)
    return {"autotuned_tile": tile_name(picked),
            "graph_tiles_us": {tile_name(c): round(us, 2) for c, us in graph_us.items()}}


def use_graph_tiles(on: bool = True) -> None:
    """Switch :func:`graph_retile` on (or off) for the shapes the gemv op tunes from now on in this process."""
    g.RETILE = graph_retile if on else None
