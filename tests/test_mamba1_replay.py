"""The Triton kernel of the Mamba-1 replay op (``selective_replay``, ops/triton_selective_replay.py) against its
reference.

CPU: the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess because the variable must
be set before triton is imported) on small shapes: per-row counts 0, between and W, T = 1 and T > 1, W = 0,
one group and several (a block of channels straddling two), D or none, the checkpoint written over the input
state, float32 and float16 inputs. The Mamba-2 kernel of the same module, whose launcher shares the state
buffers and the empty-window handling, runs once too. The GPU tests (tests/test_mamba1_gpu.py) call the same
check on CUDA at a realistic shape.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from helpers import NEEDS_TRITON, PATCHED_SCRIPT_HEAD, run_interpreted

pytestmark = NEEDS_TRITON


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values in the kernel's result"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def replay_inputs(device, dtype, b, W, T, dim, ngroups, n, counts, with_D=True, seed=0):
    """(state, x_old, dt_old, B_old, n_replay, x_new, dt_new, B_new, C_new, A, D) as the Mamba-1 mixer passes them:
    float32 state, dt and A; x, B, C in ``dtype``; dt positive."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    state = r(b, dim, n, dt=torch.float32)
    old = (r(b, W, dim), F.softplus(r(b, W, dim, dt=torch.float32) - 2.0), r(b, W, ngroups, n) * 0.5)
    new = (r(b, T, dim), F.softplus(r(b, T, dim, dt=torch.float32) - 2.0), r(b, T, ngroups, n) * 0.5,
           r(b, T, ngroups, n) * 0.5)
    A = -torch.arange(1.0, n + 1, device=device).expand(dim, n) * (1 + 0.1 * r(dim, n, dt=torch.float32).abs())
    D = r(dim, dt=torch.float32) if with_D else None
    n_replay = torch.tensor(counts, device=device)
    return state, *old, n_replay, *new, A, D


def check_selective_replay(device, dtype, b, W, T, dim, ngroups, n, counts, with_D=True, inplace=False, seed=0):
    """The kernel against the float64 reference: y, the replayed checkpoint and the final state; with ``inplace``
    the checkpoint is written over the input state and the final state into a given buffer."""
    from mamballama_cli.ops.selective_scan import selective_replay_ref
    from mamballama_cli.ops.triton_selective_replay import selective_replay_triton

    args = replay_inputs(device, dtype, b, W, T, dim, ngroups, n, counts, with_D, seed)
    state = args[0]
    want = selective_replay_ref(*(t.double() if t is not None and t.is_floating_point() else t for t in args),
                                return_final=True)
    if inplace:
        s_in, final_out = state.clone(), torch.empty_like(state)
        y, replayed, final = selective_replay_triton(s_in, *args[1:], state_out=s_in, final_out=final_out)
        assert replayed is s_in and final is final_out
    else:
        y, replayed, final = selective_replay_triton(*args, return_final=True)
        assert torch.equal(args[0], state)
        _, _, none = selective_replay_triton(*args)
        assert none is None
    assert y.shape == (b, T, dim) and y.dtype == dtype
    assert replayed.dtype == final.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 1e-2)  # y is rounded to the inputs' dtype
    errs = [_rel(y, want[0]) if T else 0.0, _rel(replayed, want[1]), _rel(final, want[2])]
    assert errs[0] <= tol and max(errs[1:]) <= 1e-5, errs
    return errs


def check_ssm_replay(device, b, W, T, h, g, p, n, counts, seed=0, cg=None, tile=None):
    """The Mamba-2 kernel (float32) against its reference, the checkpoint written over the input state; ``cg``: C's
    groups (default one per head); ``tile``: one of ops/triton_replay.py's replay_tiles (default: its first)."""
    from mamballama_cli.ops.replay import ssm_replay_ref
    from mamballama_cli.ops.triton_replay import ssm_replay_triton

    gen = torch.Generator(device=device).manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    state = r(b, h, p, n)
    old, new = (r(b, W, g, p), r(b, W, h), r(b, W, g, n)), (r(b, T, g, p), r(b, T, h), r(b, T, g, n),
                                                            r(b, T, cg or h, n))
    A, dt_bias, D = -torch.rand(h, generator=gen, device=device) * 4 - 0.05, r(h), r(h)
    n_replay = torch.tensor(counts, device=device)
    want = ssm_replay_ref(state, *old, n_replay, *new, A, dt_bias, D, return_final=True)
    s_in = state.clone()
    got = ssm_replay_triton(s_in, *old, n_replay, *new, A, dt_bias, D, return_final=True, state_out=s_in, tile=tile)
    assert got[1] is s_in
    errs = [_rel(o, w) for o, w in zip(got, want)]
    assert max(errs) <= 1e-5, errs
    return errs


def check_ssm_replay_gated(device, b, W, T, h, g, p, n, counts, dtype, seed=0, with_z=True, tile=None):
    """The gated op (``ssm_replay_gated``: replay, then the gated RMSNorm over each head) against its reference: in
    one kernel where a head's state fits one program, else the replay kernel and the norm op. Window inputs and z in
    ``dtype``, the state in float32. ``with_z=False``: the norm without a gate (convert --no-gate)."""
    from mamballama_cli.ops.replay import ssm_replay_gated_ref
    from mamballama_cli.ops.replay_tiles import gated_in_one_program
    from mamballama_cli.ops.triton_replay import ssm_replay_gated_triton

    gen = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device).to(dt)

    state = r(b, h, p, n, dt=torch.float32)
    old, new = (r(b, W, g, p), r(b, W, h), r(b, W, g, n)), (r(b, T, g, p), r(b, T, h), r(b, T, g, n), r(b, T, h, n))
    A, dt_bias, D = -torch.rand(h, generator=gen, device=device) * 4 - 0.05, r(h), r(h)
    z, nw = r(b, T, h * p), (1 + 0.1 * torch.randn(h * p, generator=gen, device=device)).to(dtype)
    z = z if with_z else None
    n_replay = torch.tensor(counts, device=device)
    want = ssm_replay_gated_ref(state, *old, n_replay, *new, A, dt_bias, D, z, nw, 1e-5, return_final=True)
    got = ssm_replay_gated_triton(state.clone(), *old, n_replay, *new, A, dt_bias, D, z, nw, 1e-5,
                                  return_final=True, tile=tile)
    assert got[0].shape == (b, T, h * p) and got[0].dtype == dtype
    errs = [_rel(o, w) for o, w in zip(got, want)]
    assert errs[0] <= (1e-5 if dtype == torch.float32 else 4e-3) and max(errs[1:]) <= 1e-5, errs
    return gated_in_one_program(p, n), errs


def check_ssm_replay_slotted(device, b, L, T, h, g, p, n, counts, cur, offset, read_old, gated, seed=0, tile=None):
    """A window kept in two slots (``slot``): the kernel against the reference, run on copies of the same buffers:
    y, the states, and both slots after the call (the new steps written into slot ``cur`` at ``offset``, nothing
    else changed). bf16 window, float32 state."""
    from mamballama_cli.ops.replay import ssm_replay_gated_ref, ssm_replay_ref
    from mamballama_cli.ops.triton_replay import ssm_replay_gated_triton, ssm_replay_triton

    gen = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, dt=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device=device).to(dt)

    state = r(b, h, p, n, dt=torch.float32)
    xB = r(2, b, L, g * p + g * n)  # the mixer's layout: [x | B] per step, and dt beside it
    dt = r(2, b, L, h)
    new = (r(b, T, g, p), r(b, T, h), r(b, T, g, n), r(b, T, h, n))
    A, dt_bias, D = -torch.rand(h, generator=gen, device=device) * 4 - 0.05, r(h, dt=torch.float32), r(h)
    z, nw = r(b, T, h * p), (1 + 0.1 * torch.randn(h * p, generator=gen, device=device)).to(torch.bfloat16)
    slot = torch.tensor([cur], device=device)

    def run(fn, xB, dt, **kw):
        bufs = (xB[..., : g * p].unflatten(-1, (g, p)), dt, xB[..., g * p :].unflatten(-1, (g, n)))
        extra = (z, nw, 1e-5) if gated else ()
        return fn(state.clone(), *bufs, torch.tensor(counts, device=device), *new, A, dt_bias, D, *extra,
                  return_final=True, slot=slot, offset=offset, read_old=read_old, **kw)

    wx, wd = xB.clone(), dt.clone()
    want = run(ssm_replay_gated_ref if gated else ssm_replay_ref, wx, wd)
    gx, gd = xB.clone(), dt.clone()
    got = run(ssm_replay_gated_triton if gated else ssm_replay_triton, gx, gd, tile=tile)
    errs = [_rel(o, w) for o, w in zip(got, want)]
    assert errs[0] <= 1e-2 and max(errs[1:]) <= 1e-5, errs  # y in bf16 (truncated by the interpreter)
    assert torch.equal(gx, wx) and torch.equal(gd, wd)  # the same slot written, the same values, nothing else
    other = 1 - cur
    assert torch.equal(gx[other], xB[other]) and torch.equal(gd[other], dt[other])  # the old slot untouched
    assert torch.equal(gx[cur, :, offset : offset + T, : g * p], new[0].flatten(-2))  # x of the new steps
    assert torch.equal(gd[cur, :, offset : offset + T], new[1])
    assert torch.equal(gx[cur, :, offset : offset + T, g * p :], new[2].flatten(-2))
    return errs


_SCRIPT = PATCHED_SCRIPT_HEAD + r"""
import test_mamba1_replay as t
from mamballama_cli.ops.replay_tiles import gated_tiles, replay_tiles

torch.set_num_threads(1)  # tiny ops: threads fighting over the cores make them 100x slower
f32, f16 = torch.float32, torch.float16
# (dtype, b, W, T, dim, ngroups, dstate, counts, with_D, inplace)
cases = [(f32, 3, 4, 3, 80, 2, 16, [0, 2, 4], True, False),  # a block of 32 channels straddles the two groups
         (f32, 2, 5, 1, 48, 1, 8, [5, 0], False, True),     # T = 1, no D, checkpoint over the input state
         (f32, 2, 0, 2, 40, 4, 4, [0, 0], True, True),      # W = 0: nothing to replay (a draft's next step)
         (f16, 3, 3, 4, 64, 4, 16, [3, 1, 0], True, False),
         (f32, 1, 2, 0, 24, 3, 16, [1], True, False)]        # T = 0: the checkpoint and the final state only
for k, (dtype, b, W, T, dim, g, n, counts, with_D, inplace) in enumerate(cases):
    print(dtype, b, W, T, dim, g, n, counts, with_D, inplace,
          t.check_selective_replay("cpu", dtype, b, W, T, dim, g, n, counts, with_D, inplace, seed=k))
# Mamba-2: (b, W, T, heads, x/B groups, headdim, dstate, counts, C groups): counts 0, between and W; T = 1 (a
# draft's step), W = 0, T = 0; a verify window (W = T = 5, padded to 8 steps in the kernel's tiles); headdim past
# one block of the kernel, dstate not a power of two
for k, (b, W, T, h, g, p, n, counts, cg) in enumerate([
        (2, 3, 2, 4, 2, 8, 16, [3, 1], None), (3, 5, 5, 4, 1, 16, 16, [0, 2, 5], 2), (2, 4, 1, 2, 2, 8, 8, [4, 0], 1),
        (1, 0, 3, 2, 1, 8, 16, [0], None), (2, 2, 0, 2, 1, 8, 16, [1, 2], None), (1, 5, 5, 2, 1, 40, 12, [3], None)]):
    for tile in replay_tiles(p, n, False):  # every candidate tile: the first, the loads ahead (4 and 8 warps)
        print("ssm_replay", b, W, T, counts, tile, t.check_ssm_replay("cpu", b, W, T, h, g, p, n, counts, seed=k, cg=cg,
                                                                     tile=tile))
# the gated op: one kernel (headdim past one block of the ungated tiles; headdim not a power of two; fp16 inputs),
# and two (a head's state past one program: the 8B shape's case, smaller); where a head fits one program the
# candidates include the chunked form (FORM 3), here also at the widest window (K = 7), W = 0 and T = 0
for k, (b, W, T, h, g, p, n, counts, dtype, one) in enumerate([
        (2, 5, 5, 4, 2, 64, 16, [0, 5], f32, True), (2, 3, 2, 2, 1, 24, 16, [2, 1], f16, True),
        (1, 4, 3, 2, 2, 64, 128, [3], f32, False), (1, 8, 8, 2, 1, 64, 64, [5], f32, True),
        (2, 0, 3, 2, 1, 32, 16, [0, 0], f32, True), (1, 3, 0, 2, 1, 32, 16, [2], f32, True)]):
    assert any(tile[2] == 3 for tile in gated_tiles(p, n)) is one, (p, n)
    for with_z in (True, False) if k != 1 else (True,):  # False: the norm without a gate (convert --no-gate)
        for tile in gated_tiles(p, n):  # one kernel where a head fits a program, else the tiled one and the norm op
            fused, errs = t.check_ssm_replay_gated("cpu", b, W, T, h, g, p, n, counts, dtype, seed=k, with_z=with_z,
                                                   tile=tile)
            assert fused is one, (p, n)
            print("ssm_replay_gated", b, W, T, p, n, with_z, tile, fused, errs)
# a window kept in two slots: a verify call (read slot 1 - cur, write slot cur from 0) and a draft's continue step
# (no reads, written at its offset); gated in one kernel and not; two blocks of headdim; groups of 2 and 3 heads
for k, (b, L, T, h, g, p, n, counts, cur, offset, read_old, gated) in enumerate([
        (2, 5, 5, 4, 2, 48, 128, [3, 0], 1, 0, True, False), (2, 5, 5, 6, 2, 16, 16, [5, 2], 0, 0, True, True),
        (1, 6, 2, 4, 2, 16, 16, [0], 1, 3, False, True), (2, 4, 1, 3, 1, 48, 128, [0, 0], 0, 2, False, False),
        (2, 5, 5, 4, 2, 48, 128, [3, 0], 1, 0, True, True)]):  # gated, a head past one program: the norm op after
    for tile in gated_tiles(p, n) if gated else replay_tiles(p, n, False):
        print("slotted", tile, t.check_ssm_replay_slotted("cpu", b, L, T, h, g, p, n, counts, cur, offset, read_old,
                                                          gated, seed=k, tile=tile))
print("ok")
"""


def test_selective_replay_kernel_under_the_triton_interpreter():
    out = run_interpreted(_SCRIPT, str(Path(__file__).parent))
    assert out.strip().endswith("ok"), out[-3000:]


def test_selective_replay_kernel_is_registered_and_hands_autograd_to_the_reference():
    from mamballama_cli import ops
    from mamballama_cli.ops.selective_scan import selective_replay_ref
    from mamballama_cli.ops.triton_selective_replay import selective_replay_triton

    ops._load_fast()
    assert "mamballama-triton" in [impl.name for impl in ops.FAST["selective_replay"]]
    assert ops.dispatch("selective_replay", torch.device("cpu"))[0] == "torch-ref"
    args = list(replay_inputs("cpu", torch.float32, 2, 3, 2, 16, 2, 4, [1, 3]))
    args[5] = args[5].requires_grad_(True)  # x_new: training would need the kernel's backward, which it lacks
    y, replayed, _ = selective_replay_triton(*args)  # CPU tensors: only the reference can run this
    y_ref, replayed_ref, _ = selective_replay_ref(*args)
    y.sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(replayed, replayed_ref) and args[5].grad is not None


@NEEDS_TRITON
def test_the_replay_tile_is_the_fastest_timed_on_copies_and_named_in_the_report(monkeypatch):
    """ops/triton_replay.py's choice of tile, with the CUDA timing stubbed: each candidate runs once on a copy of the
    state and one whose output or replayed state differs from the first tile's is dropped (recorded as such); the
    others are timed (three interleaved rounds, the best of each kept) over copies of the state that pass twice the
    L2 cache, never the state itself; the fastest wins and the report names it. On CPU the op runs the first tile
    untimed."""
    from types import SimpleNamespace

    from mamballama_cli.ops import replay_tiles as tr

    state = torch.randn(1, 4, 8, 16)  # 2 KiB
    assert tr.replay_tiles(8, 16, False) == [(8, 4, 0), (8, 4, 2)]  # no 8-warp tile: 8 x 16 is too few for 256 threads
    assert tr.replay_tiles(128, 128, False) == [(32, 4, 0), (32, 4, 2), (32, 8, 2)]
    cands = tr.replay_tiles(8, 16, False) + [(8, 2, 2)]  # a third: one that computes something else
    speed = dict(zip(cands, [9.0, 4.0, 1.0]))
    seen = []

    def launch(c, st, fin):
        assert st is not state and fin is not state and torch.equal(st, state)
        seen.append(c)
        return st.sum(-1) * (2.0 if c == (8, 2, 2) else 1.0)  # the output, whatever the timing does to st

    def graph_us(calls):
        before = len(seen)
        for call in calls:
            call()
        assert len(seen) - before == len(calls) == 4  # 2 x 8 KiB of L2 over 4 KiB a copy (a state and a final)
        return speed[seen[-1]] + len(seen) * 1e-3  # later rounds a little slower: the best round counts
    monkeypatch.setattr(tr, "graph_call_us", graph_us)
    monkeypatch.setattr(tr.torch.cuda, "get_device_properties", lambda d: SimpleNamespace(L2_cache_size=8 << 10))
    monkeypatch.setattr(tr, "TIMINGS", {})
    monkeypatch.setattr(tr, "TILE_CHOICES", {})
    key = (1, 4, 8, 16, 5, 5, False, False, True, True, True, torch.float32, torch.float32, 0)
    assert tr._fastest(launch, state, cands, key) == (8, 4, 2)  # the fastest that agrees, not (8, 2, 2)
    assert seen[:3] == cands and len(seen) == 3 + 3 * 4 * 2  # each checked once, the two that agree timed
    assert tr.TIMINGS[key] == {"8x4": 9.01, "8x4f": 4.01, "8x2f": "disagrees"}  # the first round's

    def unset_first(c, st, fin):  # the first tile's results not finite (a warm-up's unset buffers): none is judged
        y = launch(c, st, fin)
        return y * float("nan") if c == cands[0] else y
    before = len(seen)
    monkeypatch.setattr(tr, "TIMINGS", {})
    assert tr._fastest(unset_first, state, cands, key) == (8, 2, 2)
    assert len(seen) - before == 3 + 3 * 4 * 3 and "disagrees" not in tr.TIMINGS[key].values()

    def no_memory(*a, **k):
        raise torch.cuda.OutOfMemoryError("no memory")
    monkeypatch.setattr(tr.torch, "empty_like", no_memory)  # a batch that fills the device: the first tile, untimed
    before = len(seen)
    assert tr._fastest(launch, state, cands, (*key[:-1], 1)) == cands[0] and len(seen) == before  # nothing ran
    assert tr.TIMINGS[(*key[:-1], 1)] == {"untimed": "no memory for copies of the state"}
    tr.TILE_CHOICES[key] = (8, 4, 2)
    tr.TILE_CHOICES[(*key[:4], 0, 1, *key[6:])] = True  # a shape that ran off CUDA: the first tile, untimed
    assert tr.choices_report()["replay_tiles"] == {"b1 h4 8x16 W5 T5 slotted": "8x4f"}


def test_a_split_norm_replay_tile_is_kept_where_it_is_within_the_margin_of_the_fastest():
    """ops/replay_tiles.py ``_pick``: the fastest tile, except that the fastest split-norm tile (the gated norm in
    the kernel, which lets the projection after it start early) is kept where it is at most
    NORM_IN_KERNEL_MARGIN slower; with no split-norm candidate, or one that is slower by more, the fastest."""
    from mamballama_cli.ops import replay_tiles as tr

    plain, split, other = (32, 4, 2), (32, 4, 2, 1), (16, 2, 1, 1)
    m = tr.NORM_IN_KERNEL_MARGIN
    assert tr._pick([plain, split, other], {plain: 10.0, split: 10.0 * (1 + m) - 1e-6, other: 12.0}) == split
    assert tr._pick([plain, split, other], {plain: 10.0, split: 10.0 * (1 + m) + 1e-3, other: 12.0}) == plain
    assert tr._pick([plain, split, other], {plain: 10.0, split: 11.0, other: 10.2}) == other  # the fastest split
    assert tr._pick([plain, (16, 2, 1)], {plain: 10.0, (16, 2, 1): 9.0}) == (16, 2, 1)  # no split-norm tile
    assert tr._pick([plain, split], {plain: 10.0, split: 8.0}) == split
