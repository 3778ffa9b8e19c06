"""Load on `mamballama serve`: N concurrent clients, each sending requests of a given prompt length, and the
server's throughput and latency under that load (issue 17: 32 clients at 4K context, hybrid and teacher).

    python benchmarks/serve_load.py MODEL --clients 32 --prompt-tokens 4096 --max-tokens 128 --requests 64 \
        --json serve-hybrid.json [--serve-args "--dtype bfloat16"]

It starts `python -m mamballama_cli serve MODEL --port 0 --max-batch CLIENTS --max-context PROMPT+MAX+16`, waits
for its "listening on" line, then runs CLIENTS threads that send `/v1/completions` requests (greedy, streamed, so
that the time to the first token is seen) until REQUESTS are done. Prompts are distinct random words cut to the
prompt length by the model's tokenizer (the server's count, `usage.prompt_tokens`, is reported). Written: completion tokens per second
over the whole run, per-request latency and time to first token (p50, p95, max), the wait between two streamed
pieces of an answer over all answers (``inter_token_s``: where another prompt's read stalls the running answers;
``serve --prefill-per-step`` bounds it), and the server's /health (how many batches it ran, the largest, and the
prompts read over several steps). Only the standard library talks HTTP, so it runs wherever serve does.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.request


def start_server(model: str, clients: int, context: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mamballama_cli", "serve", model, "--port", "0", "--max-batch", str(clients),
           "--max-context", str(context), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.time() + 600
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit("serve exited:\n" + "".join(seen))
        seen.append(line)
        if line.startswith("listening on "):
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
            return proc, line.split()[-1].removesuffix("/v1")
    proc.kill()
    raise SystemExit("serve did not start in 600 s:\n" + "".join(seen))


def prompt_text(tok, rng: random.Random, tokens: int) -> str:
    """Random words, cut to ``tokens`` tokens of the model's tokenizer."""
    vocab = ["river", "stone", "lamp", "seven", "orange", "quiet", "market", "paper", "garden", "north", "silver",
             "window", "copper", "bread", "winter", "signal", "harbour", "velvet", "candle", "meadow"]
    words = []
    while True:
        words += [rng.choice(vocab) for _ in range(max(8, tokens // 2))]
        ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            return tok.decode(ids[:tokens])


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    usage = {}
    pieces, gaps = 0, []
    with urllib.request.urlopen(req, timeout=3600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if any(c.get("text") for c in event.get("choices", [])):
                pieces += 1
                now = time.perf_counter()
                if first is None:
                    first = now
                else:  # the wait between two streamed pieces: a stall (another prompt read meanwhile) shows here
                    gaps.append(now - last)
                last = now
    t1 = time.perf_counter()
    return {"latency_s": t1 - t0, "ttft_s": (first or t1) - t0, "pieces": pieces, "gaps_s": gaps, **usage}


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}
    q = statistics.quantiles(xs, n=20, method="inclusive") if len(xs) > 1 else [xs[0]] * 19
    return {"p50": statistics.median(xs), "p95": q[18], "max": xs[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=4096, help="roughly: words sent (the server counts tokens)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=None, help="total requests (default: 2 per client)")
    ap.add_argument("--serve-args", default="", help="extra options for `mamballama serve`, one string")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from mamballama_cli.loading import checkpoint_dir

    tok = AutoTokenizer.from_pretrained(str(checkpoint_dir(args.model)))
    total = args.requests or 2 * args.clients
    rng = random.Random(args.seed)
    prompts = [prompt_text(tok, rng, args.prompt_tokens) for _ in range(total)]
    context = args.prompt_tokens + args.max_tokens + 64  # re-tokenising decoded text can add a few tokens
    proc, url = start_server(args.model, args.clients, context, shlex.split(args.serve_args))
    try:
        for _ in range(600):  # the socket is bound before uvicorn listens on it
            try:
                urllib.request.urlopen(url + "/health", timeout=10).close()
                break
            except OSError:
                time.sleep(0.1)
        # warm-up (kernels compiled, decoders built) on a prompt of its own: a measured one would find its state in
        # the server's prefix cache
        one_request(url, prompt_text(tok, random.Random(args.seed + 1), args.prompt_tokens), 2)
        results: list[dict] = []
        lock, nxt = threading.Lock(), [0]

        def client():
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= total:
                    return
                r = one_request(url, prompts[i], args.max_tokens)
                with lock:
                    results.append(r)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        with urllib.request.urlopen(url + "/health", timeout=60) as r:
            health = json.loads(r.read())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    completion = sum(r.get("completion_tokens", 0) for r in results)
    out = {
        "model": args.model, "clients": args.clients, "requests": len(results), "max_tokens": args.max_tokens,
        "prompt_tokens_mean": statistics.mean(r.get("prompt_tokens", 0) for r in results),
        "prompt_tokens_cached": sum((r.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for r in results),
        "completion_tokens": completion, "wall_s": wall, "completion_tokens_per_s": completion / wall,
        "latency_s": percentiles([r["latency_s"] for r in results]),
        "ttft_s": percentiles([r["ttft_s"] for r in results]),
        "inter_token_s": percentiles([g for r in results for g in r["gaps_s"]]),
        "server": {k: health.get(k) for k in ("mode", "batches", "largest_batch", "read_in_pieces")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "serve_args": args.serve_args,
    }
    print(json.dumps(out, indent=1))
    print(f"{args.model}: {len(results)} requests from {args.clients} clients, {out['prompt_tokens_mean']:.0f} prompt "
          f"tokens: {out['completion_tokens_per_s']:.1f} completion tok/s, latency p50 {out['latency_s']['p50']:.2f} s "
          f"p95 {out['latency_s']['p95']:.2f} s, first token p50 {out['ttft_s']['p50']:.2f} s, between tokens p95 "
          f"{out['inter_token_s'].get('p95', 0) * 1e3:.1f} ms max {out['inter_token_s'].get('max', 0) * 1e3:.1f} ms "
          f"({health.get('mode')})", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
