"""`mamballama serve`: a real server process on a tiny hybrid, driven by the official `openai` client (issue 17)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from clihelp import run_cli

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_thread")


class Server:
    def __init__(self, model, *args, env=None):
        e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "mamballama_cli", "serve", str(model), "--port", "0",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
        deadline = time.time() + 180
        self.lines = []
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise AssertionError("serve exited: " + "".join(self.lines) + self.proc.stderr.read())
            self.lines.append(line)
            if line.startswith("listening on "):
                self.url = line.split()[-1]
                break
        else:
            raise AssertionError("serve did not start: " + "".join(self.lines))
        self.client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=120)

    def post(self, path, body: bytes | str):
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url.removesuffix("/v1") + path, data=data, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics(self) -> dict[str, float]:
        """/metrics as {"name{labels}": value}, after checking every sample line parses."""
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/metrics", timeout=30) as r:
            assert r.headers["content-type"].startswith("text/plain")
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def health(self):
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=30) as r:
            return json.loads(r.read())

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(models):
    # prompts read in pieces (answers still equal `generate`'s); 10 ms a decode step, so that concurrent requests
    # overlap however fast the tiny model decodes
    s = Server(models["hybrid"], "--max-batch", "4", "--max-context", "96", "--name", "tiny",
               "--prefill-chunk", "7", env={"MAMBALLAMA_SERVE_STEP_DELAY": "0.01"})
    yield s
    s.stop()


def test_completions_chat_and_streamed_chat_through_the_openai_client(server, models, capsys):
    c = server.client
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 0
    assert r.usage.completion_tokens <= 8
    # the same greedy answer as `mamballama generate` (a separate process, its own engine)
    g = run_cli(["generate", models["hybrid"], "--prompt", "hello world", "-n", "8"], capsys)
    assert g.code == 0, g.err
    assert r.choices[0].text == g.out.rstrip("\n")
    msgs = [{"role": "user", "content": "hi there"}]
    whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    pieces = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True))
    assert pieces[0].choices[0].delta.role == "assistant" and pieces[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == whole.choices[0].message.content
    g = run_cli(["generate", models["hybrid"], "--chat", "--prompt", "hi there", "-n", "12"], capsys)
    assert whole.choices[0].message.content == g.out.rstrip("\n")
    # stream_options.include_usage: a last chunk with no choices and the usage, as OpenAI's API sends it
    events = list(c.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == r.usage.completion_tokens
    assert "".join(e.choices[0].text for e in events if e.choices) == r.choices[0].text


def test_sixteen_concurrent_requests_get_their_solo_greedy_answers(server, models, capsys):
    c = server.client
    prompts = [f"{i} apples and " + "pears " * (i % 5) for i in range(16)]  # unequal lengths in one batch

    def ask(p):
        return c.completions.create(model="tiny", prompt=p, max_tokens=6 + p.count("pears"), temperature=0)

    # each alone through `generate` (not the server, whose prefix cache would then hold every prompt)
    solo = []
    for p in prompts:
        g = run_cli(["generate", models["hybrid"], "--prompt", p, "-n", str(6 + p.count("pears"))], capsys)
        assert g.code == 0, g.err
        solo.append(g.out.rstrip("\n"))
    before = server.health()["batches"]
    with ThreadPoolExecutor(16) as pool:
        together = [r.choices[0].text for r in pool.map(ask, prompts)]
    h = server.health()
    assert together == solo
    assert h["largest_batch"] > 1 and h["batches"] - before < 16  # they did share batches


def test_a_llama_teacher_is_served_continuous_batched_as_an_all_attention_hybrid(models, capsys):
    """A plain Llama (a teacher) is batched by the same engine as its hybrids, run as an all-attention hybrid that
    shares its weights; concurrent answers equal transformers' own greedy `generate` of each prompt."""
    s = Server(models["teacher"], "--max-batch", "4", "--max-context", "96", "--name", "teacher")
    prompts = [f"{i} apples and " + "pears " * i for i in range(6)]
    try:
        def ask(p):
            return s.client.completions.create(model="teacher", prompt=p, max_tokens=8, temperature=0).choices[0].text

        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(ask, prompts))
        h = s.health()
    finally:
        s.stop()
    assert h["mode"] == "continuous-batched (as an all-attention hybrid)" and h["largest_batch"] > 1, h
    for p, got in zip(prompts, together):
        g = run_cli(["generate", str(models["teacher"]), "--engine", "transformers", "--prompt", p, "-n", "8"], capsys)
        assert g.code == 0, g.err
        assert got == g.out.rstrip("\n"), p


def test_bad_requests_get_their_status_and_the_server_keeps_serving(server):
    cases = [
        ("/v1/chat/completions", "{not json", 400),
        ("/v1/chat/completions", "[1, 2]", 400),
        ("/v1/chat/completions", json.dumps({"model": "tiny"}), 422),
        ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": []}), 422),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user"}]}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": "abc"}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": -5}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 0}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "temperature": 5}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "top_p": 1.5}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "top_p": "high"}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "seed": "lucky"}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "seed": 1.5}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "top_k": -2}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "logprobs": 21}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "echo": True}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "stream": 1}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "n": 0}), 422),
        ("/v1/completions", json.dumps({"prompt": []}), 422),
        ("/v1/completions", json.dumps({"prompt": [5, "a"]}), 422),
        ("/v1/completions", json.dumps({"prompt": [5, 10**6]}), 422),
        ("/v1/completions", json.dumps({"prompt": ["a"] * 65}), 422),
        ("/v1/completions", json.dumps({"prompt": ["a"] * 17, "n": 16}), 422),
        ("/v1/completions", json.dumps({"prompt": "hi", "n": 17}), 422),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}), 422),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "a"}], "logprobs": 1}), 422),
        ("/v1/completions", json.dumps({"prompt": "x" * 200}), 413),
        ("/v1/completions", json.dumps({"model": "gpt-9", "prompt": "hi"}), 404),
        ("/v1/chat/completions", json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "a"}]}), 404),
        ("/v1/embeddings", json.dumps({"input": "a"}), 404),
    ]
    for path, body, status in cases:
        got, payload = server.post(path, body)
        assert got == status, (body, got, payload)
        assert payload["error"]["message"] and payload["error"]["code"] == status, payload
        got, payload = server.post("/v1/completions", json.dumps({"prompt": "ok", "max_tokens": 3, "temperature": 0}))
        assert got == 200 and payload["choices"][0]["text"] is not None, (body, payload)


def test_metrics_count_requests_tokens_rejections_and_latency(server):
    """/metrics (Prometheus' text format): the counters move by what the requests between two scrapes did."""
    before = server.metrics()
    got, done = server.post("/v1/completions", json.dumps({"prompt": "ok", "max_tokens": 3, "temperature": 0}))
    got2, chat = server.post("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}))
    got3, _ = server.post("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": -5}))
    assert (got, got2, got3) == (200, 200, 422)
    after = server.metrics()

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    m = 'model="tiny"'
    for endpoint, answer in (("/v1/completions", done), ("/v1/chat/completions", chat)):
        reason = answer["choices"][0]["finish_reason"]
        assert delta(f'mamballama_requests_total{{{m},endpoint="{endpoint}",finish_reason="{reason}"}}') == 1
    assert delta(f'mamballama_requests_rejected_total{{{m},status="422"}}') == 1
    assert delta(f"mamballama_generation_tokens_total{{{m}}}") == (done["usage"]["completion_tokens"]
                                                                  + chat["usage"]["completion_tokens"])
    assert delta(f"mamballama_prompt_tokens_total{{{m}}}") == (done["usage"]["prompt_tokens"]
                                                              + chat["usage"]["prompt_tokens"])
    assert delta(f"mamballama_request_latency_seconds_count{{{m}}}") == 2
    assert delta(f"mamballama_request_latency_seconds_sum{{{m}}}") > 0
    texts = sum(1 for a in (done["choices"][0].get("text"), chat["choices"][0]["message"]["content"]) if a)
    assert delta(f"mamballama_time_to_first_token_seconds_count{{{m}}}") == texts
    for name in ("request_latency_seconds", "time_to_first_token_seconds"):  # cumulative buckets, +Inf = count
        buckets = [v for k, v in after.items() if k.startswith(f"mamballama_{name}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == after[f"mamballama_{name}_count{{{m}}}"]
    assert after["mamballama_uptime_seconds"] > 0
    deadline = time.time() + 10  # the engine's thread counts the rows it frees just after it answers them
    while server.metrics()[f"mamballama_num_requests_running{{{m}}}"] != 0:
        assert time.time() < deadline, "a finished request still counted as running"
        time.sleep(0.05)


def test_stop_strings_cut_the_answer_streamed_or_not_and_end_its_row(server):
    """OpenAI's `stop`: the answer ends before the first stop string (finish_reason "stop"), streamed alike; its row
    stops decoding there; a bad `stop` is a 422."""
    c = server.client
    full = c.completions.create(model="tiny", prompt="hello world", max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert len(text) >= 8, text
    cut = text[4:7]
    expected = text[:text.index(cut)]
    got = c.completions.create(model="tiny", prompt="hello world", max_tokens=24, temperature=0,
                               stop=["never-there", cut])
    assert got.choices[0].text == expected and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < full.usage.completion_tokens
    pieces = list(c.completions.create(model="tiny", prompt="hello world", max_tokens=24, temperature=0, stop=cut,
                                       stream=True))
    assert "".join(p.choices[0].text for p in pieces) == expected and pieces[-1].choices[0].finish_reason == "stop"
    for bad in ("", [], ["a", "b", "c", "d", "e"], [3], ["ok", ""]):
        status, payload = server.post("/v1/completions", json.dumps({"prompt": "hi", "stop": bad}))
        assert status == 422 and payload["error"]["param"] == "stop", (bad, payload)


def test_stop_text_holds_back_what_may_begin_a_stop_string():
    from mamballama_cli.generation.result import StopText

    sent = []
    cut = StopText(("END", "\n\n"), sent.append)
    for piece in ("Hello E", "N", "d wor", "ld\n", "\nmore"):
        cut.push(piece)
    assert "".join(sent) == "Hello ENd world" and cut.matched  # "EN" held, then released; "\n\n" across pieces
    cut.push("ignored")
    assert "".join(sent) == "Hello ENd world"
    sent.clear()
    cut = StopText(("abc",), sent.append)
    for piece in ("xa", "b"):
        cut.push(piece)
    assert sent == ["x"] and not cut.matched
    cut.flush()  # the answer ended on "ab": it is the answer's end
    assert "".join(sent) == "xab"
    sent.clear()
    cut = StopText(("abc",), sent.append)
    cut.push("abcdef")
    assert sent == [] and cut.matched  # the stop string first: an empty answer


LONGER = "next, and then a little more"


def test_a_request_joins_the_running_batch_and_a_client_leaving_mid_stream_frees_its_row(models):
    """Continuous batching: a request joins a batch that is decoding, its prompt read 3 tokens between two steps
    (--prefill-per-step 3) through the layer walk (--prompt-pieces walk), and answers as it would alone; a client
    leaving mid-stream frees its row."""
    s = Server(models["hybrid"], "--max-context", "200", "--prefill-per-step", "3", "--prefix-cache-gb", "0",
               "--prompt-pieces", "walk",  # prompts through the layer walk's pieces, as CUDA graphs replay it
               env={"MAMBALLAMA_SERVE_STEP_DELAY": "0.05"})  # no prefix cache: the solo answer is read anew
    try:
        host, port = s.url.removeprefix("http://").removesuffix("/v1").split(":")
        body = json.dumps({"prompt": "a long answer please", "max_tokens": 150, "stream": True, "temperature": 0})
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        got = b""
        while got.count(b"data: ") < 3:  # a few tokens have streamed: the row is decoding
            got += sock.recv(4096)
        assert s.health()["active"] == 1
        # continuous batching: a short request joins the running batch and is answered while the long one streams
        joined = s.client.completions.create(model="hybrid", prompt=LONGER, max_tokens=3, temperature=0)
        h = s.health()
        assert h["joined_running"] == 1 and h["active"] == 1 and h["batches"] == 1, h
        assert joined.usage.prompt_tokens > 3 and h["read_in_pieces"] == 1, (joined.usage, h)
        sock.close()  # 150 tokens at 0.05 s a step would take 7.5 s more
        deadline = time.time() + 5
        while time.time() < deadline and not (s.health()["cancelled"] == 1 and s.health()["active"] == 0):
            time.sleep(0.1)
        h = s.health()
        assert h["cancelled"] == 1 and h["active"] == 0, h
        r = s.client.completions.create(model="hybrid", prompt=LONGER, max_tokens=3, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.choices[0].text == joined.choices[0].text  # alone (read whole), the same answer as inside the batch
        assert s.health()["read_in_pieces"] == 1
    finally:
        s.stop()


def test_logprobs_are_the_models_own_for_every_answer_token_streamed_or_not(server, models):
    """`logprobs` (completions) and `logprobs`/`top_logprobs` (chat): each answer token's log-probability under the
    model, and the most likely tokens, equal to a teacher-forced forward of the prompt and answer in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mamballama_cli  # noqa: F401  (registers the hybrid with the Auto classes)

    tok = AutoTokenizer.from_pretrained(models["hybrid"])
    model = AutoModelForCausalLM.from_pretrained(models["hybrid"]).eval()
    ids = tok("hello world")["input_ids"]
    ref = []  # (token text, log-probability, the 3 most likely as {text: log-probability}) of the greedy answer
    with torch.no_grad():
        for _ in range(6):
            lp = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            nxt = int(lp.argmax())
            top = lp.topk(3)
            ref.append((tok.decode([nxt]), float(lp[nxt]),
                        {tok.decode([j]): float(v) for j, v in zip(top.indices.tolist(), top.values)}))
            ids.append(nxt)
    c = server.client
    r = c.completions.create(model="tiny", prompt="hello world", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert n >= 1 and lp.tokens == [t for t, _, _ in ref[:n]] and "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs == pytest.approx([x for _, x, _ in ref[:n]], abs=1e-4)
    for got, (_, _, want) in zip(lp.top_logprobs, ref):
        assert got.keys() == want.keys() and list(got.values()) == pytest.approx(list(want.values()), abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    plain = c.completions.create(model="tiny", prompt="hello world", max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == r.choices[0].text
    # streamed: the chunks' logprobs together are the whole answer's, offsets running on
    events = list(c.completions.create(model="tiny", prompt="hello world", max_tokens=6, temperature=0, logprobs=3,
                                       stream=True))
    streamed = [e.choices[0].logprobs for e in events if e.choices and e.choices[0].logprobs]
    assert [t for x in streamed for t in x.tokens] == lp.tokens
    assert [o for x in streamed for o in x.text_offset] == lp.text_offset
    # chat: OpenAI's shape, top_logprobs as many as asked, the greedy token first among them
    msgs = [{"role": "user", "content": "hi there"}]
    whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                      top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert "".join(x.token for x in content) == whole.choices[0].message.content
    for x in content:
        assert len(x.top_logprobs) == 2 and x.top_logprobs[0].token == x.token
        assert x.logprob == pytest.approx(x.top_logprobs[0].logprob) and x.logprob <= 0
        assert bytes(x.bytes).decode() == x.token
    pieces = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=2, stream=True))
    got = [x for p in pieces if p.choices and p.choices[0].logprobs for x in p.choices[0].logprobs.content]
    assert [(x.token, x.logprob) for x in got] == [(x.token, x.logprob) for x in content]
    assert c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2).choices[0].logprobs is None


def test_a_prompt_that_extends_or_repeats_an_earlier_one_resumes_from_its_kept_state(server, models, capsys):
    """The prefix cache (on by default): the next turn (the earlier prompt, its answer, more) reads only what is
    new, a repeated prompt nothing; usage says how many prompt tokens were cached, and the answers are the model's
    own (`generate`, a separate process with no cache)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["hybrid"])
    c = server.client
    before = server.metrics()
    p1 = "a turn of talk: "
    r1 = c.completions.create(model="tiny", prompt=p1, max_tokens=8, temperature=0)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    done = r1.usage.completion_tokens
    assert len(tok(r1.choices[0].text, add_special_tokens=False)["input_ids"]) == done > 0
    p2 = p1 + r1.choices[0].text + " then more"
    r2 = c.completions.create(model="tiny", prompt=p2, max_tokens=8, temperature=0)
    n1 = len(tok(p1)["input_ids"])
    # the first prompt and every answer token it fed: all of them after a stop token, all but the last at max_tokens
    fed = n1 + done - (r1.choices[0].finish_reason == "length")
    assert fed > n1 and r2.usage.prompt_tokens_details.cached_tokens == fed
    g = run_cli(["generate", models["hybrid"], "--prompt", p2, "-n", "8"], capsys)
    assert g.code == 0 and r2.choices[0].text == g.out.rstrip("\n")
    again = c.completions.create(model="tiny", prompt=p1, max_tokens=8, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens == n1
    assert again.choices[0].text == r1.choices[0].text
    after, health = server.metrics(), server.health()["prefix_cache"]
    key = 'mamballama_prompt_tokens_cached_total{model="tiny"}'
    assert after[key] - before.get(key, 0) == fed + n1
    assert health["hits"] >= 2 and 0 < health["bytes"] <= health["budget_bytes"] == 4 * 10**9


def test_requests_that_share_a_beginning_resume_where_the_earlier_ones_branched(server, models, capsys):
    """Requests with the same beginning (a system prompt) and different endings: the second keeps the hybrid's
    state at the end of the whole blocks both share, and the third reads only from there; its answer is the
    model's own (`generate`, a separate process with no cache)."""
    from transformers import AutoTokenizer

    from mamballama_cli.generation.prefix_cache import BLOCK

    tok = AutoTokenizer.from_pretrained(models["hybrid"])
    head = "You are a terse helper; answer in one line: "
    prompts = [head + t for t in ("pears?", "apples!", "plums, then")]
    rs = [server.client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0) for p in prompts]
    ids = [tok(p)["input_ids"] for p in prompts[:2]]
    common = next(i for i, (x, y) in enumerate(zip(*ids)) if x != y)
    shared = common // BLOCK * BLOCK
    assert shared >= BLOCK and [r.usage.prompt_tokens_details.cached_tokens for r in rs] == [0, 0, shared]
    g = run_cli(["generate", models["hybrid"], "--prompt", prompts[2], "-n", "6"], capsys)
    assert g.code == 0 and rs[2].choices[0].text == g.out.rstrip("\n")


def test_completions_take_token_ids_and_lists_of_prompts_each_answered_as_alone(server, models):
    """The completions API's other prompt forms (as vLLM's, and lm-eval's local-completions sends them): token ids,
    a list of strings or of token-id lists; choice i * n + j is prompt i's j-th."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["hybrid"])
    c = server.client
    texts = ["one pear", "two apples and", "x"]
    alone = [c.completions.create(model="tiny", prompt=t, max_tokens=6, temperature=0) for t in texts]
    ids = [tok(t)["input_ids"] for t in texts]
    by_ids = c.completions.create(model="tiny", prompt=ids[1], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == alone[1].choices[0].text
    for prompt in (texts, ids):
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, n=2)
        assert [x.index for x in r.choices] == list(range(6))
        assert [x.text for x in r.choices] == [a.choices[0].text for a in alone for _ in range(2)]
        assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
        assert r.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)


def test_n_choices_are_the_answers_of_seeds_in_a_row_streamed_or_not(server):
    """OpenAI's `n`: n answers to one prompt, decoded side by side; with a `seed`, choice i is the answer of a lone
    request with seed + i. Usage counts the prompt once and every choice's tokens."""
    c = server.client
    r = c.completions.create(model="tiny", prompt="5 pears and", max_tokens=10, temperature=1.2, seed=40, n=3)
    assert [x.index for x in r.choices] == [0, 1, 2]
    ones = [c.completions.create(model="tiny", prompt="5 pears and", max_tokens=10, temperature=1.2, seed=40 + i)
            for i in range(3)]
    assert [x.text for x in r.choices] == [o.choices[0].text for o in ones]
    assert len({x.text for x in r.choices}) > 1
    assert r.usage.prompt_tokens == ones[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(o.usage.completion_tokens for o in ones)
    msgs = [{"role": "user", "content": "hi there"}]
    whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=1.0, seed=3, n=2)
    events = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=1.0, seed=3, n=2,
                                            stream=True, stream_options={"include_usage": True}))
    for i in range(2):
        text = "".join(e.choices[0].delta.content or "" for e in events if e.choices and e.choices[0].index == i)
        assert text == whole.choices[i].message.content
        assert sum(1 for e in events if e.choices and e.choices[0].index == i and e.choices[0].finish_reason) == 1
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == whole.usage.completion_tokens
    greedy = c.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_requests_with_different_sampling_share_the_running_batch_and_a_seed_repeats_its_answer(models):
    """Sampling settings are per row: greedy and sampled requests at different temperatures, top-p and top-k decode
    in one batch, and a request with a `seed` gets the answer it gets alone; another seed, another answer."""
    s = Server(models["hybrid"], "--max-batch", "4", "--max-context", "96",
               env={"MAMBALLAMA_SERVE_STEP_DELAY": "0.05"})
    asks = [{"temperature": 0}, {"temperature": 0.9, "seed": 7}, {"temperature": 1.3, "top_p": 0.9, "seed": 11},
            {"temperature": 1.0, "seed": 7, "extra_body": {"top_k": 5}}]
    try:
        def ask(i, **over):
            kw = {**asks[i], **over}
            return s.client.completions.create(model="hybrid", prompt=f"{i} pears and", max_tokens=16,
                                               **kw).choices[0].text

        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, range(4)))
        h = s.health()
        alone = [ask(i) for i in range(4)]
        other_seed = ask(1, seed=8)
    finally:
        s.stop()
    assert h["batches"] == 1 and h["largest_batch"] == 4, h  # one run: every setting in the same batch
    assert together == alone
    assert other_seed != alone[1]


def test_speculative_serving_answers_as_the_model_alone(models, tmp_path, capsys):
    """`serve --draft D`: speculative decoding, one request at a time, lossless at temperature 0."""
    draft = tmp_path / "draft"
    r = run_cli(["convert", models["teacher"], "--draft-layers", "0,3", "--output", draft], capsys)
    assert r.code == 0, r.err
    s = Server(models["hybrid"], "--draft", str(draft), "-k", "3", "--name", "tiny", "--max-context", "96")
    try:
        assert s.health()["mode"].startswith("speculative") and "k=3" in s.health()["mode"]
        c = s.client
        prompts = ["hello world", "3 apples and pears pears", "tell me"]
        g = [run_cli(["generate", models["hybrid"], "--prompt", p, "-n", "10"], capsys) for p in prompts]
        assert all(x.code == 0 for x in g)
        with ThreadPoolExecutor(3) as pool:  # queued, then served one by one
            got = list(pool.map(lambda p: c.completions.create(model="tiny", prompt=p, max_tokens=10,
                                                               temperature=0), prompts))
        assert [x.choices[0].text for x in got] == [x.out.rstrip("\n") for x in g]
        assert all(x.usage.completion_tokens <= 10 for x in got)
        msgs = [{"role": "user", "content": "hi there"}]
        whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
        pieces = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                                stream=True))
        assert "".join(p.choices[0].delta.content or "" for p in pieces) == whole.choices[0].message.content
        gc = run_cli(["generate", models["hybrid"], "--chat", "--prompt", "hi there", "-n", "12"], capsys)
        assert whole.choices[0].message.content == gc.out.rstrip("\n")
        runs = s.health()["speculative_runs"]
        assert runs >= 2  # the two chats came alone: speculative decoding
        # log-probabilities: such a request decodes in the continuous batch, with the model's own answer
        lp = c.completions.create(model="tiny", prompt=prompts[0], max_tokens=10, temperature=0, logprobs=2)
        assert lp.choices[0].text == got[0].choices[0].text and len(lp.choices[0].logprobs.tokens) >= 1
        assert s.health()["speculative_runs"] == runs
        text = got[0].choices[0].text  # a stop string ends a speculative answer too
        assert len(text) >= 6, text
        stopped = c.completions.create(model="tiny", prompt=prompts[0], max_tokens=10, temperature=0,
                                       stop=text[3:5])
        assert stopped.choices[0].text == text[:text.index(text[3:5])]
        assert stopped.choices[0].finish_reason == "stop"
    finally:
        s.stop()


def test_speculative_serving_with_no_draft_uses_the_gated_lookup(models, capsys):
    """`serve --speculative` alone: the lookup draft (lookup:3:gate=2, no model) at k = 6, answers equal to the
    model's own greedy ones."""
    s = Server(models["hybrid"], "--speculative", "--name", "tiny", "--max-context", "96")
    try:
        assert s.health()["mode"] == ("speculative when alone, continuous-batched under load (draft lookup:3:gate=2, "
                                      "k=6)"), s.health()
        got = s.client.completions.create(model="tiny", prompt="3 apples and pears pears", max_tokens=12,
                                          temperature=0)
        want = run_cli(["generate", models["hybrid"], "--prompt", "3 apples and pears pears", "-n", "12"], capsys)
        assert want.code == 0 and got.choices[0].text == want.out.rstrip("\n")
    finally:
        s.stop()


def test_speculative_serving_batches_the_requests_that_wait_while_one_decodes(models, capsys):
    """With a draft, a greedy request that finds the engine idle decodes speculatively; requests that queue meanwhile
    decode together in the continuous batch once it ends, not one by one. Every answer is the model's own."""
    s = Server(models["hybrid"], "--draft", "lookup", "-k", "4", "--name", "tiny", "--max-context", "96",
               env={"MAMBALLAMA_SERVE_STEP_DELAY": "0.05"})
    prompts = ["a long one: pears", "3 apples and", "tell me"]
    try:
        def ask(p, n):
            return s.client.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).choices[0].text

        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(ask, prompts[0], 40)
            deadline = time.time() + 30
            while s.health()["active"] == 0 and time.time() < deadline:  # the first is decoding, alone
                time.sleep(0.02)
            rest = [pool.submit(ask, p, 8) for p in prompts[1:]]
            got = [first.result()] + [r.result() for r in rest]
        h = s.health()
    finally:
        s.stop()
    assert h["speculative_runs"] == 1 and h["largest_batch"] == 2, h  # the two that waited ran together
    for p, n, text in zip(prompts, (40, 8, 8), got):
        g = run_cli(["generate", models["hybrid"], "--prompt", p, "-n", str(n)], capsys)
        assert g.code == 0 and text == g.out.rstrip("\n"), p


@pytest.mark.timeout(300)
def test_serve_refuses_bad_options_in_one_line(models, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        r = run_cli(["serve", models["hybrid"], "--port", str(busy.getsockname()[1])], capsys)
        assert r.code == 2 and "--port" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    finally:
        busy.close()
    r = run_cli(["serve", models["hybrid"], "--port", "0", "--max-context", "100000"], capsys)
    assert r.code == 2 and "--max-context" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    r = run_cli(["serve", models["hybrid"], "--port", "0", "--draft", "lookup:3:gate=9"], capsys)
    assert r.code == 2 and "gate=9" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    r = run_cli(["serve", models["hybrid"], "--port", "0", "--draft", "no-such-draft"], capsys)
    assert r.code == 2 and "--draft 'no-such-draft'" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    r = run_cli(["serve", models["hybrid"], "--port", "0", "--api-key", " "], capsys)
    assert r.code == 2 and "--api-key is empty" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    r = run_cli(["serve", models["hybrid"], "--port", "0", "--prompt-pieces", "fast"], capsys)
    assert r.code == 2 and "--prompt-pieces fast: give graph, walk or forward" in r.err, r.err
    # graph pieces on the CPU (named, so that the check holds on the CUDA machine too, where serve would start)
    r = run_cli(["serve", models["hybrid"], "--port", "0", "--device", "cpu", "--prompt-pieces", "graph"], capsys)
    assert r.code == 2 and "--prompt-pieces graph records CUDA graphs" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err


def test_api_key_guards_the_api_but_not_health_and_never_reaches_the_log(models):
    key = "sk-test-5f1c9a"
    s = Server(models["hybrid"], "--name", "tiny", env={"MAMBALLAMA_API_KEY": key})
    try:
        for client_key in ("wrong", "none"):
            bad = openai.OpenAI(base_url=s.url, api_key=client_key, max_retries=0, timeout=60)
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model="tiny", prompt="hi", max_tokens=2)
        got, payload = s.post("/v1/models", b"")  # no header at all: OpenAI's error body, status 401
        assert got == 401 and payload["error"]["code"] == 401 and "Bearer" in payload["error"]["message"]
        good = openai.OpenAI(base_url=s.url, api_key=key, max_retries=0, timeout=60)
        answer = good.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0)
        assert answer.usage.completion_tokens >= 1
        assert s.health()["status"] == "ok"  # open, as /metrics
        assert s.metrics()['mamballama_requests_rejected_total{model="tiny",status="401"}'] >= 2
    finally:
        s.stop()
    assert key not in "".join(s.lines) + s.proc.stderr.read()


def test_serve_load_benchmark_runs_and_reports(models, tmp_path):
    """benchmarks/serve_load.py (the 32-clients-at-4K measurement of issue 17), as a smoke run on the tiny hybrid."""
    from pathlib import Path

    out = tmp_path / "load.json"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "serve_load.py"), str(models["hybrid"]),
                        "--clients", "4", "--prompt-tokens", "16", "--max-tokens", "5", "--requests", "8",
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["requests"] == 8 and data["prompt_tokens_mean"] >= 16 and data["completion_tokens"] > 0
    assert data["completion_tokens_per_s"] > 0 and data["latency_s"]["p95"] >= data["latency_s"]["p50"] > 0
    assert data["server"]["mode"] == "continuous-batched" and data["server"]["largest_batch"] > 1
    gaps = data["inter_token_s"]  # 8 answers of up to 5 streamed pieces: the waits between them
    assert 0 < gaps["p50"] <= gaps["p95"] <= gaps["max"] < data["latency_s"]["max"]
    assert data["server"]["read_in_pieces"] >= 0


def test_serving_with_the_lookup_draft_answers_as_the_model_alone(models, capsys):
    """`serve --draft lookup`: the draft without a model (generation/lookup.py) in captured rounds, lossless."""
    s = Server(models["hybrid"], "--draft", "lookup", "-k", "4", "--name", "tiny", "--max-context", "96")
    try:
        assert "draft lookup, k=4" in s.health()["mode"]
        prompt = "3 apples and pears pears pears"
        g = run_cli(["generate", models["hybrid"], "--prompt", prompt, "-n", "16"], capsys)
        assert g.code == 0, g.err
        got = s.client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
        assert got.choices[0].text == g.out.rstrip("\n")
    finally:
        s.stop()


def test_a_client_leaving_while_its_prompt_is_read_between_steps_frees_the_slot(models, monkeypatch):
    """The engine in this process: while a row streams, a long prompt is read 2 tokens a step; its client leaves
    mid-read. The reading is dropped (answered "cancelled", counted), its slot is free again, and the next request
    is read and answered as when the engine was idle."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mamballama_cli  # noqa: F401  (registers the hybrid with the Auto classes)
    from mamballama_cli.serve.engine import Engine, Request

    monkeypatch.setenv("MAMBALLAMA_SERVE_STEP_DELAY", "0.02")
    model = AutoModelForCausalLM.from_pretrained(models["hybrid"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(models["hybrid"])
    engine = Engine(model, tok, max_batch=2, max_context=200, prefill_per_step=2, prefix_cache_bytes=0)
    ended: dict[str, tuple] = {}
    events = {name: threading.Event() for name in ("long", "late", "next", "alone")}

    def request(name, ids, n):
        def finish(reason, usage):
            ended[name] = (reason, usage)
            events[name].set()
        return Request(prompt_ids=ids, max_tokens=n, temperature=0.0, finish=finish,
                       emit=lambda text: ended.setdefault(name + ":text", []).append(text))

    gen = torch.Generator().manual_seed(5)
    long_prompt = torch.randint(5, 96, (40,), generator=gen).tolist()
    nxt = torch.randint(5, 96, (9,), generator=gen).tolist()
    engine.submit(request("long", [7, 8, 9], 150))  # 150 steps of 0.02 s: streams while the rest happens
    deadline = time.time() + 60
    while engine.active < 1 and time.time() < deadline:
        time.sleep(0.01)
    late = request("late", long_prompt, 5)
    engine.submit(late)
    while engine.reading is None and time.time() < deadline:
        time.sleep(0.005)
    assert engine.reading is not None and engine.reading[0] is late  # 40 tokens, 2 a step: read over 20 steps
    late.cancelled.set()
    assert events["late"].wait(30) and ended["late"][0] == "cancelled"
    assert engine.cancelled == 1 and engine.reading is None and len(engine.decoder.free) == 1
    engine.submit(request("next", nxt, 4))  # read 2 tokens a step too, beside the long row
    assert events["next"].wait(60) and ended["next"][0] == "length"
    assert engine.read_in_pieces == 1 and engine.joined_running == 1
    events["long"].wait(60)
    engine.submit(request("alone", nxt, 4))  # the engine idle: read whole
    assert events["alone"].wait(60) and ended["alone"][0] == "length"
    assert "".join(ended["next:text"]) == "".join(ended["alone:text"])
