"""Sampling: one config and one temperature / top-k / top-p filter, shared by every decoding path.

:func:`filter_logits` is the only implementation of the three. The paths use it as follows:

* plain ``transformers`` generation (and ``label``) passes it to ``generate()`` as a logits processor
  (:func:`transformers_kwargs`), with transformers' own warpers switched off;
* the static decoder (generation/fast.py) samples with :func:`sample`, inside its captured CUDA graph;
* speculative decoding needs the distribution itself for rejection sampling: :func:`probabilities`;
* continuous batching (generation/continuous.py) gives every row its own settings and seed: :func:`sample_rows`
  applies the same rules with per-row values (:func:`filter_rows`) and a counter-based draw (:func:`row_uniform`).

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


def _top_k_cut(scores: Tensor, sorted_scores: Tensor | None, k) -> Tensor:
    """(..., 1) the k-th largest score (a threshold: scores below it go). ``k`` is an int (> 0) or a (..., 1)
    long tensor where 0 is off (threshold -inf); ``sorted_scores`` (descending) when the caller has sorted."""
    if isinstance(k, int):
        return torch.topk(scores, k, dim=-1).values[..., -1:]
    kth = sorted_scores.gather(-1, (k.clamp(1, scores.shape[-1]) - 1))
    return torch.where(k > 0, kth, torch.full_like(kth, float("-inf")))


def _top_p_cut(sorted_scores: Tensor, top_p) -> Tensor:
    """(..., 1) the score of the last token top-p keeps, from scores sorted descending (tokens tied with it stay).
    ``top_p`` is a float or a (..., 1) tensor; a row's 1.0 keeps everything."""
    probs = sorted_scores.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass ranked above each sorted position
    edge = top_p - TOP_P_TOLERANCE
    if isinstance(top_p, Tensor):
        edge = torch.where(top_p < 1.0, edge, torch.full_like(edge, float("inf")))
    n_keep = (before < edge).sum(dim=-1, keepdim=True).clamp(min=1)
    return sorted_scores.gather(-1, n_keep - 1)


def filter_logits(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """(..., vocab) logits -> float32 scores of the same shape: temperature applied, every token that
    top-k / top-p (or greedy) removes set to -inf. softmax of the result is the sampling distribution."""
    scores = logits.float()
    if cfg.greedy:
        best = scores.argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter(-1, best, scores.gather(-1, best))
    scores = scores / cfg.temperature
    if cfg.top_k and cfg.top_k < scores.shape[-1]:
        scores = scores.masked_fill(scores < _top_k_cut(scores, None, int(cfg.top_k)), float("-inf"))
    if cfg.top_p < 1.0:
        cut = _top_p_cut(torch.sort(scores, dim=-1, descending=True).values, cfg.top_p)
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


# --- per-row settings (continuous batching: each row its own request) -------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 tensors of 32-bit values, with no int64 overflow (16-bit halves)."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & _M32


def _mix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection on 32-bit values), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def row_uniform(seed: Tensor, counter: Tensor, n: int) -> Tensor:
    """(rows,) seeds and draw counters -> (rows, n) float32 uniforms in (0, 1), a pure function of (seed, counter,
    column): a row's numbers do not depend on the other rows, the batch size or the device, so a seeded request
    samples the same tokens alone or in any batch. Counter-based (a hash of the three), so no generator state
    lives in a CUDA graph."""
    key = _mix32((seed & _M32) ^ _mul32(counter & _M32, 0x9E3779B9))
    col = _mul32(torch.arange(n, device=seed.device, dtype=torch.long), 0x27D4EB2F)
    h = _mix32(_mix32(key[:, None] ^ col[None, :]) ^ ((seed[:, None] >> 32) & _M32))
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))  # 23 bits: (k + 0.5) / 2^23 is exact in float32, < 1


class RowSampling:
    """Sampling settings per row, as device tensors a captured step reads: temperature (<= 0 greedy), top-p (1
    off), top-k (0 off), and each row's seed and draw counter for :func:`row_uniform`. :meth:`set` writes one
    row (between steps); :func:`sample_rows` draws a token for every row and advances the counters of ``live``."""

    def __init__(self, rows: int, device):
        self.temperature = torch.zeros(rows, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.seed = torch.zeros(rows, dtype=torch.long, device=device)
        self.counter = torch.zeros(rows, dtype=torch.long, device=device)
        self.greedy = [True] * rows  # host mirror: a step with only greedy rows needs no sampling

    def set(self, row: int, cfg: SamplingConfig, seed: int) -> None:
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed {seed}: give an integer in [0, 2^63)")
        self.temperature[row] = float(cfg.temperature)
        self.top_p[row] = float(cfg.top_p)
        self.top_k[row] = int(cfg.top_k)
        self.seed[row] = int(seed)
        self.counter[row] = 0
        self.greedy[row] = cfg.greedy


def _row_cut(logits: Tensor, rs: RowSampling) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each row's rules at once: (scores at the row's temperature, the same sorted descending, their token ids,
    how many of the sorted survive top-k and top-p (a prefix; a greedy row is filtered at temperature 1))."""
    scores = logits.float()
    t = torch.where(rs.temperature > 0, rs.temperature, torch.ones_like(rs.temperature))[:, None]
    scores = scores / t
    # one stable sort serves top-k, top-p and the draw; ties keep their token order
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    kth = _top_k_cut(scores, sorted_scores, rs.top_k[:, None])
    sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, float("-inf"))
    cut = _top_p_cut(sorted_scores, rs.top_p[:, None])
    kept = (sorted_scores >= cut) & (sorted_scores > float("-inf"))  # top-p's prefix, less what top-k took
    return scores, sorted_scores, order, kept.sum(dim=-1, keepdim=True)


def filter_rows(logits: Tensor, rs: RowSampling) -> Tensor:
    """(rows, vocab) -> float32 scores: :func:`filter_logits`'s rules with each row's own temperature, top-k and
    top-p, every token they remove at -inf (a greedy row is filtered at temperature 1)."""
    scores, sorted_scores, _, n_kept = _row_cut(logits, rs)
    return scores.masked_fill(scores < sorted_scores.gather(-1, n_kept - 1), float("-inf"))


def sample_rows(logits: Tensor, rs: RowSampling, live: Tensor | None = None) -> Tensor:
    """(rows, vocab) -> (rows,) int64: each row drawn from the distribution :func:`filter_rows` gives, by the
    inverse of its cumulative mass at one :func:`row_uniform` number; greedy rows take the first maximal index.
    Advances the draw counter of every row where ``live`` is 1 (all rows when None). No host sync."""
    _, sorted_scores, order, n_kept = _row_cut(logits, rs)
    mass = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    u = row_uniform(rs.seed, rs.counter, 1) * mass.gather(-1, n_kept - 1)  # within the kept prefix's mass
    at = torch.minimum((mass <= u).sum(dim=-1, keepdim=True), n_kept - 1)  # first position whose mass passes u
    rs.counter.add_(1 if live is None else live)
    return torch.where(rs.temperature <= 0, argmax_last(logits), order.gather(-1, at)[:, 0])


def token_logprobs(logits: Tensor, tokens: Tensor, k: int = 0) -> list[tuple[float, list[tuple[int, float]]]]:
    """(rows, vocab) logits and the (rows,) tokens chosen -> per row (the token's log-probability, the ``k`` most
    likely tokens with theirs), under the model's own distribution (before temperature and filtering, as vLLM's
    default and OpenAI's ``logprobs``)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tokens.view(-1, 1).to(lp.device))[:, 0].tolist()
    if not k:
        return [(c, []) for c in chosen]
    values, ids = lp.topk(min(int(k), lp.shape[-1]), dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]


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
