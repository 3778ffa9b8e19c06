"""The quality study's scripts (benchmarks/study_smollm2.sh, benchmarks/study_report.py) without a GPU: the script
with a stub CLI that records each command, and the report on result files shaped as the CLI writes them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KR_LAYERS = [0, 2, 5, 7]  # what the stub's kl+recall placement answers with the gate
NG_LAYERS = [1, 2, 6, 7]  # and without it: a different placement, as the CPU smoke run of 2026-12-06 found

STUB = f"""#!/usr/bin/env bash
# python3, except `-m mamballama_cli ...`: logged, and for convert a summary with the placement's layers; and the
# scripts that evaluate models: nothing
if [ "$1" = -m ] && [ "$2" = mamballama_cli ]; then
  shift 2
  echo "$*" >> "$STUB_LOG"
  if [ "$1" = distill ] && [ -n "${{STUB_DISTILL_RC:-}}" ]; then exit "$STUB_DISTILL_RC"; fi
  if [ "$1" = convert ]; then
    case " $* " in
      *" --attn-layers auto "*" --no-gate "*) echo '{{"attn_layers": {NG_LAYERS}}}' ;;
      *" --attn-layers auto "*) echo '{{"attn_layers": {KR_LAYERS}}}' ;;
      *) echo '{{"attn_layers": []}}' ;;
    esac
  fi
  exit 0
fi
case "$1" in */heldout_ce.py|*/study_answers.py) exit 0 ;; esac  # they would load models: not this test's business
exec {sys.executable} "$@"
"""


def _study(tmp_path: Path, runs: str, **env_extra: str) -> list[str]:
    """The study with the stub CLI in ``tmp_path``; the convert commands it ran (``_cli_log`` has them all)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    stub = tmp_path / "py"
    stub.write_text(STUB)
    stub.chmod(0o755)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in ("manifest.json", "prompts-train.jsonl", "text-train.jsonl", "text-heldout.jsonl",
                 "prompts-heldout.jsonl"):
        (data / name).write_text("{}\n")
    log = tmp_path / "cli.log"
    env = {**os.environ, "PY": str(stub), "STUB_LOG": str(log), "TINY": "1", "RUNS": runs, "DATA": str(data),
           "WORK": str(tmp_path / "work"), "EVAL_CAP": "60", **env_extra}
    proc = subprocess.run(["bash", "benchmarks/study_smollm2.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in _cli_log(tmp_path) if line.startswith("convert ")]


def _cli_log(tmp_path: Path) -> list[str]:
    return (tmp_path / "cli.log").read_text().splitlines()


@pytest.mark.parametrize("pct", ["50", "25"])
def test_the_no_gate_student_takes_the_gated_students_attention_layers_when_both_run(tmp_path, pct):
    """d50krng against d50kr (d25krng against d25kr) measures the gate: with both, the no-gate student converts
    with its gated twin's layers (the auto placement scores each conversion, and without the gate it may place them
    elsewhere); alone, it places its own."""
    both = _study(tmp_path / "both", f"d{pct}kr d{pct}krng")
    ng = [c for c in both if f"/h{pct}krng" in c]
    assert len(ng) == 1 and f"--attn-layers {','.join(map(str, KR_LAYERS))} --no-gate" in ng[0], both
    alone = _study(tmp_path / "alone", f"d{pct}krng")
    ng = [c for c in alone if f"/h{pct}krng" in c]
    ratio = {"50": "0.5", "25": "0.25"}[pct]
    assert len(ng) == 1 and f"--ratio {ratio} --attn-layers auto --placement-score kl+recall --no-gate" in ng[0], alone


def test_resume_keeps_finished_steps_and_continues_the_rest_from_their_checkpoints(tmp_path):
    """A study cut short (both distill runs of the twenty-ninth session died mid-run) goes on with RESUME=1: the
    conversions that finished are kept, data generation and a run with a checkpoint resume, a finished run is kept,
    and a run with nothing to go on from starts over; without RESUME every step starts over."""
    work, res = tmp_path / "work", tmp_path / "work" / "results"
    for name in ("h50", "h50kr"):  # finished conversions; h50krng never finished
        (work / name).mkdir(parents=True)
        (work / name / "config.json").write_text("{}")
    res.mkdir(parents=True)
    (res / "convert-h50.json").write_text('{"attn_layers": []}')
    (res / "convert-h50kr.json").write_text(json.dumps({"attn_layers": KR_LAYERS}))
    (work / "run-d50kr" / "checkpoints" / "step-00000191").mkdir(parents=True)  # cut short after a checkpoint
    (work / "run-d50krng").mkdir()
    (work / "run-d50krng" / "training_summary.json").write_text("{}")  # finished
    (res / "distill-d50kr.log").write_text("the run that died\n")
    _study(tmp_path, "d50kr d50krng d25kr", RESUME="1")
    log = _cli_log(tmp_path)
    converts = sorted(line.split("--output ")[1].split()[0].rsplit("/", 1)[1] for line in log if line.startswith("convert "))
    assert converts == ["h25kr", "h50krng"], log  # the two that had not finished
    assert any(f"--attn-layers {','.join(map(str, KR_LAYERS))} --no-gate" in line for line in log if "/h50krng" in line)
    generate = [line for line in log if line.startswith("data generate ")]
    assert len(generate) == 1 and generate[0].endswith(" --resume"), generate
    distills = {line.split("--output ")[1].split()[0].rsplit("/", 1)[1]: line for line in log if line.startswith("distill ")}
    assert sorted(distills) == ["run-d25kr", "run-d50kr"], log  # run-d50krng finished: kept
    assert distills["run-d50kr"].endswith(" --resume") and distills["run-d25kr"].endswith(" --force")
    assert (res / "distill-d50kr.log").read_text().startswith("the run that died")  # a resumed run's log goes on
    timeline = (res / "timeline.txt").read_text()
    assert "convert h50: kept" in timeline and "distill d50krng kept (finished)" in timeline

    assert "cut short" not in timeline

    (tmp_path / "cli.log").unlink()
    _study(tmp_path, "d50kr d50krng", RESUME="1", STUB_DISTILL_RC="139")  # d50kr dies again: the timeline says how on
    timeline = (res / "timeline.txt").read_text()
    assert "distill d50kr exit 139" in timeline
    assert "distill d50kr cut short: RESUME=1 with the same WORK goes on from step-00000191" in timeline

    (tmp_path / "cli.log").unlink()
    _study(tmp_path, "d50kr d50krng")  # no RESUME: everything again, each run from scratch
    log = _cli_log(tmp_path)
    assert sum(line.startswith("convert ") for line in log) == 3 and all(
        line.endswith(" --force") for line in log if line.startswith(("distill ", "data generate ")))
    assert not (res / "distill-d50kr.log").read_text().startswith("the run that died")


def _results(res: Path, name: str, layers: list[int], student_ppl: float, passkey: float) -> None:
    (res / f"convert-h{name[1:]}.json").write_text(json.dumps({"attn_layers": layers}))  # d50kr -> h50kr
    metrics = [{"step": 1, "tokens": 1000, "step_s": 1.0}, {"step": 1, "eval_ce": math.log(student_ppl + 5)},
               {"step": 2, "tokens": 1000, "step_s": 1.0}, {"step": 2, "eval_ce": math.log(student_ppl)}]
    (res / f"metrics-{name}.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    rows = [{"metric": "perplexity (text-heldout.jsonl, 1016 tokens)", "teacher": 20.0, "student": student_ppl},
            {"metric": "accuracy @ 128 tokens (1x distill)", "teacher": 1.0, "student": passkey}]
    (res / f"eval-{name}-results.json").write_text(json.dumps({"rows": rows}))


def test_the_study_report_has_a_row_for_each_gate_run_and_the_teachers_passkey_without_d50(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    _results(res, "d50kr", KR_LAYERS, 21.0, 0.5)
    _results(res, "d50krng", KR_LAYERS, 22.0, 1.0)
    (res / "convert-h50.json").write_text(json.dumps({"attn_layers": [1, 3, 5, 7]}))  # always converted, not trained
    proc = subprocess.run([sys.executable, "benchmarks/study_report.py", "--results", str(res), "--out", str(res)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = json.loads((res / "study.json").read_text())
    assert set(study["runs"]) == {"d50kr", "d50krng"}  # not d50 or d50nr, whose conversion h50 is there
    assert study["runs"]["d50krng"]["ratio_to_teacher"] == 22.0 / 20.0
    assert study["runs"]["d50krng"]["attn_layers"] == KR_LAYERS and "without the gate" in study["runs"]["d50krng"]["what"]
    table = (res / "study.md").read_text().splitlines()
    assert sum("without the gate" in line for line in table) == 1 and sum("kl+recall" in line for line in table) == 1
    assert table[-1].startswith("| teacher |") and table[-1].endswith("| 1.00 |")  # the teacher's passkey, no d50
