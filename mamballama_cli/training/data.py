"""Training data: read records, apply the chat template, mask everything but responses, pack or pad, batch.

Sources (``--data``; several, comma-separated, are concatenated): a .jsonl file; a local Hugging Face
``datasets`` folder (``Dataset.save_to_disk``) or a .parquet / .arrow file; a shard folder from `mamballama data
generate` (pre-tokenised: no templating, targets = the teacher's sampled tokens; mamballama_cli/shards.py);
``builtin:pydoc-topics``; or a Hugging Face dataset name.

Record formats (one JSON object per line of a .jsonl file, or rows of a data set):
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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.output import log

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("pydoc-topics",)


class DataError(MamballamaError):
    """A data file that cannot be used, naming the file and line."""



@dataclass
class Record:
    source: str  # file name or dataset name
    line: int  # 1-based line (or row) number
    data: dict

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line}"


@dataclass
class ShardRecord:
    """One shard of pre-tokenised sequences (mamballama_cli/shards.py), kept as flat numpy arrays."""

    source: str  # the shard file
    shard: object  # shards.Shard
    tokenizer: dict  # the manifest's tokenizer identity

    @property
    def where(self) -> str:
        return self.source

    def examples(self, seq_len: int) -> list["Example"]:
        """Sequences truncated to ``seq_len`` as views into the shard's arrays; targets = the sampled tokens.

        Sequences left without a sampled token inside ``seq_len`` are dropped.
        """
        sh = self.shard
        lens = np.diff(sh.offsets)
        prompt = sh.prompt_lens.astype(np.int64)
        # mask[t] = token t of its sequence is a sampled (response) token; one bool per token for the whole shard
        within = np.arange(sh.n_tokens, dtype=np.int64) - np.repeat(sh.offsets[:-1], lens)
        mask = within >= np.repeat(prompt, lens)
        keep = np.minimum(lens, seq_len)
        starts = sh.offsets[:-1]
        return [Example(sh.tokens[o:o + k], mask[o:o + k])
                for o, k, p in zip(starts.tolist(), keep.tolist(), prompt.tolist()) if k > p]


# --- reading ---------------------------------------------------------------------------------------------------
def split_data_spec(spec: str) -> list[str]:
    """``--data a,b`` -> [a, b] (several sources are concatenated in the order given)."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise UsageError(f"--data {spec!r} names no data")
    return parts


def read_records(spec: str, *, split: str = "train", kind: str = "chat", skip_bad: bool = False,
                 text_field: str | None = None) -> list:
    """Records from JSONL files, local data sets, builtin sources or Hugging Face datasets, each checked against
    ``kind``; shard folders come back as :class:`ShardRecord` (pre-tokenised, for ``kind='chat'`` only).

    ``text_field`` names the field holding each record's text (a string) or conversation (a message list).
    A bad line stops the run with its file and line number, unless ``skip_bad`` (then it is counted and named).
    """
    out: list = []
    for part in split_data_spec(spec):
        path = Path(part).expanduser()
        if path.is_dir() and _is_shards(path):
            if kind != "chat":
                need = "preference pairs" if kind == "preference" else "prompts"
                raise DataError(f"data {part} holds pre-tokenised shards from `mamballama data generate`; this "
                                f"command needs {need} (JSONL or a data set)")
            out += read_shard_dir(path)
            continue
        out += _checked(part, load_records(part, split=split, skip_bad=skip_bad, text_field=text_field), kind,
                        skip_bad)
    return out


def _is_shards(path: Path) -> bool:
    from mamballama_cli.shards import is_shard_dir

    return is_shard_dir(path)


def read_shard_dir(path: Path) -> list[ShardRecord]:
    """The complete shards a manifest lists, each checked against its sha256."""
    from mamballama_cli.shards import read_manifest, read_shard, verify_shard

    manifest = read_manifest(path)
    entries = manifest.get("shards") or []
    if not entries:
        raise DataError(f"data {path} holds no complete shard yet; run `mamballama data generate ... --resume`")
    if not manifest.get("complete"):
        log(f"note: {path} is incomplete ({manifest.get('tokens', 0):,} of {manifest.get('target_tokens', 0):,} "
            f"tokens); training on its {len(entries)} complete shard(s)")
    return [ShardRecord(str(path / e["file"]), read_shard(verify_shard(path, e)), manifest.get("tokenizer") or {})
            for e in entries]


def load_records(spec: str, *, split: str = "train", skip_bad: bool = False, text_field: str | None = None,
                 string_key: str = "text") -> list[Record]:
    """Unchecked records of one source: a builtin, a .jsonl file, a local data set (folder, .parquet, .arrow)
    or a Hugging Face dataset name. ``text_field`` maps each record to {string_key: value} (a string) or
    {'messages': value} (a message list)."""
    if spec.startswith(BUILTIN_PREFIX):
        records = _builtin(spec[len(BUILTIN_PREFIX):])
        fields = None
    else:
        path = Path(spec).expanduser()
        if path.is_dir() or (path.is_file() and path.suffix in (".parquet", ".arrow")):
            records, fields = _local_dataset(path, split)
        elif path.is_file():
            records, fields = _read_jsonl(path, skip_bad), None
        elif path.suffix in (".jsonl", ".json", ".txt", ".parquet", ".arrow") or "/" not in spec or spec.startswith(
                (".", "/", "~")):
            raise DataError(f"data file {spec} does not exist")
        else:
            records, fields = _hf_dataset(spec, split), None
    if text_field:
        records = _pick_field(spec, records, text_field, fields, string_key)
    return records


def _checked(spec: str, records: list[Record], kind: str, skip_bad: bool) -> list[Record]:
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


def _pick_field(spec: str, records: list[Record], name: str, fields: list[str] | None,
                string_key: str = "text") -> list[Record]:
    """Each record becomes {string_key: value} (a string) or {'messages': value} (a message list)."""
    if fields is not None and name not in fields:
        raise DataError(f"data {spec} has no field {name!r}; its fields are: {', '.join(fields)} "
                        "(pass --text-field with one of them)")
    out = []
    for rec in records:
        if name not in rec.data:
            raise DataError(f"{rec.where} has no field {name!r}; its fields are: {', '.join(sorted(rec.data))} "
                            "(pass --text-field with one of them)")
        value = rec.data[name]
        out.append(Record(rec.source, rec.line, {"messages" if isinstance(value, list) else string_key: value}))
    return out


def _local_dataset(path: Path, split: str) -> tuple[list[Record], list[str]]:
    """Rows of a ``datasets`` folder (save_to_disk), a .parquet or an .arrow file, and the field names."""
    if path.suffix == ".parquet" and path.is_file():
        pq = _need("pyarrow.parquet", path)
        table = pq.read_table(str(path))
    elif path.suffix == ".arrow" and path.is_file():
        pa = _need("pyarrow", path)
        try:  # the Arrow IPC file format, else the stream format (what `datasets` writes)
            table = pa.ipc.open_file(str(path)).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_stream(str(path)).read_all()
    else:
        if not any((path / n).is_file() for n in ("state.json", "dataset_dict.json", "dataset_info.json")):
            raise DataError(f"data {path} is a directory but neither a shard folder (manifest.json from `mamballama "
                            "data generate`) nor a saved `datasets` folder (Dataset.save_to_disk); pass a .jsonl, "
                            ".parquet or .arrow file")
        datasets = _need("datasets", path)
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"data {path}: `datasets` cannot load this folder ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"data {path} has no split {split!r}; its splits are: {', '.join(ds)} "
                                "(pass --data-split)")
            ds = ds[split]
        rows = ds.to_list()
        return [Record(str(path), i + 1, row) for i, row in enumerate(rows)], list(ds.column_names)
    return [Record(str(path), i + 1, row) for i, row in enumerate(table.to_pylist())], list(table.column_names)


def _need(module: str, path: Path):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"data {path}: reading it needs the {module.split('.')[0]} package: pip install "
                        "'mamballama[train]' (or pass a .jsonl file)") from None


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
    """A tokenised sequence: lists, or numpy views into a shard's arrays (pre-tokenised data is never copied)."""

    ids: Sequence[int]
    mask: Sequence[bool]  # True where the token is a target (part of a response); mask[0] is always False


def count_true(mask: Sequence[bool]) -> int:
    return int(np.count_nonzero(mask)) if isinstance(mask, np.ndarray) else sum(mask)


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


def encode_records(tok, records: list, seq_len: int) -> list[Example]:
    """Tokenise, truncate to ``seq_len`` and drop examples left without a target token.

    Shards (:class:`ShardRecord`) are already tokenised: they are checked against ``tok`` and passed through.
    """
    out, dropped = [], 0
    ident = None
    for rec in records:
        if isinstance(rec, ShardRecord):
            ident = _check_shard_tokenizer(tok, rec, ident)
            exs = rec.examples(seq_len)
            dropped += rec.shard.n_sequences - len(exs)
            out += exs
            continue
        ex = encode_record(tok, rec, max_tokens=seq_len)
        ex = Example(ex.ids[:seq_len], ex.mask[:seq_len])
        if count_true(ex.mask) == 0:
            dropped += 1
            continue
        out.append(ex)
    if dropped:
        log(f"note: {dropped} example(s) have no response token within --seq-len {seq_len} and were dropped")
    if not out:
        raise DataError(f"no example keeps a response token within --seq-len {seq_len}; raise --seq-len")
    return out


def _check_shard_tokenizer(tok, rec: ShardRecord, mine: dict | None) -> dict:
    """This run's tokenizer identity (``mine``, computed once), after checking the shard was written with it."""
    from mamballama_cli.shards import describe_tokenizer, same_tokenizer, tokenizer_identity

    mine = mine or tokenizer_identity(tok)
    if not same_tokenizer(mine, rec.tokenizer):
        raise DataError(f"data {Path(rec.source).parent} was written with tokenizer {describe_tokenizer(rec.tokenizer)}"
                        f" but this run tokenises with {describe_tokenizer(mine)}: token ids would mean other "
                        "tokens; generate the data with this model's teacher (`mamballama data generate`)")
    return mine


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
