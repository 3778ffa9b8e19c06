"""Speculative decoding for recurrent state: the replay op, rollback, lossless greedy and sampled decoding."""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_hybrid
from mamballama_cli.generation.sampling import SamplingConfig, probabilities
from mamballama_cli.generation.speculative import HybridRunner, accept_sampled, as_hybrid, speculative_generate
from mamballama_cli.ops.replay import ssm_replay_ref
from mamballama_cli.ops.ssd import ssm_step_ref

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def perturbed(model, scale: float, seed: int = 7):
    """A copy of ``model`` with relative noise on every weight: a draft that mostly agrees with it."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    return draft


class NeverAgrees:
    """A draft runner that proposes anything but the target's greedy choice: every draft is rejected."""

    def __init__(self, target, batch_size, max_length, window):
        self.inner = HybridRunner(target, batch_size, max_length, window, keep_live=True)

    @staticmethod
    def _spoil(logits):
        return logits.scatter(-1, logits.argmax(-1, keepdim=True), float("-inf"))

    def prefill(self, ids):
        return self._spoil(self.inner.prefill(ids))

    def extend(self, ids, rebase):
        return self._spoil(self.inner.extend(ids, rebase))

    def commit(self, r):
        self.inner.commit(r)


def greedy_reference(model, prompt, n):
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, prompt.shape[1]:].tolist()


# --- the replay op ---------------------------------------------------------------------------------------
def _window_inputs(b, steps, h, g, p, n, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, steps, g, p, generator=gen, dtype=dtype)
    dt = torch.randn(b, steps, h, generator=gen, dtype=dtype) - 1  # raw: before dt_bias and softplus
    B = torch.randn(b, steps, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, steps, h, n, generator=gen, dtype=dtype)
    return x, dt, B, C


@pytest.mark.parametrize("K", [1, 4])
def test_replay_op_equals_step_by_step_for_every_accepted_count(K):
    b, h, g, p, n = 2, 4, 2, 5, 6
    gen = torch.Generator().manual_seed(K)
    s0 = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    A = -torch.rand(h, generator=gen, dtype=torch.float64) - 0.1
    D = torch.randn(h, generator=gen, dtype=torch.float64)
    dt_bias = torch.randn(h, generator=gen, dtype=torch.float64)
    xo, dto, Bo, _ = _window_inputs(b, K + 1, h, g, p, n, seed=10 + K)
    xn, dtn, Bn, Cn = _window_inputs(b, K + 1, h, g, p, n, seed=20 + K)

    def steps(state, x, dt, B, C, count):
        ys = []
        for t in range(count):
            xh = x[:, t].repeat_interleave(h // g, dim=1)
            state, y = ssm_step_ref(state, xh, F.softplus(dt[:, t] + dt_bias), A, B[:, t], C[:, t], D)
            ys.append(y)
        return state, ys

    for accepted in range(K + 1):
        for r in (accepted, accepted + 1):  # drafts kept, and drafts kept plus the verified token
            n_replay = torch.full((b,), r)
            y, replayed, final = ssm_replay_ref(s0, xo, dto, Bo, n_replay, xn, dtn, Bn, Cn, A, dt_bias, D,
                                                return_final=True)
            want_ckpt, _ = steps(s0, xo, dto, Bo, Cn, r)
            want_final, want_y = steps(want_ckpt, xn, dtn, Bn, Cn, K + 1)
            assert torch.allclose(replayed, want_ckpt, atol=1e-12)
            assert torch.allclose(y, torch.stack(want_y, 1), atol=1e-12)
            assert torch.allclose(final, want_final, atol=1e-12)
    # rows may replay different counts (batched speculation); in-place checkpoint update
    n_replay = torch.tensor([0, K])
    out = s0.clone()
    ssm_replay_ref(out, xo, dto, Bo, n_replay, xn, dtn, Bn, Cn, A, dt_bias, D, state_out=out)
    assert torch.allclose(out[0], s0[0]) and torch.allclose(out[1], steps(s0, xo, dto, Bo, Cn, K)[0][1])


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("accepted", [0, 1, 2, 3, 4])
def test_runner_rollback_equals_plain_decoding_for_every_accepted_count(accepted, static):
    """Verify K+1 tokens, keep ``accepted`` drafts, verify the next window: the logits equal a plain
    forward over the kept sequence (attention rolled back by length, Mamba layers by replay). ``static``
    is the computation CUDA graphs record (device-side positions, masked attention over the buffer)."""
    K = 4
    target, _ = tiny_hybrid(attn_layers=(1,), seed=3)
    gen = torch.Generator().manual_seed(accepted)
    prompt = torch.randint(3, 96, (1, 7), generator=gen)
    window1 = torch.randint(3, 96, (1, K + 1), generator=gen)
    window2 = torch.randint(3, 96, (1, K + 1), generator=gen)
    runner = HybridRunner(target, 1, max_length=32, window=K + 1, static=static)
    with torch.no_grad():
        runner.prefill(prompt)
        runner.extend(window1, rebase=True)
        runner.commit(accepted + 1)
        got = runner.extend(window2, rebase=True)
        full = torch.cat([prompt, window1[:, : accepted + 1], window2], 1)
        want = target(full).logits[:, -(K + 1):]
    assert (got - want).abs().max().item() <= 1e-4
    assert runner.start == [prompt.shape[1] + accepted + 1]


def test_hybrid_draft_window_grows_and_rolls_back():
    """A hybrid draft feeds one token at a time ("continue" steps) and is cut back to any prefix."""
    target, _ = tiny_hybrid(attn_layers=(1,), seed=4)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 96, (1, 5), generator=gen)
    toks = torch.randint(3, 96, (1, 8), generator=gen)
    for keep, static in ((1, False), (2, True), (4, False)):
        runner = HybridRunner(target, 1, max_length=32, window=5, keep_live=True, static=static)
        with torch.no_grad():
            runner.prefill(prompt)
            outs = [runner.extend(toks[:, :1], rebase=True)]
            for j in range(1, 4):
                outs.append(runner.extend(toks[:, j : j + 1], rebase=False))
            runner.commit(keep)
            nxt = runner.extend(toks[:, 4:6], rebase=True)
            full = torch.cat([prompt, toks[:, :keep], toks[:, 4:6]], 1)
            plain = target(full).logits
            step_logits = target(torch.cat([prompt, toks[:, :4]], 1)).logits[:, -4:]
        assert (torch.cat(outs, 1) - step_logits).abs().max().item() <= 1e-4
        assert (nxt - plain[:, -2:]).abs().max().item() <= 1e-4


# --- lossless greedy decoding ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_speculative_greedy_equals_target_greedy(k):
    target, _ = tiny_hybrid(seed=0)
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    want = greedy_reference(target, prompt, 64)

    mostly = speculative_generate(target, perturbed(target, 0.02), prompt, k=k, max_new_tokens=64)
    assert mostly.tokens == want
    assert mostly.stats.acceptance_rate > 0.5, mostly.stats.as_dict()
    assert mostly.extra["draft_runner"] == "HybridRunner"

    never = NeverAgrees(target, 1, prompt.shape[1] + 64 + 2 * (k + 1), k + 1)
    rejected = speculative_generate(target, never, prompt, k=k, max_new_tokens=64)
    assert rejected.tokens == want
    assert rejected.stats.accepted == 0 and rejected.stats.rounds == 63
    assert rejected.stats.tokens_per_call == 1.0

    # stats are consistent: every round produces accepted + 1 tokens
    s = mostly.stats
    assert s.produced == s.accepted + s.rounds and s.drafted == k * s.rounds
    assert s.new_tokens == 64 and s.tokens_per_call == pytest.approx(s.produced / s.rounds)


@pytest.mark.parametrize("k", [2, 4])
def test_transformers_draft_with_cropped_cache(k):
    """A plain transformers draft (the teacher): its DynamicCache is cropped back after each verification."""
    target, teacher = tiny_hybrid(seed=0)
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(5))
    want = greedy_reference(target, prompt, 24)
    res = speculative_generate(target, teacher, prompt, k=k, max_new_tokens=24)
    assert res.extra["draft_runner"] == "TransformersRunner"
    assert res.tokens == want
    # as its own target's draft the teacher agrees always, so all K drafts pass and the bonus is used
    as_target = as_hybrid(teacher)
    res = speculative_generate(as_target, teacher, prompt, k=k, max_new_tokens=24)
    assert res.tokens == greedy_reference(teacher, prompt, 24)
    assert res.stats.acceptance_rate == 1.0


def test_adaptive_k_stays_lossless_and_follows_acceptance():
    from mamballama_cli.generation.speculative import next_k

    assert [next_k(4, a, 6) for a in (4, 3, 2, 1, 0)] == [5, 4, 4, 3, 3]
    assert next_k(6, 6, 6) == 6 and next_k(1, 0, 6) == 1
    target, _ = tiny_hybrid(seed=0)
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    want = greedy_reference(target, prompt, 48)
    # a draft that always agrees: the window grows to the largest and stays there
    same = speculative_generate(target, copy.deepcopy(target), prompt, k=6, max_new_tokens=48, adaptive=True)
    assert same.tokens == want and same.extra["adaptive_k"]
    assert max(same.stats.rounds_by_k) == 6 and same.stats.acceptance_rate == 1.0
    # a draft that never agrees: the window falls to one token and stays there
    never = NeverAgrees(target, 1, prompt.shape[1] + 48 + 2 * 7, 7)
    low = speculative_generate(target, never, prompt, k=6, max_new_tokens=48, adaptive=True)
    assert low.tokens == want
    assert low.stats.rounds_by_k[1] >= low.stats.rounds - 5 and low.stats.drafted < 6 * low.stats.rounds
    # a draft that mostly agrees, in the graph-recorded computation: lossless, several window lengths used
    mixed = speculative_generate(target, perturbed(target, 0.05), prompt, k=5, max_new_tokens=48, adaptive=True,
                                 static=True)
    assert mixed.tokens == want
    s = mixed.stats
    assert s.drafted == sum(k * n for k, n in s.rounds_by_k.items()) and sum(s.rounds_by_k.values()) == s.rounds
    assert s.produced == s.accepted + s.rounds


def test_acceptance_by_position_counts_each_window_position():
    target, _ = tiny_hybrid(seed=0)
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    res = speculative_generate(target, perturbed(target, 0.05), prompt, k=4, max_new_tokens=40)
    s = res.stats
    assert len(s.position_reached) == 4 and s.position_reached[0] == s.rounds
    assert sum(s.position_accepted) == s.accepted  # draft j kept <=> position j counted as accepted
    assert all(r2 <= a1 <= r1 for r1, a1, r2 in zip(s.position_reached, s.position_accepted, s.position_reached[1:]))
    d = s.as_dict()
    assert len(d["acceptance_by_position"]) == 4 and d["rounds_by_k"] == {"4": s.rounds}


def test_graph_computation_run_eagerly_keeps_greedy_lossless():
    """``static``: the computation CUDA graphs record (device-side positions and replay counts, attention
    over the whole buffer under a mask), for both the target and a hybrid draft."""
    target, _ = tiny_hybrid(seed=0)
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    res = speculative_generate(target, perturbed(target, 0.02), prompt, k=3, max_new_tokens=32, static=True)
    assert res.tokens == greedy_reference(target, prompt, 32)
    assert 0 < res.stats.acceptance_rate < 1


def test_batched_rows_advance_in_lockstep_and_each_equals_its_greedy():
    """A plain transformers draft has one cache length for the batch: rows advance together."""
    target, teacher = tiny_hybrid(seed=1)
    prompts = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(9))
    res = speculative_generate(target, teacher, prompts, k=3, max_new_tokens=20)
    assert res.extra["draft_runner"] == "TransformersRunner" and not res.extra["per_row"]
    for row in range(3):
        assert res.tokens[row] == greedy_reference(target, prompts[row : row + 1], 20)[0]


@pytest.mark.parametrize("static", [False, True])
def test_batched_rows_keep_their_own_accepted_counts_and_each_equals_its_greedy(static):
    """Hybrid target and draft: every row commits its own accepted count each round and sits at its own
    position (``static``: the CUDA-graph computation, positions and counts read from device tensors). Rows
    that meet a stop token stop while the others go on."""
    target, _ = tiny_hybrid(seed=1)
    prompts = torch.randint(3, 96, (4, 6), generator=torch.Generator().manual_seed(9))
    n = 24
    wants = [greedy_reference(target, prompts[r : r + 1], n)[0] for r in range(4)]
    stop = wants[0][9]
    runner = HybridRunner(target, 4, 6 + n + 2 * 4, 4, static=static)
    commits = []
    commit = runner.commit

    def spy(r):
        commits.append(r.tolist() if isinstance(r, torch.Tensor) else [r] * 4)
        commit(r)

    runner.commit = spy
    res = speculative_generate(runner, perturbed(target, 0.05), prompts, k=3, max_new_tokens=n, static=static,
                               stop_tokens=[stop])
    assert res.extra["per_row"]
    for row, want in enumerate(wants):
        assert res.tokens[row] == (want[: want.index(stop) + 1] if stop in want else want), row
    assert any(len(set(c)) > 1 for c in commits)  # rows kept different counts in one round
    assert any(0 in c and max(c) > 0 for c in commits)  # a finished row stayed where it was as others went on
    s = res.stats
    assert s.produced == s.accepted + s.row_rounds and s.tokens_per_call == pytest.approx(s.produced / s.row_rounds)


def test_stop_token_ends_generation_like_plain_decoding():
    target, _ = tiny_hybrid(seed=0)
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    want = greedy_reference(target, prompt, 40)[0]
    stop = want[10]
    res = speculative_generate(target, target, prompt, k=4, max_new_tokens=40, stop_tokens=[stop])
    assert res.tokens[0] == want[: want.index(stop) + 1]
    first = speculative_generate(target, target, prompt, k=4, max_new_tokens=40, stop_tokens=[want[0]])
    assert first.tokens[0] == want[:1] and first.stats.rounds == 0
    assert first.stats.as_dict()["acceptance_rate"] is None  # nothing drafted: null in the JSON, not NaN


def test_as_hybrid_runs_a_llama_exactly():
    _, teacher = tiny_hybrid(seed=2)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    hybrid = as_hybrid(teacher)
    with torch.no_grad():
        assert (hybrid(ids).logits - teacher(ids).logits).abs().max().item() <= 1e-5
    assert hybrid.model.embed_tokens.weight.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()  # shared


# --- lossless sampling -----------------------------------------------------------------------------------
def _chi2_sf(stat: float, df: int) -> float:
    """Survival function of the chi-square distribution (regularised upper incomplete gamma)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def test_rejection_sampling_emits_the_target_distribution_at_every_position():
    """Fixed per-position p and q (no context): each emitted token must follow p at its position."""
    V, K, N = 5, 3, 40000
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(2 * torch.randn(K + 1, V, generator=gen), -1)
    q = torch.softmax(2 * torch.randn(K, V, generator=gen), -1)
    drafts = torch.multinomial(q, N, replacement=True, generator=gen).T  # (N, K)
    accepted, nxt = accept_sampled(drafts, q.expand(N, K, V), p.expand(N, K + 1, V), gen)
    emitted = torch.cat([drafts, torch.zeros(N, 1, dtype=torch.long)], 1)
    emitted[torch.arange(N), accepted] = nxt
    for pos in range(K + 1):
        rows = accepted >= pos  # the token at ``pos`` is emitted iff all before it were kept
        counts = torch.bincount(emitted[rows, pos], minlength=V).double()
        expected = rows.sum() * p[pos].double()
        stat = float(((counts - expected) ** 2 / expected).sum())
        assert _chi2_sf(stat, V - 1) > 1e-3, (pos, counts, expected)
    # and the draft distribution itself is rejected by the same test (the test has power)
    counts = torch.bincount(drafts[:, 0], minlength=V).double()
    stat = float(((counts - N * p[0]) ** 2 / (N * p[0])).sum())
    assert _chi2_sf(stat, V - 1) < 1e-6


def test_sampled_speculative_decoding_follows_the_target_distribution():
    """End to end on tiny models (vocabulary 6): pool every emitted token's exact conditional target
    distribution; the token counts must fit it (Pearson chi-square), while they do not fit the draft's."""
    V, K, new, trials = 6, 2, 16, 20
    target, _ = tiny_hybrid(seed=0, vocab=V)
    with torch.no_grad():  # sharper than a random init, so that the distributions are far from uniform
        target.lm_head.weight.mul_(4)
    draft = perturbed(target, 0.2)
    sampling = SamplingConfig(temperature=1.0)
    prompt = torch.tensor([[1, 3, 4, 2]])
    n0 = prompt.shape[1]
    observed = torch.zeros(V, dtype=torch.float64)
    expected_p = torch.zeros(V, dtype=torch.float64)
    expected_q = torch.zeros(V, dtype=torch.float64)
    accepted = drafted = 0
    for trial in range(trials):
        res = speculative_generate(target, draft, prompt, k=K, max_new_tokens=new, sampling=sampling, seed=trial)
        seq = torch.cat([prompt, torch.tensor([res.tokens[0]])], 1)
        with torch.no_grad():
            p = probabilities(target(seq).logits[0, n0 - 1 : -1], sampling).double()
            q = probabilities(draft(seq).logits[0, n0 - 1 : -1], sampling).double()
        observed += torch.bincount(seq[0, n0:], minlength=V).double()
        expected_p += p.sum(0)
        expected_q += q.sum(0)
        accepted += res.stats.accepted
        drafted += res.stats.drafted
    assert 0.2 < accepted / drafted < 0.8  # rejections and acceptances both happen
    stat_p = float(((observed - expected_p) ** 2 / expected_p).sum())
    stat_q = float(((observed - expected_q) ** 2 / expected_q).sum())
    assert _chi2_sf(stat_p, V - 1) > 1e-3, (observed, expected_p)
    assert _chi2_sf(stat_q, V - 1) < 1e-3, (observed, expected_q)


def test_sampling_with_top_k_and_top_p_never_emits_tokens_outside_the_target_support():
    target, _ = tiny_hybrid(seed=0)
    draft = perturbed(target, 0.3)
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    sampling = SamplingConfig(temperature=0.8, top_p=0.5, top_k=5)
    res = speculative_generate(target, draft, prompt, k=4, max_new_tokens=24, sampling=sampling, seed=3)
    seq = torch.cat([prompt, torch.tensor([res.tokens[0]])], 1)
    with torch.no_grad():
        p = probabilities(target(seq).logits[0, prompt.shape[1] - 1 : -1], sampling)
    assert bool((p.gather(-1, seq[0, prompt.shape[1]:, None]) > 0).all())
    again = speculative_generate(target, draft, prompt, k=4, max_new_tokens=24, sampling=sampling, seed=3)
    assert again.tokens == res.tokens  # --seed makes sampled runs reproducible
