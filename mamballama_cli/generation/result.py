"""What a generation hands back, whichever path ran it: :class:`GenerationResult`, the :class:`TextStream`
that turns new tokens into text as they come, :class:`StopText`, which cuts that text at a stop string, and
:func:`stop_token_ids`, the tokens that end it."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    total_s: float
    token_ids: list[int] = field(default_factory=list)
    engine: str = "transformers"  # or "static-graph" / "static-eager" (generation/fast.py)

    @property
    def decode_tokens_per_s(self) -> float:
        dt = self.total_s - self.time_to_first_token_s
        return (self.new_tokens - 1) / dt if self.new_tokens > 1 and dt > 0 else float("nan")


class StopText:
    """A request's text cut at the first of its stop strings: what could begin one is held back until it cannot,
    and once one appears the text before it is sent and nothing after (``matched`` says so)."""

    def __init__(self, stops: tuple[str, ...], emit: Callable[[str], None]):
        self.stops, self.emit = [x for x in stops if x], emit
        self.held, self.matched = "", False

    def push(self, text: str) -> None:
        if self.matched:
            return
        buf = self.held + text
        hits = [i for i in (buf.find(x) for x in self.stops) if i >= 0]
        if hits:
            self.matched, self.held = True, ""
            if min(hits):
                self.emit(buf[:min(hits)])
            return
        keep = 0  # the longest end of buf that begins a stop string
        for x in self.stops:
            for k in range(min(len(x) - 1, len(buf)), keep, -1):
                if buf.endswith(x[:k]):
                    keep = k
                    break
        if len(buf) > keep:
            self.emit(buf[:len(buf) - keep])
        self.held = buf[len(buf) - keep:] if keep else ""

    def flush(self) -> None:
        """The answer ended without a stop string: the text held back is the answer's end."""
        if self.held and not self.matched:
            self.emit(self.held)
        self.held = ""


class TextStream:
    """Incremental detokeniser: emits only the new suffix, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_ids) -> None:
        self.ids.extend(int(t) for t in token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if self.on_text and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])
        self.emitted = text

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.on_text and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])
        self.emitted = text
        return text


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids of the generation config, the model config and the tokenizer, without repeats."""
    ids: list[int] = []
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None)
        for e in eos if isinstance(eos, (list, tuple)) else [eos]:
            if e is not None and int(e) not in ids:
                ids.append(int(e))
    return ids
