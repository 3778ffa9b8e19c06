"""The ``add_rmsnorm_gemv_spec_conv`` op: a verify window's in_proj and its conv (reference: ``add_rmsnorm_gemv``
then ``spec_conv`` on in_proj's [x | B | C] columns, ops/verify_ref.py; on CUDA the several-row GEMV kernel with the
window conv in its epilogue, ops/triton_gemv_conv.py): every window tile against the ops apart and the reference
under Triton's interpreter; what the kernel refuses; the per-shape choice with the timing stubbed; a Mamba-2 verify
window through the op; and on CUDA (gpu, part4 of benchmarks/gpu_session.sh) the 8B and default-teacher in_proj
shapes and the timed choice."""

import pytest
import torch
from helpers import NEEDS_TRITON, PATCHED_SCRIPT_HEAD, assert_equal_and_close, interpreted_json, route_conv_op


@NEEDS_TRITON
def test_every_window_tile_with_the_conv_epilogue_equals_the_ops_apart_under_the_interpreter():
    """Each window tile (the several-row kernel's dot modes), 2, 5 and 8 rows: conv columns that start and end
    inside a block of outputs (and at the output's first column), partial blocks of K, with and without either
    bias, SiLU and none, widths 4 and 2, a prefix read at a shift (a rebase step) and a window appended at an
    offset (a continue step); bf16, and fp16 and the pdl launch on two tiles. Against the ops apart run by the same
    interpreter (the several-row GEMV kernel at the same tile, then the window conv kernel on its columns): the
    same arithmetic, so the projection, the conv's output and the rewritten buffer must be equal bit for bit; and
    the conv against the float64 reference on the GEMV's rounded output, within the conv's roundings."""
    from mamballama_cli.ops.triton_gemv_conv import WINDOW_TILES

    out = interpreted_json(PATCHED_SCRIPT_HEAD + r"""
from mamballama_cli.ops.triton_conv import spec_conv_triton
from mamballama_cli.ops.triton_gemv import gemv_launch
from mamballama_cli.ops.triton_gemv_conv import WINDOW_TILES, gemv_spec_conv_launch
from mamballama_cli.ops.verify_ref import spec_conv_ref
gen = torch.Generator().manual_seed(7)
out = {}
cases = ((5, 70, 320, 37, 5, 4, True, True, "silu", 2, 0), (2, 130, 256, 64, 66, 4, False, True, "silu", 0, 3),
         (8, 96, 96, 96, 0, 2, True, False, None, 1, 0))
runs = [(torch.bfloat16, case, cfg, False) for case in cases for cfg in WINDOW_TILES]
runs += [(dtype, cases[0], cfg, pdl) for cfg in WINDOW_TILES[:1] + WINDOW_TILES[-1:]
         for dtype, pdl in ((torch.float16, False), (torch.bfloat16, True))]
for dtype, (m, n, k, c, start, width, bias, cbias, act, shift, offset), cfg, pdl in runs:
    x = torch.randn(1, m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    buf = torch.randn(1, c, width - 1 + 8 + 3, generator=gen).to(dtype)
    cw = torch.randn(c, width, generator=gen).to(dtype)
    cb = torch.randn(c, generator=gen).to(dtype) if cbias else None
    sh = torch.tensor([shift])
    b_apart, b_got = buf.clone(), buf.clone()
    y_apart = gemv_launch(x, w, b, config=cfg, pdl=pdl)
    post_apart = spec_conv_triton(y_apart[..., start:start + c], b_apart, sh, offset, cw, cb, act)
    y, post = gemv_spec_conv_launch(x, w, b, b_got, sh, offset, cw, cb, start, act, config=cfg, pdl=pdl)
    assert y.shape == (1, m, n) and post.shape == (1, m, c) and y.dtype == post.dtype == dtype
    same = torch.equal(y, y_apart) and torch.equal(post, post_apart) and torch.equal(b_got, b_apart)
    b_ref = buf.double()
    want = spec_conv_ref(y_apart[..., start:start + c].double(), b_ref, sh, offset, cw.double(),
                         cb.double() if cbias else None, act)
    err = max(float((post.double() - want).norm() / want.norm()), float((b_got.double() - b_ref).norm() / b_ref.norm()))
    out[f"{dtype} {m}x{n}x{k} c{c}@{start} w{width} s{shift} o{offset} {cfg} {pdl}"] = [same, err]
print(json.dumps(out))
""", str(__import__("pathlib").Path(__file__).parent), timeout=900)
    assert_equal_and_close(out, 3 * len(WINDOW_TILES) + 4)


@NEEDS_TRITON
def test_the_window_kernel_takes_one_sequence_of_several_rows_and_a_buffer_with_room():
    """``spec_conv_supported``: one sequence's 2 .. 8 half-precision rows, a (1, C, ...) buffer with room for the
    window after ``offset``, one integer shift, the conv's columns inside the output, SiLU or none; not one row (the
    one-row op's), more than 8, a batch of two, a buffer too short, a float shift, columns past the output, another
    activation, ``--kernels ref:spec_conv``, or either switch off (every conv epilogue, or the window's alone)."""
    from mamballama_cli import ops
    from mamballama_cli.ops import triton_gemv_conv as g

    half = lambda *s: torch.randn(*s).to(torch.bfloat16)
    w, buf, cw, sh = half(100, 64), half(1, 40, 3 + 8), half(40, 4), torch.tensor([1])
    ok = lambda x, *a, **k: g.spec_conv_supported(x, w, None, *a, **k)
    assert ok(half(1, 5, 64), buf, sh, 0, cw, None, 10, "silu") and ok(half(1, 8, 64), buf, sh, 0, cw, None, 60, None)
    assert not ok(half(1, 1, 64), buf, sh, 0, cw, None, 10, "silu")  # one row
    assert not ok(half(1, 9, 64), half(1, 40, 3 + 9), sh, 0, cw, None, 10, "silu")  # past MAX_ROWS
    assert not ok(half(2, 4, 64), half(2, 40, 11), torch.tensor([1, 0]), 0, cw, None, 10, "silu")  # a batch
    assert not ok(half(1, 5, 64), buf, sh, 4, cw, None, 10, "silu")  # 4 + 3 + 5 > 11 entries
    assert not ok(half(1, 5, 64), buf, torch.tensor([1.0]), 0, cw, None, 10, "silu")
    assert not ok(half(1, 5, 64), buf, sh, 0, cw, None, 61, "silu")  # columns 61 .. 100 pass the output's 100
    assert not ok(half(1, 5, 64), buf, sh, 0, cw, None, 10, "gelu")
    ops.configure("ref:spec_conv")
    try:
        assert not ok(half(1, 5, 64), buf, sh, 0, cw, None, 10, "silu")
    finally:
        ops.configure("auto")
    for switch in ("CONV", "SPEC_CONV"):  # every conv epilogue off, or the window's alone (--no-spec-conv)
        setattr(g, switch, False)
        try:
            assert not ok(half(1, 5, 64), buf, sh, 0, cw, None, 10, "silu")
        finally:
            setattr(g, switch, True)
    assert ok(half(1, 5, 64), buf, sh, 0, cw, None, 10, "silu")


@NEEDS_TRITON
def test_the_window_kernel_serves_a_shape_only_where_it_agrees_and_is_timed_faster(monkeypatch):
    """The op's first use of a shape on CUDA, with the device, the launch and the graph timing stubbed: the shape is
    served where the kernel agrees with the ops apart and is faster; not where it is slower, disagrees or fails
    (each recorded in WINDOW_TIMINGS with the numbers or the reason); the caller's buffer is rewritten only by the
    call itself, once, as the ops apart would."""
    from mamballama_cli.ops import triton_gemv_conv as g
    from mamballama_cli.ops.verify_ref import add_rmsnorm_gemv_spec_conv_ref, spec_conv_ref

    gen = torch.Generator().manual_seed(3)
    x, r = torch.randn(1, 5, 64, generator=gen), torch.randn(1, 5, 64, generator=gen)
    nw, w = torch.randn(64, generator=gen), torch.randn(96, 64, generator=gen)
    buf, cw, sh = torch.randn(1, 40, 11, generator=gen), torch.randn(40, 4, generator=gen), torch.tensor([2])
    before = buf.clone()

    def launch(normed, w, b, buf, sh, offset, cw, cb, start, act, pdl=False):  # the kernel's contract
        y = normed @ w.T
        return y, spec_conv_ref(y[..., start:start + buf.shape[1]], buf, sh, offset, cw, cb, act)

    monkeypatch.setattr(g, "WINDOW_CHOICES", {})
    monkeypatch.setattr(g, "WINDOW_TIMINGS", {})
    monkeypatch.setattr(g, "spec_conv_supported", lambda *a: True)  # CPU float32: let the choice run
    monkeypatch.setattr(g, "chosen", lambda choices, key, x, decide: choices.setdefault(key, decide()))
    monkeypatch.setattr(g, "gemv_spec_conv_launch", launch)
    want = add_rmsnorm_gemv_spec_conv_ref(x, r, nw, 1e-5, w, None, before.clone(), sh, 0, cw, None, 8, "silu")
    for ours, apart, use in ((8.0, 9.0, True), (9.5, 9.0, False)):
        g.WINDOW_CHOICES.clear()
        monkeypatch.setattr(g, "graph_ab_us", lambda a, b, w, o=ours, p=apart: (a(w), b(w), (o, p, 3))[-1])
        b = before.clone()
        _, post, h = g.add_rmsnorm_gemv_spec_conv_triton(x, r, nw, 1e-5, w, None, b, sh, 0, cw, None, 8, "silu")
        key = (5, 96, 64, 40, x.dtype, None)
        assert g.WINDOW_CHOICES == {key: use}
        t = g.WINDOW_TIMINGS[key]
        assert (t["conv_us"], t["apart_us"], t["how"], t["copies"], t["pdl"]) == (ours, apart, "graph", 3, False)
        assert torch.allclose(post, want[1], atol=1e-5) and torch.allclose(h, want[2])
        ref_buf = before.clone()
        add_rmsnorm_gemv_spec_conv_ref(x, r, nw, 1e-5, w, None, ref_buf, sh, 0, cw, None, 8, "silu")
        assert torch.allclose(b, ref_buf)  # rewritten once, by the call (the check and the timing used copies)
    monkeypatch.setattr(g, "gemv_spec_conv_launch", lambda *a, **k: (launch(*a, **k)[0], launch(*a, **k)[1] + 1))
    g.WINDOW_CHOICES.clear()
    g.add_rmsnorm_gemv_spec_conv_triton(x, r, nw, 1e-5, w, None, before.clone(), sh, 0, cw, None, 8, "silu")
    assert g.WINDOW_TIMINGS[(5, 96, 64, 40, x.dtype, None)] == {"how": "disagrees"}

    def fails(*a, **k):
        raise RuntimeError("does not build")

    monkeypatch.setattr(g, "gemv_spec_conv_launch", fails)
    g.WINDOW_CHOICES.clear()
    _, post, _ = g.add_rmsnorm_gemv_spec_conv_triton(x, r, nw, 1e-5, w, None, before.clone(), sh, 0, cw, None, 8,
                                                     "silu")
    t = g.WINDOW_TIMINGS[(5, 96, 64, 40, x.dtype, None)]
    assert t["how"] == "failed" and "RuntimeError: does not build" in t["why"]
    assert torch.allclose(post, want[1], atol=1e-5)  # the ops apart served the call
    report = g.choices_report()
    assert report["gemv_spec_conv_shapes"] == [] and "5x96x64 conv 40 float32" in report["gemv_spec_conv_timings"]


@pytest.mark.parametrize("gate", [True, False])
def test_a_mamba2_verify_window_runs_in_proj_and_its_conv_as_one_op(gate):
    """A Mamba-2 layer's window step (two verify calls, the second keeping 2 of the first's 3 tokens: a shifted
    prefix) hands its normed input,
    in_proj and its conv buffer to ``add_rmsnorm_gemv_spec_conv`` (one op, not add_rmsnorm_gemv then spec_conv),
    its conv columns after z (or first, without the gate), and the walk equals the one it replaced: the two ops
    apart, run through the same op table, give the same logits and the same conv buffers."""
    from helpers import tiny_hybrid

    from mamballama_cli.models.runtime import Runtime
    from mamballama_cli.ops.decode import add_rmsnorm_gemv_ref
    from mamballama_cli.ops.verify_ref import spec_conv_ref

    torch.manual_seed(0)
    model = tiny_hybrid(seed=2, overrides=None if gate else {"mamba_gate": False})[0].eval()
    mixer = next(layer.mamba for layer in model.model.layers if not layer.is_attention)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    outs = []
    for fused in (True, False):
        rt = Runtime(model, 1, 32, window=5)
        def apart(x, r, nw, eps, w, b, buf, sh, offset, cw, cb, start, act):  # the op as the two it replaced
            y, h = add_rmsnorm_gemv_ref(x, r, nw, eps, w, b)
            return y, spec_conv_ref(y[..., start:start + buf.shape[1]], buf, sh, offset, cw, cb, act), h

        calls = route_conv_op(rt, "add_rmsnorm_gemv_spec_conv", None if fused else apart, "spec_conv")
        with torch.no_grad():
            rt.prefill(ids[:, :6])
            first = rt.walk(ids[:, 6:9], rt.step(pos=torch.tensor([6]), keep=torch.tensor([0])))
            logits = rt.walk(ids[:, 9:12], rt.step(pos=torch.tensor([8]), keep=torch.tensor([2])))
        n_mamba = model.config.num_hidden_layers - len(model.config.attn_layers)
        assert calls == [mixer.d_z] * (2 * n_mamba) and n_mamba > 0
        bufs = [win.conv.clone() for win in rt.windows]
        assert len(bufs) == n_mamba
        outs.append((first, logits, bufs))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_window_conv_gemv_on_cuda_equals_the_reference_and_is_chosen_by_timing(dtype):
    """On CUDA: every window tile at 5 rows (a K = 4 verify call), plain and pdl launch where the device has it, at
    the 8B hybrid's in_proj (10,272 x 4,096: 6,144 conv channels after z) and the default teacher's (1,545 x 576:
    960 channels), a rebase step's shift, against the reference; the op's first use of each shape checks and times
    the kernel against the ops apart in CUDA graphs and serves the shape as that timing says; the op dispatches to
    the kernel."""
    from mamballama_cli import ops
    from mamballama_cli.ops import triton_gemv_conv as g
    from mamballama_cli.ops.triton_gemv import _pdl_usable
    from mamballama_cli.ops.verify_ref import add_rmsnorm_gemv_spec_conv_ref

    assert ops.dispatch("add_rmsnorm_gemv_spec_conv", torch.device("cuda"))[0] == "mamballama-triton"
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device="cuda") * scale).to(dtype)
    sh = torch.tensor([2], device="cuda")
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())
    for n, k, c, start in ((10272, 4096, 6144, 4096), (1545, 576, 960, 576)):
        x, r, nw = rnd(1, 5, k), rnd(1, 5, k), rnd(k)
        w = rnd(n, k, scale=k**-0.5)
        buf, cw, cb = rnd(1, c, 3 + 8), rnd(c, 4, scale=0.5), rnd(c)
        b_ref = buf.double()
        want = add_rmsnorm_gemv_spec_conv_ref(x.double(), r.double(), nw.double(), 1e-5, w.double(), None, b_ref, sh,
                                              0, cw.double(), cb.double(), start, "silu")
        normed = ops.dispatch("add_rmsnorm", x.device)[1](x, r, nw, 1e-5)[0]
        for cfg in g.WINDOW_TILES:
            for pdl in (False, True) if _pdl_usable(x) else (False,):
                b = buf.clone()
                y, post = g.gemv_spec_conv_launch(normed, w, None, b, sh, 0, cw, cb, start, "silu", config=cfg, pdl=pdl)
                assert rel(post, want[1]) < 1e-2 and rel(b, b_ref) < 1e-2, (cfg, pdl, n)
                assert rel(y[..., :start], want[0][..., :start]) < 1e-2, (cfg, pdl, n)
        b = buf.clone()
        _, post, h = g.add_rmsnorm_gemv_spec_conv_triton(x, r, nw, 1e-5, w, None, b, sh, 0, cw, cb, start, "silu")
        key = (5, n, k, c, dtype, x.device.index)
        assert key in g.WINDOW_CHOICES and g.WINDOW_TIMINGS[key]["how"] == "graph", g.WINDOW_TIMINGS.get(key)
        assert rel(post, want[1]) < 1e-2 and rel(b, b_ref) < 1e-2 and rel(h, want[2]) < 1e-2
        print("gemv_spec_conv", key, "kernel" if g.WINDOW_CHOICES[key] else "apart", g.WINDOW_TIMINGS[key])
