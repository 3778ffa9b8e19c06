"""Training data: read records, apply the chat template, mask everything but responses, pack or pad, batch.

Record formats (one JSON object per line of a .jsonl file, or rows of a Hugging Face dataset):
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
    {"text": "..."}                                   every token is a target
    {"prompt": "...", "response": "..."}              ("completion" also accepted)
    {"prompt": ..., "chosen": ..., "rejected": ...}   preference pairs (dpo); each a string or a message list

Loss is taken only on tokens of assistant turns (the end-of-turn token included, so the model learns to stop)
or, for plain text, on every token but the first. Positions are shifted once, here: ``targets[t]`` is
``input_ids[t + 1]`` and ``target_mask[t]`` says whether that target counts.

Packing concatenates examples into rows of ``seq_len`` tokens with position ids restarting at each example.
Only models whose attention honours those boundaries can be packed (transformers models build a
block-diagonal mask from restarting position ids). A Mamba layer would carry its recurrent and conv state
from one example into the next, and our SSD ops have no per-token sequence index to reset it, so hybrids
with Mamba layers are never packed: their batches are right-padded instead, which is exact because every
layer is causal and padding only follows the real tokens.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from mamballama_cli.errors import MamballamaError, UsageError

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("pydoc-topics",)


class DataError(MamballamaError):
    """A data file that cannot be used, naming the file and line."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Record:
    source: str  # file name or dataset name
    line: int  # 1-based line (or row) number
    data: dict

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line}"


# --- reading ---------------------------------------------------------------------------------------------------
def read_records(spec: str, *, split: str = "train", kind: str = "chat", skip_bad: bool = False) -> list[Record]:
    """Records from a JSONL file, a builtin source or a Hugging Face dataset; each checked against ``kind``.

    A bad line stops the run with its file and line number, unless ``skip_bad`` (then it is counted and named).
    """
    if spec.startswith(BUILTIN_PREFIX):
        records = _builtin(spec[len(BUILTIN_PREFIX):])
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            records = _read_jsonl(path, skip_bad)
        elif path.exists():
            raise DataError(f"data {spec!r} is a directory; pass a .jsonl file")
        elif path.suffix in (".jsonl", ".json", ".txt") or "/" not in spec or spec.startswith((".", "/", "~")):
            raise DataError(f"data file {spec} does not exist")
        else:
            records = _hf_dataset(spec, split)
    checker = {"chat": _check_chat, "preference": _check_preference, "prompt": _check_prompt}[kind]
    good, bad = [], []
    for rec in records:
        problem = checker(rec.data)
        if problem is None:
            good.append(rec)
        elif skip_bad:
            bad.append(f"{rec.where}: {problem}")
        else:
            raise DataError(f"{rec.where}: {problem} (fix the line, or pass --skip-bad-lines to skip such lines)")
    if bad:
        log(f"warning: skipped {len(bad)} bad record(s) in {spec}; first: {bad[0]}")
    if not good:
        raise DataError(f"data {spec} holds no usable records" + (f" ({len(bad)} skipped)" if bad else ""))
    return good


def _read_jsonl(path: Path, skip_bad: bool) -> list[Record]:
    records, bad = [], []
    with path.open("r", encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            msg = f"{path} line {n}: not valid JSON ({exc.msg} at column {exc.colno})"
            if not skip_bad:
                raise DataError(msg + " (fix the line, or pass --skip-bad-lines to skip such lines)") from None
            bad.append(msg)
            continue
        if not isinstance(obj, dict):
            msg = f"{path} line {n}: expected a JSON object, got {type(obj).__name__}"
            if not skip_bad:
                raise DataError(msg + " (fix the line, or pass --skip-bad-lines to skip such lines)")
            bad.append(msg)
            continue
        records.append(Record(str(path), n, obj))
    if bad:
        log(f"warning: skipped {len(bad)} malformed line(s) of {path}; first: {bad[0]}")
    return records


def _hf_dataset(name: str, split: str) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data {name!r} is not a local file; loading Hugging Face datasets needs the datasets "
                        "package: pip install 'mamballama[train]' (or pass a .jsonl file)") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DataError(f"data {name!r}: could not load this Hugging Face dataset (split {split!r}): {first}; "
                        "offline, export it to JSONL on a connected machine and pass the file") from exc
    return [Record(name, i + 1, dict(row)) for i, row in enumerate(ds)]


def _builtin(name: str) -> list[Record]:
    """Offline text that ships with Python: the standard library's pydoc topics as chat pairs."""
    if name != "pydoc-topics":
        raise UsageError(f"unknown builtin data {name!r}; available: {', '.join(BUILTIN_PREFIX + b for b in BUILTINS)}")
    from pydoc_data.topics import topics

    out = []
    for i, (topic, text) in enumerate(sorted(topics.items())):
        body = text.strip()
        if not body:
            continue
        out.append(Record("builtin:pydoc-topics", i + 1, {"messages": [
            {"role": "user", "content": f"Explain the Python topic '{topic}'."},
            {"role": "assistant", "content": body},
        ]}))
    return out


def _check_messages(msgs, what: str) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return f"'{what}' must be a non-empty list of {{'role', 'content'}} objects"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"'{what}'[{i}] must be an object with string 'role' and 'content'"
    return None


def _check_chat(d: dict) -> str | None:
    if "messages" in d:
        problem = _check_messages(d["messages"], "messages")
        if problem:
            return problem
        if not any(m["role"] == "assistant" for m in d["messages"]):
            return "'messages' has no assistant turn, so there is nothing to learn from"
        return None
    if "text" in d:
        return None if isinstance(d["text"], str) and d["text"].strip() else "'text' must be a non-empty string"
    if "prompt" in d and ("response" in d or "completion" in d):
        resp = d.get("response", d.get("completion"))
        if not isinstance(d["prompt"], str) or not isinstance(resp, str):
            return "'prompt' and 'response' must be strings"
        return None
    return f"expected 'messages', 'text' or 'prompt'+'response' keys, found {sorted(d)[:6]}"


def _check_preference(d: dict) -> str | None:
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in d]
    if missing:
        return f"a preference pair needs 'prompt', 'chosen' and 'rejected'; missing {missing}"
    for k in ("prompt", "chosen", "rejected"):
        v = d[k]
        if isinstance(v, str):
            if k != "prompt" and not v.strip():
                return f"'{k}' is empty"
            continue
        problem = _check_messages(v, k)
        if problem:
            return problem + " or a string"
    return None


def _check_prompt(d: dict) -> str | None:
    if "prompt" in d:
        return None if isinstance(d["prompt"], str) and d["prompt"].strip() else "'prompt' must be a non-empty string"
    if "messages" in d:
        return _check_messages(d["messages"], "messages")
    return f"expected a 'prompt' string or a 'messages' list, found {sorted(d)[:6]}"


# --- templating and masking ------------------------------------------------------------------------------------
@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # True where the token is a target (part of a response); mask[0] is always False


def _render(tok, messages, add_generation_prompt=False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def response_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end-of-turn included).

    A turn's span runs from the end of "conversation so far + generation prompt" to the end of "conversation
    including this turn", both rendered by the tokenizer's own chat template. If a template does not render
    prefixes consistently, the turn's content is located in the full text instead.
    """
    full = _render(tok, messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = end = None
        if i > 0:
            before = _render(tok, messages[:i], add_generation_prompt=True)
            upto = _render(tok, messages[: i + 1])
            if full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
                start, end = len(before), len(upto)
        if start is None:
            pos = full.find(m["content"], cursor)
            if pos < 0:
                raise ValueError(f"assistant turn {i} is not found in the rendered chat template")
            start, end = pos, pos + len(m["content"])
            eos = getattr(tok, "eos_token", None)
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return full, spans


# A record's text is cut to a character window before it is tokenised, so that one huge record (a 50 MB text) costs
# memory bounded by --seq-len, not by its size: the window starts at WINDOW_CHARS_PER_TOKEN characters per token
# wanted and doubles until the tokens that lie clear of the cut (in the first 3/4 of the window) cover what is kept.
# A record shorter than the window is tokenised whole, exactly as before.
WINDOW_CHARS_PER_TOKEN = 8
WINDOW_MIN_CHARS = 4096


def _window(max_tokens: int | None) -> int | None:
    return None if max_tokens is None else max(WINDOW_MIN_CHARS, WINDOW_CHARS_PER_TOKEN * (max_tokens + 1))


def _stable(offsets, cut: int) -> int:
    """How many leading tokens end clear of a cut at character ``cut`` (those a longer text tokenises the same)."""
    limit = cut - cut // 4
    return sum(1 for _, e in offsets if e <= limit)


def _clip_messages(messages: list[dict], chars: int) -> tuple[list[dict], bool]:
    clipped = [{**m, "content": m["content"][:chars]} if len(m["content"]) > chars else m for m in messages]
    return clipped, any(len(m["content"]) > chars for m in messages)


def encode_chat(tok, messages: list[dict], max_tokens: int | None = None) -> Example:
    """Render with the chat template, tokenise, mask all but the assistant turns. With ``max_tokens`` only a
    window of characters large enough for that many tokens is tokenised (the tokens kept are the same)."""
    if not getattr(tok, "chat_template", None):
        raise MamballamaError("the tokenizer has no chat template, so 'messages' records cannot be rendered; "
                              "use {'text': ...} records or a tokenizer with a chat template")
    if not getattr(tok, "is_fast", False):
        raise MamballamaError("masking chat data needs a fast tokenizer (character offsets); this one is slow")
    chars = _window(max_tokens)
    while True:
        msgs, clipped = (messages, False) if chars is None else _clip_messages(messages, chars)
        full, spans = response_spans(tok, msgs)
        cut = chars is not None and len(full) > chars
        text = full[:chars] if cut else full
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if not (cut or clipped) or _stable(enc["offset_mapping"], chars) > max_tokens:
            break
        chars *= 2
    ids = list(enc["input_ids"])
    mask = []
    for s, e in enc["offset_mapping"]:
        mask.append(any(a <= s < b or (s < a < e) for a, b in spans))
    if mask:
        mask[0] = False
    return Example(ids, mask)


def _tokenize_prefix(tok, text: str, max_tokens: int | None, **kw) -> tuple[list[int], bool]:
    """(ids, whole): the ids of ``text``, or, for a text longer than the window, more than ``max_tokens`` leading
    ids computed from a window of its characters (the same ids the whole text starts with; whole is False)."""
    chars = _window(max_tokens)
    while chars is not None and len(text) > chars:
        if getattr(tok, "is_fast", False):
            enc = tok(text[:chars], return_offsets_mapping=True, **kw)
            n = _stable(enc["offset_mapping"], chars)
            if n > max_tokens:
                return list(enc["input_ids"])[:n], False
        else:  # a slow tokenizer has no offsets: keep tokens far from the cut instead
            ids = list(tok(text[:chars], **kw)["input_ids"])
            if len(ids) > 2 * max_tokens + 64:
                return ids[:max_tokens + 1], False
        chars *= 2
    return list(tok(text, **kw)["input_ids"]), True


def _tokenize_suffix(tok, text: str, max_tokens: int, **kw) -> list[int]:
    """The last ``max_tokens`` ids of ``text`` (fewer for a short text), tokenising only a window of its last
    characters when it is long (the mirror image of :func:`_tokenize_prefix`)."""
    chars = _window(max_tokens)
    while len(text) > chars and getattr(tok, "is_fast", False):
        enc = tok(text[-chars:], return_offsets_mapping=True, add_special_tokens=False)
        clear = [i for i, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]) if a >= chars // 4]
        if len(clear) >= max_tokens:
            return clear[-max_tokens:]
        chars *= 2
    return list(tok(text, **kw)["input_ids"])[-max_tokens:]


def encode_text(tok, text: str, max_tokens: int | None = None) -> Example:
    """Every token a target. With ``max_tokens`` a long text is tokenised through a window of its characters
    (:func:`_tokenize_prefix`); its end-of-text token would lie beyond what is kept anyway."""
    ids, whole = _tokenize_prefix(tok, text, max_tokens)
    eos = tok.eos_token_id
    if whole and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return Example(ids, [False] + [True] * (len(ids) - 1))


def encode_record(tok, rec: Record, max_tokens: int | None = None) -> Example:
    """A record as tokens and target mask; ``max_tokens`` (what will be kept) bounds the text tokenised."""
    d = rec.data
    try:
        if "messages" in d:
            return encode_chat(tok, d["messages"], max_tokens)
        if "text" in d:
            return encode_text(tok, d["text"], max_tokens)
        response = d.get("response", d.get("completion"))
        if getattr(tok, "chat_template", None):
            return encode_chat(tok, [{"role": "user", "content": d["prompt"]},
                                     {"role": "assistant", "content": response}], max_tokens)
        p, whole = _tokenize_prefix(tok, d["prompt"], max_tokens)
        if not whole:  # the prompt alone fills what is kept: no response token would be
            return Example(p, [False] * len(p))
        r, whole = _tokenize_prefix(tok, response, max_tokens, add_special_tokens=False)
        r += [tok.eos_token_id] if whole and tok.eos_token_id is not None else []
        return Example(p + r, [False] * len(p) + [True] * len(r))
    except MamballamaError:
        raise
    except Exception as exc:  # a template that chokes on this record
        raise DataError(f"{rec.where}: cannot render it with the chat template ({type(exc).__name__}: {exc})") from exc


def encode_records(tok, records: list[Record], seq_len: int) -> list[Example]:
    """Tokenise, truncate to ``seq_len`` and drop examples left without a target token."""
    out, dropped = [], 0
    for rec in records:
        ex = encode_record(tok, rec, max_tokens=seq_len)
        ex = Example(ex.ids[:seq_len], ex.mask[:seq_len])
        if sum(ex.mask) == 0:
            dropped += 1
            continue
        out.append(ex)
    if dropped:
        log(f"note: {dropped} example(s) have no response token within --seq-len {seq_len} and were dropped")
    if not out:
        raise DataError(f"no example keeps a response token within --seq-len {seq_len}; raise --seq-len")
    return out


# --- preference pairs ------------------------------------------------------------------------------------------
@dataclass
class PairExample:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _as_messages(v, role: str) -> list[dict]:
    return [{"role": role, "content": v}] if isinstance(v, str) else list(v)


def _response_text(v) -> str:
    if isinstance(v, str):
        return v
    turns = [m for m in v if m["role"] == "assistant"]
    if not turns:
        raise ValueError("the message list has no assistant turn")
    return turns[-1]["content"]


def encode_pair(tok, rec: Record, seq_len: int, max_prompt_len: int) -> PairExample:
    d = rec.data
    try:
        prompt_msgs = _as_messages(d["prompt"], "user")
        # Preference sets often repeat the prompt inside chosen/rejected: keep only the final answer.
        responses = [_response_text(d["chosen"]), _response_text(d["rejected"])]
        if getattr(tok, "chat_template", None):
            prefix = _render(tok, prompt_msgs, add_generation_prompt=True)
            outs = []
            for r in responses:
                full = _render(tok, prompt_msgs + [{"role": "assistant", "content": r}])
                if not full.startswith(prefix):
                    raise ValueError("the chat template does not render the prompt as a prefix of the answer")
                outs.append(full[len(prefix):])
            p = _tokenize_suffix(tok, prefix, max_prompt_len, add_special_tokens=False)
            c, r = (_tokenize_prefix(tok, x, seq_len, add_special_tokens=False)[0] for x in outs)
        else:
            text = d["prompt"] if isinstance(d["prompt"], str) else "\n".join(m["content"] for m in prompt_msgs)
            p = _tokenize_suffix(tok, text, max_prompt_len)
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            c, r = (ids + (eos if whole else []) for ids, whole in
                    (_tokenize_prefix(tok, x, seq_len, add_special_tokens=False) for x in responses))
    except Exception as exc:
        raise DataError(f"{rec.where}: cannot encode this preference pair ({type(exc).__name__}: {exc})") from exc
    # the end of a long prompt is kept (it is what the answer follows); only windows of long texts are tokenised
    room = seq_len - len(p)
    return PairExample(p, c[:room], r[:room])


def encode_pairs(tok, records: list[Record], seq_len: int, max_prompt_len: int) -> list[PairExample]:
    out = [encode_pair(tok, rec, seq_len, max_prompt_len) for rec in records]
    out = [x for x in out if x.chosen and x.rejected]
    if not out:
        raise DataError("no preference pair keeps a response token; raise --seq-len or lower --max-prompt-length")
    return out


# --- items: padded examples or packed rows ---------------------------------------------------------------------
@dataclass
class Item:
    ids: list[int]
    mask: list[bool]
    positions: list[int] | None = None  # restarting position ids of a packed row

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(self.mask)


def pack(examples: list[Example], seq_len: int) -> list[Item]:
    """Greedy packing in the given order into rows of at most ``seq_len`` tokens.

    Each example keeps mask[0] = False, so no token is ever trained to follow the previous example.
    """
    rows, cur = [], Item([], [], [])
    for ex in examples:
        if cur.ids and len(cur.ids) + len(ex.ids) > seq_len:
            rows.append(cur)
            cur = Item([], [], [])
        cur.ids += ex.ids
        cur.mask += ex.mask
        cur.positions += list(range(len(ex.ids)))
    if cur.ids:
        rows.append(cur)
    return rows


def pack_concat(examples: list[Example], seq_len: int) -> list[Item]:
    """Concatenate the examples (in the given order) and cut the stream into rows of exactly ``seq_len``.

    Unlike :func:`pack`, positions run on across example boundaries, as in the usual "concatenate and chunk"
    pre-training layout: every model (teacher and student alike) reads the row as one text, so a Mamba layer's
    state carrying over a boundary is what the teacher's attention sees too, and a KL to the teacher stays
    exact. Every row is full: no padding, no wasted compute. The tail shorter than ``seq_len`` is kept as a
    last, shorter row.
    """
    import numpy as np

    if not examples:
        return []
    ids = np.concatenate([np.asarray(ex.ids, dtype=np.int64) for ex in examples])
    mask = np.concatenate([np.asarray(ex.mask, dtype=bool) for ex in examples])
    rows = []
    for s in range(0, len(ids), seq_len):
        m = mask[s:s + seq_len].tolist()
        m[0] = False
        rows.append(Item(ids[s:s + seq_len].tolist(), m))
    return [r for r in rows if len(r) > 1]


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
        ids[i, :n] = torch.tensor(it.ids)
        mask[i, :n] = torch.tensor(it.mask)
        if it.positions is not None:
            # Padding continues the last segment's positions: it follows every real token, so causal
            # attention keeps it out of their outputs.
            tail = it.positions[-1] + 1 if it.positions else 0
            pos[i, :n] = torch.tensor(it.positions)
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

    def steps_per_epoch(self) -> float:
        return self.n / self.gb

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
