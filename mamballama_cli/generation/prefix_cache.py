"""A prefix cache for continuous batching: the decoding state after a token sequence, kept for the next request
whose prompt begins with that sequence (a multi-turn chat re-sends its whole history; ``n`` choices and retries send
the same prompt).

A hybrid's state at position m is the attention layers' K/V for positions [0, m) and every Mamba layer's conv and
SSM state *at* m. The K/V of a shorter prefix are a slice of a longer one, but a recurrent state exists only at the
position it was taken, so an entry serves exactly its own token sequence and any prompt that extends it; nothing in
between. Entries are taken where a request's state is already there for free: when its prompt has been read (with
the prompt's last logits, so the same prompt again needs no forward at all), and when it leaves (every token it fed:
the prompt and its answer but the last token sampled, with the logits that sampled it).

Requests that share only a beginning (the same system prompt, different questions) are found in whole blocks of
:data:`BLOCK` tokens (:meth:`PrefixCache.shared`: a chain of block hashes, as vLLM's automatic prefix caching keys
its blocks). A Transformer (every layer attention) resumes from the shared blocks at once: its K/V there are a slice
of the longer entry's. A hybrid cannot, but its decoder reads such a prompt in two pieces and keeps the state at
the end of the shared blocks as an entry of its own, so every later request with that beginning resumes there
(Marconi, Pan et al. 2024, keeps SSM states at such branch points for the same reason).

Each entry is a one-row :class:`~mamballama_cli.models.cache.HybridCache` of exactly its length, restored with
``copy_row``. The cache holds at most ``budget_bytes`` and drops the least recently used entries first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from mamballama_cli.models.cache import HybridCache

BLOCK = 16  # tokens: a prompt's beginning shared with an entry is found in whole blocks of this many


def block_hashes(tokens, limit: int | None = None) -> list[int]:
    """The chain hash of each whole :data:`BLOCK` of ``tokens`` (ending at or before ``limit``): the k-th hashes
    the first k blocks, so equal hashes mean (barring a collision, which :meth:`PrefixCache.shared` rules out)
    equal beginnings."""
    end = len(tokens) if limit is None else min(len(tokens), int(limit))
    out, h = [], 0
    for s in range(0, end - BLOCK + 1, BLOCK):
        h = hash((h, tuple(tokens[s : s + BLOCK])))
        out.append(h)
    return out


@dataclass
class Entry:
    cache: HybridCache  # one row, capacity = len(tokens)
    logits: torch.Tensor  # (1, vocab): what the state after the last token predicts
    nbytes: int
    blocks: list[int]  # block_hashes of its tokens


class PrefixCache:
    """Decoding states keyed by the exact tokens fed, least recently used dropped first beyond ``budget_bytes``."""

    def __init__(self, model, budget_bytes: int):
        self.model, self.budget = model, int(budget_bytes)
        self.entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()
        self.lengths: dict[int, int] = {}  # length -> entries of that length (lookup tries each length once)
        self.blocks: dict[int, dict[tuple[int, ...], None]] = {}  # block chain hash -> the entries beginning so
        self.bytes = 0
        self.hits = self.tokens_reused = 0

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, prompt: list[int]) -> tuple[tuple[int, ...], Entry] | None:
        """The longest entry whose tokens begin ``prompt`` (the whole prompt included), or None."""
        for n in sorted((n for n in self.lengths if n <= len(prompt)), reverse=True):
            key = tuple(prompt[:n])
            entry = self.entries.get(key)
            if entry is not None:
                self.take(key, n)
                return key, entry
        return None

    def take(self, key: tuple[int, ...], n: int) -> None:
        """Count a request resuming from the first ``n`` tokens of entry ``key``, now the most recently used."""
        self.entries.move_to_end(key)
        self.hits += 1
        self.tokens_reused += n

    def shared(self, prompt: list[int], limit: int) -> tuple[int, tuple[int, ...] | None]:
        """The most whole blocks (at most ``limit`` tokens) that ``prompt`` begins with and some entry begins with
        too: (their length, the most recently kept such entry), or (0, None)."""
        hashes, best = block_hashes(prompt, limit), 0
        while best < len(hashes) and hashes[best] in self.blocks:
            best += 1
        if not best:
            return 0, None
        owner = next(reversed(self.blocks[hashes[best - 1]]))
        n = best * BLOCK
        return (n, owner) if owner[:n] == tuple(prompt[:n]) else (0, None)  # a hash collision: nothing shared

    def put(self, tokens: list[int], src: HybridCache, row: int, logits: torch.Tensor) -> bool:
        """Keep row ``row`` of ``src`` (its first len(tokens) positions) as the state after ``tokens``; False
        where it does not fit the budget on its own."""
        key, n = tuple(tokens), len(tokens)
        if self.budget <= 0 or n < 1:
            return False
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        with torch.profiler.record_function("prefix_cache.alloc"):  # a named range: allocation apart from copies
            snap = HybridCache(self.model, 1, max_length=n)
        mem = snap.memory_bytes()
        nbytes = mem["kv_bytes"] + mem["state_bytes"] + logits.numel() * logits.element_size()
        if nbytes > self.budget:
            return False
        while self.bytes + nbytes > self.budget:
            self._drop(next(iter(self.entries)))
        with torch.profiler.record_function("prefix_cache.copy"):
            snap.copy_row(src, row, 0, n)
        snap.seqlen = n
        self.entries[key] = entry = Entry(snap, logits.detach().reshape(1, -1).clone(), nbytes, block_hashes(key))
        self.lengths[n] = self.lengths.get(n, 0) + 1
        for h in entry.blocks:
            self.blocks.setdefault(h, {})[key] = None
        self.bytes += nbytes
        return True

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self.entries.pop(key)
        self.bytes -= entry.nbytes
        for h in entry.blocks:
            owners = self.blocks[h]
            del owners[key]
            if not owners:
                del self.blocks[h]
        self.lengths[len(key)] -= 1
        if not self.lengths[len(key)]:
            del self.lengths[len(key)]
