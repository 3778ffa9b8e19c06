"""Sampling: one config and one temperature / top-k / top-p filter, shared by every decoding path.

:func:`filter_logits` is the only implementation of the three. The paths use it as follows:

* plain ``transformers`` generation (and ``label``) passes it to ``generate()`` as a logits processor
  (:func:`transformers_kwargs`), with transformers' own warpers switched off;
* the static decoder (generation/fast.py) samples with :func:`sample`, inside its captured CUDA graph;
* speculative decoding needs the distribution itself for rejection sampling: :func:`probabilities`.

The rules, applied in this order (as transformers orders its warpers):

* temperature ``t``: scores = logits / t. ``t <= 0`` is greedy: only the first maximal token is kept.
* top-k ``k`` (0 = off): keep every token whose score is at least the k-th largest score, so tokens tied
  with the k-th are all kept (more than k can survive).
* top-p ``p`` (1 = off): sort the distribution (after top-k) by probability and keep the smallest prefix
  whose mass reaches ``p`` (at least the first token), **plus every token tied with the last one kept**.
  A token is dropped only when the tokens strictly more probable than it already hold ``p``; which of
  several tied tokens comes first in the sort never matters. Masses are float32 sums, so a prefix within
  :data:`TOP_P_TOLERANCE` of ``p`` counts as reaching it: rounding does not decide an exact edge.

  Example, probabilities [0.4, 0.3, 0.3] and p = 0.7: the prefix 0.4 + 0.3 reaches 0.7, and the other 0.3
  is tied with the last token kept, so all three are kept. With [0.4, 0.3, 0.2, 0.1] and p = 0.7 the 0.2
  and 0.1 are dropped (0.4 + 0.3 reaches 0.7 exactly).

Everything here is tensor ops without host synchronisation or branches on tensor values (the branches are
on the config only), so :func:`sample` can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TOP_P_TOLERANCE = 1e-6


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def argmax_last(x: Tensor, block: int = 512) -> Tensor:
    """argmax over the last dim of (batch, n), first index on ties, in two parallel stages.

    torch's single-pass argmax over a 128K vocabulary runs one block per row (~37 us on an H200, one of
    the slowest kernels of a decode step); a max per block of ``block`` entries, then an argmax over the
    block maxima takes a few microseconds. The first maximal block holds the first maximal index.
    """
    b, n = x.shape
    if n < 16 * block or not x.is_cuda:  # a CPU core scans the row once either way
        return x.argmax(dim=-1)
    pad = (-n) % block
    if pad:
        x = F.pad(x, (0, pad), value=float("-inf"))
    values, idx = x.reshape(b, -1, block).max(dim=-1)  # (batch, blocks): first maximum within each block
    best = values.argmax(dim=-1, keepdim=True)  # first block holding the overall maximum
    return (best * block + idx.gather(-1, best)).squeeze(-1)


def filter_logits(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """(..., vocab) logits -> float32 scores of the same shape: temperature applied, every token that
    top-k / top-p (or greedy) removes set to -inf. softmax of the result is the sampling distribution."""
    scores = logits.float()
    if cfg.greedy:
        best = scores.argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter(-1, best, scores.gather(-1, best))
    scores = scores / cfg.temperature
    if cfg.top_k and cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores = torch.sort(scores, dim=-1, descending=True).values
        probs = sorted_scores.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass ranked above each sorted position
        n_keep = (before < cfg.top_p - TOP_P_TOLERANCE).sum(dim=-1, keepdim=True).clamp(min=1)
        cut = sorted_scores.gather(-1, n_keep - 1)  # score of the last token kept; ties with it stay
        scores = scores.masked_fill(scores < cut, float("-inf"))
    return scores


def probabilities(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """(..., vocab) logits -> the sampling distribution (float32); greedy gives a one-hot at the argmax."""
    return filter_logits(logits, cfg).softmax(dim=-1)


def sample(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """(batch, vocab) -> (batch,) int64, one token drawn from :func:`probabilities`, with no host sync.

    Greedy is the first maximal index (as transformers). Otherwise the Gumbel-max trick: argmax(scores +
    Gumbel noise) is a sample of softmax(scores).
    """
    if cfg.greedy:
        return argmax_last(logits)
    scores = filter_logits(logits, cfg)
    u = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
    u = u.clamp_(min=torch.finfo(scores.dtype).tiny)
    return (scores - torch.log(-torch.log(u))).argmax(dim=-1)


class LogitsFilter:
    """A transformers logits processor that applies :func:`filter_logits`."""

    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return filter_logits(scores, self.cfg)


def transformers_kwargs(cfg: SamplingConfig) -> dict:
    """Sampling arguments for transformers' ``generate()``: greedy, or sampling through :class:`LogitsFilter`
    with transformers' own temperature / top-k / top-p warpers off (so the rules above apply, not its)."""
    if cfg.greedy:
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    from transformers import LogitsProcessorList

    return dict(do_sample=True, temperature=None, top_p=None, top_k=None,
                logits_processor=LogitsProcessorList([LogitsFilter(cfg)]))
