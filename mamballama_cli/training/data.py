"""Training data: read records, apply the chat template, mask everything but responses, pack or pad, batch.

This module is the face of the training data: reading and checking records lives in
:mod:`~mamballama_cli.training.records`, templating, masking and tokenising in
:mod:`~mamballama_cli.training.encoding`; both are re-exported here. This module owns what comes after:
items (padded examples or packed rows), batches, and the order of the data.

Packing concatenates examples into rows of ``seq_len`` tokens with position ids restarting at each example.
Only models whose attention honours those boundaries can be packed (transformers models build a
block-diagonal mask from restarting position ids). A Mamba layer would carry its recurrent and conv state
from one example into the next, and our SSD ops have no per-token sequence index to reset it, so hybrids
with Mamba layers are never packed: their batches are right-padded instead, which is exact because every
layer is causal and padding only follows the real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

from mamballama_cli.training.encoding import (PairExample, encode_chat, encode_pair, encode_pairs, encode_record,
                                              encode_records, encode_text, response_spans)
from mamballama_cli.training.records import (DataError, Example, Record, ShardRecord, count_true, load_records,
                                             read_records, read_shard_dir, split_data_spec)

__all__ = [  # the names callers import from here (the two modules above define most of them)
    "DataError", "Record", "ShardRecord", "Example", "count_true", "split_data_spec", "read_records",
    "read_shard_dir", "load_records", "PairExample", "response_spans", "encode_chat", "encode_text", "encode_record",
    "encode_records", "encode_pair", "encode_pairs", "Item", "pack", "pack_concat", "pack_fit", "as_items", "collate",
    "collate_pairs", "BatchPlan", "split_global_batch",
]


# --- items: padded examples or packed rows ---------------------------------------------------------------------
@dataclass
class Item:
    """One row of a batch. ``ids``/``mask`` are lists, or numpy arrays (views into shards: not copied)."""

    ids: Sequence[int]
    mask: Sequence[bool]
    positions: Sequence[int] | None = None  # restarting position ids of a packed row

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return count_true(self.mask)


def pack(examples: list[Example], seq_len: int) -> list[Item]:
    """Greedy packing in the given order into rows of at most ``seq_len`` tokens.

    Each example keeps mask[0] = False, so no token is ever trained to follow the previous example.
    """
    rows, cur, n = [], [], 0
    for ex in examples:
        if cur and n + len(ex.ids) > seq_len:
            rows.append(_join(cur))
            cur, n = [], 0
        cur.append(ex)
        n += len(ex.ids)
    if cur:
        rows.append(_join(cur))
    return rows


def _join(examples: list[Example]) -> Item:
    """One packed row: lists stay lists; numpy-backed examples become one array per field."""
    if any(isinstance(ex.ids, np.ndarray) for ex in examples):
        return Item(np.concatenate([np.asarray(ex.ids) for ex in examples]),
                    np.concatenate([np.asarray(ex.mask, dtype=bool) for ex in examples]),
                    np.concatenate([np.arange(len(ex.ids)) for ex in examples]))
    ids, mask, pos = [], [], []
    for ex in examples:
        ids += ex.ids
        mask += ex.mask
        pos += range(len(ex.ids))
    return Item(ids, mask, pos)


def pack_concat(examples: list[Example], seq_len: int) -> list[Item]:
    """Concatenate the examples (in the given order) and cut the stream into rows of exactly ``seq_len``.

    Unlike :func:`pack`, positions run on across example boundaries, as in the usual "concatenate and chunk"
    pre-training layout: every model (teacher and student alike) reads the row as one text, so a Mamba layer's
    state carrying over a boundary is what the teacher's attention sees too, and a KL to the teacher stays
    exact. Every row is full: no padding, no wasted compute. The tail shorter than ``seq_len`` is kept as a
    last, shorter row.
    """
    if not examples:
        return []
    arrays = any(isinstance(ex.ids, np.ndarray) for ex in examples)  # shards: rows stay numpy (views, int32)
    ids = np.concatenate([np.asarray(ex.ids, dtype=np.int32 if arrays else np.int64) for ex in examples])
    mask = np.concatenate([np.asarray(ex.mask, dtype=bool) for ex in examples])
    rows = []
    for s in range(0, len(ids), seq_len):
        m = mask[s:s + seq_len] if arrays else mask[s:s + seq_len].tolist()
        m[0] = False
        rows.append(Item(ids[s:s + seq_len] if arrays else ids[s:s + seq_len].tolist(), m))
    return [r for r in rows if len(r) > 1]


def pack_fit(examples: list[Example], seq_len: int) -> list[Item]:
    """Best-fit packing: whole examples into rows of at most ``seq_len`` tokens, positions running on.

    Like :func:`pack_concat`, a row is read as one text by every model (exact for KD), but no example shorter
    than a row is ever cut at a row boundary: each goes whole into the row with the least room that still
    holds it (best-fit decreasing, as in Ding et al. 2024, "Fewer Truncations Improve Language Modeling").
    A document whose question refers to a fact stated 1,000 tokens earlier keeps both in one row, which
    :func:`pack_concat` splits about as often as not. An example longer than a row is cut into row-sized
    pieces; the full pieces are rows of their own and the remainder is placed like any other example. Rows
    are padded where no example fits the room left (:func:`fill_ratio` says how much).
    """
    import bisect

    pieces: list[Example] = []
    for ex in examples:
        for s in range(0, len(ex.ids), seq_len):
            pieces.append(Example(ex.ids[s:s + seq_len], ex.mask[s:s + seq_len]))
    rows: list[list[Example]] = []
    room: list[tuple[int, int]] = []  # (tokens still free, row index), sorted
    for ex in sorted((p for p in pieces if len(p.ids) > 1), key=lambda p: -len(p.ids)):  # stable: seeded order
        n = len(ex.ids)
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, r = room.pop(k)
            rows[r].append(ex)
        else:
            r, free = len(rows), seq_len
            rows.append([ex])
        if free - n > 1:
            bisect.insort(room, (free - n, r))
    out = []
    for row in rows:
        arrays = any(isinstance(ex.ids, np.ndarray) for ex in row)
        ids = np.concatenate([np.asarray(ex.ids, dtype=np.int32 if arrays else np.int64) for ex in row])
        mask = np.concatenate([np.asarray(ex.mask, dtype=bool) for ex in row])
        mask[0] = False
        out.append(Item(ids, mask) if arrays else Item(ids.tolist(), mask.tolist()))
    return out


def fill_ratio(items: list[Item], seq_len: int) -> float:
    """Real tokens over the tokens of ``seq_len``-long rows: what padding leaves of a step's compute."""
    return sum(len(it) for it in items) / max(1, seq_len * len(items))


def as_items(examples: list[Example]) -> list[Item]:
    return [Item(ex.ids, ex.mask) for ex in examples]


def collate(items: list[Item], pad_id: int):
    """Right-padded tensors: input_ids, targets (shifted by one), target_mask, position_ids (or None)."""
    import torch

    L = max(len(it) for it in items)
    b = len(items)
    ids = torch.full((b, L), pad_id, dtype=torch.long)
    mask = torch.zeros((b, L), dtype=torch.bool)
    pos = None
    if any(it.positions is not None for it in items):
        pos = torch.arange(L).repeat(b, 1)
    for i, it in enumerate(items):
        n = len(it)
        ids[i, :n] = torch.as_tensor(it.ids)
        mask[i, :n] = torch.as_tensor(it.mask)
        if it.positions is not None:
            # Padding continues the last segment's positions: it follows every real token, so causal
            # attention keeps it out of their outputs.
            tail = int(it.positions[-1]) + 1 if len(it.positions) else 0
            pos[i, :n] = torch.as_tensor(it.positions)
            pos[i, n:] = torch.arange(tail, tail + L - n)
    targets = torch.full_like(ids, pad_id)
    targets[:, :-1] = ids[:, 1:]
    target_mask = torch.zeros_like(mask)
    target_mask[:, :-1] = mask[:, 1:]
    valid = torch.arange(L)[None, :] < torch.tensor([len(it) for it in items])[:, None]  # real (unpadded) tokens
    return {"input_ids": ids, "targets": targets, "target_mask": target_mask, "position_ids": pos, "valid": valid,
            "n_tokens": int(sum(len(it) for it in items))}


def collate_pairs(pairs: list[PairExample], pad_id: int):
    """Rows [prompt + chosen] * n then [prompt + rejected] * n, with masks on the response tokens."""
    items = [Item(p.prompt + p.chosen, [False] * len(p.prompt) + [True] * len(p.chosen)) for p in pairs]
    items += [Item(p.prompt + p.rejected, [False] * len(p.prompt) + [True] * len(p.rejected)) for p in pairs]
    for it in items:
        it.mask[0] = False
    return collate(items, pad_id)


# --- the order of the data -------------------------------------------------------------------------------------
class BatchPlan:
    """Which items form global batch ``step`` of a stage: a pure function of (seed, stage, step).

    The item stream is an endless sequence of seeded permutations (one per epoch); global batch ``b`` is
    positions [b * G, (b + 1) * G) of that stream. Resuming needs nothing but the step, and every process
    knows the whole global batch, so the loss normaliser (target tokens of the global batch) needs no
    communication and does not depend on how the batch is split over processes and micro-batches.
    """

    def __init__(self, n_items: int, global_batch: int, seed: int, stage: int):
        self.n, self.gb, self.seed, self.stage = n_items, global_batch, seed, stage
        self._perms: dict[int, list[int]] = {}

    def steps_for(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.n / self.gb))

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            import torch

            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.stage * 10_007 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.gb, (step + 1) * self.gb):
            epoch, off = divmod(pos, self.n)
            out.append(self._perm(epoch)[off])
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.gb / self.n


def split_global_batch(indices: list[int], lengths: list[int], micro: int, accum: int, world: int,
                       rank: int) -> list[list[int]]:
    """This process's ``accum`` micro-batches of a global batch.

    Sorting by length first puts similar lengths in one micro-batch (less padding); micro-batches are then
    dealt to processes in turn so each gets a similar share of tokens.
    """
    order = sorted(indices, key=lambda i: -lengths[i])
    micros = [order[j * micro:(j + 1) * micro] for j in range(accum * world)]
    return [micros[j] for j in range(rank, accum * world, world)]
