"""The ``gemv_swiglu`` op (reference: ``swiglu(gemv(x, [gate; up]))`` in ops/decode.py; on CUDA the one-row GEMV
kernel with a second accumulator and the SwiGLU in its epilogue, ops/triton_gemv.py ``GLU`` and
ops/triton_gemv_swiglu.py; at 2-8 rows the several-row kernel's tensor-core modes): every one-row tile and every
several-row one against the reference under Triton's interpreter, in both launch forms; what the launcher
refuses; the per-shape choice against the ops apart with the timing stubbed; the fused norm op's fallback routed
through it; and on CUDA (gpu, part1 of benchmarks/gpu_session.sh) the kernel at the 8B and default-teacher shapes
and its timed choice."""

import pytest
import torch
from helpers import NEEDS_TRITON, PATCHED_SCRIPT_HEAD, interpreted_json


@NEEDS_TRITON
def test_every_one_row_tile_with_the_swiglu_epilogue_equals_the_reference_under_the_interpreter():
    """Each one-row candidate with ``glu=True``, plain and pdl launch, bf16 and fp16 (CUDA-core products: the
    interpreter reads bf16 right here), partial blocks of outputs and of K, with and without bias: against the
    reference in float64 (three roundings to the half dtype: each projection, silu, the product), and against the
    ops apart in the same dtype (only the summation order differs)."""
    from mamballama_cli.ops.triton_gemv import CONFIGS

    errs = interpreted_json(PATCHED_SCRIPT_HEAD + r"""
import torch.nn.functional as F
from mamballama_cli.ops.decode import gemv_swiglu_ref
from mamballama_cli.ops.triton_gemv import CONFIGS, gemv_launch
gen = torch.Generator().manual_seed(3)
out = {}
for dtype in (torch.bfloat16, torch.float16):
    for n, k, bias in ((37, 2048, True), (64, 1000, False), (130, 4096, True), (21, 96, True)):
        x = torch.randn(1, k, generator=gen).to(dtype)
        w = (torch.randn(2 * n, k, generator=gen) * 2 / k**0.5).to(dtype)  # gates of both signs, around 1 and 2
        b = torch.randn(2 * n, generator=gen).to(dtype) if bias else None
        want = gemv_swiglu_ref(x.double(), w.double(), b.double() if bias else None)
        gu = F.linear(x.float(), w.float(), b.float() if bias else None).to(dtype)
        apart = (F.silu(gu[..., :n].float()).to(dtype).float() * gu[..., n:].float()).to(dtype)
        for cfg in CONFIGS:
            for pdl in (False, True):
                y = gemv_launch(x, w, b, config=cfg, pdl=pdl, glu=True)
                assert y.shape == (1, n) and y.dtype == dtype
                key = f"{dtype} {n}x{k} {cfg} {pdl}"
                out[key] = [float((y.double() - want).norm() / want.norm()),
                            float((y.float() - apart.float()).norm() / apart.float().norm())]
print(json.dumps(out))
""", str(__import__("pathlib").Path(__file__).parent), timeout=600)
    assert len(errs) == 2 * 4 * len(CONFIGS) * 2
    # The interpreter truncates to bf16 where CUDA rounds to nearest (1 + 2^-8 + 2^-10 -> 1.0, torch: 1.0078125),
    # and the kernel rounds four times (each projection, silu, the product): about 1.2% in bf16 here, against
    # 0.03-0.05% in fp16, which rounds to nearest; the gpu test holds bf16 to 6e-3. A swapped gate and up, a
    # missing bias half or a wrong row offset is off by tens of percent.
    tol = {"torch.bfloat16": 2e-2, "torch.float16": 2e-3}
    bad = {k: v for k, v in errs.items() if not max(v) < tol[k.split()[0]]}
    assert not bad, bad


@NEEDS_TRITON
def test_every_several_row_tile_with_the_swiglu_epilogue_equals_the_reference_under_the_interpreter():
    """Each several-row candidate of the SwiGLU GEMV (``GLU_TILES``: the dot modes of SKINNY, with the gate and up
    tiles apart, and the paired tiles, dotp and dotwp, one weight tile of gate and up rows side by side, split in the
    epilogue), plain and pdl launch,
    at 2, 5 and 8 rows (a verify window of K = 1, 4, 7), partial blocks of outputs and of K, with and without bias,
    in fp16 (the interpreter's tl.dot reads bf16 as raw bits; the gpu test runs bf16): against the float64
    reference and the ops apart in fp16. A swapped gate and up, a missing bias half, a wrong up-row offset or a row
    mixed with another is off by tens of percent."""
    from mamballama_cli.ops.triton_gemv import GLU_TILES, PAIRED_TILES, SKINNY

    errs = interpreted_json(PATCHED_SCRIPT_HEAD + r"""
import torch.nn.functional as F
from mamballama_cli.ops.decode import gemv_swiglu_ref
from mamballama_cli.ops.triton_gemv import GLU_TILES, gemv_launch
gen = torch.Generator().manual_seed(4)
out = {}
dtype = torch.float16
for m, n, k, bias in ((2, 37, 320, True), (5, 70, 1000, False), (8, 40, 256, True)):
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(2 * n, k, generator=gen) * 2 / k**0.5).to(dtype)
    b = torch.randn(2 * n, generator=gen).to(dtype) if bias else None
    want = gemv_swiglu_ref(x.double(), w.double(), b.double() if bias else None)
    gu = F.linear(x.float(), w.float(), b.float() if bias else None).to(dtype)
    apart = (F.silu(gu[..., :n].float()).to(dtype).float() * gu[..., n:].float()).to(dtype)
    for cfg in GLU_TILES:
        for pdl in (False, True):
            y = gemv_launch(x, w, b, config=cfg, pdl=pdl, glu=True)
            assert y.shape == (m, n) and y.dtype == dtype
            out[f"{m}x{n}x{k} {cfg} {pdl}"] = [float((y.double() - want).norm() / want.norm()),
                                                float((y.float() - apart.float()).norm() / apart.float().norm())]
print(json.dumps(out))
""", str(__import__("pathlib").Path(__file__).parent), timeout=900)
    n_dot = sum(c[-1] in ("dot", "dotw") for c in SKINNY)
    assert {c[-1] for c in PAIRED_TILES} == {"dotp", "dotwp"} and len(PAIRED_TILES) >= 6
    assert len(GLU_TILES) == n_dot + len(PAIRED_TILES) and len(errs) == 3 * len(GLU_TILES) * 2 and n_dot >= 8
    bad = {k: v for k, v in errs.items() if not max(v) < 2e-3}
    assert not bad, bad


@NEEDS_TRITON
def test_the_swiglu_launch_takes_an_even_number_of_outputs_and_dot_tiles_at_several_rows():
    from mamballama_cli.ops.triton_gemv import SKINNY, gemv_launch

    w = torch.randn(64, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"\[gate; up\], an even number of outputs, not 63"):
        gemv_launch(torch.randn(1, 32, dtype=torch.float16), w[:63], glu=True)
    acc = next(c for c in SKINNY if c[-1] == "acc")
    with pytest.raises(ValueError, match="at several rows takes a tile of mode dot or dotw or dotp or dotwp, not 'acc'"):
        gemv_launch(torch.randn(2, 32, dtype=torch.float16), w, config=acc, glu=True)
    with pytest.raises(ValueError, match="without the SwiGLU takes a tile of mode dot or acc or dotw, not 'dotp'"):
        gemv_launch(torch.randn(2, 32, dtype=torch.float16), w, config=(8, 32, 2, 1, "dotp"))


@NEEDS_TRITON
def test_the_swiglu_kernel_serves_a_shape_only_where_it_agrees_and_is_timed_faster(monkeypatch):
    """``_glu_is_faster`` with the launch and the graph timing stubbed: kept where the kernel agrees with the ops
    apart and is faster; not where it is slower, disagrees or fails to build or time (each recorded in
    GLU_TIMINGS with the timings or the reason)."""
    from mamballama_cli.ops import triton_gemv_swiglu as s
    from mamballama_cli.ops.decode import gemv_swiglu_ref

    x, w = torch.randn(1, 64), torch.randn(48, 64)
    monkeypatch.setattr(s, "GLU_TIMINGS", {})
    monkeypatch.setattr(s, "gemv_launch", lambda x, w, b=None, pdl=False, glu=False: gemv_swiglu_ref(x, w, b))
    for ours, apart, want in ((8.0, 9.0, True), (9.5, 9.0, False)):
        monkeypatch.setattr(s, "graph_ab_us", lambda a, b, w, o=ours, p=apart: (o, p, 3))
        assert s._glu_is_faster(x, w, None, ("k", ours)) is want
        t = s.GLU_TIMINGS[("k", ours)]
        assert (t["glu_us"], t["apart_us"], t["how"], t["copies"], t["pdl"]) == (ours, apart, "graph", 3, False)
    monkeypatch.setattr(s, "gemv_launch", lambda x, w, b=None, pdl=False, glu=False: gemv_swiglu_ref(x, w, b) + 1)
    assert not s._glu_is_faster(x, w, None, "wrong") and s.GLU_TIMINGS["wrong"] == {"how": "disagrees"}

    def fails(*a, **k):
        raise RuntimeError("does not build")

    monkeypatch.setattr(s, "gemv_launch", fails)
    assert not s._glu_is_faster(x, w, None, "boom")
    assert s.GLU_TIMINGS["boom"]["how"] == "failed" and "RuntimeError: does not build" in s.GLU_TIMINGS["boom"]["why"]


@NEEDS_TRITON
def test_the_op_runs_the_kernel_only_where_it_can_and_was_chosen(monkeypatch):
    """``gemv_swiglu_triton``: 1 to 8 rows of a supported [gate; up] run the kernel (on CPU tensors the choice is
    not timed; each row count a shape of its own); 9 rows, a weight not contiguous along K, float32, or ``--kernels
    ref:gemv`` run the ops apart; a shape timed slower is remembered and runs the ops apart."""
    from mamballama_cli import ops
    from mamballama_cli.ops import triton_gemv_swiglu as s
    from mamballama_cli.ops.decode import gemv_swiglu_ref

    launched = []

    def launch(x, w, b=None, pdl=False, glu=False):
        launched.append((tuple(x.shape), tuple(w.shape), glu))
        return gemv_swiglu_ref(x, w, b)

    monkeypatch.setattr(s, "gemv_launch", launch)
    monkeypatch.setattr(s, "GLU_CHOICES", {})
    g = torch.Generator().manual_seed(0)
    half = lambda *shape: torch.randn(*shape, generator=g).to(torch.bfloat16)
    x, w = half(1, 64), half(96, 64)
    assert torch.equal(s.gemv_swiglu_triton(x, w), gemv_swiglu_ref(x, w))
    assert launched == [((1, 64), (96, 64), True)] and s.GLU_CHOICES == {(1, 96, 64, torch.bfloat16, None): True}
    x5 = half(5, 64)  # a verify window: a shape of its own
    assert torch.equal(s.gemv_swiglu_triton(x5, w), gemv_swiglu_ref(x5, w)) and launched[1:] == [
        ((5, 64), (96, 64), True)] and s.GLU_CHOICES[(5, 96, 64, torch.bfloat16, None)] is True
    launched.clear()
    for args in ((half(9, 64), w), (x, half(64, 96).t()), (x.float(), w.float())):  # 9 rows, K-strided, fp32
        y = s.gemv_swiglu_triton(*args)
        assert torch.equal(y, gemv_swiglu_ref(*args)) and not launched, args[1].shape
    ops.configure("ref:gemv")
    try:
        assert torch.equal(s.gemv_swiglu_triton(x, w), gemv_swiglu_ref(x, w)) and not launched
    finally:
        ops.configure("auto")
    monkeypatch.setattr(s, "GLU", False)  # benchmarks/speed.py --no-glu
    assert torch.equal(s.gemv_swiglu_triton(x, w), gemv_swiglu_ref(x, w)) and not launched
    monkeypatch.setattr(s, "GLU", True)
    s.GLU_CHOICES[(1, 96, 64, torch.bfloat16, None)] = False  # timed slower on its first use
    assert torch.equal(s.gemv_swiglu_triton(x, w), gemv_swiglu_ref(x, w)) and not launched
    assert torch.equal(s.gemv_swiglu_triton(x5, w), gemv_swiglu_ref(x5, w)) and len(launched) == 1  # 5 rows: kernel


def test_the_speed_benchmark_takes_no_glu_and_hands_the_rest_to_eval_speed():
    """``benchmarks/speed.py --no-glu`` (gpu_session.sh b1noglu) and ``--no-gemv-conv`` (b1noconv): the flags are the
    script's own, so eval speed never sees them, and each switches its kernel off (the SwiGLU GEMV; the in_proj
    GEMV with the conv epilogue, ops/triton_gemv_conv.py); the rest reaches eval speed."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "speed.py"
    done = subprocess.run([sys.executable, str(script), "--no-glu", "--no-pdl", "--no-gemv-conv", "--help"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "--max-batch" in done.stdout, done.stderr[-2000:]
    bad = subprocess.run([sys.executable, str(script), "--no-such-option"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert bad.returncode != 0
    for flag, want in (("--no-glu", "GLU False CONV True"), ("--no-gemv-conv", "GLU True CONV False")):
        code = ("import runpy, sys\n"
                f"sys.argv = [{str(script)!r}, {flag!r}, '--help']\n"
                "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
                "from mamballama_cli.ops import triton_gemv_conv as c, triton_gemv_swiglu as s\n"
                "print('GLU', s.GLU, 'CONV', c.CONV)\n")
        off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        assert want in off.stdout, (flag, off.stdout, off.stderr[-2000:])  # that kernel off, and only by its flag


def test_the_fused_norm_swiglu_op_runs_its_gemv_and_swiglu_as_the_gemv_swiglu_op(monkeypatch):
    """Where the fused norm + [gate; up] kernel does not serve a shape, ``add_rmsnorm_gemv_swiglu`` runs the norm
    and then the ``gemv_swiglu`` op as dispatched (its kernel on CUDA), not gemv and swiglu apart."""
    from mamballama_cli import ops
    from mamballama_cli.ops import triton_gemv_fused as fused
    from mamballama_cli.ops.decode import add_rmsnorm_gemv_swiglu_ref, gemv_swiglu_ref

    seen = []
    monkeypatch.setitem(ops.REFERENCES, "gemv_swiglu",
                        lambda x, w, b=None: seen.append(tuple(w.shape)) or gemv_swiglu_ref(x, w, b))
    monkeypatch.setattr(fused, "_choose", lambda *a: False)
    g = torch.Generator().manual_seed(1)
    x, r, nw = (torch.randn(1, 64, generator=g) for _ in range(3))
    w = torch.randn(96, 64, generator=g)
    y, h = fused.add_rmsnorm_gemv_swiglu_triton(x, r, nw[0], 1e-5, w)
    want_y, want_h = add_rmsnorm_gemv_swiglu_ref(x, r, nw[0], 1e-5, w)
    assert seen == [(96, 64)] and torch.equal(y, want_y) and torch.equal(h, want_h)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_swiglu_gemv_on_cuda_equals_the_reference_and_is_chosen_by_timing(dtype):
    """On CUDA: every tile with the SwiGLU epilogue, one row (plain and pdl launch where the device has it) and a
    K = 4 verify window's five (the dot modes, plain launch), at the 8B MLP's [gate; up] (2 x 14,336 x 4,096) and
    the default teacher's (2 x 1,536 x 576) against the reference; the op's first use of each shape checks and
    times the kernel against the ops apart in CUDA graphs, and serves the shape as that timing says; the op
    dispatches to the kernel."""
    from mamballama_cli import ops
    from mamballama_cli.ops.decode import gemv_swiglu_ref
    from mamballama_cli.ops.triton_gemv import CONFIGS, GLU_TILES, _pdl_usable, gemv_launch
    from mamballama_cli.ops.triton_gemv_swiglu import GLU_CHOICES, GLU_TIMINGS, gemv_swiglu_triton

    assert ops.dispatch("gemv_swiglu", torch.device("cuda"))[0] == "mamballama-triton"
    gen = torch.Generator(device="cuda").manual_seed(0)
    for (inter, hidden), rows in ((s, m) for s in ((14336, 4096), (1536, 576)) for m in (1, 5)):
        x = torch.randn(rows, hidden, generator=gen, device="cuda").to(dtype)
        w = (torch.randn(2 * inter, hidden, generator=gen, device="cuda") * 2 / hidden**0.5).to(dtype)
        want = gemv_swiglu_ref(x.double(), w.double())
        for cfg in CONFIGS if rows == 1 else GLU_TILES:
            # five rows: the plain launch here (fewer compiles in part1), both forms in the interpreter test
            for pdl in (False, True) if _pdl_usable(x) and rows == 1 else (False,):
                y = gemv_launch(x, w, config=cfg, pdl=pdl, glu=True)
                assert float((y.double() - want).norm() / want.norm()) < 6e-3, (cfg, pdl, inter, rows)
        y = gemv_swiglu_triton(x, w)
        key = (rows, 2 * inter, hidden, dtype, x.device.index)
        assert key in GLU_CHOICES and GLU_TIMINGS[key]["how"] == "graph", GLU_TIMINGS.get(key)
        assert float((y.double() - want).norm() / want.norm()) < 6e-3
        print("gemv_swiglu", key, "kernel" if GLU_CHOICES[key] else "apart", GLU_TIMINGS[key])
