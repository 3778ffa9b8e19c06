"""The lookup draft's proposal in one Triton launch (``lookup_draft``; reference and contract in
:mod:`mamballama_cli.ops.lookup`).

One program per row. It reads the row's tokens where they are (the prompt buffer below ``prompt_len``, the history
of new tokens after it) instead of assembling the context first. Over blocks of end positions e it extends each
match one token back at a time, for n = 1 .. MAX_N, and keeps the best score n * (L + 1) + e (longest n, then
latest e). It then writes the K tokens that followed the best match, repeating with its period. With an n-gram
table and a longest match shorter than the table's ``below``, it then walks the table's chain over those tokens:
each step one load of the pair's probe slots, one of its successor and one of the single token's. The reference is
some forty small kernels in a captured round (a hundred more with a table), each a few microseconds. Integer work
only, so it equals the reference exactly. Importing this module registers it on CUDA.
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from mamballama_cli import ops
from mamballama_cli.ops.common import _device_guard, exact_probe
from mamballama_cli.ops.lookup import HASH_MUL, PROBES, TableArrays, hash_pairs, lookup_draft_ref


@triton.jit
def _token(prompt, hist, p, plen, L, mask):
    """The context's token at position(s) ``p`` of this row (pointers already at the row); -1 where masked."""
    inp = p < plen
    a = tl.load(prompt + p, mask=mask & inp & (p >= 0), other=-1)
    b = tl.load(hist + (p - plen), mask=mask & (p >= plen) & (p - plen < L), other=-1)
    return tl.where(inp, a, b)


@triton.jit
def _table_next(keys, nexts, single, vocab, size, a, b, PROBES: tl.constexpr, HASH: tl.constexpr):
    """The table's successor of the pair (a, b) (a < 0: no pair), else of b alone; -1 where it has neither (the
    reference: ops/lookup.py ``table_next``). Scalars in, a scalar out; a token outside the table's vocabulary has
    no entry (int flags: scalar booleans combine badly in the interpreter)."""
    ok_b = (b >= 0).to(tl.int32) * (b < vocab).to(tl.int32)
    ok = ok_b * (a >= 0).to(tl.int32) * (a < vocab).to(tl.int32)
    key = tl.where(ok > 0, a * vocab + b, -1)
    k0 = tl.maximum(key, 0)
    start = ((k0 ^ (k0 >> 15)) * HASH >> 4) & (size - 1)
    d = tl.arange(0, PROBES).to(tl.int64)
    hit = (tl.load(keys + start + d) == key) & (key >= 0)
    pair = tl.max(tl.where(hit, tl.load(nexts + start + d), -1), axis=0)
    one = tl.load(single + tl.minimum(tl.maximum(b, 0), vocab - 1))
    return tl.where(pair >= 0, pair, tl.where(ok_b > 0, one, -1))


@triton.jit
def _lookup_draft_kernel(prompt, plen_ptr, hist, hist_len, out, L, K, s_pr, s_hr, s_hl, s_or,
                         keys, nexts, single, vocab, size, below, match_ptr, s_m,
                         MAX_N: tl.constexpr, MIN_N: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                         TABLE: tl.constexpr, PROBES: tl.constexpr, HASH: tl.constexpr, MATCH: tl.constexpr):
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
    n_best = tl.where(score >= 0, score // big, 0)  # the longest match's length, 0 for none
    if MATCH:
        tl.store(match_ptr + r * s_m, n_best)
    if TABLE:
        b = tl.max(_token(prompt, hist, last + offs * 0, plen, L, offs == 0), axis=0)  # the last token
        a = tl.max(_token(prompt, hist, last - 1 + offs * 0, plen, L, offs == 0), axis=0)  # -1 when last is 0
        going = (n_best < below).to(tl.int32)  # an int flag: scalar booleans combine badly in the interpreter
        for jj in range(K):
            nxt = _table_next(keys, nexts, single, vocab, size, a, b, PROBES, HASH)
            going = going * (nxt >= 0).to(tl.int32)
            tl.store(out + r * s_or + jj, nxt, mask=going > 0)
            a = b
            b = nxt


def lookup_draft_triton(prompt, prompt_len, hist, hist_len, k: int, max_ngram: int = 3, min_ngram: int = 1,
                        table: TableArrays | None = None, match_out=None):
    b, L = prompt.shape
    out = torch.empty(b, k, dtype=prompt.dtype, device=prompt.device)
    t = table if table is not None else TableArrays(hist_len, hist_len, hist_len, 1, 1, 0)  # unread placeholders
    with _device_guard(prompt):
        _lookup_draft_kernel[(b,)](
            prompt, prompt_len, hist, hist_len, out, L, k, prompt.stride(0), hist.stride(0), hist_len.stride(0),
            out.stride(0), t.keys, t.nexts, t.single, t.vocab, t.keys.shape[0] - t.probes, t.below,
            match_out if match_out is not None else hist_len, match_out.stride(0) if match_out is not None else 0,
            MAX_N=max_ngram, MIN_N=min_ngram, BLOCK=min(1024, triton.next_power_of_2(L)),
            BLOCK_K=triton.next_power_of_2(k), TABLE=table is not None, PROBES=t.probes, HASH=HASH_MUL,
            MATCH=match_out is not None, num_warps=4,
        )
    return out


def random_table(vocab: int, n_pairs: int, n_single: int, below: int, gen: torch.Generator,
                 device: str = "cpu") -> TableArrays:
    """A table of ``n_pairs`` random pairs and ``n_single`` single tokens with random successors, over a vocabulary
    of ``vocab`` tokens (the check's)."""
    pairs = torch.randperm(vocab * vocab, generator=gen)[:n_pairs]
    keys, nexts = hash_pairs(pairs.numpy(), torch.randint(0, vocab, (n_pairs,), generator=gen).numpy())
    single = torch.full((vocab,), -1, dtype=torch.long)
    single[torch.randperm(vocab, generator=gen)[:n_single]] = torch.randint(0, vocab, (n_single,), generator=gen)
    return TableArrays(torch.as_tensor(keys).to(device), torch.as_tensor(nexts).to(device), single.to(device), vocab,
                       PROBES, below)


def lookup_draft_check(fn, device: str = "cuda", seed: int = 0) -> int:
    """Run ``fn`` and the reference on random rows (small vocabularies: matches of every length, loops, no match;
    lengths from 1 to the whole buffer, contexts longer than one block), without a table and with tables that
    cover every pair, some pairs, or some pairs and some single tokens (so chains run to the end and stop early);
    returns how many proposals and match lengths differ."""
    gen = torch.Generator().manual_seed(seed)
    bad = 0
    cases = [(40, 6, 5, 3, None), (1500, 3, 700, 5, None), (64, 4, 1, 2, None), (300, 2, 30, 50, None),
             (40, 6, 3, 30, (900, 30, 2)), (50, 5, 1, 40, (400, 20, 2)), (200, 3, 20, 12, (60, 6, 3)),
             (24, 4, 2, 60, (3000, 0, 1)), (48, 4, 2, 400, (80000, 200, 2)),  # keys past 2**15
             (40, 5, 3, 48, (500, 24, 2, 32))]  # a table of a smaller vocabulary than the context's tokens
    for L, b, plen, vocab, tab in cases:
        prompt = torch.randint(0, vocab, (b, L), generator=gen)
        hist = torch.randint(0, vocab, (b, L), generator=gen)
        hist_len = torch.randint(0, L - plen + 1, (b,), generator=gen)
        hist_len[0] = max(0, 1 - plen)  # the shortest context
        hist_len[-1] = L - plen  # the whole buffer
        args = [prompt, torch.tensor(plen), hist, hist_len]
        table = random_table(tab[3] if tab and len(tab) > 3 else vocab, *tab[:3], gen) if tab else None
        on_device = table and TableArrays(*(x.to(device) for x in table[:3]), *table[3:])
        for k, max_n, min_n in ((1, 3, 1), (4, 3, 1), (8, 4, 2), (5, 1, 1)):
            want_n, got_n = torch.full((b,), -7), torch.full((b,), -7, device=device)
            want = lookup_draft_ref(*args, k, max_n, min_n, table, want_n)
            got = fn(*[a.to(device) for a in args], k, max_n, min_n, on_device, got_n)
            bad += int((got.cpu() != want).sum()) + int((got_n.cpu() != want_n).sum())
    return bad


ops.register_fast("lookup_draft", "mamballama-triton", lookup_draft_triton,
                  partial(exact_probe, lookup_draft_check, lookup_draft_triton, "probe rows"))
