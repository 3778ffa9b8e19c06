"""A minimal OpenAI-compatible chat-completions server for a local checkpoint (a judge on offline machines).

    python -m mamballama_cli.evaluation.judge_server MODEL [--host 127.0.0.1] [--port 8000]
    mamballama eval H --tasks mt-bench --judge-base-url http://127.0.0.1:8000/v1 --judge-model NAME

Serves ``POST /v1/chat/completions`` (greedy decoding with the model's chat template; ``max_tokens``
honoured up to ``--max-new-tokens``) and ``GET /v1/models``. One request is decoded at a time.
No authentication: it binds to 127.0.0.1 unless told otherwise. Judge quality is the served model's:
the report labels any judge other than the benchmark's reference judge.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_server(model, tokenizer, name: str, host: str = "127.0.0.1", port: int = 8000,
                max_new_tokens: int = 512) -> ThreadingHTTPServer:
    from mamballama_cli.evaluation.chat import chat_reply

    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # requests go to stderr only with --verbose (see main)
            if getattr(self.server, "verbose", False):
                sys.stderr.write("judge-server: " + fmt % args + "\n")

        def _send(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _read_request(self):
            """((messages, max_tokens), None) for a valid chat-completions body, else (None, what is wrong)."""
            try:
                length = int(self.headers.get("Content-Length", 0))
                req = json.loads(self.rfile.read(length)) if length > 0 else None
            except (ValueError, UnicodeDecodeError):
                return None, "body must be JSON with messages: [{role, content}, ...]"
            if not isinstance(req, dict):
                return None, "body must be a JSON object with messages: [{role, content}, ...]"
            msgs = req.get("messages")
            if not isinstance(msgs, list) or not msgs:
                return None, "messages must be a non-empty list of {role, content} objects"
            messages = []
            for m in msgs:
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict)) or None
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                    return None, "every message must be an object with a string role and a string content"
                messages.append({"role": m["role"], "content": content})
            limit = req.get("max_tokens", req.get("max_completion_tokens"))
            if limit is None:
                limit = max_new_tokens
            elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                return None, f"max_tokens must be a positive integer, got {limit!r}"
            return (messages, min(limit, max_new_tokens)), None

        def do_GET(self):
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "local"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}; use /v1/chat/completions"}})
                return
            req, problem = self._read_request()
            if problem:
                self._send(400, {"error": {"message": problem, "type": "invalid_request_error"}})
                return
            messages, limit = req
            try:
                with lock:
                    text = chat_reply(model, tokenizer, messages, limit)
            except Exception as exc:  # answer the client instead of dropping the connection
                self._send(500, {"error": {"message": f"generation failed: {type(exc).__name__}: {exc}",
                                           "type": "server_error"}})
                return
            self._send(200, {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                             "created": int(time.time()), "model": name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}]})

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mamballama_cli.evaluation.judge_server",
                                     description="Serve a local checkpoint as an OpenAI-compatible chat endpoint.")
    parser.add_argument("model", help="checkpoint directory or 'default'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default=None, help="model id to report (default: the checkpoint folder name)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    from mamballama_cli.errors import MamballamaError
    from mamballama_cli.loading import load_causal_lm

    try:
        model, tok, path = load_causal_lm(args.model, dtype=args.dtype, device=args.device)
        if tok is None:
            raise MamballamaError(f"model {args.model!r} has no tokenizer files")
    except MamballamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    name = args.name or path.name
    server = make_server(model, tok, name, args.host, args.port, args.max_new_tokens)
    server.verbose = args.verbose
    print(f"serving {name} at http://{args.host}:{server.server_address[1]}/v1 (Ctrl-C stops)", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
