"""The tiles of the Mamba-2 replay kernel (:mod:`mamballama_cli.ops.triton_replay`): which exist for a head size, the
one each shape runs, chosen once by timing the candidates in CUDA graphs (:mod:`mamballama_cli.ops.graph_timing`) on
copies of the state, and the report of the choices for the benchmarks' JSONs. Plain Python: no Triton needed."""

from __future__ import annotations

import torch

from mamballama_cli.ops import tuning
from mamballama_cli.ops.common import _next_pow2, _rel
from mamballama_cli.ops.graph_timing import graph_call_us, l2_copies

GATED_TILE = 4096  # the largest (headdim x dstate) state tile, padded to powers of two, that one program keeps


def replay_tile(p: int, n: int, gated: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_N) of the Mamba-2 replay kernel's first tile for a ``p`` x ``n`` head: gated, one program a
    head (its whole row for the norm); else (BLOCK_P x dstate) tiles of at most 4,096 elements and 32 rows."""
    block_n = _next_pow2(n)
    return (_next_pow2(p) if gated else min(_next_pow2(p), max(1, 4096 // block_n), 32),
            block_n)


# The candidates, (rows of replay_tile's BLOCK_P divided by, num_warps, FORM). The first (FORM 0) loads each step's
# inputs after the last step's stores. On an H100 at the 8B head (a K = 4 window, plain and gated, slotted and not;
# benchmarks/replay_tiles.py, docs/gpu.md, the seventeenth session) the first won every shape, 9.4-12.3 us a call;
# the six others tried there (FORM 1, the window loaded first, at 4 and 8 warps, 13.6-27.6 us; a chunked form in
# float32 dots, 13.6-17.8 us; whole-head tiles for the gated op, 75-205 us) are gone: each candidate compiles on a
# shape's first call, and with eight of them a verify benchmark's first calls took over 240 s on an H200. FORM 2
# (since the eighteenth session) is the first tile with the new steps' loads two steps ahead of their use: FORM 0's
# loads of a step wait behind the last step's stores (the compiler cannot move a load above a store it cannot prove
# apart), so each new step there waits on memory once. It has won every verify window timed since (9.9 us against
# 11.1 for FORM 0 at the 8B head on the H200, the thirtieth session). FORM 1 at 16 rows and 2 warps lost at every
# shape there (13.1 us) and was removed in the thirty-second session for FORM 2 at 8 warps: at the 8B head one
# program of 4 warps a (32 x 128) tile leaves an SM 4 warps, and a K = 4 window is a chain of dependent steps, so
# the kernel waits on its own latency; compiled for sm90 (benchmarks/kernel_sass.py), 8 warps issue 28% fewer
# instructions a thread (triton 3.6, the H200's: 2,352 against 3,280, with the split norm 2,544 against 3,576; triton
# 3.9 the same within 1%) and 9-11 barriers instead of 39-43; not yet timed on a GPU. FORM 3 (the twenty-second session) is the chunked form for a head that
# fits one program (ops/triton_replay_math.py): the window as a few float32 dots and one norm, where the other forms
# are a chain of dependent steps on as few programs as the model has heads (the default teacher's nine).
REPLAY_FORMS = ((1, 4, 0), (1, 4, 2), (1, 8, 2))
FORM_NAMES = ("", "p", "f", "c")  # by FORM; "p" was FORM 1's (removed; it holds FORM 2 and 3 in their places)
CHUNKED_WARPS = (4, 8)  # the chunked tiles' num_warps: under triton 3.6 for sm90 at K = 6, 4,024 instructions a
# thread at 4 warps and 2,408 at 8 (fewer a thread, more in all): which issues faster on nine SMs is the timing's call
TILE_CHOICES: dict = {}  # shape key -> (BLOCK_P, num_warps, FORM), chosen once by timing
TIMINGS: dict = {}  # shape key -> {tile name: microseconds a call in CUDA graphs}
tuning.register_choices("replay", TILE_CHOICES)


def replay_tiles(p: int, n: int, gated: bool) -> list[tuple[int, int, int]]:
    """The (BLOCK_P, num_warps, FORM) tiles worth timing for a ``p`` x ``n`` head, the first tile first (the one
    that runs where nothing can be timed: the interpreter, a CUDA graph's recording)."""
    base, block_n = replay_tile(p, n, gated)
    tiles = [(base, 4, 0)]  # the first, whatever the head's size
    for div, warps, form in REPLAY_FORMS[1:]:
        rows = base // div
        if (gated and div != 1) or rows < 1 or rows * block_n < 32 * warps or (rows, warps, form) in tiles:
            continue
        tiles.append((rows, warps, form))
    if gated and gated_in_one_program(p, n) and base >= 16 and block_n >= 16:  # a tl.dot takes 16 rows at least
        tiles += [(base, warps, 3) for warps in CHUNKED_WARPS]
    return tiles


def gated_tiles(p: int, n: int) -> list[tuple]:
    """The candidates of the gated op (``ssm_replay_gated``): where a head fits one program, its one-program tiles
    (the norm in the kernel); else the tiled kernel's, each followed by the norm op, then the same tiles with the
    norm in the kernel, done by the last of a head's programs to finish (a fourth entry, 1: :func:`splits_norm`;
    one launch a layer fewer)."""
    if gated_in_one_program(p, n):
        return replay_tiles(p, n, True)
    tiles = replay_tiles(p, n, False)
    return tiles + [(*t, 1) for t in tiles]


def splits_norm(tile) -> bool:
    """Whether a gated replay tile normalises in the kernel, by the last of a head's programs (``32x4n``)."""
    return len(tile) > 3 and bool(tile[3])


def norm_in_kernel(tile, p: int, gated: bool) -> tuple[bool, bool]:
    """Where the gated op's tile normalises a ``p``-wide head in the kernel: (whole, split). whole: the tile holds
    the head's whole row (one program a head); split: a split-norm tile, the head's last program normalising."""
    whole = gated and tile[0] >= _next_pow2(p)
    return whole, gated and not whole and splits_norm(tile)


def window_rows(W: int, T: int, form: int = 1) -> tuple[int, int]:
    """(WP, TP): the rows of the tiles of the window's old and new steps that FORM 3 (the chunked form) loads, W and
    T rounded up to powers of two, at least 16 (the rows of its dots); of the other forms, which read none, W and T
    rounded up."""
    least = 16 if form == 3 else 1
    return max(_next_pow2(max(W, 1)), least), max(_next_pow2(max(T, 1)), least)


def tile_name(tile) -> str:
    """``32x4`` (BLOCK_P x num_warps), ``f`` appended for FORM 2, ``c`` for FORM 3 (chunked), ``n`` for the norm split
    over a head's programs (``p`` for the removed FORM 1)."""
    return f"{tile[0]}x{tile[1]}{FORM_NAMES[int(tile[2])]}{'n' if splits_norm(tile) else ''}"


def _fastest(launch, state, cands, key) -> tuple:
    """The fastest of ``cands`` at this shape that agree with the first: each run once on a copy of the state and its
    output and replayed state compared with the first tile's (one that disagrees is recorded as such and never
    runs), then each recorded in CUDA graphs over copies of the state (in place, a final state beside each) that
    together pass twice the L2 cache, as a verify call finds its layers' states cold; the candidates interleaved over
    three rounds, the best of each kept. The timings go into ``TIMINGS[key]``. ``launch(tile, state, final)``
    returns the call's output."""
    copies = l2_copies(state.device, 2 * state.numel() * state.element_size(), 32)
    try:
        pool = [(state.clone(), torch.empty_like(state)) for _ in range(copies)]
    except torch.cuda.OutOfMemoryError:  # a batch that fills the device: the first tile, untimed
        TIMINGS[key] = {"untimed": "no memory for copies of the state"}
        return cands[0]
    first, disagree = None, []
    for c in cands:
        st, fin = pool[0][0].copy_(state), pool[0][1]
        got = (launch(c, st, fin).float().clone(), st.clone())  # the output buffer is shared: a copy
        if first is None:  # its inputs may be a warm-up's unset buffers: judged only where its results are finite
            first = got if all(bool(torch.isfinite(t).all()) for t in got) else False
        elif first is not False and not (_rel(got[0], first[0]) < 1e-2 and _rel(got[1], first[1]) < 1e-4):
            disagree.append(c)
    cands = [c for c in cands if c not in disagree]
    times = dict.fromkeys(cands, float("inf"))
    for _ in range(3):
        for c in cands:
            calls = [lambda st=st, fin=fin, c=c: launch(c, st, fin) for st, fin in pool]
            times[c] = min(times[c], graph_call_us(calls))
    TIMINGS[key] = {**{tile_name(c): round(t, 2) for c, t in times.items()},
                    **{tile_name(c): "disagrees" for c in disagree}}
    return _pick(cands, times)


# A split-norm tile (the gated norm in the kernel) is kept over the fastest tile followed by the norm op unless that
# one is faster by more than this share. The timing above sees the launch saved, not what follows: only a kernel
# that ends the op lets the projection after it start early (TRIGGER, ops/triton_replay.py), and the norm op after
# the other tiles does not. At the 8B head on an H100 the two timed equal (10.13-10.27 us, 2026-12-06).
NORM_IN_KERNEL_MARGIN = 0.05


def _pick(cands, times: dict) -> tuple:
    """The fastest of ``cands`` by ``times``, or the fastest split-norm tile where it is within
    :data:`NORM_IN_KERNEL_MARGIN` of that."""
    best = min(cands, key=times.get)
    split = [c for c in cands if splits_norm(c)]
    if split and not splits_norm(best):
        near = min(split, key=times.get)
        if times[near] <= (1.0 + NORM_IN_KERNEL_MARGIN) * times[best]:
            return near
    return best


def choices_report() -> dict:
    """For a benchmark's JSON: the tile each replay shape runs (``replay_tiles``) and the timings behind it (shapes
    that ran off CUDA, remembered as True by ``graph_timing.chosen``, ran the first tile untimed: left out)."""
    def name(k):
        return f"b{k[0]} h{k[1]} {k[2]}x{k[3]} W{k[4]} T{k[5]}{' gated' if k[6] else ''}{' slotted' if k[8] else ''}"
    return {"replay_tiles": {name(k): tile_name(v) for k, v in TILE_CHOICES.items() if isinstance(v, tuple)},
            "replay_timings": {name(k): t for k, t in TIMINGS.items()}}


def gated_in_one_program(headdim: int, dstate: int) -> bool:
    """Whether ``ssm_replay_gated`` runs as one kernel at this head size: one program must hold a head's whole
    state to normalise its rows (the 8B shape's 128 x 128 is four times :data:`GATED_TILE`; it keeps two kernels)."""
    return _next_pow2(headdim) * _next_pow2(dstate) <= GATED_TILE
