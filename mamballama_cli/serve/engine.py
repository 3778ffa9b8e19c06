"""The serving engine: one worker thread owns the model and decodes every request in flight, several at a time.

Continuous batching (hybrids the static decoder runs): requests join and leave the running batch between decode
steps. A :class:`~mamballama_cli.generation.continuous.SlotDecoder` holds ``--max-batch`` slots of
``--max-context`` positions (CUDA-graph captured on GPU, eager on the PyTorch references on CPU); a new request
takes a free slot at once (its prompt read on a one-row staging runtime and copied into the slot, reusing the
slot's K/V and state buffers), and a row that meets a stop token, its ``max_tokens``, a full slot or a cancel (the
client went away) frees its slot for the next. Every row sits at its own position, so each decodes exactly as if
alone, and samples with its own settings and seed in the same batch as every other. A Llama-family Transformer
(a teacher) is served the same way, as an all-attention hybrid sharing its weights. Models the static decoder
cannot run (other Transformers, Mamba-1) decode one request at a time through transformers' ``generate``.

With a draft (``serve --speculative --draft D``), a greedy request that finds the engine idle decodes by speculative
decoding (:func:`~mamballama_cli.generation.speculative.speculative_generate`; its answer equals the target's own);
requests that queue meanwhile, sampled ones and ones asking for log-probabilities decode in the continuous batch
until it drains (a target the static decoder cannot run: every request speculatively, one at a time).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from collections.abc import Callable

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
    stop: tuple[str, ...] = ()  # OpenAI's `stop`: the answer ends before the first of these strings
    seed: int | None = None  # the same seed, the same sampled answer (alone or in any batch); None: a fresh one
    logprobs: int | None = None  # None: none; k: each answer token's log-probability and the k most likely
    on_logprobs: Callable[[int, float, list], None] = lambda token, logprob, top: None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def sampling(self):
        from mamballama_cli.generation.sampling import SamplingConfig

        return SamplingConfig(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed)


class _Stop(Exception):
    """Raised inside a one-at-a-time decode loop's callback once its client has gone."""


class _Matched(Exception):
    """Raised inside a one-at-a-time decode loop's callback once a stop string appeared."""


def _text_sink(req: Request):
    """(where a request's decoded text goes, its stop-string filter or None)."""
    from mamballama_cli.generation.result import StopText

    cut = StopText(req.stop, req.emit) if req.stop else None
    return (cut.push if cut else req.emit), cut


def _fail(req: Request, exc: Exception) -> None:
    """Answer ``req`` with the error (the server goes on serving the others)."""
    req.finish("error", {"error": f"{type(exc).__name__}: {exc}"})


class _Row:
    """A request decoding in a slot: its text stream and counts. :meth:`take` returns True once it is done."""

    def __init__(self, req: Request, tokenizer):
        from mamballama_cli.generation.result import TextStream

        sink, self.cut = _text_sink(req)
        self.req, self.stream = req, TextStream(tokenizer, sink)
        self.new, self.reason, self.eos = 0, "length", False
        self.cached = 0  # prompt tokens whose state came from the prefix cache

    def take(self, token: int, stops, logprob=None) -> bool:
        """``logprob``: (the token's log-probability, the most likely tokens with theirs), for a request that
        asked for them."""
        if self.req.cancelled.is_set():
            self.reason = "cancelled"
            return True
        self.new += 1
        if token in stops:
            self.reason, self.eos = "stop", True
            return True
        if logprob is not None:
            self.req.on_logprobs(token, *logprob)
        self.stream.push([token])
        if self.cut is not None and self.cut.matched:
            self.reason = "stop"
            return True
        return self.new >= self.req.max_tokens

    def finish(self) -> None:
        self.stream.finish()
        if self.cut is not None:
            self.reason = "stop" if self.cut.matched and self.reason == "length" else self.reason  # in the last text
            self.cut.flush()
        n_prompt = len(self.req.prompt_ids)
        n = self.new - self.eos  # the stop token is not part of the answer; a stop string's last token is
        if self.reason == "cancelled":
            self.req.finish("cancelled", {})
            return
        self.req.finish(self.reason, {"prompt_tokens": n_prompt, "completion_tokens": n,
                                      "total_tokens": n_prompt + n, "cached_tokens": self.cached})

    def fail(self, exc: Exception) -> None:
        _fail(self.req, exc)


class Engine:
    """Owns the model on one worker thread; :meth:`submit` queues a request and returns at once."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_context: int = 4096,
                 prefill_chunk: int | None = None, draft=None, k: int = 4, draft_name: str = "",
                 prefix_cache_bytes: int = 0, prefill_per_step: int = 0, pieces: str | None = None):
        from mamballama_cli.generation.fast import unsupported_reason
        from mamballama_cli.generation.result import stop_token_ids
        from mamballama_cli.generation.runners import as_hybrid, is_hybrid

        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_context = int(max_batch), int(max_context)
        self.prefill_chunk = prefill_chunk
        # while rows decode, prompt tokens read between two steps (0: whole prompts): a long prompt joins over
        # several steps, so the running answers never wait for all of it
        self.prefill_per_step = int(prefill_per_step)
        self.pieces = pieces  # how the slot decoder reads short prompts (SlotDecoder's pieces; None: by device)
        self.reading = None  # (request, its Reading): the prompt being read into a slot, a piece per step
        self.read_in_pieces = 0  # requests whose prompt was read over more than one step
        self.prefix_cache_bytes = int(prefix_cache_bytes)  # continuous batching's prefix cache; 0: none
        self.draft, self.k, self.draft_name = draft, int(k), draft_name
        self.stops = stop_token_ids(model, tokenizer)
        # A Llama-family Transformer decodes exactly as an all-attention hybrid sharing its weights (as_hybrid):
        # batched on the static decoder too, so a teacher and its hybrid are served by the same engine.
        self.static_model = model if is_hybrid(model) else (as_hybrid(model) or model)
        self.static_reason = unsupported_reason(self.static_model)  # None: batched on the static decoder
        self.pending: queue.Queue[Request] = queue.Queue()
        self.decoder = None  # the SlotDecoder, built at the first request (continuous batching)
        self.batches = 0  # batches run (continuous: runs from an idle engine until it drains), and the largest
        self.largest_batch = 0
        self.joined_running = 0  # requests that joined a batch already decoding (continuous batching)
        self.active = 0  # rows of the running batch still decoding
        self.cancelled = 0  # requests whose client went away before their answer was complete
        self.speculative_runs = 0  # requests answered by speculative decoding (with a draft)
        # Seconds to wait after each decode step: 0 in use; tests and demos set MAMBALLAMA_SERVE_STEP_DELAY to watch
        # streaming (and a client leaving mid-answer) at a human pace.
        import os

        self.step_delay = float(os.environ.get("MAMBALLAMA_SERVE_STEP_DELAY", "0") or 0)
        self.thread = threading.Thread(target=self._loop, name="mamballama-serve", daemon=True)
        self.thread.start()

    def prefix_stats(self) -> dict:
        """The prefix cache's entries, bytes held, hits and prompt tokens it spared (zeros without one)."""
        cache = getattr(self.decoder, "prefix", None)
        if cache is None:
            return {"entries": 0, "bytes": 0, "budget_bytes": self.prefix_cache_bytes, "hits": 0, "tokens_reused": 0}
        return {"entries": len(cache), "bytes": cache.bytes, "budget_bytes": cache.budget, "hits": cache.hits,
                "tokens_reused": cache.tokens_reused}

    @property
    def serves_logprobs(self) -> bool:
        """Log-probabilities come with continuous batching (the static decoder's logits; with a draft, such a
        request decodes in the batch), not with transformers' one-at-a-time decoding."""
        return self.static_reason is None

    @property
    def mode(self) -> str:
        if self.draft is not None:
            if self.static_reason is None:
                return (f"speculative when alone, continuous-batched under load (draft {self.draft_name}, "
                        f"k={self.k})")
            return f"speculative, one request at a time (draft {self.draft_name}, k={self.k})"
        if self.static_reason is not None:
            return "one request at a time (transformers)"
        return "continuous-batched" + ("" if self.static_model is self.model else " (as an all-attention hybrid)")

    def submit(self, req: Request) -> None:
        self.pending.put(req)

    # --- worker ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.static_reason is None and self.draft is None:
            self._continuous()
        while True:
            req = self.pending.get()
            if req.cancelled.is_set():
                continue
            if self.draft is not None and self.static_reason is None and (
                    req.temperature > 0 or req.logprobs is not None or not self.pending.empty()):
                # under load (others waiting), sampled (a seed then gives the batch's answer, the same alone or
                # not) or asking for log-probabilities: the continuous batch, until it drains
                self._continuous(start=req)
                continue
            try:
                with torch.inference_mode():
                    if self.draft is not None:
                        self._run_speculative(req)
                    else:
                        self._run_plain(req)
            except Exception as exc:  # a failed request is answered with the error; the server goes on
                _fail(req, exc)

    def _decoder(self):
        from mamballama_cli.generation.continuous import SlotDecoder

        if self.decoder is None:
            self.decoder = SlotDecoder(self.static_model, self.max_batch, self.max_context,
                                       prefill_chunk=self.prefill_chunk, prefix_cache_bytes=self.prefix_cache_bytes,
                                       pieces=self.pieces)
        return self.decoder

    def _continuous(self, start: Request | None = None) -> None:
        """The worker's loop for continuous batching: forever, or with ``start`` (speculative serving under load),
        from that request until the batch drains and nobody waits."""
        waiting: list[Request] = [start] if start is not None else []
        rows: dict[int, _Row] = {}  # slot -> the request decoding there
        dec = None
        while True:
            if not rows and not waiting and self.reading is None:
                if start is not None and self.pending.empty():
                    return  # drained: the next request alone may decode speculatively again
                waiting.append(self.pending.get())  # idle: block until a request comes
            while True:
                try:
                    waiting.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            if not rows and self.reading is None:  # idle until now: a new run of batches
                waiting = [r for r in waiting if not r.cancelled.is_set()]
                if not waiting:
                    continue
                dec = self._decoder()
                self.batches += 1
            self._admit(dec, rows, waiting)
            self.active = len(rows)
            self.largest_batch = max(self.largest_batch, len(rows))
            if not rows:
                continue
            try:
                with torch.inference_mode():
                    tokens = dec.step()
                    asked = [s for s in rows if rows[s].req.logprobs is not None]
                    lps = dict(zip(asked, dec.logprobs(asked, max(rows[s].req.logprobs for s in asked)))) \
                        if asked else {}
            except Exception as exc:  # a failed step answers its rows with the error; the server goes on
                for slot in list(rows):
                    rows[slot].fail(exc)
                    dec.leave(slot)
                    del rows[slot]
                self.active = 0
                continue
            for slot in list(rows):
                lp = lps.get(slot)
                if lp is not None:  # each request gets the number of most likely tokens it asked for
                    lp = (lp[0], lp[1][: rows[slot].req.logprobs])
                if rows[slot].take(tokens[slot], self.stops, lp) or dec.room(slot) <= 0:
                    self._close(dec, rows, slot)
            self.active = len(rows)
            if self.step_delay:
                time.sleep(self.step_delay)

    def _admit(self, dec, rows: dict, waiting: list) -> None:
        """Waiting requests take free slots, their prompts read on the decoder's staging runtime. While rows decode,
        at most ``prefill_per_step`` prompt tokens are read before the next step: a longer prompt goes on at the
        next (``SlotDecoder.begin``/``advance``/``finish``). An idle batch reads whole prompts."""
        budget = self.prefill_per_step if rows and self.prefill_per_step > 0 else None
        while budget is None or budget > 0:
            if self.reading is None:
                while waiting and waiting[0].cancelled.is_set():
                    waiting.pop(0)
                if not waiting or not dec.free:
                    return
                # (the request, its Reading once begun, the steps it has been read over so far)
                self.reading = (waiting.pop(0), None, [0])
            req, r, calls = self.reading
            if req.cancelled.is_set():  # the client left before its first token
                if r is not None:
                    dec.drop(r)
                self.reading = None
                self.cancelled += 1
                req.finish("cancelled", {})
                continue
            calls[0] += 1
            slot = None
            try:
                with torch.inference_mode():
                    if r is None:
                        r = dec.begin(req.prompt_ids, req.sampling, req.seed)
                        self.reading = (req, r, calls)
                    read = dec.advance(r, budget)
                    if r.done:
                        row = _Row(req, self.tokenizer)
                        slot, first = dec.finish(r)
                        row.cached = dec.cached[slot]
                        lp = None if req.logprobs is None else dec.logprobs([slot], req.logprobs)[0]
            except Exception as exc:  # a failed request is answered with the error; the others go on
                if slot is not None:
                    dec.leave(slot)
                elif r is not None:
                    dec.drop(r)
                self.reading = None
                _fail(req, exc)
                continue
            if budget is not None:
                budget -= read
            if not r.done:
                return  # the rest after the next step
            self.reading = None
            self.read_in_pieces += calls[0] > 1
            self.joined_running += bool(rows)
            rows[slot] = row
            if row.take(first, self.stops, lp) or dec.room(slot) <= 0:
                self._close(dec, rows, slot)

    def _close(self, dec, rows: dict, slot: int) -> None:
        row = rows.pop(slot)
        dec.leave(slot)
        self.cancelled += row.reason == "cancelled"
        self.active = len(rows)  # before the answer goes out: a client reading /health next sees its row gone
        row.finish()

    def _run_speculative(self, req: Request) -> None:
        from mamballama_cli.generation.result import TextStream
        from mamballama_cli.generation.speculative import speculative_generate

        if req.cancelled.is_set():
            return
        n_prompt = len(req.prompt_ids)
        max_new = max(1, min(req.max_tokens, self.max_context - n_prompt))
        sampling = replace(req.sampling, max_new_tokens=max_new)
        self.batches += 1
        self.speculative_runs += 1
        self.largest_batch = max(self.largest_batch, 1)
        self.active = 1
        sink, cut = _text_sink(req)
        stream = TextStream(self.tokenizer, sink)
        shown = [0]

        def on_tokens(tokens: list[int]) -> None:
            if req.cancelled.is_set():
                raise _Stop
            new = [t for t in tokens[shown[0]:] if t not in self.stops]
            shown[0] = len(tokens)
            stream.push(new)
            if cut is not None and cut.matched:
                raise _Matched
            if self.step_delay:
                time.sleep(self.step_delay)

        dev = next(self.model.parameters()).device
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=dev)
        try:
            res = speculative_generate(self.model, self.draft, ids, k=self.k, max_new_tokens=max_new,
                                       sampling=sampling, stop_tokens=self.stops, on_tokens=on_tokens, seed=req.seed)
        except _Stop:
            self.cancelled += 1
            self.active = 0
            req.finish("cancelled", {})
            return
        except _Matched:  # a stop string: the round's tokens so far were generated (some after the string)
            n = shown[0]
            self.active = 0
            req.finish("stop", {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n})
            return
        finally:
            self.active = 0
        out = res.tokens[0]
        stream.finish()
        if cut is not None:
            cut.flush()
        eos = bool(out) and out[-1] in self.stops
        reason = "stop" if eos or (cut is not None and cut.matched) else "length"
        n = len(out) - eos  # the stop token is not part of the answer
        req.finish(reason, {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n})

    def _run_plain(self, req: Request) -> None:
        from mamballama_cli.generation.plain import generate

        sampling = req.sampling
        self.batches += 1
        self.largest_batch = max(self.largest_batch, 1)

        sink, cut = _text_sink(req)
        seen: list[str] = []

        def emit(text: str) -> None:
            if req.cancelled.is_set():
                raise _Stop
            seen.append(text)
            sink(text)
            if cut is not None and cut.matched:
                raise _Matched
            if self.step_delay:
                time.sleep(self.step_delay)

        ids = torch.tensor([req.prompt_ids], dtype=torch.long)
        try:
            res = generate(self.model, self.tokenizer, ids, sampling, on_text=emit, engine="transformers")
        except _Stop:
            self.cancelled += 1
            req.finish("cancelled", {})
            return
        except _Matched:  # the tokens generated, counted by tokenising the text decoded up to the stop string
            n = len(self.tokenizer("".join(seen), add_special_tokens=False)["input_ids"])
            req.finish("stop", {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n,
                                "total_tokens": len(req.prompt_ids) + n})
            return
        if cut is not None:
            cut.flush()
        reason = "stop" if res.token_ids and res.token_ids[-1] in self.stops else "length"
        n = len(res.token_ids)
        req.finish(reason, {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n,
                            "total_tokens": len(req.prompt_ids) + n})
