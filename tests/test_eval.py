"""`mamballama eval MODEL`: perplexity against a direct computation, retrieval scoring, plots, resume, bad input."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mamballama_cli.models.modeling  # noqa: F401  (import order: see the note in the helper's report)
from clihelp import run_cli
from helpers import read_json, save_teacher, teacher_and_half_hybrid, tiny_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
        "All that glitters is not gold, and not all those who wander are lost. Time and tide wait for no one. "
        "The early bird catches the worm, but the second mouse gets the cheese. Actions speak louder than words. ")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher and its 50% hybrid (through the real convert CLI path)."""
    return teacher_and_half_hybrid(tmp_path_factory.mktemp("evalmodels"))


def _load(path):
    from mamballama_cli.loading import load_causal_lm

    model, tok, _ = load_causal_lm(str(path), dtype="float32", device="cpu")
    return model, tok


def test_perplexity_agreement_and_kl_equal_a_direct_computation(models, tmp_path, capsys):
    teacher_dir, hybrid = models
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 2)
    r = run_cli(["eval", hybrid, "--tasks", "perplexity", "--ppl-data", data, "--ppl-max-length", 128,
                 "--ppl-max-tokens", 400, "--output", tmp_path / "out"], capsys)
    assert r.code == 0, r.err
    assert "| perplexity |" in r.out  # the table goes to stdout
    res = read_json(tmp_path / "out" / "results.json")["details"]["perplexity"]["text.txt"]

    student, tok = _load(hybrid)
    teacher, _ = _load(teacher_dir)
    ids = tok(TEXT * 2)["input_ids"][:400]
    nll = {"student": 0.0, "teacher": 0.0}
    count, agree, kl = 0, 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(ids), 128):
            w = torch.tensor([ids[start:start + 128]])
            n = w.shape[1] - 1
            for name, m in (("student", student), ("teacher", teacher)):
                nll[name] += m(input_ids=w, labels=w).loss.item() * n  # transformers' own shifted mean CE
            ls = student(input_ids=w).logits[0, :-1].log_softmax(-1)
            lt = teacher(input_ids=w).logits[0, :-1].log_softmax(-1)
            agree += (ls.argmax(-1) == lt.argmax(-1)).sum().item()
            kl += F.kl_div(ls, lt, log_target=True, reduction="sum").item()
            count += n
    assert res["tokens"] == count == 400 - 4  # four windows (128, 128, 128, 16), one unpredicted token each
    for name in ("student", "teacher"):
        assert res[name]["perplexity"] == pytest.approx(math.exp(nll[name] / count), rel=1e-4)
    assert res["agreement"]["value"] == pytest.approx(agree / count, abs=1e-6)
    assert res["kl_teacher_student"]["value"] == pytest.approx(kl / count, rel=1e-4)
    assert res["student"]["perplexity"] != pytest.approx(res["teacher"]["perplexity"], rel=1e-3)


def test_perplexity_shows_its_windows_as_it_goes(models, tmp_path, capsys, monkeypatch):
    """A perplexity pass that runs long (the CPU) logs its windows, at most every 10 s: here every window is
    'long', and the last one is left to the "done" line."""
    from mamballama_cli.evaluation import runner
    from mamballama_cli.output import every

    monkeypatch.setattr(runner, "every", lambda seconds, what: every(0.0, what))
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 2)
    r = run_cli(["eval", models[1], "--tasks", "perplexity", "--ppl-data", data, "--ppl-max-length", 128,
                 "--ppl-max-tokens", 400, "--output", tmp_path / "out"], capsys)
    assert r.code == 0, r.err
    shown = re.findall(r"\[perplexity\] text.txt: window (\d+)/(\d+) \(\d+ s\)", r.err)
    assert shown == [("1", "4"), ("2", "4"), ("3", "4")]


def test_progress_lines_wait_for_their_interval():
    import time

    from mamballama_cli import output

    lines = []
    real = output.log
    output.log = lines.append
    try:
        tick = output.every(0.2, "x")
        tick(1, 5)  # before 0.2 s: nothing
        time.sleep(0.25)
        tick(2, 5)
        tick(3, 5)  # 0.2 s not passed since the last line
        time.sleep(0.25)
        tick(5, 5)  # the last item: its caller says "done"
    finally:
        output.log = real
    assert [ln.split(" (")[0] for ln in lines] == ["x 2/5"]


def test_passkey_scorer_is_zero_for_a_model_that_cannot_retrieve_and_one_for_an_oracle(models):
    from mamballama_cli.evaluation.retrieval import PromptBuilder, greedy_answerer, score_trials

    _, hybrid = models
    student, tok = _load(hybrid)
    builder = PromptBuilder("passkey", tok)
    trials = [builder.build(length, depth, k, seed=7) for length in (480, 960) for depth in (0.0, 0.5, 1.0)
              for k in range(2)]
    assert len({t.key for t in trials}) > 8  # random keys
    for t in trials:  # sized in the model's tokens, needle where asked
        assert t.length - 60 <= t.n_tokens <= t.length
        assert t.prompt.count(t.key) == 2
    by_depth = {d: [t.needle_at for t in trials if t.depth == d] for d in (0.0, 0.5, 1.0)}
    assert max(by_depth[0.0]) < 0.1 and 0.35 < min(by_depth[0.5]) and max(by_depth[0.5]) < 0.65
    assert min(by_depth[1.0]) > 0.9

    def oracle(prompt):  # reads the key where the needle put it
        return " " + re.search(r"the pass key is (\d+)\.", prompt).group(1) + "."

    assert score_trials(trials, oracle)["accuracy"] == 1.0
    random_model = score_trials(trials[:4], greedy_answerer(student, tok, 8))
    assert random_model["accuracy"] == 0.0 and random_model["n"] == 4
    wrong = score_trials(trials[:2], lambda p: " 12345 is my guess")
    assert wrong["accuracy"] == 0.0 and wrong["trials"][0]["parsed"] == "12345"


def test_retrieval_grid_writes_heatmaps_and_resumes(models, tmp_path, capsys):
    _, hybrid = models
    out = tmp_path / "out"
    args = ["eval", hybrid, "--tasks", "passkey,needle", "--lengths", "1x,2x", "--distill-length", 400,
            "--depths", "0,1", "--trials", 1, "--output", out]
    r = run_cli(args, capsys)
    assert r.code == 0, r.err
    results = read_json(out / "results.json")
    for kind in ("passkey", "needle"):
        for name in (f"{kind}_heatmap.png", f"{kind}_accuracy.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        d = results["details"][kind]
        assert d["lengths"] == [400, 800] and d["distill_length"] == 400
        assert set(d["grids"]) == {"teacher", "student"} and len(d["grids"]["student"]) == 2
    metrics = [row["metric"] for row in results["rows"]]
    assert "accuracy @ 800 tokens (2x distill)" in metrics
    assert results["timing"]["computed"] == 16 and results["timing"]["reused"] == 0
    assert results["repro"]["student"]["attn_layers"] == [1, 3]
    assert results["repro"]["teacher"]["attn_layers"] == [0, 1, 2, 3]
    assert len(results["repro"]["student"]["sha256"]) == 64 and results["repro"]["libraries"]["torch"]
    assert "report.md" in r.err and "![" in (out / "report.md").read_text()
    cell = json.loads(next((out / "cells" / "passkey" / "student").glob("*.json")).read_text())
    assert cell["repro"]["command"].startswith("mamballama eval") and cell["result"]["n"] == 1

    r = run_cli(args, capsys)  # everything cached: nothing recomputed, same numbers
    assert r.code == 0, r.err
    again = read_json(out / "results.json")
    assert again["timing"]["computed"] == 0 and again["timing"]["reused"] == 16
    assert again["rows"] == results["rows"]
    assert "loading" not in r.err  # no model was even loaded


def test_output_directory_rules(models, tmp_path, capsys):
    teacher_dir, hybrid = models
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    r = run_cli(["eval", hybrid, "--tasks", "perplexity", "--output", unrelated], capsys)
    assert r.code == 2 and "--force" in r.err and "no previous `mamballama eval` run" in r.err
    assert (unrelated / "notes.txt").read_text() == "keep me"

    out = tmp_path / "out"
    ok = ["--tasks", "perplexity", "--ppl-max-tokens", 64, "--ppl-max-length", 32, "--output", out]
    assert run_cli(["eval", hybrid, *ok], capsys).code == 0
    r = run_cli(["eval", teacher_dir, *ok], capsys)  # another model into the same directory
    assert r.code == 2 and "another checkpoint" in r.err
    r = run_cli(["eval", teacher_dir, *ok, "--force"], capsys)
    assert r.code == 0, r.err
    assert read_json(out / "results.json")["repro"]["student"]["path"] == str(teacher_dir)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "perplexty"], "did you mean 'perplexity'? known tasks: perplexity, passkey"),
    (["--tasks", "passkey", "--lengths", "2x"], "--distill-length"),
    (["--tasks", "passkey", "--lengths", "40"], "too short for the passkey prompt"),
    (["--tasks", "passkey", "--depths", "0,1.5"], "outside [0, 1]"),
    (["--tasks", "passkey", "--lengths", "100000000000"], "attention K/V alone would take"),  # 1e11 tokens
    (["--tasks", "perplexity", "--ppl-data", "missing.jsonl"], "no such file"),
    (["--tasks", "lm-eval"], "--lm-eval-tasks"),
    (["--tasks", "mt-bench", "--judge-base-url", "http://127.0.0.1:9/v1"], "--judge-model"),
    (["--teacher", "/nonexistent/teacher"], "--teacher"),
])
def test_bad_input_is_one_line_before_any_work(models, tmp_path, capsys, args, message):
    _, hybrid = models
    r = run_cli(["eval", hybrid, "--output", tmp_path / "out", *args], capsys)
    assert r.code != 0
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.err
    assert not (tmp_path / "out").exists()


def test_speed_without_the_benchmark_module_says_so(models, tmp_path, capsys, monkeypatch):
    from mamballama_cli.evaluation import speed_task

    monkeypatch.setattr(speed_task, "SPEED_MODULE", "mamballama_cli.evaluation.no_such_speed_module")
    r = run_cli(["eval", models[1], "--tasks", "speed", "--output", tmp_path / "out"], capsys)
    assert r.code == 1 and "speed benchmark" in r.err and "drop speed from --tasks" in r.err
    assert r.err.startswith("error:") and r.err.count("\n") == 1  # before loading anything


def test_missing_teacher_tokenizer_and_teacher_none(models, tmp_path, capsys):
    _, hybrid = models
    r = run_cli(["eval", hybrid, "--teacher", "none", "--tasks", "perplexity", "--ppl-max-tokens", 64,
                 "--ppl-max-length", 32, "--output", tmp_path / "out", "--json"], capsys)
    assert r.code == 0, r.err
    rows = json.loads(r.out)["rows"]
    assert rows[0]["teacher"] is None and rows[0]["student"] > 1 and len(rows) == 1  # no agreement without teacher
    notok = save_teacher(tmp_path / "notok", tokenizer=False)
    r = run_cli(["eval", notok, "--teacher", "none", "--tasks", "perplexity", "--output", tmp_path / "o2"], capsys)
    assert r.code == 1 and "no tokenizer" in r.err


def test_builtin_haystack_is_prose():
    from mamballama_cli.evaluation.haystack import builtin_text, sentences

    s = sentences(builtin_text())
    assert len(s) > 500 and not any("::=" in x for x in s[:200])
    assert sum(len(x) for x in s) > 100_000
    assert tiny_tokenizer()  # the tiny tokenizer covers the printable ASCII the prompts use


def test_heatmap_marks_the_distillation_length(tmp_path):
    from mamballama_cli.evaluation.plots import _distill_x, retrieval_heatmap

    assert _distill_x([512, 1024, 2048], 1024) == 1.0
    assert 0.0 < _distill_x([512, 1024, 2048], 700) < 1.0
    assert _distill_x([512, 1024], 256) == -0.5
    p = retrieval_heatmap(tmp_path / "h.png", "t", [512, 1024], [0.0, 1.0],
                          {"teacher": [[1.0, 0.5], [1.0, float("nan")]], "student": [[0.0, 0.5], [1.0, 0.0]]}, 512)
    assert p.read_bytes()[:4] == b"\x89PNG"
    assert not [f for f in Path(tmp_path).iterdir() if f.name.startswith(".")]


def test_speed_task_reports_the_speed_benchmark(models, tmp_path, capsys):
    pytest.importorskip("mamballama_cli.evaluation.speed")
    _, hybrid = models
    out = tmp_path / "out"
    r = run_cli(["eval", hybrid, "--tasks", "speed", "--speed-contexts", "", "--speed-new-tokens", 4,
                 "--output", out], capsys)
    assert r.code == 0, r.err
    rows = {row["metric"]: row for row in read_json(out / "results.json")["rows"] if row["task"] == "speed"}
    decode = rows["decode tokens/s per sequence (batch 1, 128-token prompt)"]
    assert decode["teacher"] > 0 and decode["student"] > 0
    assert read_json(out / "speed" / "speed.json")["rows"]  # the speed benchmark's own JSON is kept
    plots = {p["path"] for p in read_json(out / "results.json")["plots"]}  # and its figure, in the report
    assert "speed/speed.png" in plots and (out / "speed" / "speed.png").stat().st_size > 10_000
    assert "speed/speed.png" in (out / "report.md").read_text()
