"""Chat benchmarks and the judge client, against a real OpenAI-compatible HTTP server on 127.0.0.1.

The server below speaks the chat-completions protocol; markers in the user text script its reply:
[refuse] -> a refusal, [malformed] -> a 200 that is not JSON, [nojudge] -> text without a verdict,
[flaky] -> 503 the first time a body is seen, [ratelimit] -> 429 (Retry-After: 0) the first time,
[down] -> always 500. Anything else gets a well-formed verdict.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import mamballama_cli.models.modeling  # noqa: F401  (import order: see tests/test_eval.py)
from clihelp import run_cli
from helpers import read_json, teacher_and_half_hybrid

KEY = "sk-test-0123456789abcdef"


class ScriptedJudge(BaseHTTPRequestHandler):
    seen: set = set()
    requests: list = []
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _reply(self, code, body: bytes, headers=None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _completion(self, message, finish="stop"):
        return json.dumps({"id": "x", "object": "chat.completion", "model": "scripted",
                           "choices": [{"index": 0, "message": message, "finish_reason": finish}]}).encode()

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        req = json.loads(raw)
        with self.lock:
            first_time = raw not in self.seen
            self.seen.add(raw)
            self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": req})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._reply(401, b'{"error": {"message": "bad key"}}')
        if req["model"] == "new-model" and "max_tokens" in req:  # as newer OpenAI models answer
            return self._reply(400, b'{"error": {"message": "Unsupported parameter: \'max_tokens\'; use '
                                    b'\'max_completion_tokens\' instead."}}')
        system, user = req["messages"][0]["content"], req["messages"][1]["content"]
        pairwise = "[[A]]" in system
        if "[down]" in user:
            return self._reply(500, b'{"error": "down"}')
        if "[flaky]" in user and first_time:
            return self._reply(503, b'{"error": "busy"}')
        if "[ratelimit]" in user and first_time:
            return self._reply(429, b'{"error": "slow down"}', {"Retry-After": "0"})
        if "[malformed]" in user:
            return self._reply(200, b"<html>gateway says hello</html>")
        if "[refuse]" in user:
            return self._reply(200, self._completion({"role": "assistant", "content": None,
                                                      "refusal": "I can't help with that."}))
        if "[nojudge]" in user:
            return self._reply(200, self._completion({"role": "assistant", "content": "Both look fine to me."}))
        verdict = "Answer A is clearer. [[A]]" if pairwise else "Helpful and correct.\nRating: [[7]]"
        return self._reply(200, self._completion({"role": "assistant", "content": verdict}))


@pytest.fixture()
def judge_server():
    ScriptedJudge.seen = set()
    ScriptedJudge.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _client(url, monkeypatch, key=KEY, **kw):
    from mamballama_cli.evaluation.judge import JudgeClient

    monkeypatch.setenv("TEST_JUDGE_KEY", key)
    return JudgeClient(url, "scripted", "TEST_JUDGE_KEY", retries=kw.get("retries", 3), backoff_s=0.01, timeout_s=10)


def test_judge_client_classifies_every_kind_of_reply(judge_server, monkeypatch):
    from mamballama_cli.evaluation.judge import PAIR_SYSTEM, SINGLE_SYSTEM, parse_rating, parse_verdict

    c = _client(judge_server, monkeypatch)
    ok = c.chat(SINGLE_SYSTEM, "question")
    assert ok.status == "ok" and parse_rating(ok.text) == 7.0
    assert parse_verdict(c.chat(PAIR_SYSTEM, "which?").text) == "A"
    assert c.chat(SINGLE_SYSTEM, "[refuse] q").status == "refused"
    bad = c.chat(SINGLE_SYSTEM, "[malformed] q")
    assert bad.status == "malformed" and "gateway" in bad.detail
    text = c.chat(SINGLE_SYSTEM, "[nojudge] q")
    assert text.status == "ok" and parse_rating(text.text) is None
    n = len(ScriptedJudge.requests)
    assert c.chat(SINGLE_SYSTEM, "[flaky] q").status == "ok"  # 503, then retried
    assert c.chat(SINGLE_SYSTEM, "[ratelimit] q").status == "ok"  # 429 + Retry-After, then retried
    assert len(ScriptedJudge.requests) == n + 4
    down = c.chat(SINGLE_SYSTEM, "[down] q")
    assert down.status == "failed" and "HTTP 500" in down.detail
    assert len(ScriptedJudge.requests) == n + 4 + 4  # 1 try + 3 retries
    assert {r["path"] for r in ScriptedJudge.requests} == {"/v1/chat/completions"}
    assert ScriptedJudge.requests[0]["body"]["model"] == "scripted"
    assert ScriptedJudge.requests[0]["body"]["temperature"] == 0


def test_judge_client_switches_to_max_completion_tokens_when_asked(judge_server, monkeypatch):
    from mamballama_cli.evaluation.judge import JudgeClient

    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    c = JudgeClient(judge_server, "new-model", "TEST_JUDGE_KEY", retries=0, backoff_s=0.01, max_tokens=77)
    assert c.chat("s", "u").status == "ok" and c.chat("s", "u").status == "ok"
    sent = [r["body"] for r in ScriptedJudge.requests]
    assert "max_tokens" in sent[0] and sent[1]["max_completion_tokens"] == 77 and "max_tokens" not in sent[2]
    assert len(sent) == 3  # one refused request, then the new spelling for the rest of the run


def test_rejected_key_stops_with_one_line_naming_the_variable_not_the_key(judge_server, monkeypatch):
    from mamballama_cli.errors import MamballamaError

    c = _client(judge_server, monkeypatch, key="sk-wrong-key-999")
    with pytest.raises(MamballamaError) as exc:
        c.chat("s", "u")
    assert "$TEST_JUDGE_KEY" in str(exc.value) and "sk-wrong" not in str(exc.value)


def test_unreachable_endpoint_is_a_failed_judgment(monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    c = _client(f"http://127.0.0.1:{port}/v1", monkeypatch, retries=1)
    reply = c.chat("s", "u")
    assert reply.status == "failed" and "Error" in reply.detail


def test_parsers():
    from mamballama_cli.evaluation.judge import parse_rating, parse_verdict

    assert parse_rating("Format: [[N]]. The answer is okay. Rating: [[6]]") == 6.0
    assert parse_rating("Rating: [[8.5]]") == 8.5 and parse_rating("rating: 4") == 4.0
    assert parse_rating("[[11]]") is None and parse_rating("no number") is None
    assert parse_verdict("[[B]]") == "B" and parse_verdict("[[C]]") == "tie"
    assert parse_verdict("[[A]] or maybe [[B]]") is None and parse_verdict("A is better") is None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return teacher_and_half_hybrid(tmp_path_factory.mktemp("chatmodels"))


def test_chat_benchmarks_answered_in_their_formats_and_judged(models, judge_server, tmp_path, capsys, monkeypatch):
    teacher, hybrid = models
    mt = tmp_path / "question.jsonl"
    mt.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 81, "category": "writing", "turns": ["[flaky] Say hi.", "Now say bye."]},
        {"question_id": 82, "category": "math", "turns": ["[refuse] 1+1?"], "reference": ["2"]},
        {"question_id": 83, "category": "stem", "turns": ["[malformed] Why?"]},
        {"question_id": 84, "category": "roleplay", "turns": ["[nojudge] Be a cat."]},
    ]))
    alpaca = tmp_path / "eval_set.json"
    alpaca.write_text(json.dumps([{"instruction": "[ratelimit] List two fruits.", "dataset": "test"},
                                  {"instruction": "Name a colour.", "dataset": "test"},
                                  {"instruction": "[down] Name a planet.", "dataset": "test"}]))
    cfg = tmp_path / "judge.yaml"
    cfg.write_text("judge_backoff_s: 0.01\njudge_retries: 2\n")
    monkeypatch.setenv("MY_JUDGE_KEY", KEY)
    out = tmp_path / "out"
    args = ["eval", hybrid, "--tasks", "mt-bench,alpaca-eval", "--mt-bench", mt, "--alpaca-eval", alpaca,
            "--max-new-tokens", 4, "--judge-base-url", judge_server, "--judge-model", "scripted-judge",
            "--judge-api-key-env", "MY_JUDGE_KEY", "--config", cfg, "--output", out]
    r = run_cli(args, capsys)
    assert r.code == 0, r.err

    # answer files in the benchmarks' formats
    answers = [json.loads(x) for x in (out / "mt_bench" / "model_answer" / "h50.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 82, 83, 84]
    assert {"question_id", "answer_id", "model_id", "choices", "tstamp"} <= set(answers[0])
    assert answers[0]["model_id"] == "h50" and len(answers[0]["choices"][0]["turns"]) == 2
    assert (out / "mt_bench" / "model_answer" / "teacher.jsonl").is_file()
    outputs = read_json(out / "alpaca_eval" / "h50" / "model_outputs.json")
    assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"}] * 3
    assert outputs[0]["generator"] == "h50" and outputs[0]["dataset"] == "test"

    # judgments: parsed / refused / malformed / unparsed counted, failed ones reported, nothing crashed
    res = read_json(out / "results.json")
    mt_counts = res["details"]["mt-bench"]
    assert mt_counts["single_counts"]["student"] == {"total": 5, "parsed": 2, "unparsed": 1, "refused": 1,
                                                     "malformed": 1, "failed": 0}
    assert mt_counts["pair_counts"] == {"total": 8, "parsed": 2, "unparsed": 2, "refused": 2, "malformed": 2,
                                        "failed": 0}
    assert res["details"]["alpaca-eval"]["student_pair_counts"] == {"total": 6, "parsed": 4, "unparsed": 0,
                                                                    "refused": 0, "malformed": 0, "failed": 2}
    rows = {(row["task"], row["metric"]): row for row in res["rows"]}
    assert rows[("mt-bench", "score 1-10, all turns")]["student"] == 7.0
    assert rows[("mt-bench", "score 1-10, all turns")]["teacher"] == 7.0
    # the scripted judge always prefers answer A; both orders are asked, so the win rate is exactly 0.5
    assert rows[("mt-bench", "pairwise win rate of student vs teacher (ties 0.5)")]["student"] == 0.5
    assert rows[("alpaca-eval", "win rate of student vs teacher (ties 0.5)")]["student"] == 0.5
    report = (out / "report.md").read_text()
    assert "NOT the benchmark's reference judge (gpt-4)" in report and "2/5 judgments parsed" in report
    judgments = (out / "mt_bench" / "model_judgment" / "scripted-judge_single.jsonl").read_text()
    assert '"score": 7.0' in judgments
    # the key went in the Authorization header and nowhere else
    assert all(req["auth"] == f"Bearer {KEY}" for req in ScriptedJudge.requests)
    for f in out.rglob("*"):
        if f.is_file():
            assert KEY not in f.read_text(errors="ignore"), f
    assert KEY not in r.err and KEY not in r.out

    # rerun: answers and final judgments come from the cache; only the failed judgments are asked again
    before = len(ScriptedJudge.requests)
    r = run_cli(args, capsys)
    assert r.code == 0, r.err
    again = read_json(out / "results.json")
    assert again["timing"]["computed"] == 0 and "loading" not in r.err
    assert len(ScriptedJudge.requests) - before == 2 * 3  # two [down] judgments, 1 try + 2 retries each


def test_judge_server_serves_a_checkpoint(models, monkeypatch):
    from mamballama_cli.evaluation.judge import JudgeClient
    from mamballama_cli.evaluation.judge_server import make_server
    from mamballama_cli.loading import load_causal_lm

    model, tok, _ = load_causal_lm(str(models[0]), dtype="float32", device="cpu")
    server = make_server(model, tok, "tiny-judge", port=0, max_new_tokens=6)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.delenv("NO_SUCH_KEY", raising=False)
        c = JudgeClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "tiny-judge", "NO_SUCH_KEY", retries=0)
        reply = c.chat("You judge.", "Rate this.")
        assert reply.status == "ok" and isinstance(reply.text, str)
    finally:
        server.shutdown()
        server.server_close()
