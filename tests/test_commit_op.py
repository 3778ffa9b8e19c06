"""The commit of a speculative round as one op (``commit_round``, ops/commit.py; generation/captured_round.py
calls it): the reference against a plain per-row oracle, the Triton kernel (ops/triton_commit.py) under Triton's
interpreter on CPU (TRITON_INTERPRET=1, in a subprocess: the variable must be set before triton is imported),
and on CUDA (gpu, part3 of benchmarks/gpu_session.sh)."""

import pytest
import torch

from helpers import NEEDS_TRITON, interpreted_check
from mamballama_cli.ops.commit import commit_round_ref


def oracle(drafts, acc, nxt, pending, finished, hist, hist_len, stops, max_new):
    """Per row, in Python lists: what a round's commit must leave behind."""
    rows = []
    for r in range(drafts.shape[0]):
        if finished[r]:
            rows.append((0, pending[r].tolist(), hist[r].tolist(), int(hist_len[r]), True, 0))
            continue
        a = int(acc[r])
        d = drafts[r].tolist()
        new = d[:a] + [int(nxt[r])]
        last = int(pending[r, 1]) if a == 0 else d[a - 1]
        h = hist[r].tolist()
        n0 = int(hist_len[r])
        h[n0:n0 + len(new)] = new
        n1 = n0 + len(new)
        done = any(t in stops for t in new) or n1 >= max_new
        rows.append((a + 1, [last, int(nxt[r])], h, n1, done, a))
    return rows


def test_commit_reference_equals_a_per_row_oracle():
    gen = torch.Generator().manual_seed(0)
    b, K, L = 7, 4, 30
    drafts = torch.randint(0, 9, (b, K), generator=gen)
    acc = torch.tensor([0, 1, 2, 3, 4, 2, 1])
    nxt = torch.randint(0, 9, (b,), generator=gen)
    pending = torch.randint(0, 9, (b, 2), generator=gen)
    finished = torch.tensor([False, False, True, False, False, False, False])
    hist = torch.randint(0, 9, (b, L), generator=gen)
    hist_len = torch.tensor([0, 4, 9, 20, 22, 3, 10])
    stops, max_new = torch.tensor([3]), torch.tensor(25)
    want = oracle(drafts, acc, nxt, pending, finished, hist, hist_len, [3], 25)
    t_keep, d_keep = torch.full((b,), -1), torch.full((b,), -1)
    accepted, row_rounds = torch.tensor(5), torch.tensor(2)
    commit_round_ref(drafts, acc, nxt, pending, finished, t_keep, d_keep, hist, hist_len, stops, max_new,
                     accepted, row_rounds)
    for r, (kept, pend, h, n, done, _) in enumerate(want):
        assert int(t_keep[r]) == int(d_keep[r]) == kept, r
        assert pending[r].tolist() == pend and hist[r].tolist() == h, r
        assert int(hist_len[r]) == n and bool(finished[r]) == done, r
    assert int(accepted) == 5 + sum(w[5] for w in want) and int(row_rounds) == 2 + 6


@NEEDS_TRITON
def test_commit_kernel_equals_the_reference_under_the_interpreter():
    assert interpreted_check("mamballama_cli.ops.triton_commit", "commit_round_check", "commit_round_triton") == [0, 0]


@pytest.mark.gpu
def test_commit_kernel_equals_the_reference_on_cuda_and_is_chosen():
    from mamballama_cli import ops
    from mamballama_cli.ops.triton_commit import commit_round_check, commit_round_triton

    assert commit_round_check(commit_round_triton) == 0 and commit_round_check(commit_round_triton, seed=3) == 0
    assert ops.dispatch("commit_round", torch.device("cuda"))[0] == "mamballama-triton"
