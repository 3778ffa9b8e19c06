"""Plain (non-speculative) generation with streaming text and timing."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mamballama_cli.generation.result import GenerationResult, TextStream, stop_token_ids
from mamballama_cli.generation.sampling import SamplingConfig, transformers_kwargs


def encode_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> torch.Tensor:
    """(1, n) input ids; with ``chat`` the tokenizer's chat template and a generation prompt are applied."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            from mamballama_cli.errors import UsageError

            raise UsageError("--chat: this model's tokenizer has no chat template; drop --chat to use raw text")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


class _Streamer:
    """transformers streamer protocol (put/end) feeding a TextStream and recording time to first token."""

    def __init__(self, stream: TextStream):
        self.stream, self.first_token_at = stream, None
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.stream.push(value.reshape(-1).tolist())

    def end(self):
        pass


ENGINES = ("auto", "static", "transformers")


def choose_engine(model, engine: str = "auto") -> str:
    """"static" (generation/fast.py: static cache, CUDA-graph step) or "transformers" (generate()).

    auto: static for hybrids (on CUDA with a captured step; on CPU the same step eagerly, faster there than
    transformers' generate: docs/benchmarks.md), transformers for other models.
    """
    if engine not in ENGINES:
        from mamballama_cli.errors import UsageError

        raise UsageError(f"--engine {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "transformers":
        return engine
    from mamballama_cli.generation.fast import unsupported_reason

    why = unsupported_reason(model)
    if engine == "static":
        if why:
            from mamballama_cli.errors import UsageError

            raise UsageError(f"--engine static: {why}; use --engine transformers")
        return "static"
    return "static" if why is None else "transformers"


def _gib(n: float) -> str:
    """Bytes in binary units, e.g. 60.3 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def check_request(model, n_prompt: int, max_new_tokens: int, engine: str = "auto", batch_size: int = 1) -> None:
    """Refuse before allocating anything: an empty prompt, more tokens than the model's context length
    (max_position_embeddings), or a static cache larger than the free memory. Each error says the limit and
    the -n that fits."""
    from mamballama_cli.errors import UsageError

    if n_prompt < 1:
        raise UsageError("the prompt encodes to no tokens; pass a non-empty --prompt")
    static = choose_engine(model, engine) == "static"
    need = None
    if static:
        from mamballama_cli.generation.fast import static_cache_bytes, static_capacity

        need = static_cache_bytes(model, batch_size, static_capacity(n_prompt, max_new_tokens))
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx and n_prompt + max_new_tokens > ctx:
        if n_prompt >= ctx:
            raise UsageError(f"the prompt has {n_prompt} tokens, as many as the model's context length of {ctx} "
                             "(max_position_embeddings) or more; shorten it")
        memory = f"; its static cache would need {_gib(need)}" if need is not None else ""
        raise UsageError(f"--max-new-tokens {max_new_tokens}: the prompt ({n_prompt} tokens) plus {max_new_tokens} "
                         f"new tokens exceed the model's context length of {ctx} tokens (max_position_embeddings)"
                         f"{memory}; pass -n {ctx - n_prompt} or less")
    if need is not None:
        from mamballama_cli.generation.fast import available_bytes

        device = next(model.parameters()).device
        free = available_bytes(device)
        if free is not None and need > 0.9 * free:
            raise UsageError(f"--max-new-tokens {max_new_tokens}: the static cache for {n_prompt + max_new_tokens} "
                             f"tokens needs {_gib(need)}, but only {_gib(free)} is free on {device} (the model's "
                             f"context length is {ctx}); lower -n or use --engine transformers")


def generate(model, tokenizer, input_ids: torch.Tensor, sampling: SamplingConfig,
             on_text: Callable[[str], None] | None = None, engine: str = "auto") -> GenerationResult:
    """Decode one prompt. On CUDA, hybrids use the static decoder with a captured step
    (:mod:`mamballama_cli.generation.fast`); otherwise transformers' generate with the hybrid cache
    (O(1) per token in Mamba layers)."""
    if choose_engine(model, engine) == "static":
        from mamballama_cli.generation.fast import generate_fast

        return generate_fast(model, tokenizer, input_ids, sampling, on_text=on_text)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    stops = stop_token_ids(model, tokenizer)
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=stops or None,
                  pad_token_id=(stops[0] if stops else None), **transformers_kwargs(sampling))
    stream = TextStream(tokenizer, on_text)
    streamer = _Streamer(stream)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs)
    total = time.perf_counter() - start
    new_ids = out[0, input_ids.shape[1]:].tolist()
    text = stream.finish()
    ttft = (streamer.first_token_at - start) if streamer.first_token_at else total
    return GenerationResult(text, input_ids.shape[1], len(new_ids), ttft, total, new_ids)
