"""lm-evaluation-harness: the registered model `mamballama`, offline tasks from JSONL/YAML, parity with `hf`."""

import json
import subprocess
import sys

import pytest

import mamballama_cli.models.modeling  # noqa: F401  (import order: see tests/test_eval.py)
from clihelp import run_cli
from helpers import read_json, save_teacher

pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": "Which is a colour?", "choices": ["red", "seven", "quickly"], "answer": 0},
    {"question": "Two plus two is", "choices": ["three", "four", "five"], "answer": "four"},
    {"question": "The sky on a clear day is", "choices": ["green", "blue", "loud"], "answer": 1},
    {"question": "A cat says", "choices": ["moo", "woof", "meow"], "answer": 2},
    {"question": "Ice is", "choices": ["cold", "hot"], "answer": 0},
    {"question": "Fish live in", "choices": ["trees", "water", "fire"], "answer": 1},
    {"question": "One more than nine is", "choices": ["ten", "eight", "zero"], "answer": 0},
    {"question": "The opposite of up is", "choices": ["left", "down", "in"], "answer": 1},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mamballama_cli.convert import ConvertConfig, run_convert

    root = tmp_path_factory.mktemp("lmeval")
    teacher = save_teacher(root / "teacher", n_heads=4, n_kv=2)
    run_convert(ConvertConfig(teacher=str(teacher), output=str(root / "h100"), ratio=1.0))
    mc = root / "mc.jsonl"
    mc.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return teacher, root / "h100", mc


def _per_doc_loglikelihoods(samples_path):
    rows = [json.loads(line) for line in samples_path.read_text().splitlines()]
    return {r["doc_id"]: [float(x[0][0]) for x in r["resps"]] for r in rows}


def test_local_jsonl_task_through_mamballama_equals_hf_on_a_full_attention_conversion(setup, tmp_path, capsys):
    """The report's lm-eval path (model `mamballama`) on a 100%-attention hybrid gives lm-eval's `hf` numbers."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from mamballama_cli.evaluation.lm_eval_tasks import mc_task_config

    teacher, h100, mc = setup
    out = tmp_path / "out"
    r = run_cli(["eval", h100, "--teacher", teacher, "--tasks", "lm-eval", "--lm-eval-tasks", mc, "--output", out,
                 "--batch-size", 4], capsys)
    assert r.code == 0, r.err
    rows = {row["metric"]: row for row in read_json(out / "results.json")["rows"]}
    acc = rows["mc acc"]
    own = read_json(out / "lm_eval" / "student" / "mc.json")  # lm-eval's own results JSON is kept
    assert own["results"]["mc"]["acc,none"] == acc["student"]
    assert acc["stderr"] == pytest.approx(own["results"]["mc"]["acc_stderr,none"])

    # lm-eval's stock `hf` model on the teacher, same task definition, same data
    cfg = mc_task_config("mc", out / "lm_eval" / "tasks" / "mc.jsonl", tmp_path / "dscache")
    ref = simple_evaluate(model="hf", model_args={"pretrained": str(teacher), "dtype": "float32", "device": "cpu"},
                          tasks=[cfg], task_manager=TaskManager(include_defaults=False), log_samples=True)
    assert acc["student"] == ref["results"]["mc"]["acc,none"] == acc["teacher"]
    assert rows["mc acc_norm"]["student"] == ref["results"]["mc"]["acc_norm,none"]
    # per-choice log-likelihoods, not only the accuracy, agree
    ours = _per_doc_loglikelihoods(out / "lm_eval" / "student" / "mc.samples.jsonl")
    theirs = {s["doc_id"]: [float(x[0][0]) for x in s["resps"]] for s in ref["samples"]["mc"]}
    assert ours.keys() == theirs.keys() and len(ours) == len(QUESTIONS)
    for doc_id in ours:
        assert ours[doc_id] == pytest.approx(theirs[doc_id], abs=1e-4)


def test_registered_name_and_yaml_task(setup, tmp_path):
    """`--model mamballama` by name (what lm-eval's CLI does) on a task YAML with local data."""
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import mamballama_cli.evaluation.lm_eval_model  # noqa: F401

    teacher, h100, mc = setup
    assert get_model("mamballama").__name__ == "MamballamaLM"
    yaml_dir = tmp_path / "tasks"
    yaml_dir.mkdir()
    (yaml_dir / "tiny.yaml").write_text(
        "task: tiny_yaml\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n  cache_dir: {tmp_path / 'dscache'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({**q, "answer": q["choices"].index(q["answer"])
                                                             if isinstance(q["answer"], str) else q["answer"]}) + "\n"
                                                 for q in QUESTIONS))
    res = {}
    for name, path in (("mamballama", h100), ("hf", teacher)):
        out = simple_evaluate(model=name, model_args=f"pretrained={path},device=cpu,dtype=float32",
                              tasks=["tiny_yaml"], task_manager=TaskManager(include_path=str(yaml_dir),
                                                                            include_defaults=False))
        res[name] = out["results"]["tiny_yaml"]["acc,none"]
    assert res["mamballama"] == res["hf"]


def test_bad_jsonl_task_is_one_line(setup, tmp_path, capsys):
    teacher, h100, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "c"}) + "\n")
    r = run_cli(["eval", h100, "--teacher", "none", "--tasks", "lm-eval", "--lm-eval-tasks", bad,
                 "--output", tmp_path / "o"], capsys)
    assert r.code == 2 and "line 1" in r.err and "answer 'c'" in r.err


@pytest.mark.slow
def test_lm_eval_own_cli_with_the_wrapper(setup, tmp_path):
    """lm-eval's own CLI (through the wrapper that registers the model); it indexes all of lm-eval's tasks: slow."""
    teacher, h100, mc = setup
    yaml = tmp_path / "t.yaml"
    yaml.write_text("task: wrapped_mc\ndataset_path: json\n"
                    f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'd.jsonl'}\n"
                    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                    "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({**q, "answer": 0}) + "\n" for q in QUESTIONS))
    out = subprocess.run([sys.executable, "-m", "mamballama_cli.evaluation.lm_eval_cli", "run", "--model",
                          "mamballama", "--model_args", f"pretrained={h100}", "--tasks", str(yaml),
                          "--output_path", str(tmp_path / "res")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrapped_mc" in out.stdout and "acc" in out.stdout
    assert list((tmp_path / "res").rglob("results_*.json"))


def test_lm_eval_git_hash_leaves_stderr_alone_outside_a_repository(tmp_path, monkeypatch, capfd):
    """lm-eval's ``git describe`` printed "fatal: not a git repository" on stderr during `eval`."""
    import shutil

    from lm_eval import evaluator

    from mamballama_cli.evaluation.lm_eval_tasks import quiet_git_hash

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    evaluator.get_git_commit_hash()
    assert "fatal" in capfd.readouterr().err  # what lm-eval alone does here
    with quiet_git_hash():
        assert evaluator.get_git_commit_hash() is None
    assert capfd.readouterr().err == ""
    assert evaluator.get_git_commit_hash.__module__ == "lm_eval.loggers.utils"  # restored
