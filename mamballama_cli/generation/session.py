"""A multi-turn conversation that keeps its decoding state between turns (`mamballama chat`).

Each turn renders the whole conversation through the chat template, as any chat client does, but the prompt is
read from the state the last turn left: one :class:`~mamballama_cli.generation.continuous.SlotDecoder` slot with a
prefix cache (generation/prefix_cache.py) keeps the state after every turn's prompt and answer, so a turn reads only
its new tokens (the end of the last answer's turn and the new message), however long the conversation. For a
hybrid that state is a few layers' K/V and each Mamba layer's fixed-size state. Models the static decoder cannot
run (other Transformers, Mamba-1) re-read the conversation each turn through transformers' ``generate``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mamballama_cli.generation.sampling import SamplingConfig


@dataclass
class Turn:
    answer: str
    prompt_tokens: int  # the whole conversation so far, as the template renders it
    cached_tokens: int  # of those, read from the kept state
    new_tokens: int
    time_to_first_token_s: float
    total_s: float
    dropped_turns: int = 0  # earliest exchanges left out to fit the context


class ChatSession:
    def __init__(self, model, tokenizer, sampling: SamplingConfig, max_context: int, system: str | None = None,
                 prefix_cache_bytes: int = 1 << 30):
        from mamballama_cli.generation.fast import unsupported_reason
        from mamballama_cli.generation.result import stop_token_ids
        from mamballama_cli.generation.runners import as_hybrid, is_hybrid

        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use `generate --prompt` instead")
        self.model, self.tok, self.sampling = model, tokenizer, sampling
        self.max_context = int(max_context)
        self.system = system
        self.messages: list[dict] = []
        self.stops = stop_token_ids(model, tokenizer)
        self.turns = 0
        static = model if is_hybrid(model) else (as_hybrid(model) or model)
        self.decoder = None
        if unsupported_reason(static) is None:
            from mamballama_cli.generation.continuous import SlotDecoder

            self.decoder = SlotDecoder(static, 1, self.max_context, sampling, prefix_cache_bytes=prefix_cache_bytes)

    @property
    def engine(self) -> str:
        return "static, state kept between turns" if self.decoder is not None else "transformers, re-read each turn"

    def reset(self) -> None:
        """Forget the conversation (the kept states stay: a conversation that starts the same way reuses them)."""
        self.messages = []

    def _prompt(self, messages: list[dict]) -> list[int]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        text = self.tok.apply_chat_template(head + messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def reply(self, text: str, on_text=lambda piece: None) -> Turn:
        """Answer the user's ``text``, streaming the answer to ``on_text``; the exchange joins the conversation."""
        room = max(1, min(self.sampling.max_new_tokens, self.max_context // 2))
        kept, dropped = self.messages + [{"role": "user", "content": text}], 0
        ids = self._prompt(kept)
        while len(ids) + room > self.max_context and len(kept) > 1:
            kept, dropped = kept[2:], dropped + 1  # the earliest exchange goes; the new message stays
            ids = self._prompt(kept)
        if len(ids) + 1 > self.max_context:  # the message alone does not fit: the conversation stays as it was
            raise ValueError(f"the message takes {len(ids)} tokens with the template; the context holds "
                             f"{self.max_context} (--max-context)")
        self.messages = kept
        seed = None if self.sampling.seed is None else self.sampling.seed + self.turns
        t0 = time.perf_counter()
        if self.decoder is not None:
            answer, new, cached, ttft = self._static(ids, room, seed, on_text, t0)
        else:
            answer, new, cached, ttft = self._transformers(ids, room, seed, on_text)
        self.messages.append({"role": "assistant", "content": answer})
        self.turns += 1
        return Turn(answer, len(ids), cached, new, ttft, time.perf_counter() - t0, dropped)

    def _static(self, ids, room, seed, on_text, t0):
        from mamballama_cli.generation.result import TextStream

        pieces: list[str] = []

        def sink(piece: str) -> None:
            pieces.append(piece)
            on_text(piece)

        stream = TextStream(self.tok, sink)
        dec = self.decoder
        slot, token = dec.join(ids, self.sampling, seed)
        ttft, cached, new = time.perf_counter() - t0, dec.cached[slot], 0
        try:
            while True:
                if token in self.stops:
                    break
                new += 1
                stream.push([token])
                if new >= room or dec.room(slot) <= 0:
                    break
                token = dec.step()[slot]
        finally:
            dec.leave(slot)
        stream.finish()
        return "".join(pieces), new, cached, ttft

    def _transformers(self, ids, room, seed, on_text):
        from dataclasses import replace

        from mamballama_cli.generation.plain import generate

        sampling = replace(self.sampling, max_new_tokens=room, seed=seed)
        res = generate(self.model, self.tok, torch.tensor([ids]), sampling, on_text=on_text, engine="transformers")
        return res.text, res.new_tokens, 0, res.time_to_first_token_s
