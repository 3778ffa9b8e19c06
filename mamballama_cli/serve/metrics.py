"""The server's counters, served at ``/metrics`` in Prometheus' text format (version 0.0.4), the names vLLM's
users scrape under a ``mamballama_`` prefix: requests by endpoint and finish reason, rejected requests by status,
prompt and generated tokens, time to first token and request latency as histograms, and the engine's batch."""

from __future__ import annotations

import time
from collections import Counter

# Histogram bounds in seconds: from one fast decode step to a long answer on a CPU.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.sum, self.count = 0.0, 0

    def observe(self, seconds: float) -> None:
        self.sum += seconds
        self.count += 1
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f'{name}_bucket{{{labels},le="{bound}"}} {n}' for bound, n in zip(BUCKETS, self.counts)]
        return out + [f'{name}_bucket{{{labels},le="+Inf"}} {self.count}', f"{name}_sum{{{labels}}} {self.sum:.6f}",
                      f"{name}_count{{{labels}}} {self.count}"]


class Metrics:
    """Updated on the server's event loop (one thread): no locks."""

    def __init__(self) -> None:
        self.started = time.time()
        self.finished: Counter = Counter()  # (endpoint, reason) -> requests
        self.rejected: Counter = Counter()  # status -> requests answered with an error body
        self.prompt_tokens = self.generation_tokens = self.cached_tokens = 0
        self.ttft, self.latency = Histogram(), Histogram()

    def first_text(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def end(self, endpoint: str, seconds: float, reason: str, usage: dict) -> None:
        self.finished[(endpoint, reason)] += 1
        self.latency.observe(seconds)
        self.prompt_tokens += int(usage.get("prompt_tokens", 0) or 0)
        self.generation_tokens += int(usage.get("completion_tokens", 0) or 0)
        self.cached_tokens += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0)

    def reject(self, status: int) -> None:
        self.rejected[status] += 1

    def render(self, engine, model: str) -> str:
        m = f'model="{model}"'
        out = ["# HELP mamballama_requests_total Requests answered, by endpoint and finish reason.",
               "# TYPE mamballama_requests_total counter"]
        out += [f'mamballama_requests_total{{{m},endpoint="{e}",finish_reason="{r}"}} {n}'
                for (e, r), n in sorted(self.finished.items())]
        out += ["# HELP mamballama_requests_rejected_total Requests answered with an error body, by HTTP status.",
                "# TYPE mamballama_requests_rejected_total counter"]
        out += [f'mamballama_requests_rejected_total{{{m},status="{s}"}} {n}' for s, n in sorted(self.rejected.items())]
        for name, value, what in (("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of answered requests."),
                                  ("prompt_tokens_cached_total", self.cached_tokens,
                                   "Prompt tokens whose state came from the prefix cache."),
                                  ("generation_tokens_total", self.generation_tokens, "Tokens generated.")):
            out += [f"# HELP mamballama_{name} {what}", f"# TYPE mamballama_{name} counter",
                    f"mamballama_{name}{{{m}}} {value}"]
        for name, hist, what in (("time_to_first_token_seconds", self.ttft, "From a request's arrival to its first text."),
                                 ("request_latency_seconds", self.latency, "From a request's arrival to its end.")):
            out += [f"# HELP mamballama_{name} {what}", f"# TYPE mamballama_{name} histogram"]
            out += hist.lines(f"mamballama_{name}", m)
        for name, value, what in (("num_requests_running", engine.active, "Rows of the running batch decoding."),
                                  ("num_requests_waiting", engine.pending.qsize(), "Requests queued for a row."),
                                  ("largest_batch", engine.largest_batch, "The largest batch run so far.")):
            out += [f"# HELP mamballama_{name} {what}", f"# TYPE mamballama_{name} gauge",
                    f"mamballama_{name}{{{m}}} {value}"]
        out += ["# HELP mamballama_uptime_seconds Seconds since the server started.",
                "# TYPE mamballama_uptime_seconds gauge", f"mamballama_uptime_seconds {time.time() - self.started:.1f}"]
        return "\n".join(out) + "\n"
