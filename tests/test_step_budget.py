"""``benchmarks/step_budget.py``: where a batch-1 decode step's time goes, from a speed JSON. Checked on the H200's
own JSON of 2026-12-05 (``docs/results/gpu-2026-12-05-fifteenth/speed-b1-nogate.json``): the GEMVs a step runs are
counted from the model (24 Mamba and 8 attention layers at the 8B shape's 25% hybrid, each with its MLP, and
lm_head), each served time is the one its choice kept, and the rest of the step is what they leave."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("step_budget", ROOT / "benchmarks" / "step_budget.py")
step_budget = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_budget)
SPEED = ROOT / "docs" / "results" / "gpu-2026-12-05-fifteenth" / "speed-b1-nogate.json"


def test_the_budget_counts_each_gemv_of_a_step_and_adds_up_what_served_it(tmp_path):
    data = json.loads(SPEED.read_text())
    b = step_budget.budget(data)
    counts = {it["shape"]: it["count"] for it in b["items"]}
    # no gate: in_proj is [x; B; C; dt] = 1,024 + 1,024 + 4,096 + 32 rows; [q; k; v] 4,096 + 2 x 1,024
    assert counts == {"28672x4096": 32, "4096x14336": 32, "6176x4096": 24, "4096x4096": 32, "128256x4096": 1,
                      "6144x4096": 8}
    row = data["rows"][0]
    want = 0.0
    for it in b["items"]:
        t = row["gemv_timings"][f"1x{it['shape']} bfloat16"]
        kernel = f"1x{it['shape']}" in row["gemv_kernel_shapes"]
        assert it["us"] == (t["kernel_us"] if kernel else t["cublas_us"])
        want += it["count"] * it["us"]
    assert b["gemv_us"] == pytest.approx(want) and b["step_us"] == pytest.approx(1e6 / row["decode_tok_s"])
    assert b["rest_us"] == pytest.approx(b["step_us"] - want) and 0 < b["rest_us"] < b["step_us"]
    assert b["floor_us"] == pytest.approx(data["floor"]["hybrid"]["weight_bytes"]
                                          / data["floor"]["copy_bandwidth_bytes_per_s"] * 1e6)
    out = tmp_path / "budget.png"
    assert step_budget.main([str(SPEED), "--plot", str(out), "--json", str(tmp_path / "b.json")]) == 0
    assert out.stat().st_size > 10_000 and json.loads((tmp_path / "b.json").read_text())["tok_s"] == row["decode_tok_s"]


def test_a_shape_the_swiglu_or_the_conv_gemv_served_is_named_so():
    data = json.loads(SPEED.read_text())
    data["rows"][0]["gemv_swiglu_shapes"] = ["1x28672x4096"]
    data["rows"][0]["gemv_conv_shapes"] = ["6176x4096 conv 6144"]  # this hybrid's in_proj (no gate), conv epilogue
    served = {it["shape"]: it["served_by"] for it in step_budget.budget(data)["items"]}
    assert served["28672x4096"].startswith("gemv_swiglu") and served["4096x14336"] == "kernel"
    assert served["6176x4096"].startswith("gemv_conv") and not served["6144x4096"].startswith("gemv_conv")


def test_the_gate_adds_its_z_rows_to_in_proj_and_the_teacher_is_all_attention():
    base = {"shape": "llama3-8b", "ratio": 0.25}
    gated = step_budget.projection_shapes({**base, "mamba_gate": True})
    assert gated["10272x4096"] == 24 and "6176x4096" not in gated  # z: 4,096 more rows
    teacher = step_budget.projection_shapes({**base, "model": "teacher"})
    assert teacher["6144x4096"] == 32 and teacher["4096x4096"] == 32 and sum(teacher.values()) == 4 * 32 + 1


def test_a_json_without_the_row_or_a_missing_file_is_refused(tmp_path, capsys):
    data = json.loads(SPEED.read_text())
    with pytest.raises(SystemExit, match="no batch-1 decode row of 'teacher'"):
        step_budget.budget(data, "teacher")
    assert step_budget.main([str(tmp_path / "nope.json")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_a_run_whose_choices_came_from_a_tuning_table_says_so_instead_of_a_bare_not_timed():
    data = json.loads(SPEED.read_text())
    row = data["rows"][0]
    row["gemv_timings"] = {}  # what a run with --tuning records: the table chose, nothing was timed
    bare = step_budget.table(step_budget.budget(json.loads(json.dumps(data))))
    assert "| not timed |" in bare and "tuning table" not in bare
    row["tuning"] = {"file": "t.json", "status": "used", "seeded": {"tuners": 5, "choices": 7}, "stale_entries": 0}
    b = step_budget.budget(data)
    assert b["tuning_table"] and {it["served_by"] for it in b["items"]} == {"not timed: the tuning table chose it"}
    text = step_budget.table(b)
    assert "without it (--tuning left out, or TUNING=0" in text and b["gemv_us"] == 0
    assert "everything else" not in text and "| **all GEMVs** | 129 | not timed |" in text  # no split of the step
    row["tuning"]["status"] = "set aside: made with another GPU; everything is timed as before"  # timed: no note
    assert "tuning table" not in step_budget.table(step_budget.budget(data))
