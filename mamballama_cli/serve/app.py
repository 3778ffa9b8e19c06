"""The OpenAI-compatible HTTP face of the engine (FastAPI): /v1/models, /v1/completions, /v1/chat/completions;
/health, and /metrics in Prometheus' text format (serve/metrics.py).

Bad input is answered with OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``, and a status:
400 for a body that is not JSON (or not an object), 404 for an unknown model, 413 for a prompt longer than
``--max-context``, 422 for a field with a wrong type or value. Nothing a client sends stops the server. A client
that goes away mid-stream cancels its request; the engine frees its row at the next step.
"""


import asyncio
import functools
import itertools
import json
import time
from dataclasses import dataclass

from mamballama_cli.serve.engine import Engine, Request
from mamballama_cli.serve.metrics import Metrics


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


@dataclass
class Job:
    """What the HTTP side keeps of one HTTP request: the engine's ``Request`` per choice (OpenAI's ``n``) and the
    queue their events land in, as (choice, kind, value)."""

    reqs: list[Request]
    events: asyncio.Queue
    prompt_of: list[int]  # choice -> the prompt it answers (a list of prompts times n choices each)

    @property
    def req(self) -> Request:
        return self.reqs[0]

    def cancel(self) -> None:
        for r in self.reqs:
            r.cancelled.set()


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise ApiError(422, f"{name} must be a number in [{lo}, {hi}], got {v!r}", name)
    return float(v)


def _max_tokens(body: dict, default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            v = body[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ApiError(422, f"{name} must be a positive integer, got {v!r}", name)
            return v
    return default


def _integer(body: dict, name: str, lo: int, hi: int, what: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(422, f"{name} must be {what}, got {v!r}", name)
    return v


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many most likely tokens to give beside each answer token's log-probability; None: no log-probabilities.
    Chat: ``logprobs`` (bool) and ``top_logprobs`` (0-20); completions: ``logprobs`` (0-20, vLLM's bound)."""
    if body.get("echo"):
        raise ApiError(422, "echo is not supported: send the prompt's continuation only (echo false)", "echo")
    if not chat:
        return _integer(body, "logprobs", 0, 20, "an integer from 0 to 20 (or null)")
    on = body.get("logprobs")
    if on is not None and not isinstance(on, bool):
        raise ApiError(422, f"logprobs must be true or false, got {on!r}", "logprobs")
    top = _integer(body, "top_logprobs", 0, 20, "an integer from 0 to 20")
    if top is not None and not on:
        raise ApiError(422, "top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if on else None


def _is_ids(v: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _stop_strings(body: dict) -> tuple[str, ...]:
    """OpenAI's ``stop``: a string or a list of at most 4, each non-empty (null: none)."""
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not 1 <= len(items) <= 4 or \
            not all(isinstance(x, str) and x for x in items):
        raise ApiError(422, f"stop must be a non-empty string or a list of 1 to 4 of them, got {v!r}", "stop")
    return tuple(items)


def create_app(engine: Engine, model_name: str, max_context: int, default_max_tokens: int = 256,
               api_key: str | None = None):
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="mamballama serve", version="1")
    created = int(time.time())
    tok = engine.tokenizer
    metrics = Metrics()

    if api_key:
        import hmac

        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def _auth(request: HttpRequest, call_next):  # /v1/* only: /health and /metrics stay open, as vLLM's
            given = request.headers.get("authorization", "").encode()
            if request.url.path.startswith("/v1/") and not hmac.compare_digest(given, expected):
                metrics.reject(401)
                return JSONResponse(status_code=401, content={"error": {
                    "message": "invalid or missing API key: send the header 'Authorization: Bearer <key>' with the "
                               "key the server was started with (--api-key)",
                    "type": "invalid_request_error", "param": None, "code": 401}})
            return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        metrics.reject(exc.status)
        return JSONResponse(status_code=exc.status, content={"error": {
            "message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.status}})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mamballama"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "mode": engine.mode, "batches": engine.batches,
                "largest_batch": engine.largest_batch, "joined_running": engine.joined_running,
                "waiting": engine.pending.qsize(), "active": engine.active, "cancelled": engine.cancelled,
                "speculative_runs": engine.speculative_runs, "read_in_pieces": engine.read_in_pieces,
                "prefix_cache": engine.prefix_stats()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine, model_name), media_type="text/plain; version=0.0.4")

    async def read_body(request: HttpRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        name = body.get("model")
        if name is not None and name != model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r}", "model",
                           "not_found_error")
        _integer(body, "n", 1, 16, "an integer from 1 to 16")
        if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
            raise ApiError(422, f"stream must be true or false, got {body.get('stream')!r}", "stream")
        return body

    def make_job(body: dict, prompts: list[list[int]], endpoint: str) -> Job:
        """The engine's requests for ``prompts`` (token ids), ``n`` choices each: choice i * n + j is prompt i's
        j-th (with a ``seed``, drawn from seed + j)."""
        logprobs = _logprobs(body, endpoint == "/v1/chat/completions")
        if logprobs is not None and not engine.serves_logprobs:
            raise ApiError(422, f"logprobs come with continuous batching; this server runs {engine.mode}",
                           "logprobs")
        longest = max(len(p) for p in prompts)
        if longest >= max_context:
            raise ApiError(413, f"the prompt has {longest} tokens; this server's --max-context is "
                                f"{max_context}", "messages" if "messages" in body else "prompt")
        asked_tokens = _max_tokens(body, default_max_tokens)
        temperature, top_p = _number(body, "temperature", 1.0, 0.0, 2.0), _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0.0:
            raise ApiError(422, "top_p must be greater than 0", "top_p")
        top_k = _integer(body, "top_k", -1, 2**31 - 1, "an integer, -1 or 0 for off (vLLM's extension)") or 0
        seed = _integer(body, "seed", -2**63, 2**63 - 1, "an integer")
        stop, n = _stop_strings(body), body.get("n") or 1
        if len(prompts) * n > 256:
            raise ApiError(422, f"{len(prompts)} prompts x n={n} is {len(prompts) * n} answers; one request asks for "
                                "at most 256: send fewer prompts or a smaller n", "n")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        t0, texts, ends = time.perf_counter(), [], {}
        prompt_of = [i for i in range(len(prompts)) for _ in range(n)]

        def emit(i: int, text: str) -> None:  # on the engine's thread: the metrics and the queue belong to the loop
            if not texts:
                texts.append(True)
                loop.call_soon_threadsafe(metrics.first_text, time.perf_counter() - t0)
            loop.call_soon_threadsafe(events.put_nowait, (i, "text", text))

        def on_logprobs(i: int, token: int, logprob: float, top: list) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (i, "lp", (token, logprob, top)))

        def finish(i: int, reason: str, usage: dict) -> None:  # counted (once per HTTP request) even when the
            ends[i] = usage  # client has gone
            if len(ends) == len(prompt_of):
                loop.call_soon_threadsafe(metrics.end, endpoint, time.perf_counter() - t0, reason,
                                          usage_of(ends, prompt_of))
            loop.call_soon_threadsafe(events.put_nowait, (i, "end", (reason, usage)))

        reqs = [Request(prompts[p], min(asked_tokens, max_context - len(prompts[p])), temperature=temperature,
                        top_p=top_p, top_k=max(top_k, 0), emit=functools.partial(emit, i),
                        finish=functools.partial(finish, i), stop=stop,
                        seed=None if seed is None else (seed + i % n) % 2**63, logprobs=logprobs,
                        on_logprobs=functools.partial(on_logprobs, i)) for i, p in enumerate(prompt_of)]
        return Job(reqs, events, prompt_of)

    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):  # unknown routes and methods, in OpenAI's shape too
        metrics.reject(exc.status_code)
        return JSONResponse(status_code=exc.status_code, content={"error": {
            "message": f"{exc.detail}: this server has /v1/models, /v1/completions and /v1/chat/completions",
            "type": "invalid_request_error", "param": None, "code": exc.status_code}})

    @app.exception_handler(Exception)
    async def _any_error(_request, exc: Exception):
        metrics.reject(500)
        return JSONResponse(status_code=500, content={"error": {
            "message": f"{type(exc).__name__}: {exc}", "type": "server_error", "param": None, "code": 500}})

    async def run_to_end(job: Job) -> list[tuple[str, str, dict, list]]:
        """Every choice's (text, finish reason, usage, log-probabilities), once all have ended."""
        for r in job.reqs:
            engine.submit(r)
        parts = [[] for _ in job.reqs]
        entries = [[] for _ in job.reqs]
        ends: dict[int, tuple] = {}
        while len(ends) < len(job.reqs):
            try:
                i, kind, value = await job.events.get()
            except asyncio.CancelledError:  # the client went away
                job.cancel()
                raise
            if kind == "text":
                parts[i].append(value)
            elif kind == "lp":
                entries[i].append(value)
            else:
                reason, usage = value
                if reason == "error":
                    job.cancel()
                    raise ApiError(500, usage.get("error", "generation failed"), kind="server_error")
                ends[i] = (reason, usage)
        return [("".join(parts[i]), *ends[i], entries[i]) for i in range(len(job.reqs))]

    async def stream(job: Job, request: HttpRequest, chunk, include_usage: bool = False):
        """Server-sent events: one chunk per piece of text (per choice, ``index`` saying which), a last one per
        choice with its finish reason (and with ``stream_options.include_usage``, one with no choices and the usage,
        as OpenAI's API), then [DONE]."""
        for r in job.reqs:
            engine.submit(r)
        entries = [[] for _ in job.reqs]  # log-probabilities of tokens not yet sent, attached to the next chunk
        usages, last = {}, None
        try:
            for i in range(len(job.reqs)):
                first = chunk(i, None, None)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
            while len(usages) < len(job.reqs):
                try:
                    i, kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "lp":
                    entries[i].append(value)
                elif kind == "text":
                    yield f"data: {json.dumps(chunk(i, value, None, entries[i]))}\n\n"
                    entries[i] = []
                else:
                    reason, usage = value
                    if reason == "error":
                        yield f"data: {json.dumps({'error': {'message': usage.get('error'), 'type': 'server_error'}})}\n\n"
                        break
                    last = chunk(i, '', reason, entries[i])
                    yield f"data: {json.dumps(last)}\n\n"
                    usages[i] = usage
            if include_usage and last is not None and len(usages) == len(job.reqs):
                yield f"data: {json.dumps({**last, 'choices': [], 'usage': usage_of(usages, job.prompt_of)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the response was cancelled) or the stream ended: free the rows
            job.cancel()

    def chat_logprobs(entries) -> dict:
        """OpenAI's chat ``logprobs``: per answer token its text, log-probability, UTF-8 bytes and the most likely
        tokens with theirs."""
        def one(token: int, logprob: float) -> dict:
            text = tok.decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**one(t, lp), "top_logprobs": [one(j, v) for j, v in top]} for t, lp, top in entries]}

    def completion_logprobs(entries, offset: int) -> dict:
        """The completions API's ``logprobs``: tokens, their log-probabilities, the most likely tokens as
        {text: log-probability}, and each token's character offset in the answer (from ``offset``)."""
        tokens = [tok.decode([t]) for t, _, _ in entries]
        starts = list(itertools.accumulate((len(x) for x in tokens[:-1]), initial=offset))[: len(tokens)]
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{tok.decode([j]): v for j, v in top} for _, _, top in entries], "text_offset": starts}

    def wants_usage(body: dict) -> bool:
        opts = body.get("stream_options")
        return isinstance(opts, dict) and bool(opts.get("include_usage"))

    def usage_of(usages: dict[int, dict], prompt_of: list[int]) -> dict:
        """OpenAI's usage of one HTTP request: each prompt once, the completion tokens of every choice; cached: per
        prompt, the fewest any of its choices found in the prefix cache (what earlier requests left)."""
        prompt = cached = 0
        for p in set(prompt_of):
            group = [u for i, u in usages.items() if prompt_of[i] == p]
            if group:
                prompt += max(u.get("prompt_tokens", 0) for u in group)
                cached += min(u.get("cached_tokens", 0) for u in group)
        done = sum(u.get("completion_tokens", 0) for u in usages.values())
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def reason_of(reason: str) -> str:
        return reason if reason in ("stop", "length") else "stop"

    vocab = int(getattr(engine.model.config, "vocab_size", 0) or 0) or len(tok)

    def read_prompts(prompt) -> list[list[int]]:
        """The completions API's ``prompt``: a string, token ids, or a list of up to 64 of either (one choice set
        each); -> token ids per prompt."""
        what = "prompt must be a non-empty string, a list of token ids, or a list of up to 64 of either"
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_ids(prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not 1 <= len(prompt) <= 64:
            raise ApiError(422, what, "prompt")
        out = []
        for p in prompt:
            if isinstance(p, str) and p:
                out.append(tok(p)["input_ids"])
            elif isinstance(p, list) and p and _is_ids(p):
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise ApiError(422, f"prompt token id {bad[0]} is outside this model's vocabulary [0, {vocab})",
                                   "prompt")
                out.append(list(p))
            else:
                raise ApiError(422, what, "prompt")
        return out

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await read_body(request)
        job = make_job(body, read_prompts(body.get("prompt")), "/v1/completions")
        cid, now, asked = f"cmpl-{job.req.id}", int(time.time()), job.req.logprobs is not None
        if body.get("stream"):
            offset = [0] * len(job.reqs)  # per choice, characters of its tokens sent: the next first text_offset

            def chunk(i, text, reason, entries=()):
                if text is None:
                    return None
                lp = completion_logprobs(entries, offset[i]) if asked else None
                if lp is not None:
                    offset[i] += sum(len(t) for t in lp["tokens"])
                return {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": lp}]}

            return StreamingResponse(stream(job, request, chunk, wants_usage(body)), media_type="text/event-stream")
        done = await run_to_end(job)
        return {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": i, "text": text, "finish_reason": reason_of(reason),
                             "logprobs": completion_logprobs(entries, 0) if asked else None}
                            for i, (text, reason, _, entries) in enumerate(done)],
                "usage": usage_of({i: u for i, (_, _, u, _) in enumerate(done)}, job.prompt_of)}

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        body = await read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(422, "messages must be a non-empty list of {role, content} objects", "messages")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                    not isinstance(m.get("content"), str):
                raise ApiError(422, "each message needs a role (system, user or assistant) and a string content",
                               "messages")
        if not getattr(tok, "chat_template", None):
            raise ApiError(422, f"model {model_name!r} has no chat template; use /v1/completions", "messages")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        job = make_job(body, [tok(text, add_special_tokens=False)["input_ids"]], "/v1/chat/completions")
        cid, now, asked = f"chatcmpl-{job.req.id}", int(time.time()), job.req.logprobs is not None
        if body.get("stream"):
            def chunk(i, text, reason, entries=()):
                delta = {"role": "assistant", "content": ""} if text is None else (
                    {"content": text} if text else {})
                choice = {"index": i, "delta": delta, "finish_reason": reason}
                if asked:
                    choice["logprobs"] = chat_logprobs(entries)
                return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [choice]}

            return StreamingResponse(stream(job, request, chunk, wants_usage(body)), media_type="text/event-stream")
        done = await run_to_end(job)
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": answer},
                             "logprobs": chat_logprobs(entries) if asked else None,
                             "finish_reason": reason_of(reason)} for i, (answer, reason, _, entries) in enumerate(done)],
                "usage": usage_of({i: u for i, (_, _, u, _) in enumerate(done)}, job.prompt_of)}

    return app
