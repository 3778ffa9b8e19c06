"""A/B tools over the several-row GEMV kernels' autotuners, for the verify benchmark
(``benchmarks/speculative_verify.py``): offer the plain GEMV's more tiles, or choose every several-row kernel's
tile again by timing in CUDA graphs.

Triton's autotuner times each candidate tile alone, one call at a time (``do_bench``). A verify call runs its GEMVs
back to back inside a CUDA graph, each weight cold in L2, and there the same tiles take other times: at the 8B
shape's five-row [gate; up] projection on an H100 the autotuner timed its pick at 92.45 us, and the graph timing
against cuBLAS found 83.39 us (2026-12-06). Whether the autotuner's order holds in a graph is what
:func:`graph_retile` lets a run find out, for each kernel that a verify call's GEMVs run at several rows (the plain
GEMV, the SwiGLU GEMV, the fused norm + GEMV and its SwiGLU kind, the in_proj GEMV with the window's conv): it times
the autotuner's fastest few tiles in CUDA graphs and keeps the fastest there. Both tools change only shapes tuned
after they are switched on, in the process that switched them.
"""

from __future__ import annotations

from mamballama_cli.ops import graph_timing
from mamballama_cli.ops import triton_gemv as g
from mamballama_cli.ops.gemv_candidates import EXTRA, MODES, PAIRED_MODES, median_ms, tile_name
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


_PAIRED = {MODES[m] for m in PAIRED_MODES}  # the SwiGLU GEMV's paired tiles' MODE values (PAIRED_TILES)


def paired_offered() -> bool:
    """Whether the several-row SwiGLU GEMV's autotuner has paired tiles among its candidates."""
    return any(c.kwargs["MODE"] in _PAIRED for c in g._skinny_glu_tuned.configs)


def without_paired() -> list[str]:
    """Take the paired tiles (``dotp``, ``dotwp``: ``PAIRED_TILES``) from the several-row SwiGLU GEMV's autotuner, for
    shapes not yet tuned in this process (``speculative_verify.py --no-paired-glu``: the verify call without them,
    against a run with); returns the names of the tiles taken out."""
    gone = [c for c in g._skinny_glu_tuned.configs if c.kwargs["MODE"] in _PAIRED]
    g._skinny_glu_tuned.configs[:] = [c for c in g._skinny_glu_tuned.configs if c.kwargs["MODE"] not in _PAIRED]
    return [tile_name(c) for c in gone]


def config_name(config) -> str:
    """An autotuner config of any of the GEMV kernels as a short name: :func:`tile_name`'s for the plain and SwiGLU
    GEMVs' and the conv epilogue's tiles (they carry a MODE), ``"BLOCK_N,BLOCK_K,warps"`` and, on tensor cores,
    ``",stages,dot"`` for the fused norm + GEMV's."""
    kw = config.kwargs
    if "MODE" in kw or "DOT" not in kw:
        return tile_name(config)
    dot = f",{config.num_stages},dot" if kw["DOT"] else ""
    return f"{kw['BLOCK_N']},{kw['BLOCK_K']},{config.num_warps}{dot}"


def graph_retile(tuner, before: set, ours, against, weight) -> dict:
    """For the one shape ``tuner`` has tuned since its cache held the keys ``before`` (the kernels' timed choices
    call this through ``graph_timing.retiled``, right after autotuning): time the autotuner's :data:`TOP` fastest
    tiles, by its own timings of that run, inside CUDA graphs over copies of the weight (``ours(w)``, the autotuned
    kernel, run with the tuner's entry for the shape set to each tile in turn, interleaved with ``against(w)``, as
    ``graph_ab_us`` times), and make the fastest there the tuner's tile for that shape. Returns ``{"autotuned_tile":
    its pick, "graph_tiles_us": {tile: microseconds}}`` for the shape's timings; ``{}`` where the run did not tune
    exactly one new shape or kept no timings (a disk-cached tuning keeps them). A tile whose timing fails ends the
    retiming: the fastest timed so far, or the autotuner's pick, is kept, and ``graph_retile_failed`` says why."""
    new = [key for key in tuner.cache if key not in before]
    timings = getattr(tuner, "configs_timings", None) or {}
    if len(new) != 1 or not timings:
        return {}
    key, picked = new[0], tuner.cache[new[0]]
    ranked = sorted((c for c in timings if median_ms(timings[c]) < float("inf")),
                    key=lambda c: median_ms(timings[c]))[:TOP]
    graph_us, failed = {}, {}
    for config in ranked:
        tuner.cache[key] = config
        try:
            graph_us[config], _, _ = graph_ab_us(ours, against, weight)
        except Exception as exc:  # noqa: BLE001 - a tile that cannot be recorded or timed is left out, and said
            failed = {"graph_retile_failed": f"{config_name(config)}: {type(exc).__name__}: {str(exc)[:120]}"}
            break
    tuner.cache[key] = tuner.best_config = min(graph_us, key=graph_us.get) if graph_us else picked
    return {"autotuned_tile": config_name(picked),
            "graph_tiles_us": {config_name(c): round(us, 2) for c, us in graph_us.items()}, **failed}


def use_graph_tiles(on: bool = True) -> None:
    """Switch :func:`graph_retile` on (or off) for the several-row shapes the GEMV kernels tune from now on in this
    process."""
    graph_timing.RETILE = graph_retile if on else None
