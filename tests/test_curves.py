"""RUN/curves.png: the panels drawn from metrics.jsonl (training/curves.py)."""

import json

import pytest

from mamballama_cli.training.curves import curve_panels, draw_curves, read_metrics


def records():
    out = []
    for step in range(1, 7):
        stage = "align" if step <= 2 else "kd"
        kl = 2.0 / step
        out.append({"step": step, "stage": stage, "loss": kl + 0.1, "kl": kl, "ce": 0.1 if step != 4 else None,
                    "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0})
        if step in (2, 6):
            out.append({"step": step, "stage": stage, "eval_kl": kl, "eval_ce": 3.0})
    return out


def test_panels_hold_what_the_run_wrote_without_nulls_and_mark_each_stage_start():
    panels, starts = curve_panels(records())
    titles = [t for t, _ in panels]
    assert titles == ["training loss (per target token)", "held-out", "learning rate", "gradient norm", "tokens/s"]
    loss = dict(panels)["training loss (per target token)"]
    assert set(loss) == {"loss", "kl", "ce"} and loss["ce"][0] == [1, 2, 3, 5, 6]  # the null at step 4 is skipped
    assert dict(panels)["held-out"] == {"eval_ce": ([2, 6], [3.0, 3.0]), "eval_kl": ([2, 6], [1.0, 2.0 / 6])}
    assert starts == [(0, "align"), (2, "kd")]
    # one loss term equal to the loss (KL alone) adds nothing: only the loss is drawn
    kl_only = [{**r, "loss": r["kl"], "ce": None} if "kl" in r else r for r in records()]
    assert set(dict(curve_panels(kl_only)[0])["training loss (per target token)"]) == {"loss"}
    # DPO's records: a preference panel
    dpo = [{"step": s, "stage": "train", "loss": 0.69, "margin": 0.1 * s, "accuracy": 0.5, "lr": 1e-4}
           for s in (1, 2)]
    assert [t for t, _ in curve_panels(dpo)[0]] == ["training loss (per target token)", "preference pairs",
                                                    "learning rate"]


def test_draw_curves_writes_the_png_and_nothing_for_a_run_without_steps(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()) + '{"step": 7, "lo')
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == len(records())  # the cut line is skipped
    path = draw_curves(tmp_path)
    assert path == tmp_path / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert draw_curves(empty) is None and not (empty / "curves.png").exists()
