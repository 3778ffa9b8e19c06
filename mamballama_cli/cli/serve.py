"""`mamballama serve MODEL`: an OpenAI-compatible HTTP server (mamballama_cli/serve/)."""

from __future__ import annotations

from typing import Optional

import typer

from mamballama_cli.cli.options import device_option, dtype_option

HELP = ("Serve a hybrid or Transformer checkpoint over OpenAI's HTTP API (/v1/models, /v1/completions, "
        "/v1/chat/completions with stream): waiting requests decode together on the static decoder.")


def command(
    model: str = typer.Argument(..., help="Checkpoint directory (hybrid or transformers model), or 'default'."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0 = any free port)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Requests decoded together at most."),
    max_context: Optional[int] = typer.Option(None, "--max-context", min=8, help="Prompt + answer tokens of one "
                                              "request at most; longer prompts get HTTP 413 (default: the model's "
                                              "context length, at most 4096)."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Answer length when a request sets none."),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", min=1, help="Prompt tokens per row read "
                                                "in one piece (default: 4096, fewer for a large batch): bounds "
                                                "prefill memory."),
    prefill_per_step: int = typer.Option(0, "--prefill-per-step", min=0, help="While answers decode, prompt "
                                         "tokens read between two decode steps: a longer prompt joins over several "
                                         "steps, so streaming answers never stall for a whole long prompt, at some "
                                         "cost in throughput (docs/serve.md); 0: each prompt whole."),
    prompt_pieces: str | None = typer.Option(None, "--prompt-pieces", help="How a prompt of at most 1,024 "
                                                "tokens is read: 'graph' (the layer walk, one CUDA graph per piece "
                                                "length; the default on CUDA), 'walk' (the same walk, eagerly) or "
                                                "'forward' (the model's own forward; the default on CPU)."),
    prefix_cache_gb: float = typer.Option(4.0, "--prefix-cache-gb", min=0.0, help="Memory (GB, on the model's "
                                          "device) for decoding states kept after each prompt and answer, so a "
                                          "prompt that repeats or extends an earlier one (a chat's next turn, n "
                                          "choices) resumes from there; least recently used dropped first; 0: off."),
    name: Optional[str] = typer.Option(None, "--name", help="Model id in the API (default: the folder's name)."),
    speculative: bool = typer.Option(False, "--speculative", help="Speculative decoding for a greedy request "
                                     "that finds the server idle (lossless); requests that queue meanwhile decode "
                                     "batched. With --draft or, without it, lookup:3:gate=2."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Draft for --speculative: lookup[:N][:TABLE][:gate=M] "
                                        "(no model), a checkpoint directory (`convert --draft-layers`) or a draft "
                                        "provider (e.g. self, layers:0,29). Implies --speculative."),
    k: int | None = typer.Option(None, "-k", "--k", min=1, max=32, help="Draft tokens proposed per round "
                                    "(--speculative; default 6 with a lookup draft, 4 with a model)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="MAMBALLAMA_API_KEY", show_default=False,
                                       help="Require 'Authorization: Bearer KEY' on /v1/* (HTTP 401 otherwise), "
                                       "as OpenAI's clients send it (api_key=KEY); /health and /metrics stay "
                                       "open. Better from the environment than on the command line."),
    dtype: str = dtype_option(default="auto"),
    device: str = device_option(default="auto"),
):
    import importlib.util

    from mamballama_cli.errors import UsageError

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"serve needs {' and '.join(missing)}: pip install 'mamballama[serve]'")
    if prompt_pieces not in (None, "graph", "walk", "forward"):
        raise UsageError(f"--prompt-pieces {prompt_pieces}: give graph, walk or forward")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty: give a key, or leave it out to serve without one")
    from pathlib import Path

    import uvicorn

    from mamballama_cli.cli.common import err, load_with_context
    from mamballama_cli.serve.app import create_app
    from mamballama_cli.serve.engine import Engine

    import socket

    try:  # bind first, so that a taken port is one line and port 0 reports the port the system gave
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # connections wait in the backlog from here on, not refused before uvicorn starts
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); pick another "
                         "port, or 0 for any free one") from None
    if draft or speculative:
        from mamballama_cli.generation.speculative_run import DEFAULT_DRAFT, default_k, resolve_draft

        draft = draft or DEFAULT_DRAFT
        k = default_k(draft) if k is None else k
        resolve_draft(draft)  # a bad --draft fails before any weights are read
    lm, tok, path, ctx = load_with_context(model, dtype, device, max_context, "serve")
    if prompt_pieces == "graph" and next(lm.parameters()).device.type != "cuda":
        raise UsageError("--prompt-pieces graph records CUDA graphs and the model is not on a GPU: give walk or "
                         "forward")
    model_name = name or Path(str(path)).name
    draft_model, draft_name = None, ""
    if draft:
        from mamballama_cli.generation.speculative_run import prepare_pair

        lm, draft_model, draft_name = prepare_pair(lm, tok, path, model, draft, dtype, device)
    engine = Engine(lm, tok, max_batch=max_batch, max_context=ctx, prefill_chunk=prefill_chunk, draft=draft_model,
                    k=k or 4, draft_name=draft_name, prefix_cache_bytes=int(prefix_cache_gb * 1e9),
                    prefill_per_step=prefill_per_step, pieces=prompt_pieces)
    app = create_app(engine, model_name, ctx, default_max_tokens=max_tokens, api_key=api_key)
    err(f"serving {model_name} ({engine.mode}, up to {max_batch} at once, context {ctx})"
        + ("; /v1/* needs the API key" if api_key else ""))
    err(f"listening on http://{host}:{sock.getsockname()[1]}/v1")
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
