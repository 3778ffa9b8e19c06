"""A speculative round's commit in one Triton launch (``commit_round``; reference and contract in
:mod:`mamballama_cli.ops.commit`).

One program per row: it reads the row's drafts, accepted count and next token, writes the keep counts, the two
pending tokens and the kept tokens into the history, checks them against the stop tokens, and adds to the two
counters atomically. It replaces about thirty kernels of a few microseconds each in a captured round. Integer
work only, so it equals the reference exactly. Importing this module registers it on CUDA.
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from mamballama_cli import ops
from mamballama_cli.ops.commit import commit_round_ref
from mamballama_cli.ops.common import _device_guard, exact_probe


@triton.jit
def _commit_round_kernel(drafts, acc_in, nxt_in, pending, finished, t_keep, d_keep, hist, hist_len, stops,
                         max_new, accepted, row_rounds,
                         K, L, S, s_dr, s_acc, s_nxt, s_pr, s_pc, s_fin, s_tk, s_dk, s_hr, s_hl,
                         BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    r = tl.program_id(0)
    j = tl.arange(0, BLOCK_T)  # the K + 1 tokens of the round: drafts 0..K-1, then the target's bonus
    fin = tl.load(finished + r * s_fin).to(tl.int1)
    live = fin == 0
    acc = tl.load(acc_in + r * s_acc)
    nxt = tl.load(nxt_in + r * s_nxt)
    acc = tl.where(live, acc, 0)
    kept = tl.where(live, acc + 1, 0)
    tl.atomic_add(accepted, acc)
    tl.atomic_add(row_rounds, live.to(tl.int64))
    tl.store(t_keep + r * s_tk, kept)
    tl.store(d_keep + r * s_dk, kept)
    d = tl.load(drafts + r * s_dr + j, mask=j < K, other=0)
    d0 = tl.sum(tl.where(j == 0, d, 0), axis=0)
    out = tl.where(j < acc, d, tl.where(j == acc, nxt, d0))  # d[:acc], nxt, then what the reference pads with
    # pending: the last token kept (pending[:, 1] when no draft was kept, else the last kept draft), then nxt
    p1 = tl.load(pending + r * s_pr + s_pc)
    last = tl.where(acc == 0, p1, tl.sum(tl.where(j == acc - 1, d, 0), axis=0))
    tl.store(pending + r * s_pr, last, mask=live)
    tl.store(pending + r * s_pr + s_pc, nxt, mask=live)
    # the history, the stop tokens, finished
    n0 = tl.load(hist_len + r * s_hl)
    valid = j < kept
    pos = tl.minimum(n0 + j, L - 1)
    tl.store(hist + r * s_hr + pos, out, mask=valid)
    s = tl.arange(0, BLOCK_S)
    st = tl.load(stops + s, mask=s < S, other=-1)
    match = (out[:, None] == st[None, :]) & (s[None, :] < S) & valid[:, None]
    hit = tl.max(tl.max(match.to(tl.int32), axis=1), axis=0) > 0
    n1 = n0 + kept
    tl.store(hist_len + r * s_hl, n1)
    done = fin | (live & hit) | (n1 >= tl.load(max_new))
    tl.store(finished + r * s_fin, done.to(tl.int1))


def commit_round_triton(drafts, acc, nxt, pending, finished, t_keep, d_keep, hist, hist_len, stops, max_new,
                        accepted, row_rounds) -> None:
    b, K = drafts.shape
    S = stops.numel()
    with _device_guard(drafts):
        _commit_round_kernel[(b,)](  # no stop tokens: S = 0 masks every read of the stand-in pointer
            drafts, acc, nxt, pending, finished, t_keep, d_keep, hist, hist_len, stops if S else drafts, max_new,
            accepted, row_rounds, K, hist.shape[1], S,
            drafts.stride(0), acc.stride(0), nxt.stride(0), *pending.stride(), finished.stride(0),
            t_keep.stride(0), d_keep.stride(0), hist.stride(0), hist_len.stride(0),
            BLOCK_T=triton.next_power_of_2(K + 1), BLOCK_S=triton.next_power_of_2(max(S, 1)), num_warps=1,
        )


def commit_round_check(fn, device: str = "cuda", seed: int = 0) -> int:
    """Run ``fn`` and the reference on the same random rounds (live and finished rows, every accepted count 0..K,
    stop tokens among the kept tokens and after them, a row reaching max_new); returns how many outputs differ."""
    gen = torch.Generator().manual_seed(seed)
    b, K, L = 9, 4, 40

    def make():
        drafts = torch.randint(0, 12, (b, K), generator=gen)
        acc = torch.tensor([0, 1, 2, 3, 4, 4, 2, 0, 3])
        nxt = torch.randint(0, 12, (b,), generator=gen)
        pending = torch.randint(0, 12, (b, 2), generator=gen)
        finished = torch.tensor([False, False, False, True, False, False, False, True, False])
        hist = torch.randint(0, 12, (b, L), generator=gen)
        hist_len = torch.tensor([0, 3, 7, 5, 30, 35, 1, 2, 34])  # room for K + 1 more in every row
        return [drafts, acc, nxt, pending, finished, torch.zeros(b, dtype=torch.long),
                torch.zeros(b, dtype=torch.long), hist, hist_len, torch.tensor([5, 7]), torch.tensor(37),
                torch.tensor(3), torch.tensor(10)]

    base = make()
    bad = 0
    for stops in (torch.tensor([5, 7]), torch.tensor([], dtype=torch.long)):
        args = [t.clone() for t in base]
        args[9] = stops
        mine = [t.clone().to(device) for t in args]  # clone: .to() of a tensor already there is the tensor
        commit_round_ref(*args)
        fn(*mine)
        bad += sum(int(not torch.equal(a, m.cpu())) for a, m in zip(args, mine))
    return bad


ops.register_fast("commit_round", "mamballama-triton", commit_round_triton,
                  partial(exact_probe, commit_round_check, commit_round_triton, "a probe round"))
