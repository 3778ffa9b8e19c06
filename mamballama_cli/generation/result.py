"""What a generation hands back, whichever path ran it: :class:`GenerationResult`, the :class:`TextStream`
that turns new tokens into text as they come, and :func:`stop_token_ids`, the tokens that end it."""

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
