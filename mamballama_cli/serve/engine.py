"""The serving engine: one worker thread owns the model and decodes the requests that wait, several at a time.

Requests that are waiting when the worker is free, and share sampling settings, decode together as one batch on
the static decoder (:class:`~mamballama_cli.generation.fast.StaticDecoder`, CUDA-graph captured on GPU, eager on
the PyTorch references on CPU). Prompts of unequal lengths share the batch through the decoder's forced tokens: the
shortest length is prefilled, and each longer prompt's rest is fed in the first decode steps, so every row decodes
exactly as if alone. A row leaves the batch's output when it meets a stop token, its ``max_tokens`` or a cancel
(the client went away); the batch ends when every row has. Models the static decoder cannot run (a plain
Transformer, Mamba-1) decode one request at a time through transformers' ``generate``.

With a draft (``serve --speculative --draft D``), requests decode one at a time by speculative decoding
(:func:`~mamballama_cli.generation.speculative.speculative_generate`): greedy answers equal the target's own.

Requests that arrive while a batch runs wait for the next batch: continuous batching, where requests join and
leave a running batch between steps, needs per-row positions in the decode step (issue 17).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Request:
    """One completion: prompt ids, sampling, and where its text goes (``emit``/``finish`` are called from the
    worker thread; the server turns them into HTTP)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    emit: Callable[[str], None] = lambda text: None
    finish: Callable[[str, dict], None] = lambda reason, usage: None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def sampling_key(self) -> tuple:
        return (float(self.temperature), float(self.top_p), int(self.top_k))


class _Stop(Exception):
    """Raised inside the decode loop's callback once no row of the batch wants more tokens."""


class Engine:
    """Owns the model on one worker thread; :meth:`submit` queues a request and returns at once."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_context: int = 4096, gather_s: float = 0.01,
                 prefill_chunk: int | None = None, draft=None, k: int = 4, draft_name: str = ""):
        from mamballama_cli.generation.fast import unsupported_reason
        from mamballama_cli.generation.result import stop_token_ids

        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_context, self.gather_s = int(max_batch), int(max_context), float(gather_s)
        self.prefill_chunk = prefill_chunk
        self.draft, self.k, self.draft_name = draft, int(k), draft_name
        self.stops = stop_token_ids(model, tokenizer)
        self.static_reason = unsupported_reason(model)  # None: batched on the static decoder
        self.pending: queue.Queue[Request] = queue.Queue()
        self.decoders: dict[tuple, object] = {}
        self.batches = 0  # batches run, and the largest, for /health and tests
        self.largest_batch = 0
        self.active = 0  # rows of the running batch still decoding
        self.cancelled = 0  # requests whose client went away before their answer was complete
        # Seconds to wait after each decode step: 0 in use; tests and demos set MAMBALLAMA_SERVE_STEP_DELAY to watch
        # streaming (and a client leaving mid-answer) at a human pace.
        import os

        self.step_delay = float(os.environ.get("MAMBALLAMA_SERVE_STEP_DELAY", "0") or 0)
        self.thread = threading.Thread(target=self._loop, name="mamballama-serve", daemon=True)
        self.thread.start()

    @property
    def mode(self) -> str:
        if self.draft is not None:
            return f"speculative, one request at a time (draft {self.draft_name}, k={self.k})"
        return "static-batched" if self.static_reason is None else "one request at a time (transformers)"

    def submit(self, req: Request) -> None:
        self.pending.put(req)

    # --- worker ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        carry: list[Request] = []
        while True:
            first = carry.pop(0) if carry else self.pending.get()
            batch = [first]
            if self.static_reason is None and self.draft is None:
                deadline = time.monotonic() + self.gather_s  # let requests sent together arrive together
                while len(batch) < self.max_batch:
                    try:
                        nxt = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    (batch if nxt.sampling_key == first.sampling_key else carry).append(nxt)
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            try:
                with torch.inference_mode():
                    if self.draft is not None:
                        for r in batch:
                            self._run_speculative(r)
                    elif self.static_reason is None:
                        self._run_static(batch)
                    else:
                        self._run_plain(batch[0])
            except Exception as exc:  # a failed batch answers its requests with the error; the server goes on
                for r in batch:
                    r.finish("error", {"error": f"{type(exc).__name__}: {exc}"})

    def _decoder(self, rows: int, req: Request):
        from mamballama_cli.generation.fast import StaticDecoder
        from mamballama_cli.generation.sampling import SamplingConfig

        size = 1
        while size < rows:
            size *= 2
        size = min(size, self.max_batch)
        key = (size, req.sampling_key)
        dec = self.decoders.get(key)
        if dec is None:
            sampling = SamplingConfig(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
            dec = StaticDecoder(self.model, size, self.max_context, sampling, self.stops, forcing=True,
                                prefill_chunk=self.prefill_chunk)
            self.decoders[key] = dec
        return dec

    def _run_static(self, batch: list[Request]) -> None:
        from mamballama_cli.generation.result import TextStream

        dec = self._decoder(len(batch), batch[0])
        n_rows = dec.batch_size
        prompts = [r.prompt_ids for r in batch] + [batch[-1].prompt_ids] * (n_rows - len(batch))  # pad rows
        lens = [len(p) for p in prompts]
        n0, width = min(lens), max(lens) - min(lens)
        dev = dec.device
        ids = torch.tensor([p[:n0] for p in prompts], dtype=torch.long, device=dev)
        forced = torch.zeros(n_rows, max(width, 1), dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            if len(p) > n0:
                forced[i, : len(p) - n0] = torch.tensor(p[n0:], dtype=torch.long)
        forced_len = torch.tensor([n - n0 for n in lens], dtype=torch.long, device=dev)
        streams = [TextStream(self.tokenizer, r.emit) for r in batch]
        seen = [0] * len(batch)  # tokens of each row received so far (forced prompt tokens included)
        new = [0] * len(batch)
        open_rows = set(range(len(batch)))

        def close(i: int, reason: str) -> None:
            open_rows.discard(i)
            self.active = len(open_rows)
            self.cancelled += reason == "cancelled"
            streams[i].finish()
            batch[i].finish(reason, {"prompt_tokens": lens[i], "completion_tokens": new[i],
                                     "total_tokens": lens[i] + new[i]})

        def take(rows: list[list[int]]) -> None:
            for i in list(open_rows):
                r = batch[i]
                if r.cancelled.is_set():
                    close(i, "cancelled")
                    continue
                for t in rows[i]:
                    seen[i] += 1
                    if seen[i] <= lens[i] - n0:
                        continue  # a forced prompt token
                    new[i] += 1
                    if t in self.stops:
                        close(i, "stop")
                        break
                    streams[i].push([t])
                    if new[i] >= r.max_tokens:
                        close(i, "length")
                        break
            if not open_rows:
                raise _Stop
            if self.step_delay:
                time.sleep(self.step_delay)

        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        self.active = len(batch)
        dec.prefill(ids, forced, forced_len)
        try:
            take(dec.tokens_so_far()[:, :1].tolist())
            steps = max(lens[i] - n0 + batch[i].max_tokens for i in range(len(batch))) - 1
            steps = min(steps, dec.room)
            dec.decode(steps, on_tokens=take, sync_every=1 if not dec.capture else 8)
        except _Stop:
            pass
        for i in list(open_rows):  # the cache is full: what was written is the answer
            close(i, "length")

    def _run_speculative(self, req: Request) -> None:
        from mamballama_cli.generation.result import TextStream
        from mamballama_cli.generation.sampling import SamplingConfig
        from mamballama_cli.generation.speculative import speculative_generate

        if req.cancelled.is_set():
            return
        n_prompt = len(req.prompt_ids)
        max_new = max(1, min(req.max_tokens, self.max_context - n_prompt))
        sampling = SamplingConfig(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, 1)
        self.active = 1
        stream = TextStream(self.tokenizer, req.emit)
        shown = [0]

        def on_tokens(tokens: list[int]) -> None:
            if req.cancelled.is_set():
                raise _Stop
            new = [t for t in tokens[shown[0]:] if t not in self.stops]
            shown[0] = len(tokens)
            stream.push(new)
            if self.step_delay:
                time.sleep(self.step_delay)

        dev = next(self.model.parameters()).device
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=dev)
        try:
            res = speculative_generate(self.model, self.draft, ids, k=self.k, max_new_tokens=max_new,
                                       sampling=sampling, stop_tokens=self.stops, on_tokens=on_tokens)
        except _Stop:
            self.cancelled += 1
            self.active = 0
            req.finish("cancelled", {})
            return
        finally:
            self.active = 0
        out = res.tokens[0]
        stream.finish()
        reason = "stop" if out and out[-1] in self.stops else "length"
        n = len(out) - (reason == "stop")
        req.finish(reason, {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n})

    def _run_plain(self, req: Request) -> None:
        from mamballama_cli.generation.plain import generate
        from mamballama_cli.generation.sampling import SamplingConfig

        sampling = SamplingConfig(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, 1)

        def emit(text: str) -> None:
            if req.cancelled.is_set():
                raise _Stop
            req.emit(text)
            if self.step_delay:
                time.sleep(self.step_delay)

        ids = torch.tensor([req.prompt_ids], dtype=torch.long)
        try:
            res = generate(self.model, self.tokenizer, ids, sampling, on_text=emit, engine="transformers")
        except _Stop:
            self.cancelled += 1
            req.finish("cancelled", {})
            return
        reason = "stop" if res.token_ids and res.token_ids[-1] in self.stops else "length"
        n = len(res.token_ids)
        req.finish(reason, {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n,
                            "total_tokens": len(req.prompt_ids) + n})
