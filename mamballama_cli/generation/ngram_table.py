"""The n-gram table behind ``--draft lookup:...:TABLE`` (generation/lookup.py; docs/speculative.md).

A lookup draft copies from the context, and when the context's last tokens occurred nowhere earlier (the longest
match shorter than ``below`` tokens) it has nothing to copy. The table fills that gap with what the target
usually writes next: for every pair of tokens in a corpus the most frequent successor, and for every single
token the same. Built from text the target itself wrote (``mamballama data generate`` shards), it proposes the
target's own habits: its phrasing of an answer's opening, its markup, its code idioms.

    mamballama data ngrams GEN_DIR[,MORE] --output table.safetensors

The file is safetensors (no pickle): ``keys`` (H + probes,) int64, a hash table of pairs a * vocab + b with
linear probing (H a power of two, at most ``probes`` slots from a key's first slot, no wrap-around), -1 where
empty; ``nexts`` the pair's successor; ``single`` (vocab,) the successor of one token, -1 for none; ``counts``
(H + probes,) how often the pair's successor followed it (-1 where empty). The metadata holds the vocabulary size, ``probes``,
the minimum count and the tokenizer's identity (:func:`~mamballama_cli.shards.tokenizer_identity`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mamballama_cli.errors import UsageError
from mamballama_cli.ops.lookup import PROBES, TableArrays, hash_pairs, pair_slot

FORMAT = "mamballama-ngram-table/1"


def _most_frequent(context: np.ndarray, successor: np.ndarray, min_count: int) -> tuple[np.ndarray, ...]:
    """For each distinct ``context`` value, its most frequent ``successor`` (ties: the smallest token) and the
    count, kept where the count is at least ``min_count``."""
    if not len(context):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs, counts = np.unique(np.stack([context, successor], 1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # by context, then most frequent, then smallest
    pairs, counts = pairs[order], counts[order]
    first = np.ones(len(pairs), bool)
    first[1:] = pairs[1:, 0] != pairs[:-1, 0]
    keep = first & (counts >= min_count)
    return pairs[keep, 0], pairs[keep, 1], counts[keep]


@dataclass
class NgramTable:
    """A table on the host (numpy); :meth:`arrays` puts it on a device for the ``lookup_draft`` op."""

    keys: np.ndarray
    nexts: np.ndarray
    counts: np.ndarray
    single: np.ndarray
    vocab: int
    probes: int
    min_count: int = 2
    tokenizer: dict | None = None

    @classmethod
    def build(cls, sequences, vocab: int, min_count: int = 2, tokenizer: dict | None = None) -> NgramTable:
        """From token sequences (each an int array): pairs never span two sequences."""
        if not 1 <= vocab <= 1 << 18:
            raise UsageError(f"n-gram table: vocabulary size {vocab} must be 1 to {1 << 18}")
        a, b, c, prev, cur = [], [], [], [], []
        for s in sequences:
            s = np.asarray(s, dtype=np.int64)
            if len(s) and (s.min() < 0 or s.max() >= vocab):
                raise UsageError(f"n-gram table: a token id is outside the vocabulary of {vocab}")
            prev.append(s[:-1])
            cur.append(s[1:])
            a.append(s[:-2])
            b.append(s[1:-1])
            c.append(s[2:])

        def cat(xs):
            return np.concatenate(xs) if xs else np.zeros(0, np.int64)

        one_ctx, one_next, _ = _most_frequent(cat(prev), cat(cur), min_count)
        single = np.full(vocab, -1, np.int64)
        single[one_ctx] = one_next
        pair_keys, pair_next, pair_count = _most_frequent(cat(a) * vocab + cat(b), cat(c), min_count)
        keys, nexts, counts = hash_pairs(pair_keys, pair_next, pair_count)
        return cls(keys, nexts, counts, single, vocab, PROBES, min_count, tokenizer)

    @property
    def n_pairs(self) -> int:
        return int((self.keys >= 0).sum())

    def next_host(self, a: int | None, b: int) -> int:
        """The plain-Python twin of :func:`~mamballama_cli.ops.lookup.table_next`: -1 where the table has none."""
        if a is not None and 0 <= a < self.vocab and 0 <= b < self.vocab:
            key = a * self.vocab + b
            start = pair_slot(key, len(self.keys) - self.probes)
            for d in range(self.probes):
                if self.keys[start + d] == key:
                    return int(self.nexts[start + d])
        return int(self.single[b]) if 0 <= b < self.vocab else -1

    def arrays(self, device, below: int = 2) -> TableArrays:
        import torch

        keys, nexts, single = (torch.from_numpy(np.ascontiguousarray(x)).to(device)
                               for x in (self.keys, self.nexts, self.single))
        return TableArrays(keys, nexts, single, self.vocab, self.probes, below)

    def save(self, path) -> None:
        """Write atomically (temporary name, then rename)."""
        from safetensors.numpy import save_file

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        meta = {"format": FORMAT, "vocab": str(self.vocab), "probes": str(self.probes),
                "min_count": str(self.min_count), "tokenizer": json.dumps(self.tokenizer or {})}
        save_file({"keys": self.keys, "nexts": self.nexts, "counts": self.counts, "single": self.single}, str(tmp),
                  metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> NgramTable:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UsageError(f"--draft lookup:...:{path}: no such n-gram table; build one with "
                             "`mamballama data ngrams GEN_DIR --output TABLE`")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in ("keys", "nexts", "counts", "single")}
        except Exception as exc:
            raise UsageError(f"{path} is not an n-gram table ({type(exc).__name__}); build one with "
                             "`mamballama data ngrams`") from exc
        if meta.get("format") != FORMAT:
            raise UsageError(f"{path} is not an n-gram table (format {meta.get('format')!r}, expected {FORMAT!r})")
        return cls(arrays["keys"], arrays["nexts"], arrays["counts"], arrays["single"], int(meta["vocab"]),
                   int(meta["probes"]), int(meta["min_count"]), json.loads(meta.get("tokenizer") or "{}") or None)


def build_from_shards(dirs, min_count: int = 2, progress=None) -> tuple[NgramTable, dict]:
    """A table from the sampled part of ``mamballama data generate`` shard folders (each sequence from two tokens
    before its first sampled token, so the answer's opening has its pair), and a summary. Every folder must come
    from the same tokenizer. ``progress(done, total, what)`` is called as shards are read (``what`` "read"), then
    once before the counting (``what`` "count")."""
    from mamballama_cli.shards import read_manifest, read_shard, same_tokenizer, verify_shard

    if min_count < 1:
        raise UsageError(f"--min-count {min_count}: must be at least 1, e.g. --min-count 2")
    manifests, tokenizer = [], None
    for d in dirs:
        manifest = read_manifest(Path(d))
        ident = manifest.get("tokenizer") or {}
        if tokenizer is None:
            tokenizer = ident
        elif not same_tokenizer(tokenizer, ident):
            raise UsageError(f"{d}: its shards come from another tokenizer than {dirs[0]}'s; build one table per "
                             "tokenizer")
        manifests.append((d, manifest))
    total = sum(len(m.get("shards", [])) for _, m in manifests)
    seqs, n_tokens, n_files = [], 0, 0
    for d, manifest in manifests:
        for entry in manifest.get("shards", []):
            shard = read_shard(verify_shard(Path(d), entry))
            for i in range(shard.n_sequences):
                lo, hi = int(shard.offsets[i]), int(shard.offsets[i + 1])
                seq = shard.tokens[max(lo, lo + int(shard.prompt_lens[i]) - 2): hi]
                seqs.append(seq)
                n_tokens += len(seq)
            n_files += 1
            if progress is not None:
                progress(n_files, total, "read")
    if not seqs:
        raise UsageError(f"{', '.join(map(str, dirs))}: no shards to read; write some with `mamballama data generate`")
    if progress is not None:
        progress(n_files, total, "count")
    vocab = int(tokenizer.get("vocab_size") or 0) or int(max(int(s.max()) for s in seqs if len(s)) + 1)
    table = NgramTable.build(seqs, vocab, min_count, tokenizer)
    summary = {"sources": [str(d) for d in dirs], "shards": n_files, "sequences": len(seqs), "tokens": n_tokens,
               "vocab": vocab, "pairs": table.n_pairs, "single": int((table.single >= 0).sum()),
               "slots": len(table.keys), "min_count": min_count}
    return table, summary
