"""Tokenise training records: apply the chat template, mask everything but responses; preference pairs.

Loss is taken only on tokens of assistant turns (the end-of-turn token included, so the model learns to stop)
or, for plain text, on every token but the first. Positions are shifted once, in
:func:`mamballama_cli.training.data.collate`: ``targets[t]`` is ``input_ids[t + 1]`` and ``target_mask[t]`` says
whether that target counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mamballama_cli.errors import MamballamaError
from mamballama_cli.output import log
from mamballama_cli.training.records import DataError, Example, Record, ShardRecord, count_true


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


def encode_records(tok, records: list, seq_len: int, whole: bool = False) -> list[Example]:
    """Tokenise, truncate to ``seq_len`` and drop examples left without a target token.

    ``whole``: keep every record whole (the packers that cut long examples into rows themselves:
    :func:`~mamballama_cli.training.data.pack_concat`, :func:`~mamballama_cli.training.data.pack_fit`).
    Shards (:class:`ShardRecord`) are already tokenised: they are checked against ``tok`` and passed through.
    """
    keep = 1 << 62 if whole else seq_len
    out, dropped = [], 0
    ident = None
    for rec in records:
        if isinstance(rec, ShardRecord):
            ident = _check_shard_tokenizer(tok, rec, ident)
            exs = rec.examples(keep)
            dropped += rec.shard.n_sequences - len(exs)
            out += exs
            continue
        ex = encode_record(tok, rec, max_tokens=None if whole else seq_len)
        ex = Example(ex.ids[:keep], ex.mask[:keep])
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
