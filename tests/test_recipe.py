"""The default distillation recipe and the loss options of issue 14, through the real CLI on tiny models."""

import json
from pathlib import Path

import pytest
import torch

from clihelp import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DATA = Path(__file__).parent / "data"
TRAIN, EVAL = str(DATA / "chat_train.jsonl"), str(DATA / "chat_eval.jsonl")
SMALL = ["--seq-len", "96", "--micro-batch-size", "2", "--gradient-accumulation-steps", "1"]


def metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train(capsys, model, out, *args) -> dict:
    r = run_cli(["distill", model, "--output", out, "--json", *args], capsys)
    assert r.code == 0, r.err[-3000:]
    return json.loads(r.out)


def test_distill_without_a_template_runs_the_default_recipe(models, tmp_path, capsys):
    """align (mixers only, alignment loss, no logits) -> kd-mixers -> kd-all, lengths in tokens."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    s = train(capsys, models["hybrid"], out, "--data", TRAIN, "--tokens", "300", *SMALL)
    recs = [r for r in metrics(out) if "loss" in r]
    stages = [r["stage"] for r in recs]
    assert stages[0] == "align" and "kd-mixers" in stages and stages[-1] == "kd-all"
    align = [r for r in recs if r["stage"] == "align"]
    kd = [r for r in recs if r["stage"] != "align"]
    assert all("hidden" in r and "kl" not in r for r in align)
    assert all("kl" in r and "hidden" not in r for r in kd)
    # tokens -> steps: ceil(300 / (global batch 2 x mean row length)) per stage, the same for all three
    per_stage = {st: stages.count(st) for st in ("align", "kd-mixers", "kd-all")}
    assert len(set(per_stage.values())) == 1 and s["total_steps"] == 3 * per_stage["align"]
    import yaml

    run_cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_cfg["loss_positions"] == "all" and run_cfg["packing"] == "fit"
    # the final model loads and differs from the input in mixers and elsewhere (kd-all trains everything)
    before = load_file(str(models["hybrid"] / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))}
    assert any(".mamba." in k for k in changed) and any("mlp" in k for k in changed)


def test_loss_positions_all_takes_the_teacher_on_prompts_but_never_on_padding():
    from mamballama_cli.training.data import Item, collate
    from mamballama_cli.training.recipes import loss_mask

    items = [Item([1, 5, 6, 7, 8, 2], [False, False, False, True, True, True]), Item([1, 9, 2], [False, True, True])]
    batch = collate(items, pad_id=0)
    resp = loss_mask(batch, "responses")
    every = loss_mask(batch, "all")
    assert torch.equal(resp, batch["target_mask"])
    # row 0: positions 0..4 predict a real next token; row 1: positions 0..1; padding and last tokens never
    assert every.tolist() == [[True] * 5 + [False], [True, True, False, False, False, False]]
    assert bool((every | ~resp).all())  # every response target is also an 'all' position


def test_kl_reduction_sequence_weighs_kl_per_sequence_like_the_papers_code(models, tmp_path, capsys):
    """loss = w_kl * KL summed per sequence (averaged over sequences) + w_ce * CE per token."""
    out = tmp_path / "seq"
    train(capsys, models["hybrid"], out, "--template", "none", "--data", TRAIN, "--steps", "2", "--w-kl", "0.1",
          "--w-ce", "1", "--kl-reduction", "sequence", "--lr", "1e-9", *SMALL)
    for r in (x for x in metrics(out) if "loss" in x):
        gb = 2  # items in the global batch (micro-batch 2 x accumulation 1)
        expected = 0.1 * r["kl"] * r["count"] / gb + r["ce"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
        assert r["count"] / gb > 5  # many tokens per sequence: KL dominates as in the paper's code
    out2 = tmp_path / "tok"
    train(capsys, models["hybrid"], out2, "--template", "none", "--data", TRAIN, "--steps", "1", "--w-kl", "0.1",
          "--w-ce", "1", "--lr", "1e-9", *SMALL)
    r = next(x for x in metrics(out2) if "loss" in x)
    assert r["loss"] == pytest.approx(0.1 * r["kl"] + r["ce"], rel=1e-5)


def test_max_seconds_stops_and_still_writes_the_final_model(models, tmp_path, capsys):
    out = tmp_path / "budget"
    s = train(capsys, models["hybrid"], out, "--template", "none", "--data", TRAIN, "--steps", "50",
              "--max-seconds", "0.01", *SMALL)
    assert s["time_budget_reached"] and s["steps"] < 50
    assert (out / "model.safetensors").is_file() and s.get("model") == str(out)


def test_a_stage_that_ran_no_step_is_evaluated_once_with_progress_shown(models, tmp_path, capsys, monkeypatch):
    """The budget runs out before the first step: the held-out evaluation at the stage's start is the stage's only
    one (its end would repeat it on the same weights), and a long evaluation shows its batches as it goes."""
    from mamballama_cli.training.report import Reporter

    monkeypatch.setattr(Reporter, "MICRO_AFTER_S", 0.0)  # every evaluation counts as long here
    monkeypatch.setattr(Reporter, "MICRO_EVERY_S", 0.0)
    out = tmp_path / "budget"
    r = run_cli(["distill", models["hybrid"], "--output", out, "--json", "--template", "none", "--data", TRAIN,
                 "--eval-data", TRAIN, "--steps", "50", "--max-seconds", "0.01", *SMALL], capsys)
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["steps"] == 0 and s["time_budget_reached"]
    assert [(e["step"], e["stage"]) for e in s["evals"]] == [(0, "train")]
    assert [m for m in metrics(out) if "eval_kl" in m] == s["evals"]
    assert "eval at step 0: batch 1/" in r.err


def test_a_stage_starting_on_the_last_stages_weights_is_not_evaluated_again(models, tmp_path, capsys):
    """Held-out evaluation runs once per state of the weights: a stage that begins where the last one ended is not
    evaluated at its start (its numbers would repeat the last stage's end), one that converts layers first is."""
    def evals(name, second):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(f"stages:\n  - {{name: a, steps: 1}}\n  - {{name: b, steps: 1{second}}}\n")
        s = train(capsys, models["hybrid"], tmp_path / name, "--template", "none", "--config", cfg, "--data", TRAIN,
                  "--eval-data", TRAIN, *SMALL)
        assert [m for m in metrics(tmp_path / name) if "eval_kl" in m] == s["evals"]
        return [(e["step"], e["stage"]) for e in s["evals"]]

    assert evals("same", "") == [(0, "a"), (1, "a"), (2, "b")]
    assert evals("relaid", ", attn_ratio: 0.25") == [(0, "a"), (1, "a"), (1, "b"), (2, "b")]


def test_concat_packing_fills_every_row(models, tmp_path, capsys):
    from mamballama_cli.training.data import Example, pack_concat

    rows = pack_concat([Example([1, 2, 3], [False, True, True]), Example([4, 5, 6, 7], [False, False, True, True]),
                        Example([8, 9], [False, True])], 4)
    assert [r.ids for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]][:2]  # the 1-token tail predicts nothing
    assert rows[0].mask == [False, True, True, False] and rows[1].mask == [False, True, True, False]
    out = tmp_path / "concat"
    s = train(capsys, models["hybrid"], out, "--template", "none", "--data", TRAIN, "--steps", "2",
              "--packing", "concat", *SMALL)
    assert s["packing"].startswith("concat")
    recs = [r for r in metrics(out) if "loss" in r]
    assert all(r["tokens"] == 2 * 96 for r in recs)  # two full rows per step, no padding


def test_fit_packing_keeps_every_example_that_fits_a_row_whole(models, tmp_path, capsys):
    import random

    from mamballama_cli.training.data import Example, fill_ratio, pack_concat, pack_fit

    rnd = random.Random(0)
    exs, start = [], 0
    for n in [rnd.randint(2, 40) for _ in range(200)] + [75, 130]:  # two longer than a row of 64
        exs.append(Example(list(range(start, start + n)), [False] + [True] * (n - 1)))
        start += n
    rows = pack_fit(exs, 64)
    assert all(len(r) <= 64 for r in rows) and not any(r.mask[0] for r in rows)
    tokens = [t for r in rows for t in r.ids]
    assert sorted(tokens) == list(range(start))  # every token once: nothing truncated, nothing repeated
    for ex in exs:  # each example of at most a row lies whole, in order, inside one row
        if len(ex.ids) <= 64:
            assert any(r.ids[i:i + len(ex.ids)] == ex.ids for r in rows for i in range(len(r) - len(ex.ids) + 1))
    assert [r.ids for r in rows].count(list(range(start - 130, start - 130 + 64))) == 1  # full piece: own row
    assert fill_ratio(rows, 64) > 0.95
    cut = sum(1 for ex in exs if len(ex.ids) <= 64 and not any(
        r.ids[i:i + len(ex.ids)] == ex.ids for r in pack_concat(exs, 64) for i in range(len(r) - len(ex.ids) + 1)))
    assert cut > 10  # what concat does to the same examples

    out = tmp_path / "fit"
    s = train(capsys, models["hybrid"], out, "--template", "none", "--data", TRAIN, "--steps", "2",
              "--packing", "fit", *SMALL)
    assert s["packing"].startswith("fit") and "of row tokens are real" in s["packing"]
    assert all(0 < r["tokens"] <= 2 * 96 for r in metrics(out) if "loss" in r)


def test_bad_recipe_options_are_one_line_errors(models, tmp_path, capsys):
    for flag, value in (("--loss-positions", "prompts"), ("--kl-reduction", "batch"), ("--tokens", "0"),
                        ("--max-seconds", "-1")):
        r = run_cli(["distill", models["hybrid"], "--data", TRAIN, "--output", tmp_path / "x", flag, value], capsys)
        assert r.code != 0 and len(r.err.strip().splitlines()) == 1, (flag, r.err)
        assert flag.lstrip("-").replace("-", "_") in r.err or flag in r.err


def test_fitted_plan_shrinks_what_remains_by_one_factor():
    from mamballama_cli.training.engine import fitted_plan

    assert fitted_plan([10, 20, 30], 1, 5, 1.0, 22.5) == [10, 12, 15]  # 45 s of steps left in 22.5 s: half each
    assert fitted_plan([10, 20, 30], 1, 5, 1.0, 100.0) == [10, 20, 30]  # it fits: unchanged, never lengthened
    assert fitted_plan([10, 20, 30], 1, 5, 1.0, -3.0) == [10, 5, 1]  # no time left: this stage ends, later get 1


def test_time_fit_measures_after_the_warm_up_steps_and_fits_the_rest():
    from mamballama_cli.training.engine import TimeFit

    now = [0.0]
    fit = TimeFit(100.0, 0.0, clock=lambda: now[0])
    fit.stage_start(0)

    def step(seconds, done, plan):
        now[0] += seconds
        return fit.after_step(done, plan, 0)

    plans, plan = [], [200]
    for i in range(10):  # 2 slow warm-up steps, then 1 s each
        plans.append(step(30.0 if i < 2 else 1.0, i + 1, plan))
        plan = plans[-1] or plan
    # step 3, the first measured (1 s): 197 s of steps left in 34 s usable, more than EARLY (2) times over: fitted
    # at once to 3 + 34 steps, not after the 8 measured steps
    assert plans[:2] == [None, None] and plans[2] == [3 + int(197 * (95 - 61) / 197)] == [37]
    assert plans[3:] == [None] * 7  # step 10's full measurement (1 s a step) agrees: 27 steps in 27 s
    assert all(step(1.0, i + 1, [37]) is None for i in range(10, 17))  # next look: 8 steps on
    assert step(2.0, 18, [37]) == [18 + int(19 * (95 - 77) / (19 * 1.125))]  # slower steps: shorter again


def test_time_fit_waits_for_the_full_measurement_where_the_plan_is_not_far_too_long():
    """A plan that overshoots by less than EARLY times at the fastest measured step waits for the 8 measured
    steps, so that one quick step cannot cut a plan on its own."""
    from mamballama_cli.training.engine import TimeFit

    now = [0.0]
    fit = TimeFit(100.0, 0.0, clock=lambda: now[0])
    fit.stage_start(0)
    plans = []
    # 1 s steps but the third, 0.5 s: at step 3 the 147 steps left need 73.5 s at 0.5 s, inside the 92.5 s left, so
    # no early cut; step 10's full measurement (0.9375 s a step) fits 140 steps into 85.5 s
    for i in range(10):
        now[0] += 0.5 if i == 2 else 1.0
        plans.append(fit.after_step(i + 1, [150], 0))
    assert plans[:9] == [None] * 9
    assert plans[9] == [10 + int(140 * (95 - 9.5) / (140 * (7 + 0.5) / 8))]


def test_time_fit_grows_back_after_slow_first_steps_but_never_past_its_ceiling():
    """Kernels compiling for new shapes slowed a real run's first steps for a while (2026-12-04, H200: steps 3-10
    at 0.1-0.9 s, then about 0.15 s): the first fit shrinks the plan, a later look at the fast steps grows it back,
    at most to the plan the run started with; a lone spike counts at most SPIKE times the median."""
    from mamballama_cli.training.engine import TimeFit

    now = [0.0]
    fit = TimeFit(100.0, 0.0, clock=lambda: now[0], ceiling=[400])
    fit.stage_start(0)

    def step(seconds, done, plan):
        now[0] += seconds
        return fit.after_step(done, plan, 0)

    plan = [400]
    for i in range(10):  # 10 slow steps at 2 s: at step 3 (6 s spent, 89 s usable) 397 steps need 794 s: 44 more
        plan = step(2.0, i + 1, plan) or plan
    assert plan == [3 + int(397 * 89 / 794)] == [47]  # step 10's full measurement agrees: 37 steps at 2 s in 75 s
    grown = None
    for done in range(11, 47):  # fast steps from here: 0.1 s
        grown = step(0.1, done, plan) or grown
        if grown:
            break
    assert grown is not None and grown[0] > 47 and grown[0] <= 400, grown
    assert step(0.1, done + 1, grown) is None  # it fits: no change
    # never past the ceiling, however much time is left
    fit2 = TimeFit(1e6, 0.0, clock=lambda: now[0], ceiling=[50])
    fit2.stage_start(0)
    fit2.last = now[0]
    assert all(fit2.after_step(i + 1, [50], 0) is None for i in range(20))
    fit2.times = [1.0, 1.0] + [1.0] * 7 + [100.0]  # one spike among 1 s steps: counted as 3 s
    assert abs(fit2.step_seconds() - (7 * 1.0 + 3.0) / 8) < 1e-9


def test_fit_to_time_ends_the_schedule_inside_the_budget(models, tmp_path, capsys):
    """--fit-to-time: a plan far longer than --max-seconds is shortened as it runs, so every stage still runs to
    the end of its cosine decay (the last learning rate near zero) and the clock never cuts it."""
    out = tmp_path / "fit"
    s = train(capsys, models["hybrid"], out, "--template", "none", "--data", TRAIN, "--steps", "5000",
              "--max-seconds", "20", "--fit-to-time", "--lr", "1e-3", *SMALL)
    assert not s["time_budget_reached"] and not s["stopped_early"], s
    assert s["planned_steps"] == 5000 and s["steps"] == sum(s["fitted_plan"]) < 5000
    recs = [r for r in metrics(out) if "loss" in r]
    assert recs[-1]["stage_step"] == s["fitted_plan"][-1] and recs[-1]["lr"] < 0.05 * 1e-3
    assert (out / "model.safetensors").is_file() and s["seconds"] < 20 * 1.5
    bad = run_cli(["distill", models["hybrid"], "--output", str(tmp_path / "x"), "--data", TRAIN, "--fit-to-time"],
                  capsys)
    assert bad.code != 0 and "--max-seconds" in bad.err and len(bad.err.strip().splitlines()) == 1


def test_fit_to_time_resume_keeps_the_fitted_plan(models, tmp_path, capsys):
    """A checkpoint of a fitted run keeps its plan: --resume continues the shortened schedule (its learning rate
    goes on down), not the recipe's original 3,000 steps."""
    out = tmp_path / "fitres"
    args = ["--template", "none", "--data", TRAIN, "--steps", "3000", "--max-seconds", "15", "--fit-to-time",
            "--lr", "1e-3", *SMALL]
    first = train(capsys, models["hybrid"], out, *args, "--max-steps", "40")
    plan = first["fitted_plan"]
    assert first["steps"] == 40 and first["stopped_early"] and 40 < plan[0] < 3000
    lr_before = [r for r in metrics(out) if "loss" in r][-1]["lr"]
    second = train(capsys, models["hybrid"], out, *args, "--resume")
    recs = [r for r in metrics(out) if "loss" in r]
    assert second["steps"] == sum(second["fitted_plan"]) and second["fitted_plan"][0] <= plan[0]
    assert recs[40]["step"] == 41 and recs[40]["lr"] < lr_before  # resumed on the shortened decay
    assert not second["time_budget_reached"] and recs[-1]["lr"] < 0.05 * 1e-3

