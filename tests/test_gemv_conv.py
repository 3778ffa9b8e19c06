"""The ``add_rmsnorm_gemv_conv`` op (reference: ``add_rmsnorm_gemv`` then ``conv_update_inplace`` on in_proj's
[x | B | C] columns, ops/decode.py; on CUDA the one-row GEMV kernel with the conv step in its epilogue,
ops/triton_gemv_conv.py): every one-row tile against the ops apart and the reference under Triton's interpreter, in
both launch forms; what the kernel refuses; the per-shape choice with the timing stubbed; a Mamba-2 decode step
through the op; and on CUDA (gpu, part1 of benchmarks/gpu_session.sh) the 8B and default-teacher in_proj shapes and
the timed choice."""

import pytest
import torch
from helpers import NEEDS_TRITON, PATCHED_SCRIPT_HEAD, assert_equal_and_close, interpreted_json, route_conv_op


@NEEDS_TRITON
def test_every_one_row_tile_with_the_conv_epilogue_equals_the_ops_apart_under_the_interpreter():
    """Each one-row candidate with the conv epilogue, plain and pdl launch, bf16 and fp16: conv columns that start
    and end inside a block of outputs (and at the output's first and last column), partial blocks of K, with and
    without the GEMV's bias and the conv's bias, SiLU and none, widths 4 and 2. Against the ops apart run by the
    same interpreter (the one-row GEMV kernel, then the conv kernel on its columns): the same arithmetic in the same
    order, so the output and the slid window must be equal bit for bit; and the conv against the float64 reference
    on the GEMV's rounded output, within the conv's roundings. A wrong channel offset, a window slid the wrong way or a conv on the wrong columns is caught by
    the first check."""
    from mamballama_cli.ops.triton_gemv import CONFIGS

    out = interpreted_json(PATCHED_SCRIPT_HEAD + r"""
from mamballama_cli.ops.decode import conv_update_inplace_ref
from mamballama_cli.ops.triton_decode import conv_update_inplace_triton
from mamballama_cli.ops.triton_gemv import CONFIGS, gemv_launch
from mamballama_cli.ops.triton_gemv_conv import gemv_conv_launch
gen = torch.Generator().manual_seed(5)
out = {}
cases = ((70, 1000, 37, 5, 4, True, True, "silu"), (130, 2048, 64, 66, 4, False, True, "silu"),
         (96, 320, 96, 0, 4, True, False, None), (50, 96, 20, 30, 2, False, False, "silu"))
for dtype in (torch.bfloat16, torch.float16):
    for n, k, c, start, width, bias, cbias, act in cases:
        x = torch.randn(1, k, generator=gen).to(dtype)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype) if bias else None
        state = torch.randn(1, c, width - 1, generator=gen).to(dtype)
        cw = torch.randn(c, width, generator=gen).to(dtype)
        cb = torch.randn(c, generator=gen).to(dtype) if cbias else None
        for cfg in CONFIGS:
            for pdl in (False, True):
                s_apart, s_got = state.clone(), state.clone()
                y_apart = gemv_launch(x, w, b, config=cfg, pdl=pdl)
                conv_apart = conv_update_inplace_triton(y_apart[:, start:start + c], s_apart, cw, cb, act)
                y = gemv_conv_launch(x, w, b, s_got, cw, cb, start, act, config=cfg, pdl=pdl)
                assert y.shape == (1, n) and y.dtype == dtype
                same = (torch.equal(y[:, start:start + c], conv_apart) and torch.equal(s_got, s_apart)
                        and torch.equal(y[:, :start], y_apart[:, :start])
                        and torch.equal(y[:, start + c:], y_apart[:, start + c:]))
                # the conv in float64 on the GEMV's own rounded output: only the conv's roundings differ
                s_ref = state.double()
                want = conv_update_inplace_ref(y_apart[:, start:start + c].double(), s_ref, cw.double(),
                                               cb.double() if cbias else None, act)
                err = max(float((y[:, start:start + c].double() - want).norm() / want.norm()),
                          float((s_got.double() - s_ref).norm() / s_ref.norm()))
                out[f"{dtype} {n}x{k} c{c}@{start} w{width} {cfg} {pdl}"] = [same, err]
print(json.dumps(out))
""", str(__import__("pathlib").Path(__file__).parent), timeout=600)
    assert_equal_and_close(out, 2 * 4 * len(CONFIGS) * 2)  # two roundings: the conv's sum, SiLU


@NEEDS_TRITON
def test_the_conv_kernel_takes_one_row_a_matching_window_and_known_activations():
    """``conv_supported``: one row of a half-precision GEMV the one-row kernel takes, a (1, C, width - 1) window
    whose C columns lie inside the output, a (C, width) weight, SiLU or none; not more rows (a batch, a verify
    window), columns past the output, a mismatched weight, another activation, ``--kernels ref:gemv`` or the switch
    off."""
    from mamballama_cli import ops
    from mamballama_cli.ops import triton_gemv_conv as g

    half = lambda *s: torch.randn(*s).to(torch.bfloat16)
    x, w, state, cw, cb = half(1, 64), half(100, 64), half(1, 40, 3), half(40, 4), half(40)
    ok = lambda *a, **k: g.conv_supported(*a, **k)
    assert ok(x, w, None, state, cw, cb, 10, "silu") and ok(x, w, None, state, cw, None, 60, None)
    assert not ok(half(2, 64), w, None, half(2, 40, 3), cw, cb, 10, "silu")  # two rows
    assert not ok(x, w, None, state, cw, cb, 61, "silu")  # columns 61 .. 100 pass the output's 100
    assert not ok(x, w, None, state, half(40, 3), cb, 10, "silu")  # width 3 against a window of 3
    assert not ok(x, w, None, state, cw, half(39), 10, "silu")  # a bias of 39 channels
    assert not ok(x, w, None, state, cw, cb, 10, "gelu")
    assert not ok(x.float(), w.float(), None, state, cw, cb, 10, "silu")  # float32: the GEMV kernel's refusal
    ops.configure("ref:gemv")
    try:
        assert not ok(x, w, None, state, cw, cb, 10, "silu")
    finally:
        ops.configure("auto")
    g.CONV = False
    try:
        assert not ok(x, w, None, state, cw, cb, 10, "silu")
    finally:
        g.CONV = True


@NEEDS_TRITON
def test_the_conv_kernel_serves_a_shape_only_where_it_agrees_and_is_timed_faster(monkeypatch):
    """``_conv_is_faster`` with the launch and the graph timing stubbed: kept where the kernel agrees with the ops
    apart and is faster; not where it is slower, disagrees or fails (each recorded in TIMINGS with the numbers or
    the reason); the caller's window is never slid by the check or the timing."""
    from mamballama_cli.ops import triton_gemv_conv as g
    from mamballama_cli.ops.decode import add_rmsnorm_gemv_conv_ref, gemv_ref

    gen = torch.Generator().manual_seed(2)
    x, r, nw = (torch.randn(1, 64, generator=gen) for _ in range(3))
    w, state, cw = torch.randn(96, 64, generator=gen), torch.randn(1, 40, 3, generator=gen), torch.randn(40, 4)
    before = state.clone()
    args = (x, r, nw[0], 1e-5, w, None, state, cw, None, 8, "silu")

    def launch(normed, w, b, s, cw, cb, start, act, pdl=False):  # the kernel's contract, by the references
        from mamballama_cli.ops.decode import conv_update_inplace_ref

        y = gemv_ref(normed, w, b)
        y[..., start:start + s.shape[1]] = conv_update_inplace_ref(y[..., start:start + s.shape[1]], s, cw, cb, act)
        return y

    monkeypatch.setattr(g, "TIMINGS", {})
    monkeypatch.setattr(g, "gemv_conv_launch", launch)
    for ours, apart, want in ((8.0, 9.0, True), (9.5, 9.0, False)):
        monkeypatch.setattr(g, "graph_ab_us", lambda a, b, w, o=ours, p=apart: (a(w), b(w), (o, p, 3))[-1])
        assert g._conv_is_faster(args, ("k", ours)) is want
        t = g.TIMINGS[("k", ours)]
        assert (t["conv_us"], t["apart_us"], t["how"], t["copies"], t["pdl"]) == (ours, apart, "graph", 3, False)
    assert torch.equal(state, before)
    monkeypatch.setattr(g, "gemv_conv_launch", lambda *a, **k: launch(*a, **k) + 1)
    assert not g._conv_is_faster(args, "wrong") and g.TIMINGS["wrong"] == {"how": "disagrees"}

    def fails(*a, **k):
        raise RuntimeError("does not build")

    monkeypatch.setattr(g, "gemv_conv_launch", fails)
    assert not g._conv_is_faster(args, "boom")
    assert g.TIMINGS["boom"]["how"] == "failed" and "RuntimeError: does not build" in g.TIMINGS["boom"]["why"]
    assert torch.equal(state, before)
    y, xbc, h = g.add_rmsnorm_gemv_conv_triton(*args)  # CPU tensors: the kernel refused (float32), the ops apart
    want = add_rmsnorm_gemv_conv_ref(x, r, nw[0], 1e-5, w, None, before.clone(), cw, None, 8, "silu")
    assert torch.equal(xbc, want[1]) and torch.equal(h, want[2]) and not torch.equal(state, before)
    assert torch.equal(y[:, :8], want[0][:, :8]) and torch.equal(y[:, 48:], want[0][:, 48:])  # z and dt columns


@pytest.mark.parametrize("gate", [True, False])
def test_a_mamba2_decode_step_runs_in_proj_and_its_conv_as_one_op(gate):
    """A Mamba-2 layer's decode step hands its normed input, in_proj and its conv window to
    ``add_rmsnorm_gemv_conv`` (one op, not add_rmsnorm_gemv then conv_update_inplace), its conv columns after z
    (or first, without the gate), and the step equals the one it replaced: the two ops apart, run here through the
    same op table, give the same logits and the same windows."""
    from helpers import tiny_hybrid

    from mamballama_cli.models.runtime import Runtime
    from mamballama_cli.ops.decode import add_rmsnorm_gemv_ref, conv_update_inplace_ref

    torch.manual_seed(0)
    model = tiny_hybrid(seed=2, overrides=None if gate else {"mamba_gate": False})[0].eval()
    mixer = next(layer.mamba for layer in model.model.layers if not layer.is_attention)
    assert mixer.d_z == (mixer.d_inner if gate else 0)
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    outs = []
    for fused in (True, False):
        rt = Runtime(model, 1, 16)
        def apart(x, r, nw, eps, w, b, s, cw, cb, start, act):  # the op as the two it replaced
            y, h = add_rmsnorm_gemv_ref(x, r, nw, eps, w, b)
            return y, conv_update_inplace_ref(y[..., start:start + s.shape[1]], s, cw, cb, act), h

        calls = route_conv_op(rt, "add_rmsnorm_gemv_conv", None if fused else apart, "conv_update_inplace")
        with torch.no_grad():
            rt.prefill(ids[:, :5])
            pos = torch.tensor([5])
            logits = rt.walk(ids[:, 5], rt.step(pos=pos, length=pos + 1))
        n_mamba = model.config.num_hidden_layers - len(model.config.attn_layers)
        assert calls == [mixer.d_z] * n_mamba and n_mamba > 0
        windows = [p.state["conv"].clone() for p in rt.layers if isinstance(p.state, dict) and "conv" in p.state]
        outs.append((logits, windows))
    assert torch.equal(outs[0][0], outs[1][0])
    assert len(outs[0][1]) == n_mamba and all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_conv_gemv_on_cuda_equals_the_reference_and_is_chosen_by_timing(dtype):
    """On CUDA: every one-row tile with the conv epilogue (plain and pdl launch where the device has it) at the 8B
    hybrid's in_proj (10,272 x 4,096 gated, 6,176 x 4,096 without the gate; 6,144 conv channels) and the default
    teacher's (1,545 x 576: 960 channels) against the reference; the op's first use of each shape checks and times
    the kernel against the ops apart in CUDA graphs and serves the shape as that timing says; the op dispatches to
    the kernel."""
    from mamballama_cli import ops
    from mamballama_cli.ops.decode import add_rmsnorm_gemv_conv_ref
    from mamballama_cli.ops.triton_gemv import CONFIGS, _pdl_usable
    from mamballama_cli.ops.triton_gemv_conv import (
        CHOICES,
        TIMINGS,
        add_rmsnorm_gemv_conv_triton,
        gemv_conv_launch,
    )

    assert ops.dispatch("add_rmsnorm_gemv_conv", torch.device("cuda"))[0] == "mamballama-triton"
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device="cuda") * scale).to(dtype)
    for n, k, c, start in ((10272, 4096, 6144, 4096), (6176, 4096, 6144, 0), (1545, 576, 960, 576)):
        x, r, nw = rnd(1, k), rnd(1, k), rnd(k)
        w, b = rnd(n, k, scale=k**-0.5), None
        state, cw, cb = rnd(1, c, 3), rnd(c, 4, scale=0.5), rnd(c)
        s_ref = state.double()
        want = add_rmsnorm_gemv_conv_ref(x.double(), r.double(), nw.double(), 1e-5, w.double(), b, s_ref,
                                         cw.double(), cb.double(), start, "silu")
        normed = ops.dispatch("add_rmsnorm", x.device)[1](x, r, nw, 1e-5)[0]
        for cfg in CONFIGS:
            for pdl in (False, True) if _pdl_usable(x) else (False,):
                s = state.clone()
                y = gemv_conv_launch(normed, w, b, s, cw, cb, start, "silu", config=cfg, pdl=pdl)
                err = float((y[:, start:start + c].double() - want[1]).norm() / want[1].norm())
                assert err < 1e-2 and float((s.double() - s_ref).norm() / s_ref.norm()) < 1e-2, (cfg, pdl, n)
        s = state.clone()
        _, xbc, h = add_rmsnorm_gemv_conv_triton(x, r, nw, 1e-5, w, b, s, cw, cb, start, "silu")
        key = (n, k, c, dtype, x.device.index)
        assert key in CHOICES and TIMINGS[key]["how"] == "graph", TIMINGS.get(key)
        assert float((xbc.double() - want[1]).norm() / want[1].norm()) < 1e-2
        assert float((s.double() - s_ref).norm() / s_ref.norm()) < 1e-2
        assert float((h.double() - want[2]).norm() / want[2].norm()) < 1e-2
        print("gemv_conv", key, "kernel" if CHOICES[key] else "apart", TIMINGS[key])
