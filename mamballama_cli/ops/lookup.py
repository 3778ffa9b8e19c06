"""The lookup draft's proposal as an op (generation/lookup.py): reference here, one Triton launch in
:mod:`mamballama_cli.ops.triton_lookup`.

    lookup_draft(prompt, prompt_len, hist, hist_len, k, max_ngram=3, min_ngram=1, table=None, match_out=None)
        -> (b, k) proposals; match_out (b,), when given, gets the length of each row's match (0: none)

prompt (b, L) with its length ``prompt_len`` (0-dim: a batch shares it); hist (b, L) each row's new tokens,
``hist_len`` (b,) how many. The context is [prompt | new tokens] (:func:`assemble_context`); the proposal
:func:`lookup_propose` over it. In a captured round the reference is some forty small kernels; the Triton kernel
reads the two buffers in place, one program per row. Integer work only, so both give the same proposals.

``table`` (:class:`TableArrays`, optional): an n-gram table built from text the target wrote
(generation/ngram_table.py). Where the context's longest match is shorter than ``table.below`` tokens, the
proposal is the table's chain instead: the most frequent successor of the last two tokens (else of the last one),
then of the last token and that one, and so on; from the first step the table has no entry for, the context's
proposal continues (:func:`table_chain`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mamballama_cli import ops

MAX_NGRAM = 3
HASH_MUL = 40503  # pair keys are below 2**36 (vocabularies up to 2**18), so key * HASH_MUL fits in int64
PROBES = 16  # the most slots a key may sit after its first one; a table grows until none needs more


class TableArrays(NamedTuple):
    """An n-gram table on the device. ``keys`` (H,) int64, H a power of two: the pair a * vocab + b stored at
    slot ``pair_slot(key, H) + d`` for some d < ``probes`` (linear probing, no wrap past H - 1 + probes: the
    arrays have H + probes entries), -1 where empty; ``nexts`` (H + probes,) int64 the pair's most frequent
    successor; ``single`` (vocab,) int64 the most frequent successor of one token, -1 for none. ``below``: the
    table proposes when the context's longest match is shorter than this."""

    keys: Tensor
    nexts: Tensor
    single: Tensor
    vocab: int
    probes: int
    below: int


def pair_slot(key, size: int):
    """The first slot probed for pair ``key`` (a tensor or an int) in a table of ``size`` slots (a power of two)."""
    return ((key ^ (key >> 15)) * HASH_MUL >> 4) & (size - 1)


def hash_pairs(keys, *values) -> tuple:
    """The table layout of :class:`TableArrays` for distinct pair ``keys`` (ints >= 0) and arrays of values per key:
    (slot keys, slot values...), each of H + PROBES entries, -1 where empty. Linear probing; H (a power of two, at
    least twice the keys) doubles until no key sits PROBES or more slots after its first one. Numpy arrays."""
    import numpy as np

    keys = np.asarray(keys, dtype=np.int64)
    size = 1 << max(4, int(2 * max(len(keys), 1) - 1).bit_length())
    while True:
        slots = np.full(size + PROBES, -1, np.int64)
        where = np.empty(len(keys), np.int64)
        for i, start in enumerate(pair_slot(keys, size).tolist()):
            free = np.flatnonzero(slots[start:start + PROBES] < 0)
            if not len(free):
                break
            slots[start + free[0]] = i
            where[i] = start + free[0]
        else:
            out = [np.full(size + PROBES, -1, np.int64) for _ in range(1 + len(values))]
            for arr, src in zip(out, (keys, *values)):
                arr[where] = np.asarray(src, dtype=np.int64)
            return tuple(out)
        size *= 2


def table_next(t: TableArrays, a: Tensor, b: Tensor) -> Tensor:
    """The table's successor of the pair (a, b) (a < 0: no pair), else of b alone; -1 where it has neither. A
    token outside the table's vocabulary (a target whose vocabulary is larger) has no entry."""
    size = t.keys.shape[0] - t.probes
    ok_b = (b >= 0) & (b < t.vocab)
    key = torch.where((a >= 0) & (a < t.vocab) & ok_b, a * t.vocab + b, -1)
    slots = pair_slot(key.clamp(min=0), size)[..., None] + torch.arange(t.probes, device=a.device)
    hit = (t.keys[slots] == key[..., None]) & (key >= 0)[..., None]
    pair = torch.where(hit, t.nexts[slots], -1).amax(-1)  # keys are unique: at most one hit
    return torch.where(pair >= 0, pair, torch.where(ok_b, t.single[b.clamp(0, t.vocab - 1)], -1))


def table_chain(t: TableArrays, ctx: Tensor, length: Tensor, proposal: Tensor, n_match: Tensor) -> Tensor:
    """``proposal`` (b, k), the context's, with the table's chain written over its first tokens in the rows whose
    longest match ``n_match`` (b,) is shorter than ``t.below``: step j proposes the table's successor of the two
    tokens before it (from the context, then the chain), until the first step the table has none for."""
    last = length - 1
    b_tok = ctx.gather(1, last[:, None])[:, 0]
    a_tok = torch.where(last >= 1, ctx.gather(1, (last - 1).clamp(min=0)[:, None])[:, 0], -1)
    going = n_match < t.below
    out = proposal.clone()
    for j in range(proposal.shape[1]):
        nxt = table_next(t, a_tok, b_tok)
        going = going & (nxt >= 0)
        out[:, j] = torch.where(going, nxt, out[:, j])
        a_tok, b_tok = b_tok, nxt
    return out


def lookup_propose(ctx: Tensor, length: Tensor, k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = 1,
                   table: TableArrays | None = None, match_out: Tensor | None = None) -> Tensor:
    """ctx (b, L) tokens, length (b,) how many are real (at least 1) -> (b, k) proposals.

    For n from ``max_ngram`` down to ``min_ngram``: a match of length n ends at e when ctx[e - i] equals
    ctx[length - 1 - i] for i < n, with e <= length - 2 (something follows it). The longest n that matches wins,
    then the latest e. Proposal j is ctx[e + 1 + (j mod P)], P = length - 1 - e. No match: e = length - 2, which
    proposes the last token K times. Fixed shapes and no host reads, so a CUDA graph can record it. With a
    ``table``, :func:`table_chain` over that where the longest match is shorter than ``table.below``. ``match_out``
    (b,): the longest match's length, 0 where none (what a gated round decides on, generation/lookup.py)."""
    L = ctx.shape[1]
    dev = ctx.device
    e = torch.arange(L, device=dev)
    last = length - 1
    padded = F.pad(ctx, (max_ngram - 1, 0), value=-1)  # a shifted view per i, -1 before the start
    tail = ctx.gather(1, (last[:, None] - torch.arange(max_ngram, device=dev)).clamp(min=0))  # tail[:, i] = ctx[last-i]
    valid = e[None, :] <= (last - 1)[:, None]
    match = valid
    best = (last - 1).clamp(min=0)  # no match: the token before the last, whose successor is the last token
    n_match = torch.zeros_like(last)
    for n in range(1, max_ngram + 1):
        i = n - 1
        shifted = padded[:, max_ngram - 1 - i: max_ngram - 1 - i + L]  # shifted[:, e] = ctx[e - i]
        match = match & (shifted == tail[:, i: i + 1]) & (last >= i)[:, None]
        if n >= min_ngram:
            latest = torch.where(match, e[None, :], -1).amax(1)
            best = torch.where(latest >= 0, latest, best)  # a longer match overrides a shorter one
            n_match = torch.where(latest >= 0, n, n_match)
    period = (last - best).clamp(min=1)
    j = torch.arange(k, device=dev)
    idx = torch.minimum(best[:, None] + 1 + j[None, :] % period[:, None], last[:, None])
    proposal = ctx.gather(1, idx)
    if match_out is not None:
        match_out.copy_(n_match)
    return proposal if table is None else table_chain(table, ctx, length, proposal, n_match)


def assemble_context(prompt: Tensor, prompt_len: Tensor, hist: Tensor, hist_len: Tensor) -> tuple[Tensor, Tensor]:
    """The (b, L) context [prompt | new tokens] and each row's length, from the prompt (b, L) of length
    ``prompt_len`` (0-dim: a batch shares it) and the round's history of new tokens ``hist`` (b, L), ``hist_len``
    (b,)."""
    b, L = prompt.shape
    pos = torch.arange(L, device=prompt.device)
    at = (pos - prompt_len).clamp(min=0, max=L - 1)
    ctx = torch.where(pos[None, :] < prompt_len, prompt, hist.gather(1, at[None, :].expand(b, -1)))
    return ctx, prompt_len + hist_len


def lookup_draft_ref(prompt: Tensor, prompt_len: Tensor, hist: Tensor, hist_len: Tensor, k: int,
                     max_ngram: int = MAX_NGRAM, min_ngram: int = 1, table: TableArrays | None = None,
                     match_out: Tensor | None = None) -> Tensor:
    ctx, length = assemble_context(prompt, prompt_len, hist, hist_len)
    return lookup_propose(ctx, length, k, max_ngram, min_ngram, table, match_out)


ops.register_reference("lookup_draft", lookup_draft_ref)


def lookup_draft(prompt: Tensor, prompt_len: Tensor, hist: Tensor, hist_len: Tensor, k: int,
                 max_ngram: int = MAX_NGRAM, min_ngram: int = 1, table: TableArrays | None = None,
                 match_out: Tensor | None = None) -> Tensor:
    return ops.dispatch("lookup_draft", prompt.device)[1](prompt, prompt_len, hist, hist_len, k, max_ngram,
                                                          min_ngram, table, match_out)
