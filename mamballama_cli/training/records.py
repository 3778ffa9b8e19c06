"""Training records: read and check them, from every source ``--data`` accepts.

Sources (``--data``; several, comma-separated, are concatenated): a .jsonl file; a local Hugging Face
``datasets`` folder (``Dataset.save_to_disk``) or a .parquet / .arrow file; a shard folder from `mamballama data
generate` (pre-tokenised: no templating, targets = the teacher's sampled tokens; mamballama_cli/shards.py);
``builtin:pydoc-topics``; or a Hugging Face dataset name.

Record formats (one JSON object per line of a .jsonl file, or rows of a data set):
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
    {"text": "..."}                                   every token is a target
    {"prompt": "...", "response": "..."}              ("completion" also accepted)
    {"prompt": ..., "chosen": ..., "rejected": ...}   preference pairs (dpo); each a string or a message list

A shard record is already tokenised: it hands out :class:`Example` s (token ids and target mask) directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.output import log

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("pydoc-topics",)


class DataError(MamballamaError):
    """A data file that cannot be used, naming the file and line."""


@dataclass
class Example:
    """A tokenised sequence: lists, or numpy views into a shard's arrays (pre-tokenised data is never copied)."""

    ids: Sequence[int]
    mask: Sequence[bool]  # True where the token is a target (part of a response); mask[0] is always False


def count_true(mask: Sequence[bool]) -> int:
    return int(np.count_nonzero(mask)) if isinstance(mask, np.ndarray) else sum(mask)


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

    def examples(self, seq_len: int) -> list[Example]:
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
                 text_field: str | None = None, heldout: bool = False) -> list:
    """Records from JSONL files, local data sets, builtin sources or Hugging Face datasets, each checked against
    ``kind``; shard folders come back as :class:`ShardRecord` (pre-tokenised, for ``kind='chat'`` only).

    A `mamballama data build` folder gives the files of its ``split`` ('train' or 'heldout'; ``heldout`` takes the
    held-out one whatever ``split`` says, as --eval-data does) that ``kind`` reads: texts and recall documents, or
    prompts. ``text_field`` names the field holding each record's text (a string) or conversation (a message
    list). A bad line stops the run with its file and line number, unless ``skip_bad`` (then it is counted and
    named).
    """
    out: list = []
    for part in split_data_spec(spec):
        path = Path(part).expanduser()
        if path.is_dir() and (files := _build_folder(part, path, kind, "heldout" if heldout else split)) is not None:
            for f in files:
                out += checked_records(str(f), load_records(str(f), skip_bad=skip_bad, text_field=text_field), kind, skip_bad)
            continue
        if path.is_dir() and _is_shards(path):
            if kind != "chat":
                need = "preference pairs" if kind == "preference" else "prompts"
                raise DataError(f"data {part} holds pre-tokenised shards from `mamballama data generate`; this "
                                f"command needs {need} (JSONL or a data set)")
            out += read_shard_dir(path)
            continue
        out += checked_records(part, load_records(part, split=split, skip_bad=skip_bad, text_field=text_field), kind,
                        skip_bad)
    return out


# What a reader of each record kind takes from a `data build` folder: chat/text training its texts and recall
# documents, `label` its prompts; preference pairs it has none of.
_FOLDER_GROUPS = {"chat": ("text", "recall"), "prompt": ("prompts",)}


def _build_folder(part: str, path: Path, kind: str, split: str) -> list[Path] | None:
    """The files to read from a `data build` folder (a note names them), or None where ``path`` is not one."""
    from mamballama_cli.corpus import folder_files

    if (files := folder_files(path, _FOLDER_GROUPS.get(kind, ()), split)) is None:
        return None
    if split not in ("train", "heldout"):
        raise DataError(f"data {part} is a `mamballama data build` folder, whose splits are train and heldout; "
                        f"got --data-split {split} (pass --data-split train or heldout)")
    if not files:
        holds = {"preference": "preference pairs", "prompt": "prompts"}.get(kind, "texts")
        raise DataError(f"data {part} is a `mamballama data build` folder with no {holds} in its {split} split "
                        + ("(pass a JSONL file of prompt/chosen/rejected records)" if kind == "preference" else
                           "(build it again with a source that has them, e.g. --sources pydoc)"))
    log(f"data {part}: the {split} split of a `data build` folder: {', '.join(f.name for f in files)}")
    return files


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
            raise DataError(f"data file {spec} does not exist; pass a .jsonl file, a data set folder (e.g. from "
                            f"`mamballama data build`), {BUILTIN_PREFIX}NAME or a Hugging Face dataset name")
        else:
            records, fields = _hf_dataset(spec, split), None
    if text_field:
        records = _pick_field(spec, records, text_field, fields, string_key)
    return records


def checked_records(spec: str, records: list[Record], kind: str, skip_bad: bool) -> list[Record]:
    """``records`` that hold what ``kind`` (chat, preference, prompt) needs; a bad one stops the run, naming its
    line, or with ``skip_bad`` is counted and left out."""
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
            raise DataError(f"data {path} is a directory but neither a shard folder (from `mamballama data "
                            "generate`), a `mamballama data build` folder nor a saved `datasets` folder "
                            "(Dataset.save_to_disk); pass a .jsonl, .parquet or .arrow file")
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
    with path.open("r", encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return jsonl_records(lines, str(path), skip_bad)


def jsonl_records(lines: list[str], path: str, skip_bad: bool) -> list[Record]:
    """JSONL lines (of a file, or of stdin: ``path`` names the source in errors) as records of JSON objects."""
    records, bad = [], []
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
        records.append(Record(path, n, obj))
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
