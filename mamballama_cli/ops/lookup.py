"""The lookup draft's proposal as an op (generation/lookup.py): reference here, one Triton launch in
:mod:`mamballama_cli.ops.triton_lookup`.

    lookup_draft(prompt, prompt_len, hist, hist_len, k, max_ngram=3, min_ngram=1) -> (b, k) proposals

prompt (b, L) with its length ``prompt_len`` (0-dim: a batch shares it); hist (b, L) each row's new tokens,
``hist_len`` (b,) how many. The context is [prompt | new tokens] (:func:`assemble_context`); the proposal
:func:`lookup_propose` over it. In a captured round the reference is some forty small kernels; the Triton kernel
reads the two buffers in place, one program per row. Integer work only, so both give the same proposals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mamballama_cli import ops

MAX_NGRAM = 3


def lookup_propose(ctx: Tensor, length: Tensor, k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = 1) -> Tensor:
    """ctx (b, L) tokens, length (b,) how many are real (at least 1) -> (b, k) proposals.

    For n from ``max_ngram`` down to ``min_ngram``: a match of length n ends at e when ctx[e - i] equals
    ctx[length - 1 - i] for i < n, with e <= length - 2 (something follows it). The longest n that matches wins,
    then the latest e. Proposal j is ctx[e + 1 + (j mod P)], P = length - 1 - e. No match: e = length - 2, which
    proposes the last token K times. Fixed shapes and no host reads, so a CUDA graph can record it."""
    L = ctx.shape[1]
    dev = ctx.device
    e = torch.arange(L, device=dev)
    last = length - 1
    padded = F.pad(ctx, (max_ngram - 1, 0), value=-1)  # a shifted view per i, -1 before the start
    tail = ctx.gather(1, (last[:, None] - torch.arange(max_ngram, device=dev)).clamp(min=0))  # tail[:, i] = ctx[last-i]
    valid = e[None, :] <= (last - 1)[:, None]
    match = valid
    best = (last - 1).clamp(min=0)  # no match: the token before the last, whose successor is the last token
    for n in range(1, max_ngram + 1):
        i = n - 1
        shifted = padded[:, max_ngram - 1 - i: max_ngram - 1 - i + L]  # shifted[:, e] = ctx[e - i]
        match = match & (shifted == tail[:, i: i + 1]) & (last >= i)[:, None]
        if n >= min_ngram:
            latest = torch.where(match, e[None, :], -1).amax(1)
            best = torch.where(latest >= 0, latest, best)  # a longer match overrides a shorter one
    period = (last - best).clamp(min=1)
    j = torch.arange(k, device=dev)
    idx = torch.minimum(best[:, None] + 1 + j[None, :] % period[:, None], last[:, None])
    return ctx.gather(1, idx)


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
                     max_ngram: int = MAX_NGRAM, min_ngram: int = 1) -> Tensor:
    ctx, length = assemble_context(prompt, prompt_len, hist, hist_len)
    return lookup_propose(ctx, length, k, max_ngram, min_ngram)


ops.register_reference("lookup_draft", lookup_draft_ref)


def lookup_draft(prompt: Tensor, prompt_len: Tensor, hist: Tensor, hist_len: Tensor, k: int,
                 max_ngram: int = MAX_NGRAM, min_ngram: int = 1) -> Tensor:
    return ops.dispatch("lookup_draft", prompt.device)[1](prompt, prompt_len, hist, hist_len, k, max_ngram,
                                                          min_ngram)
