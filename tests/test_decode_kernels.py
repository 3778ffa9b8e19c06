"""The decode step's small Triton kernels (ops/triton_decode.py: residual add + RMSNorm, SwiGLU, the Mamba-2 step
with its gated norm; ops/triton_attention.py: the split-K attention of a decode step and of a verify window)
against their references under Triton's interpreter, in the form they take on sm90 and later,
where each lets a successor launched with programmatic dependent launch (the gemv op's pdl form) start early. The
interpreter has no grid dependency control (a no-op there); on CUDA the probes and the gpu tests run the real
instruction."""

from helpers import NEEDS_TRITON, PATCHED_SCRIPT_HEAD, interpreted_json


@NEEDS_TRITON
def test_the_decode_kernels_with_the_early_launch_of_their_successor_equal_the_references():
    errs = interpreted_json(PATCHED_SCRIPT_HEAD + r"""
from mamballama_cli.ops import triton_decode as d
seen = []
def on(t):
    seen.append(t.device.type)
    return True  # the sm90 form: TRIGGER compiled in
d._gdc_on = on
d._rand = lambda gen, *shape, dtype=torch.float32: torch.randn(*shape, generator=gen).to(dtype)
from mamballama_cli.ops import common
common._rand = d._rand  # the conv check draws its inputs there
from mamballama_cli.ops import triton_attention as ta
from mamballama_cli.ops.decode import decode_attention_ref
from mamballama_cli.ops.verify_ref import window_attention_ref
ta._gdc_on = on
gen = torch.Generator().manual_seed(0)
def attention(gen, T):  # the split-K attention, its combine kernel last (the one that lets o_proj start early)
    b, nh, nkv, hd, cap = 2, 8, 2, 32, 300
    q = torch.randn(b, T, nh, hd, generator=gen) if T else torch.randn(b, nh, hd, generator=gen)
    kc, vc = torch.randn(b, nkv, cap, hd, generator=gen), torch.randn(b, nkv, cap, hd, generator=gen)
    pos = torch.tensor([190, 61])  # windows straddling a slice boundary
    fn, ref = (ta.window_attention_triton, window_attention_ref) if T else (ta.decode_attention_triton,
                                                                            decode_attention_ref)
    out = fn(q, kc, vc, pos, hd**-0.5)
    want = ref(q.double(), kc.double(), vc.double(), pos, hd**-0.5)
    return float((out.double() - want).norm() / want.norm())
out = {}
conv = d._check_conv_update(d.conv_update_inplace_triton, inplace=True)  # the window slid in place, width 4
conv_copy = d._check_conv_update(d.conv_update_triton)  # into a new state, the input's left alone
for name, check in (("add_rmsnorm", d._check_add_rmsnorm), ("swiglu", d._check_swiglu),
                    ("ssm_step_gated", d._check_ssm_step_gated), ("conv_update_inplace", conv),
                    ("conv_update", conv_copy),
                    ("decode_attention", lambda g: attention(g, 0)), ("window_attention", lambda g: attention(g, 5))):
    before = len(seen)
    out[name] = check(torch.Generator().manual_seed(0))
    out[name + " triggered"] = len(seen) - before
print(json.dumps(out))
""", str(__import__("pathlib").Path(__file__).parent), timeout=300)
    for name in ("add_rmsnorm", "swiglu", "ssm_step_gated", "decode_attention", "window_attention"):
        assert errs[name + " triggered"] == 1, errs  # the launcher asked whether to compile the trigger in
        assert errs[name] < 1e-4, errs  # float32 throughout: the kernels match their references closely
    assert errs["conv_update_inplace"] < 1e-4 and errs["conv_update"] < 1e-4, errs  # the one-token conv, both forms


@NEEDS_TRITON
def test_every_mamba2_step_tile_equals_the_reference_under_the_interpreter():
    """The Mamba-2 step's tiles (``STEP_TILES``: the head's state walked in 32 to 128 columns at a time, by one
    program a head or, SPLIT, by 2 or 4 whose last normalises the row; the autotuner's candidates on CUDA), each run
    against the reference, twice (the split tiles' count is back at zero after a call): GQA heads, D, the gated
    norm, dstate not a multiple of the widest tile, the state updated in place; the second shape's norm has no gate
    (convert --no-gate)."""
    errs = interpreted_json(PATCHED_SCRIPT_HEAD + r"""
from mamballama_cli.ops import triton_decode as d
from mamballama_cli.ops.decode import ssm_step_gated_ref
gen = torch.Generator().manual_seed(3)
out = {}
for (b, h, g, p, n) in ((2, 4, 2, 32, 128), (1, 3, 1, 16, 80)):
    r = lambda *s: torch.randn(*s, generator=gen)
    s0 = r(b, h, p, n)
    args = (r(b, g, p), r(b, g, n), r(b, h, n), r(b, h), r(h) - 2, r(h), r(h), r(b, h, p), 1 + 0.1 * r(h * p))
    if p == 16:  # the norm without a gate (convert --no-gate): no z
        args = args[:7] + (None,) + args[8:]
    s_ref = s0.double().clone()
    y_ref = ssm_step_gated_ref(s_ref, *[a.double() if a is not None else None for a in args], 1e-5)
    for tile in d.STEP_TILES:
        s = s0.clone()
        y = d.ssm_step_gated_triton(s, *args, 1e-5, tile=tile)
        rel = lambda a, w: float((a.double() - w).norm() / w.norm())
        s2 = s0.clone()
        y2 = d.ssm_step_gated_triton(s2, *args, 1e-5, tile=tile)
        out[f"{(b, h, g, p, n)} {tile}"] = max(rel(y, y_ref), rel(s, s_ref), rel(y2, y_ref), rel(s2, s_ref))
print(json.dumps(out))
""", str(__import__("pathlib").Path(__file__).parent), timeout=300)
    from mamballama_cli.ops.triton_decode import STEP_TILES

    assert len(errs) == 2 * len(STEP_TILES)
    bad = {k: v for k, v in errs.items() if not v < 1e-5}
    assert not bad, bad


def test_the_mamba2_step_tiles_timed_are_those_that_fit_the_head():
    """The autotuner times only tiles no wider than the state (dstate rounded up to a power of two) and holding at
    most STEP_MAX_TILE elements; the default teacher's 64 x 64 head and the 8B model's 128 x 128 get their own
    lists, and a head too large for any still gets the first tile."""
    from mamballama_cli.ops.triton_decode import STEP_MAX_TILE, STEP_TILES, step_tiles

    assert step_tiles(128, 128) == list(STEP_TILES)
    assert step_tiles(64, 64) == [(32, 4, 1), (64, 4, 1), (64, 8, 1), (64, 4, 4)]
    assert step_tiles(16, 16) == [(32, 4, 1)]
    assert step_tiles(256, 128) == [t for t in STEP_TILES if t[0] * 256 // t[2] <= STEP_MAX_TILE]
    assert (128, 8, 1) not in step_tiles(256, 128) and (128, 8, 2) in step_tiles(256, 128)  # half the rows a program
    assert step_tiles(4096, 128) == [STEP_TILES[0]]
