"""Timing a kernel against the alternative it must beat as a decode step runs both: recorded in CUDA graphs, weights
cold in L2. The gemv op (ops/triton_gemv.py), the SwiGLU GEMV (ops/triton_gemv_swiglu.py) and the fused norm + GEMV
ops (ops/triton_gemv_fused.py) choose per shape with it, once per shape (:func:`chosen`), and report their choices
with :func:`shape_report`; the Mamba-2 replay kernel (ops/triton_replay.py) chooses its tile with the same two."""

from __future__ import annotations

import sys

import torch


def graph_call_us(calls: list, reps: int = 7) -> float:
    """Microseconds per call of ``calls`` (closures, each one GEMV) recorded in order into one CUDA graph: the
    median over ``reps`` replays of the graph's time, divided by the calls. A decode step runs its GEMVs this way:
    as graph nodes, each weight cold in L2 (the caller gives weights that together exceed L2)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm: lazy initialisation (cuBLAS handles, workspaces) outside the recording
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps + 1):  # the first replay uploads the graph: not counted
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times = sorted(times[1:])
    return 1000.0 * times[len(times) // 2] / len(calls)


def l2_copies(device, nbytes: int, most: int) -> int:
    """How many copies of ``nbytes`` pass twice the device's L2 cache, at most ``most``: timed over that many, each
    call finds its operand cold, as a decode step or verify window finds its layers' weights and states."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size or 64 << 20
    return max(1, min(most, -(-2 * l2 // nbytes)))


def graph_ab_us(a, b, weight) -> tuple[float, float, int]:
    """Microseconds per call of ``a(w)`` and of ``b(w)``, each recorded in CUDA graphs over enough copies w of
    ``weight`` to pass twice the L2 cache (at most 16), as a decode step runs them, the two interleaved so that a
    clock or a neighbour's change touches both alike; and the number of copies."""
    copies = l2_copies(weight.device, weight.numel() * weight.element_size(), 16)
    ws = [weight] + [weight.clone() for _ in range(copies - 1)]
    ours, theirs = [], []
    for _ in range(3):
        ours.append(graph_call_us([lambda w=w: a(w) for w in ws]))
        theirs.append(graph_call_us([lambda w=w: b(w) for w in ws]))
    return min(ours), min(theirs), copies


def ab_timings(ours: tuple[str, float], theirs: tuple[str, float], copies: int, *more: dict) -> dict:
    """A per-shape choice's record of :func:`graph_ab_us`: each side's microseconds under its name (``ours`` and
    ``theirs`` are (name, us)), rounded to 0.01, how they were timed, then each of ``more`` (the launch form, the
    tiles) in order, a later one's key over an earlier one's."""
    out = {ours[0]: round(ours[1], 2), theirs[0]: round(theirs[1], 2), "how": "graph", "copies": copies}
    for extra in more:
        out.update(extra)
    return out


def failed(exc: BaseException) -> dict:
    """A per-shape choice's record where the kernel did not build or could not be timed: the ops apart serve it."""
    return {"how": "failed", "why": f"{type(exc).__name__}: {str(exc)[:120]}"}


def timed_choice(timings: dict, key, names: tuple[str, str], ours, theirs, weight, retile: tuple, timer,
                 extras=lambda: ()) -> bool:
    """The timed half of a per-shape choice: :func:`retiled` (``retile`` = (tuner, its cache keys before, rows)),
    then ``timer`` (:func:`graph_ab_us`, as the caller's module names it) of ``ours(w)`` against ``theirs(w)``,
    recorded in ``timings[key]`` by :func:`ab_timings` under ``names`` with ``extras()`` (evaluated after the
    timing: the tile the tuner kept) and the retiling; True where ours is faster. A kernel that does not build or
    time is recorded as failed: the ops apart serve the shape."""
    try:
        tiles = retiled(retile[0], retile[1], ours, theirs, weight, retile[2])
        t_ours, t_theirs, copies = timer(ours, theirs, weight)
    except Exception as exc:  # noqa: BLE001 - no fair timing: the ops apart, and why
        timings[key] = failed(exc)
        return False
    timings[key] = ab_timings((names[0], t_ours), (names[1], t_theirs), copies, *extras(), tiles)
    return t_ours < t_theirs


def chosen(choices: dict, key, x, decide) -> bool | None:
    """A per-shape choice, made once: the one remembered for ``key``; on the shape's first use ``decide()`` (which
    times the candidates) on CUDA, True elsewhere (the interpreter tests), remembered. None inside a CUDA graph's
    recording, where nothing can be timed: the caller then runs its fallback, and nothing is remembered."""
    use = choices.get(key)
    if use is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        use = choices[key] = decide() if x.is_cuda else True
    return use


# RETILE(tuner, before, ours, against, weight) -> dict: where set (ops/gemv_tuning.py's A/B,
# ``speculative_verify.py --gemv-graph-tiles``), a several-row shape's autotuned tile is chosen again by timing in
# CUDA graphs, between its autotuning and its timed choice; what it returns joins the shape's timings.
RETILE = None


def retiled(tuner, before: set, ours, against, weight, rows: int) -> dict:
    """Where :data:`RETILE` is set and the shape has several rows: RETILE for the shape ``tuner`` tuned since its
    cache held the keys ``before`` (``ours(w)`` runs the autotuned kernel on weight ``w``, ``against(w)`` what the
    choice times it against); else ``{}``."""
    return RETILE(tuner, before, ours, against, weight) if RETILE is not None and rows > 1 else {}


def shape_report(choices: dict, timings: dict, name, what: str, timed: str) -> dict:
    """``{what: the shapes a kernel serves, timed: {shape and dtype: the timings behind its choice}}``, from a
    choices table and a timings table keyed alike (the dtype second to last, the device index last); ``name``
    writes a key's shape."""
    return {what: sorted({name(k) for k, use in choices.items() if use}),
            timed: {f"{name(k)} {str(k[-2]).replace('torch.', '')}": t
                    for k, t in sorted(timings.items(), key=lambda kv: str(kv[0]))}}


def kernel_choices() -> dict:
    """What the per-shape choices of this process came to, for a benchmark's JSON: the gemv kernel's
    (``gemv_kernel_shapes``, ``gemv_pdl_shapes``, ``gemv_timings``), the SwiGLU GEMV's (``gemv_swiglu_shapes``,
    ``gemv_swiglu_timings``), the fused norm + GEMV kernel's (``fused_gemv_shapes``, ``fused_gemv_timings``), the
    in_proj GEMV with the conv in its epilogue (``gemv_conv_shapes``, ``gemv_conv_timings``) and the
    replay kernel's tiles (``replay_tiles``, ``replay_timings``) and the Mamba-2 step kernel's (``step_tiles``); empty
    for a module that was never imported (no CUDA, or the references forced)."""
    out = {"gemv_kernel_shapes": [], "gemv_swiglu_shapes": [], "fused_gemv_shapes": [], "gemv_conv_shapes": [],
           "replay_tiles": {}, "step_tiles": {}}
    for name in ("triton_gemv", "triton_gemv_swiglu", "triton_gemv_fused", "triton_gemv_conv", "replay_tiles",
                 "triton_decode"):
        module = sys.modules.get(f"mamballama_cli.ops.{name}")
        if module is not None:
            out.update(module.choices_report())
    from mamballama_cli.ops import tuning

    out["tuning"] = tuning.report()  # whether a tuning table gave the choices above (then their timings are absent)
    return out
