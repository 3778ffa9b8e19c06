"""CUDA: the fused Triton replay kernel against the reference, and speculative decoding with CUDA graphs."""

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu


def _inputs(b, h, g, p, n, W, T, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dt)

    state = r(b, h, p, n, dt=torch.float32)
    old = (r(b, W, g, p), r(b, W, h) * 2 - 3, r(b, W, g, n))  # x, raw dt, B of the last window
    new = (r(b, T, g, p), r(b, T, h) * 2 - 3, r(b, T, g, n), r(b, T, h, n))  # x, raw dt, B, C
    A = -torch.rand(h, generator=gen, device="cuda") * 4 - 0.05
    dt_bias = r(h, dt=torch.float32)
    D = r(h, dt=torch.float32)
    counts = torch.randint(0, W + 1, (b,), generator=gen, device="cuda")
    return state, old, counts, new, A, dt_bias, D


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("b,h,g,p,n,one", [(1, 9, 3, 64, 64, True), (2, 32, 8, 128, 128, False)])
def test_gated_replay_on_cuda_equals_the_reference_in_one_kernel_where_a_head_fits(b, h, g, p, n, one, with_z):
    """``ssm_replay_gated`` on CUDA (the default teacher's 50% shape: one kernel; the 8B shape: the tiled replay
    kernel and the norm op), bf16 window inputs, against its reference, the timed choice and then every candidate;
    the op table takes the Triton version. Without z: the norm alone (convert --no-gate)."""
    import sys
    from pathlib import Path

    from mamballama_cli import ops

    sys.path.insert(0, str(Path(__file__).parent))
    from test_mamba1_replay import check_ssm_replay_gated

    fused, errs = check_ssm_replay_gated("cuda", b, 5, 5, h, g, p, n, [3] * b, torch.bfloat16, with_z=with_z)
    assert fused is one, errs
    assert ops.dispatch("ssm_replay_gated", torch.device("cuda"))[0] == "triton"
    from mamballama_cli.ops.replay_tiles import gated_tiles

    for tile in gated_tiles(p, n):  # every candidate, not only the timed choice
        check_ssm_replay_gated("cuda", b, 5, 5, h, g, p, n, [3] * b, torch.bfloat16, with_z=with_z, tile=tile)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("b,h,g,p,n", [(1, 32, 8, 128, 128), (2, 9, 3, 64, 64)])
def test_slotted_replay_on_cuda_writes_the_window_as_the_reference(b, h, g, p, n, gated):
    """The replay kernel keeping a window in two slots on CUDA (8B's and the default teacher's head sizes): a verify
    call and a draft's continue step, against the reference on copies of the same buffers: outputs, states, both
    slots after the call."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_mamba1_replay import check_ssm_replay_slotted

    check_ssm_replay_slotted("cuda", b, 5, 5, h, g, p, n, [2] * b, 1, 0, True, gated)
    check_ssm_replay_slotted("cuda", b, 6, 1, h, g, p, n, [0] * b, 0, 4, False, gated, seed=1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("b,h,g,p,n,K", [(1, 32, 8, 128, 128, 4), (2, 9, 3, 64, 64, 2), (3, 4, 4, 5, 6, 8)])
def test_triton_replay_kernel_equals_reference(dtype, tol, b, h, g, p, n, K):
    from mamballama_cli.ops.replay import ssm_replay_ref
    from mamballama_cli.ops.triton_replay import ssm_replay_triton

    state, old, counts, new, A, dt_bias, D = _inputs(b, h, g, p, n, K + 1, K + 1, dtype, seed=b * 100 + K)
    want = ssm_replay_ref(state, *old, counts, *new, A, dt_bias, D, return_final=True)
    got = ssm_replay_triton(state, *old, counts, *new, A, dt_bias, D, return_final=True)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for w, g_ in zip(want, got):
        assert _rel(g_, w) <= tol
    # in place checkpoint and live state, no old window (a draft's "continue" step), no D
    s_in = state.clone()
    live = torch.empty_like(state)
    empty = tuple(t[:, :0] for t in old)
    y, s_out, f = ssm_replay_triton(s_in, *empty, torch.zeros_like(counts), *(t[:, :1] for t in new), A, dt_bias,
                                    None, state_out=s_in, final_out=live)
    ry, _, rf = ssm_replay_ref(state, *empty, torch.zeros_like(counts), *(t[:, :1] for t in new), A, dt_bias,
                               None, return_final=True)
    assert s_out is s_in and f is live and torch.equal(s_in, state)
    assert _rel(y, ry) <= tol and _rel(live, rf) <= 2e-5


def test_triton_replay_in_a_cuda_graph_reads_the_count_from_memory():
    """One captured kernel serves every accepted count: the loop bound is read on the device."""
    from mamballama_cli.ops.replay import ssm_replay_ref
    from mamballama_cli.ops.triton_replay import ssm_replay_triton

    K = 4
    state, old, _, new, A, dt_bias, D = _inputs(2, 8, 2, 64, 32, K + 1, K + 1, torch.float32, seed=7)
    ckpt = state.clone()
    n_buf = torch.zeros(2, dtype=torch.long, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ssm_replay_triton(ckpt, *old, n_buf, *new, A, dt_bias, D)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, out, _ = ssm_replay_triton(ckpt, *old, n_buf, *new, A, dt_bias, D)
    for r0, r1 in [(0, K + 1), (3, 1), (K + 1, K + 1)]:
        n_buf.copy_(torch.tensor([r0, r1]))
        ckpt.copy_(state)
        graph.replay()
        ry, rs, _ = ssm_replay_ref(state, *old, n_buf, *new, A, dt_bias, D)
        assert _rel(y, ry) <= 2e-5 and _rel(out, rs) <= 2e-5


@pytest.mark.parametrize("slotted", [False, True])
def test_replay_tiles_at_the_8b_shape_each_equal_the_reference_and_the_timed_choice_touches_no_state(slotted):
    """Every candidate tile of ops/triton_replay.py (the first, the preloaded one at more programs a head) at the 8B
    head shape and a K = 4 window, in bf16 with a float32 state, against the float64 reference; then the op without a
    tile: its first call times the candidates in CUDA graphs on copies, and its result, the checkpoint written in
    place, still equals the reference."""
    from mamballama_cli.ops import replay_tiles as tiles
    from mamballama_cli.ops import triton_replay as tr
    from mamballama_cli.ops.replay import ssm_replay_ref

    b, h, g, p, n, K = 1, 32, 8, 128, 128, 4
    state, old, counts, new, A, dt_bias, D = _inputs(b, h, g, p, n, K + 1, K + 1, torch.bfloat16, seed=11)
    counts.fill_(3)
    want = ssm_replay_ref(*(t.double() if t.is_floating_point() else t for t in (state, *old, counts, *new, A,
                                                                                   dt_bias, D)), return_final=True)
    if slotted:  # the last window in slot 0 (read), the new steps written into slot 1
        two = [torch.stack([t, torch.zeros_like(t)]) for t in old]
        kw = {"slot": torch.ones(1, dtype=torch.long, device="cuda"), "offset": 0, "read_old": True}
    for tile in [*tiles.replay_tiles(p, n, False), None]:
        ckpt, live = state.clone(), torch.empty_like(state)
        bufs = [t.clone() for t in two] if slotted else old
        got = tr.ssm_replay_triton(ckpt, *bufs, counts, *new, A, dt_bias, D, state_out=ckpt, final_out=live, tile=tile,
                                   **(kw if slotted else {}))
        assert _rel(got[0], want[0]) <= 1e-2 and _rel(ckpt, want[1]) <= 2e-5 and _rel(live, want[2]) <= 2e-5, tile
        if slotted:
            assert all(torch.equal(a[1], c.to(a.dtype)) for a, c in zip(bufs, new[:3]))
    key = (b, h, p, n, K + 1, K + 1, False, False, slotted, True, True, torch.float32, torch.bfloat16, 0)
    cands = tiles.replay_tiles(p, n, False)
    assert tiles.TILE_CHOICES[key] in cands and len(tiles.TIMINGS[key]) == len(cands) >= 2, tiles.TIMINGS
    print(tiles.choices_report())


def _perturbed(model, scale, seed=7):
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * (scale * p.std()))
    return draft


@pytest.mark.parametrize("k", [1, 4])
def test_speculative_with_cuda_graphs_equals_target_greedy(k):
    from helpers import tiny_hybrid
    from mamballama_cli.generation.speculative import speculative_generate

    target, teacher = tiny_hybrid(seed=0)
    target, teacher = target.cuda(), teacher.cuda()
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        want = target.generate(prompt, max_new_tokens=48, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[:, 6:].tolist()
    for draft in (_perturbed(target, 0.02), teacher):
        res = speculative_generate(target, draft, prompt, k=k, max_new_tokens=48, cuda_graphs=True)
        assert res.extra["cuda_graphs"] and res.extra["draft_runner"] == "HybridRunner"
        assert res.tokens == want
    eager = speculative_generate(target, _perturbed(target, 0.02), prompt, k=k, max_new_tokens=48,
                                 cuda_graphs=False)
    assert eager.tokens == want


def test_graph_replay_equals_the_eager_walk():
    from helpers import tiny_hybrid
    from mamballama_cli.generation.speculative import HybridRunner

    target, _ = tiny_hybrid(seed=1)
    target = target.cuda()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 96, (1, 9), generator=gen).cuda()
    windows = [torch.randint(3, 96, (1, 5), generator=gen).cuda() for _ in range(3)]
    graphed = HybridRunner(target, 1, 64, window=5)
    graphed.capture([(5, True, 0)])
    eager = HybridRunner(target, 1, 64, window=5)
    for runner in (graphed, eager):
        runner.prefill(prompt)
    for i, w in enumerate(windows):
        a, b = graphed.extend(w, rebase=True), eager.extend(w, rebase=True)
        assert (a - b).abs().max().item() <= 1e-4
        graphed.commit(i + 1)
        eager.commit(i + 1)


def test_batched_speculative_with_per_row_counts_in_cuda_graphs_equals_each_rows_greedy():
    """Batch 4, hybrid target and draft in CUDA graphs: rows keep their own accepted counts (positions per row
    in the graphs' device buffers), and each row's greedy output equals its plain greedy output."""
    from helpers import tiny_hybrid
    from mamballama_cli.generation.speculative import speculative_generate

    target, _ = tiny_hybrid(seed=1)
    target = target.cuda()
    prompts = torch.randint(3, 96, (4, 6), generator=torch.Generator().manual_seed(9)).cuda()
    with torch.no_grad():
        want = [target.generate(prompts[r : r + 1], max_new_tokens=40, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, 6:].tolist() for r in range(4)]
    res = speculative_generate(target, _perturbed(target, 0.05), prompts, k=3, max_new_tokens=40, cuda_graphs=True)
    assert res.extra["cuda_graphs"] and res.extra["per_row"]
    assert res.tokens == want
    assert 0 < res.stats.acceptance_rate < 1


@pytest.mark.parametrize("batch,k", [(1, 4), (3, 3)])
def test_captured_round_equals_the_uncaptured_round_token_for_token(batch, k):
    """The whole round (K draft steps, verify, acceptance, commit) in one CUDA graph gives the tokens of the
    same round run eagerly, which give each row's plain greedy tokens."""
    from helpers import tiny_hybrid
    from mamballama_cli.generation.captured_round import CapturedRounds

    target, _ = tiny_hybrid(seed=1)
    target = target.cuda()
    draft = _perturbed(target, 0.05)
    prompts = torch.randint(3, 96, (batch, 6), generator=torch.Generator().manual_seed(9)).cuda()
    n = 40
    with torch.no_grad():
        want = [target.generate(prompts[r : r + 1], max_new_tokens=n, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, 6:].tolist() for r in range(batch)]
    stop = want[0][20]
    runs = {}
    for capture in (True, False):
        rounds = CapturedRounds(target, draft, batch, 6 + n + 2 * (k + 1), k, stop_tokens=[stop], capture=capture)
        runs[capture], stats = rounds.generate(prompts, n, sync_every=4)
        assert (rounds.graph is not None) == capture and 0 < stats["acceptance_rate"] < 1
        assert stats["rounds"] <= n + 4  # the captured rounds read the budget set after the capture
    assert runs[True] == runs[False]
    assert runs[True] == [w[: w.index(stop) + 1] if stop in w else w for w in want]
