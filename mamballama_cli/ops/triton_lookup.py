"""The lookup draft's proposal in one Triton launch (``lookup_draft``; reference and contract in
:mod:`mamballama_cli.ops.lookup`).

One program per row. It reads the row's tokens where they are (the prompt buffer below ``prompt_len``, the history
of new tokens after it) instead of assembling the context first. Over blocks of end positions e it extends each
match one token back at a time, for n = 1 .. MAX_N, and keeps the best score n * (L + 1) + e (longest n, then
latest e). It then writes the K tokens that followed the best match, repeating with its period. The reference is
some forty small kernels in a captured round, each a few microseconds. Integer work only, so it equals the
reference exactly. Importing this module registers it on CUDA.
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from mamballama_cli import ops
from mamballama_cli.ops.common import _device_guard, exact_probe
from mamballama_cli.ops.lookup import lookup_draft_ref


@triton.jit
def _token(prompt, hist, p, plen, L, mask):
    """The context's token at position(s) ``p`` of this row (pointers already at the row); -1 where masked."""
    inp = p < plen
    a = tl.load(prompt + p, mask=mask & inp & (p >= 0), other=-1)
    b = tl.load(hist + (p - plen), mask=mask & (p >= plen) & (p - plen < L), other=-1)
    return tl.where(inp, a, b)


@triton.jit
def _lookup_draft_kernel(prompt, plen_ptr, hist, hist_len, out, L, K, s_pr, s_hr, s_hl, s_or,
                         MAX_N: tl.constexpr, MIN_N: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    prompt += r * s_pr
    hist += r * s_hr
    plen = tl.load(plen_ptr).to(tl.int64)
    last = plen + tl.load(hist_len + r * s_hl).to(tl.int64) - 1
    big = L + 1
    offs = tl.arange(0, BLOCK).to(tl.int64)
    best = tl.full((BLOCK,), -1, tl.int64)
    for start in range(0, L, BLOCK):
        e = start + offs
        m = e <= last - 1  # something follows a match that ends at e
        n = tl.zeros((BLOCK,), tl.int64)
        for i in tl.static_range(MAX_N):
            # the context's (i+1)-th last token; -2 where there is none, which no token (>= 0) or masked read (-1)
            # equals
            tail = tl.where(last >= i, _token(prompt, hist, last - i, plen, L, last >= i), -2)
            m = m & (_token(prompt, hist, e - i, plen, L, m & (e >= i)) == tail)
            if i + 1 >= MIN_N:
                n = tl.where(m, i + 1, n)
        best = tl.maximum(best, tl.where(n > 0, n * big + e, -1))
    score = tl.max(best, axis=0)
    e_best = tl.where(score >= 0, score % big, tl.maximum(last - 1, 0))
    period = tl.maximum(last - e_best, 1)
    j = tl.arange(0, BLOCK_K).to(tl.int64)
    idx = tl.minimum(e_best + 1 + j % period, last)
    tl.store(out + r * s_or + j, _token(prompt, hist, idx, plen, L, j < K), mask=j < K)


def lookup_draft_triton(prompt, prompt_len, hist, hist_len, k: int, max_ngram: int = 3, min_ngram: int = 1):
    b, L = prompt.shape
    out = torch.empty(b, k, dtype=prompt.dtype, device=prompt.device)
    with _device_guard(prompt):
        _lookup_draft_kernel[(b,)](
            prompt, prompt_len, hist, hist_len, out, L, k, prompt.stride(0), hist.stride(0), hist_len.stride(0),
            out.stride(0), MAX_N=max_ngram, MIN_N=min_ngram, BLOCK=min(1024, triton.next_power_of_2(L)),
            BLOCK_K=triton.next_power_of_2(k), num_warps=4,
        )
    return out


def lookup_draft_check(fn, device: str = "cuda", seed: int = 0) -> int:
    """Run ``fn`` and the reference on random rows (small vocabularies: matches of every length, loops, no match;
    lengths from 1 to the whole buffer, contexts longer than one block); returns how many proposals differ."""
    gen = torch.Generator().manual_seed(seed)
    bad = 0
    for L, b, plen, vocab in ((40, 6, 5, 3), (1500, 3, 700, 5), (64, 4, 1, 2), (300, 2, 30, 50)):
        prompt = torch.randint(0, vocab, (b, L), generator=gen)
        hist = torch.randint(0, vocab, (b, L), generator=gen)
        hist_len = torch.randint(0, L - plen + 1, (b,), generator=gen)
        hist_len[0] = max(0, 1 - plen)  # the shortest context
        hist_len[-1] = L - plen  # the whole buffer
        args = [prompt, torch.tensor(plen), hist, hist_len]
        for k, max_n, min_n in ((1, 3, 1), (4, 3, 1), (8, 4, 2), (5, 1, 1)):
            want = lookup_draft_ref(*args, k, max_n, min_n)
            got = fn(*[a.to(device) for a in args], k, max_n, min_n)
            bad += int((got.cpu() != want).sum())
    return bad


ops.register_fast("lookup_draft", "mamballama-triton", lookup_draft_triton,
                  partial(exact_probe, lookup_draft_check, lookup_draft_triton, "probe rows"))
