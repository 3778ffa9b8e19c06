"""An LLM judge behind any OpenAI-compatible chat-completions endpoint, and the prompts it is given.

Plain HTTP through the standard library. The API key is read from the environment variable the user
names (``--judge-api-key-env``), sent only in the Authorization header, and scrubbed from any error
text. 429 and 5xx replies and network errors are retried with exponential backoff (``Retry-After``
honoured); other replies are classified, never raised:

    ok         a reply with text content (it may still hold no parseable verdict: counted as unparsed)
    refused    the endpoint refused (``message.refusal`` set, or ``finish_reason == "content_filter"``)
    malformed  a 200 reply that is not chat-completions JSON
    failed     still 429/5xx/unreachable after the retries, or another HTTP error

Only a rejected key (HTTP 401/403) stops the run, since every further call would fail the same way.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from mamballama_cli.errors import MamballamaError

# The judges the benchmarks' published numbers come from (other judges give numbers on another scale).
REFERENCE_JUDGES = {"mt-bench": "gpt-4", "alpaca-eval": "gpt-4-1106-preview"}
PROMPT_VERSION = 1

SINGLE_SYSTEM = (
    "You are an impartial judge of answers written by an AI assistant. Judge helpfulness, correctness, relevance, "
    "depth and clarity; do not reward length for its own sake. If a reference answer is given, use it to check "
    "correctness. Explain your assessment in a few sentences, then give a rating from 1 (useless) to 10 (excellent) "
    "in exactly this form on the last line: Rating: [[N]]"
)
PAIR_SYSTEM = (
    "You compare two answers written by AI assistants for the same user request and decide which one is better. "
    "Judge helpfulness, correctness, relevance, depth and clarity; the order in which the answers are shown and "
    "their length must not influence you. Explain briefly, then give your verdict on the last line in exactly one "
    "of these forms: [[A]] if answer A is better, [[B]] if answer B is better, [[C]] for a tie."
)


@dataclass
class Reply:
    status: str  # ok | refused | malformed | failed
    text: str = ""
    detail: str = ""


class JudgeClient:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", retries: int = 5,
                 backoff_s: float = 2.0, timeout_s: float = 120.0, max_tokens: int = 1024):
        from urllib.parse import unquote, urlsplit, urlunsplit

        from mamballama_cli.redact import redact_url, url_secrets

        parts = urlsplit(base_url)
        parts = parts._replace(path=parts.path.rstrip("/") + "/chat/completions")  # a query stays a query
        self._basic = None
        if "@" in parts.netloc:  # credentials in the URL: sent as Basic auth (urllib cannot take them in the URL)
            self._basic = (unquote(parts.username or ""), unquote(parts.password or ""))
            parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
        self.url = urlunsplit(parts)
        self.shown_url = redact_url(urlunsplit(parts._replace(netloc=urlsplit(base_url).netloc)))  # for messages
        self.model = model
        self.api_key_env = api_key_env
        self._key = os.environ.get(api_key_env) or None
        # scrubbed from error texts (very short values would garble them; they only leak inside URLs, redacted)
        self._secrets = [s for s in [self._key, *url_secrets(base_url)] if s and len(s) >= 4]
        self.retries, self.backoff_s, self.timeout_s, self.max_tokens = retries, backoff_s, timeout_s, max_tokens
        self._lock = threading.Lock()
        self._limit_key = "max_tokens"
        self.calls = 0

    def _scrub(self, text: str) -> str:
        """``text`` without the API key or any credential of the URL."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text.replace(self.url, self.shown_url)

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * (2 ** attempt)
        if retry_after:
            try:
                delay = max(0.0, min(float(retry_after), 300.0))
            except ValueError:
                pass
        time.sleep(min(delay, 300.0))

    def chat(self, system: str, user: str) -> Reply:
        payload = {"model": self.model, "temperature": 0, self._limit_key: self.max_tokens,
                   "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        reply = self._post(json.dumps(payload).encode())
        if reply.status == "failed" and "HTTP 400" in reply.detail and "max_tokens" in reply.detail \
                and self._limit_key == "max_tokens":
            # newer OpenAI models take max_completion_tokens instead; switch once for the rest of the run
            self._limit_key = "max_completion_tokens"
            payload[self._limit_key] = payload.pop("max_tokens")
            reply = self._post(json.dumps(payload).encode())
        return reply

    def _post(self, body: bytes) -> Reply:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        elif self._basic:
            import base64

            token = base64.b64encode(f"{self._basic[0]}:{self._basic[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        last = ""
        for attempt in range(self.retries + 1):
            with self._lock:
                self.calls += 1
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                text = self._scrub(exc.read().decode("utf-8", "replace")[:200]) if exc.fp else ""
                if exc.code in (401, 403):
                    who = f"${self.api_key_env}" if self._key else f"no key (${self.api_key_env} is not set)"
                    if not self._key and self._basic:
                        who = "the credentials in --judge-base-url"
                    raise MamballamaError(f"the judge endpoint {self.shown_url} rejected the credentials (HTTP "
                                          f"{exc.code}) sent from {who}; set it to a valid key") from None
                last = f"HTTP {exc.code}: {text}"
                if exc.code == 429 or exc.code >= 500:
                    if attempt < self.retries:
                        self._wait(attempt, exc.headers.get("Retry-After") if exc.headers else None)
                    continue
                return Reply("failed", detail=last)
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exc:
                last = self._scrub(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")
                if attempt < self.retries:
                    self._wait(attempt, None)
                continue
            return self._classify(raw)
        return Reply("failed", detail=last)

    def _classify(self, raw: bytes) -> Reply:
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            message = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return Reply("malformed", detail=self._scrub(raw[:200].decode("utf-8", "replace")))
        if message.get("refusal") or choice.get("finish_reason") == "content_filter":
            return Reply("refused", text=str(message.get("refusal") or ""), detail="refused by the endpoint")
        content = message.get("content")
        if isinstance(content, list):  # some servers send content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            return Reply("malformed", detail="reply has no message content")
        return Reply("ok", text=content)


_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")
_RATING_LOOSE = re.compile(r"[Rr]ating:?\s*\[?\s*(\d+(?:\.\d+)?)")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating(text: str) -> float | None:
    """The last [[N]] (or 'Rating: N') in 1..10, else None."""
    found = _RATING.findall(text) or _RATING_LOOSE.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if 1.0 <= value <= 10.0 else None


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie'; None when absent or contradictory."""
    found = set(_VERDICT.findall(text))
    if len(found) != 1:
        return None
    v = found.pop()
    return "tie" if v == "C" else v


def single_prompt(turns: list[str], answers: list[str], turn: int, reference: list[str] | None) -> str:
    """Grade answer number ``turn`` (0-based) of a conversation, earlier turns shown as context."""
    parts = []
    if turn == 0:
        parts.append(f"[User question]\n{turns[0]}")
        if reference:
            parts.append(f"[Reference answer]\n{reference[0]}")
        parts.append(f"[Assistant's answer]\n{answers[0]}")
        parts.append("Rate the assistant's answer.")
    else:
        for i in range(turn + 1):
            parts.append(f"[User, turn {i + 1}]\n{turns[i]}")
            parts.append(f"[Assistant, turn {i + 1}]\n{answers[i]}")
        if reference and len(reference) > turn:
            parts.append(f"[Reference answer for turn {turn + 1}]\n{reference[turn]}")
        parts.append(f"Rate only the assistant's answer in turn {turn + 1}.")
    return "\n\n".join(parts)


def pair_prompt(turns: list[str], answers_a: list[str], answers_b: list[str]) -> str:
    """Compare two whole conversations (one or more turns) on the same user messages."""
    if len(turns) == 1:
        return (f"[User request]\n{turns[0]}\n\n[Answer A]\n{answers_a[0]}\n\n[Answer B]\n{answers_b[0]}\n\n"
                "Which answer is better?")
    blocks = []
    for label, answers in (("A", answers_a), ("B", answers_b)):
        conv = "\n\n".join(f"[User, turn {i + 1}]\n{t}\n\n[Assistant {label}, turn {i + 1}]\n{a}"
                           for i, (t, a) in enumerate(zip(turns, answers)))
        blocks.append(f"=== Conversation with assistant {label} ===\n{conv}")
    return "\n\n".join(blocks) + "\n\nWhich assistant answered the user better over the whole conversation?"


def judge_label(benchmark: str, judge_model: str) -> str:
    ref = REFERENCE_JUDGES[benchmark]
    if judge_model == ref:
        return f"judge {judge_model} (the benchmark's reference judge)"
    return (f"judge {judge_model}, NOT the benchmark's reference judge ({ref}): scores are not comparable with "
            "published numbers")
