"""``speculative_verify.py --gemv-graph-tiles`` (gpu_session.sh verifyg): every several-row GEMV kernel's autotuned
tile chosen again among the autotuner's fastest by timing in CUDA graphs (ops/gemv_tuning.py), through the
``RETILE`` hook of ops/graph_timing.py that the kernels' timed choices call. The graph timing is stubbed here; the
GPU runs it."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import NEEDS_TRITON

pytestmark = [NEEDS_TRITON, pytest.mark.usefixtures("one_thread")]


def _tuner(configs, new_key, old_key):
    """A stand-in autotuner that has just tuned new_key (its pick configs[1]); configs[2] failed to run (inf)."""
    timings = {c: [10.0 + i, 0.0, 0.0] for i, c in enumerate(configs)}  # the autotuner's order: as listed
    timings[configs[2]] = [float("inf")] * 3
    return SimpleNamespace(cache={old_key: configs[0], new_key: configs[1]}, best_config=configs[1],
                           configs_timings=timings)


def test_graph_retile_keeps_the_tile_fastest_in_cuda_graphs_among_the_autotuners_fastest(monkeypatch):
    """Of the autotuner's timings of its last run, its TOP fastest tiles that ran (an inf is left out) are timed
    again, each with the tuner's entry for the new shape set to it while ``ours`` runs, and the fastest in graphs
    becomes the tuner's tile for that shape alone (and its best_config); the pick and the graph timings are
    returned for the shape's record. Nothing changes where the run tuned no new shape or two, or kept no
    timings."""
    from mamballama_cli.ops import gemv_tuning as t
    from mamballama_cli.ops import triton_gemv as g

    configs = list(g._skinny_tuned.configs)
    old_key, new_key = (5, 96, 128, "torch.bfloat16"), (5, 96, 64, "torch.bfloat16")
    tuner = _tuner(configs, new_key, old_key)
    ranked = [c for c in configs if c is not configs[2]][:t.TOP]
    graph = {t.config_name(c): 9.0 - i for i, c in enumerate(ranked)}  # in graphs: the reverse order
    ran = []

    def ours(w):
        ran.append(tuner.cache[new_key])
        return w

    def timed(a, b, w):
        a(w)
        return graph[t.config_name(tuner.cache[new_key])], 20.0, 2

    monkeypatch.setattr(t, "graph_ab_us", timed)
    got = t.graph_retile(tuner, {old_key}, ours, lambda w: w, torch.zeros(96, 64))
    assert ran == ranked
    assert tuner.cache[new_key] is ranked[-1] and tuner.best_config is ranked[-1]
    assert tuner.cache[old_key] is configs[0]
    assert got == {"autotuned_tile": g.tile_name(configs[1]),
                   "graph_tiles_us": {t.config_name(c): graph[t.config_name(c)] for c in ranked}}
    ran.clear()
    assert t.graph_retile(tuner, {old_key, new_key}, ours, lambda w: w, None) == {}  # no new shape
    assert t.graph_retile(tuner, set(), ours, lambda w: w, None) == {}  # two new shapes: whose timings?
    tuner.configs_timings = {}
    assert t.graph_retile(tuner, {old_key}, ours, lambda w: w, None) == {} and ran == []


def test_a_tile_that_fails_its_graph_timing_ends_the_retiming_and_is_said(monkeypatch):
    """The fastest tile timed before the failure is kept (or the autotuner's pick, where none was), and the
    failure is reported, not raised: the op's choice goes on."""
    from mamballama_cli.ops import gemv_tuning as t
    from mamballama_cli.ops import triton_gemv as g

    configs = list(g._skinny_tuned.configs)
    old_key, new_key = (5, 96, 128, "torch.bfloat16"), (5, 96, 64, "torch.bfloat16")
    tuner = _tuner(configs, new_key, old_key)
    calls = []

    def timed(a, b, w):
        calls.append(tuner.cache[new_key])
        if len(calls) == 2:
            raise RuntimeError("capture failed")
        return 5.0, 6.0, 2

    monkeypatch.setattr(t, "graph_ab_us", timed)
    got = t.graph_retile(tuner, {old_key}, lambda w: w, lambda w: w, None)
    assert len(calls) == 2 and tuner.cache[new_key] is calls[0]
    assert got["graph_tiles_us"] == {t.config_name(calls[0]): 5.0}
    assert got["graph_retile_failed"].startswith(f"{t.config_name(calls[1])}: RuntimeError: capture failed")
    tuner.cache[new_key] = configs[1]
    monkeypatch.setattr(t, "graph_ab_us", lambda a, b, w: (_ for _ in ()).throw(RuntimeError("no")))
    got = t.graph_retile(tuner, {old_key}, lambda w: w, lambda w: w, None)
    assert tuner.cache[new_key] is configs[1] and got["graph_tiles_us"] == {} and "graph_retile_failed" in got


def test_config_names_of_every_gemv_kernels_tiles():
    """The plain/SwiGLU GEMV's and the conv epilogue's tiles by tile_name; the fused norm + GEMV's by BLOCK_N,
    BLOCK_K and warps, with stages and ``dot`` on tensor cores; and use_graph_tiles sets and clears the hook."""
    from mamballama_cli.ops import gemv_tuning as t
    from mamballama_cli.ops import graph_timing
    from mamballama_cli.ops import triton_gemv as g
    from mamballama_cli.ops import triton_gemv_conv as conv
    from mamballama_cli.ops import triton_gemv_fused as fused

    for c in g._skinny_tuned.configs + conv._gemv_spec_conv_tuned.configs:
        assert t.config_name(c) == g.tile_name(c)
    names = {t.config_name(c) for c in fused._fused_tuned.configs}
    assert names == ({",".join(map(str, tile)) for tile in fused.CONFIGS}
                     | {f"{n},{k},{w},{st},dot" for n, k, w, st in fused.DOT_CONFIGS})
    before = graph_timing.RETILE
    try:
        t.use_graph_tiles()
        assert graph_timing.RETILE is t.graph_retile
        t.use_graph_tiles(False)
        assert graph_timing.RETILE is None
    finally:
        graph_timing.RETILE = before


def _hook(monkeypatch, order, result=None):
    """RETILE stubbed: records the call (and runs ``ours`` and ``against`` once each) in ``order``."""
    from mamballama_cli.ops import graph_timing

    seen = {}

    def retile(tuner, before, ours, against, weight):
        order.append("retile")
        seen.update(tuner=tuner, before=before)
        ours(weight)
        against(weight)
        return result or {"graph_tiles_us": {"a": 1.0}}

    monkeypatch.setattr(graph_timing, "RETILE", retile)
    return seen


def test_the_gemv_choice_retiles_several_rows_before_timing_against_cublas_where_switched_on(monkeypatch):
    """``_kernel_is_faster`` with RETILE set calls it for a several-row shape after autotuning and before the timing
    against cuBLAS, with the several-row tuner and its keys before the autotuning; what it returns joins the shape's
    timings. A one-row shape and an unset RETILE skip it."""
    from mamballama_cli.ops import graph_timing
    from mamballama_cli.ops import triton_gemv as g

    order = []
    monkeypatch.setattr(g, "gemv_launch", lambda x, w, b=None, **k: order.append("tune") or F.linear(x, w, b))
    monkeypatch.setattr(g, "_timings", lambda x, w, b: order.append("time") or {"kernel_us": 1.0, "cublas_us": 2.0})
    seen = _hook(monkeypatch, order)
    monkeypatch.setattr(g, "TIMINGS", {})
    w = torch.randn(96, 64)
    assert g._kernel_is_faster(torch.randn(5, 64), w, None, key="five")
    assert order == ["tune", "retile", "tune", "time"] and g.TIMINGS["five"]["graph_tiles_us"] == {"a": 1.0}
    assert seen["tuner"] is g._skinny_tuned and seen["before"] == set(g._skinny_tuned.cache)
    order.clear()
    assert g._kernel_is_faster(torch.randn(1, 64), w, None, key="one")
    assert order == ["tune", "time"] and "graph_tiles_us" not in g.TIMINGS["one"]
    monkeypatch.setattr(graph_timing, "RETILE", None)
    order.clear()
    assert g._kernel_is_faster(torch.randn(5, 64), w, None, key="off") and order == ["tune", "time"]


def test_the_swiglu_gemv_choice_retiles_its_several_row_tuner(monkeypatch):
    """``_glu_is_faster`` (ops/triton_gemv_swiglu.py) at five rows: RETILE after its autotuning, before its graph
    timing against the ops apart, on the several-row SwiGLU tuner; the result joins GLU_TIMINGS."""
    from mamballama_cli.ops import triton_gemv_swiglu as s
    from mamballama_cli.ops.decode import gemv_swiglu_ref

    order = []
    monkeypatch.setattr(s, "gemv_launch", lambda x, w, b=None, **k: order.append("tune") or gemv_swiglu_ref(x, w, b))
    monkeypatch.setattr(s, "graph_ab_us", lambda a, b, w: order.append("time") or (1.0, 2.0, 2))
    monkeypatch.setattr(s, "GLU_TIMINGS", {})
    seen = _hook(monkeypatch, order)
    x, w = torch.randn(5, 64), torch.randn(2 * 48, 64)
    key = (5, *w.shape, x.dtype, None)
    assert s._glu_is_faster(x, w, None, key)
    assert order == ["tune", "retile", "tune", "time"] and seen["tuner"] is s._skinny_glu_tuned
    assert s.GLU_TIMINGS[key]["graph_tiles_us"] == {"a": 1.0} and s.GLU_TIMINGS[key]["glu_us"] == 1.0
    order.clear()
    assert s._glu_is_faster(x[:1], w, None, (1, *w.shape, x.dtype, None)) and order == ["tune", "time"]


def test_the_fused_norm_gemv_choice_retiles_its_tuner_at_several_rows(monkeypatch):
    """``_fused_is_faster`` (ops/triton_gemv_fused.py), the SwiGLU kind at five rows: RETILE on the fused tuner after
    its autotuning and before its graph timing; the result joins TIMINGS."""
    from mamballama_cli.ops import triton_gemv_fused as f

    order = []

    def launch(kind, x, w, bias=None, residual=None, norm_w=None, eps=0.0, config=None):
        order.append("tune")
        return f._unfused(kind, x, w, bias, residual, norm_w, eps)

    monkeypatch.setattr(f, "fused_launch", launch)
    monkeypatch.setattr(f, "graph_ab_us", lambda a, b, w: order.append("time") or (1.0, 2.0, 2))
    monkeypatch.setattr(f, "TIMINGS", {})
    seen = _hook(monkeypatch, order)
    x, res, norm_w, w = torch.randn(5, 64), torch.randn(5, 64), torch.rand(64) + 0.5, torch.randn(2 * 48, 64)
    key = (f.NORM_SWIGLU, 5, *w.shape, x.dtype, None)
    assert f._fused_is_faster(f.NORM_SWIGLU, x, w, None, res, norm_w, 1e-5, key)
    assert order == ["tune", "retile", "tune", "time"] and seen["tuner"] is f._fused_tuned
    assert f.TIMINGS[key]["graph_tiles_us"] == {"a": 1.0} and f.TIMINGS[key]["fused_us"] == 1.0
    order.clear()
    one = (f.NORM_SWIGLU, 1, *w.shape, x.dtype, None)
    assert f._fused_is_faster(f.NORM_SWIGLU, x[:1], w, None, res[:1], norm_w, 1e-5, one)
    assert order == ["tune", "time"] and "graph_tiles_us" not in f.TIMINGS[one]


def test_the_conv_epilogue_choice_retiles_a_window_not_a_step(monkeypatch):
    """``_faster`` (ops/triton_gemv_conv.py), which the window conv GEMV's choice runs: RETILE on the tuner it is
    given, after ``ours`` first ran (its autotuning) and before the graph timing, where the projection has several
    rows; at one row (the decode step's conv epilogue) it is skipped. The result joins the timings."""
    from mamballama_cli.ops import triton_gemv_conv as c

    order = []
    tuner = SimpleNamespace(cache={})

    def run(tag, rows):
        def call(w, state):
            order.append(tag)
            return torch.zeros(1, rows, 96), torch.zeros(1, rows, 8), torch.zeros(1, rows, 64)
        return call

    monkeypatch.setattr(c, "graph_ab_us", lambda a, b, w: order.append("time") or (1.0, 2.0, 2))
    seen = _hook(monkeypatch, order)
    timings = {}
    assert c._faster("w", torch.zeros(96, 64), torch.zeros(1, 8, 8), (8, 16), run("apart", 5), run("tune", 5), False,
                     tuner, timings)
    assert order == ["apart", "tune", "retile", "tune", "apart", "time"] and seen["tuner"] is tuner
    assert timings["w"]["graph_tiles_us"] == {"a": 1.0} and timings["w"]["conv_us"] == 1.0
    order.clear()
    assert c._faster("s", torch.zeros(96, 64), torch.zeros(1, 8, 3), (8, 16), run("apart", 1), run("tune", 1), False,
                     tuner, timings)
    assert order == ["apart", "tune", "time"] and "graph_tiles_us" not in timings["s"]


@pytest.mark.gpu
def test_graph_retile_on_cuda_keeps_each_kernels_fastest_graph_tile_and_the_ops_still_agree():
    """On CUDA, with the hook on, at five rows (a K = 4 verify window) of shapes no other test tunes: the fused norm
    + SwiGLU GEMV op (whose ops apart run the SwiGLU GEMV op and the gemv op, each choosing its own kernel) and the
    window conv GEMV op. Each kernel's timings carry its graph-timed tiles and no failure, its tuner runs the
    fastest of them, and every op still equals its reference."""
    from mamballama_cli.ops import gemv_tuning, graph_timing
    from mamballama_cli.ops import triton_gemv as g
    from mamballama_cli.ops import triton_gemv_conv as conv
    from mamballama_cli.ops import triton_gemv_fused as fused
    from mamballama_cli.ops import triton_gemv_swiglu as glu
    from mamballama_cli.ops.decode import add_rmsnorm_gemv_swiglu_ref
    from mamballama_cli.ops.verify_ref import add_rmsnorm_gemv_spec_conv_ref

    dtype, gen = torch.bfloat16, torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device="cuda") * scale).to(dtype)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())

    def retimed(timings, tuner):
        assert "graph_retile_failed" not in timings and timings.get("graph_tiles_us"), timings
        tiles = timings["graph_tiles_us"]  # rounded to 0.01 us: two tiles can tie there (a part4 run on 2026-12-07)
        assert tiles.get(gemv_tuning.config_name(tuner.best_config)) == min(tiles.values()), (tiles, tuner.best_config)

    before = graph_timing.RETILE
    gemv_tuning.use_graph_tiles()
    try:
        x, r, nw, w = rnd(1, 5, 576), rnd(1, 5, 576), rnd(576), rnd(2 * 1024, 576, scale=576**-0.5)
        y, h = fused.add_rmsnorm_gemv_swiglu_triton(x, r, nw, 1e-5, w, None)
        want = add_rmsnorm_gemv_swiglu_ref(x.double(), r.double(), nw.double(), 1e-5, w.double(), None)
        assert rel(y, want[0]) < 1e-2 and rel(h, want[1]) < 1e-2
        retimed(fused.TIMINGS[(fused.NORM_SWIGLU, 5, 2048, 576, dtype, x.device.index)], fused._fused_tuned)
        retimed(glu.GLU_TIMINGS[(5, 2048, 576, dtype, x.device.index)], g._skinny_glu_tuned)
        retimed(g.TIMINGS[(5, 2048, 576, dtype, x.device.index)], g._skinny_tuned)

        n, c, start, sh = 1553, 960, 576, torch.tensor([2], device="cuda")
        w, buf, cw, cb = rnd(n, 576, scale=576**-0.5), rnd(1, c, 3 + 8), rnd(c, 4, scale=0.5), rnd(c)
        b_ref = buf.double()
        want = add_rmsnorm_gemv_spec_conv_ref(x.double(), r.double(), nw.double(), 1e-5, w.double(), None, b_ref, sh,
                                              0, cw.double(), cb.double(), start, "silu")
        _, post, h = conv.add_rmsnorm_gemv_spec_conv_triton(x, r, nw, 1e-5, w, None, buf, sh, 0, cw, cb, start, "silu")
        assert rel(post, want[1]) < 1e-2 and rel(buf, b_ref) < 1e-2 and rel(h, want[2]) < 1e-2
        retimed(conv.WINDOW_TIMINGS[(5, n, 576, c, dtype, x.device.index)], conv._gemv_spec_conv_tuned)
    finally:
        graph_timing.RETILE = before
