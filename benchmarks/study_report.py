"""Summarise a benchmarks/study_smollm2.sh run: curves, tables and the targets of issue 14.

    python benchmarks/study_report.py --results runs/study/results --out runs/study/results

Reads the run's metrics-*.jsonl (held-out CE at eval steps, tokens per step), eval-*-results.json (perplexity,
agreement, KL, passkey), convert-*.json (the step-0 numbers) and data-generate.json. Writes study.json (every
number the docs quote), study.md (the tables) and curves.png (held-out perplexity against tokens trained, and
against wall time, per run, with the teacher's line and the +25% / +50% targets).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RUNS = {
    "d50": "50% attention, default recipe (even spacing)",
    "d50nr": "50% attention, default recipe (even spacing), without the recall documents",
    "d25": "25% attention, default recipe (even spacing)",
    "d50auto": "50% attention, default recipe, --attn-layers auto --placement-score kl",
    "d25auto": "25% attention, default recipe, --attn-layers auto --placement-score kl",
    "d50kr": "50% attention, default recipe, --attn-layers auto --placement-score kl+recall",
    "d25kr": "25% attention, default recipe, --attn-layers auto --placement-score kl+recall",
    "p50": "50% attention, the paper's start and recipe",
    "d50ng": "50% attention, default recipe (even spacing), without the gate (convert --no-gate)",
    "d50krng": "50% attention, default recipe, d50kr's attention layers, without the gate (convert --no-gate)",
    "d25krng": "25% attention, default recipe, d25kr's attention layers, without the gate (convert --no-gate)",
}

CONVERTED = {"d50": "h50", "d50nr": "h50", "d25": "h25", "d50auto": "h50auto", "d25auto": "h25auto", "d50kr": "h50kr", "d25kr": "h25kr",
             "p50": "h50paper", "d50ng": "h50ng", "d50krng": "h50krng", "d25krng": "h25krng"}
TARGETS = {"50": (1.25, 1.10), "25": (1.50, 1.20)}  # issue 14: (must, aim) as a multiple of the teacher's perplexity


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def curve(metrics: list[dict]) -> list[dict]:
    """(tokens trained, seconds, stage, held-out perplexity) at every held-out evaluation."""
    tokens = seconds = 0.0
    by_step: dict[int, tuple[float, float]] = {0: (0.0, 0.0)}
    for r in metrics:
        if "eval_ce" in r:
            continue
        tokens += r.get("tokens", 0)
        seconds += r.get("step_s", 0.0)
        by_step[r["step"]] = (tokens, seconds)
    out = []
    for r in metrics:
        if "eval_ce" in r:
            t, s = by_step.get(r["step"], (tokens, seconds))
            out.append({"step": r["step"], "stage": r.get("stage"), "tokens": t, "seconds": round(s, 1),
                        "ppl": math.exp(r["eval_ce"]), "kl": r.get("eval_kl")})
    return out


def eval_rows(res: dict | None) -> dict:
    """metric name -> (teacher, student) from an eval results.json."""
    rows = {}
    for r in (res or {}).get("rows", []):
        rows[r["metric"]] = (r.get("teacher"), r.get("student"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--teacher-eval-ppl", type=float, default=None,
                    help="the teacher's perplexity on the runs' --eval-data (benchmarks/heldout_ce.py), for the "
                         "curves' teacher line and the end-of-training ratios when `eval` did not run")
    args = ap.parse_args()
    res, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    study: dict = {"runs": {}, "timeline": (res / "timeline.txt").read_text() if (res / "timeline.txt").is_file()
                   else ""}
    gen = read_json(res / "data-generate.json")
    if gen:
        study["data_generate"] = {k: gen.get(k) for k in ("tokens", "sampled_tokens", "sequences", "seconds",
                                                          "tokens_per_s", "batch_size", "device") if k in gen}
    teacher_ppl = None
    for name, what in RUNS.items():
        rec: dict = {"what": what}
        conv = read_json(res / f"convert-{CONVERTED[name]}.json")
        if conv:
            cal = conv.get("calibration") or {}
            rec["attn_layers"] = conv.get("attn_layers")
            rec["step0_perplexity"] = cal.get("step0_perplexity")
            rec["mean_rel_error"] = cal.get("mean_rel_error")
            if cal.get("placement"):
                rec["placement"] = {k: cal["placement"].get(k) for k in ("score", "attn_layers")}
        rec["curve"] = curve(read_jsonl(res / f"metrics-{name}.jsonl"))
        summ = read_json(res / f"summary-{name}.json")
        if summ:
            rec["training"] = {k: summ.get(k) for k in ("steps", "total_steps", "seconds", "time_budget_reached",
                                                        "stopped_early")}
            rec["tokens_trained"] = rec["curve"][-1]["tokens"] if rec["curve"] else None
        ev = eval_rows(read_json(res / f"eval-{name}-results.json"))
        if ev:
            rec["eval"] = {k: {"teacher": v[0], "student": v[1]} for k, v in ev.items()}
            for k, (t, s) in ev.items():
                if k.startswith("perplexity (") and t is not None:
                    teacher_ppl = t
                    rec["heldout_ppl"] = s
                    rec["ratio_to_teacher"] = s / t if s and t else None
        if rec["curve"] or summ or ev:  # a run that trained or was evaluated; h50 converts whatever RUNS says
            study["runs"][name] = rec
    study["teacher_heldout_ppl"] = teacher_ppl
    # All held-out records, the first 1,024 tokens of each (benchmarks/heldout_ce.py, whatever the training rows'
    # length): the measure the runs of 2026-12-04 used as distill --eval-data.
    t_json = read_json(res / "heldout-teacher.json") or {}
    t_all, all_len = t_json.get("perplexity"), t_json.get("seq_len", 1024)
    study["teacher_all_records_ppl"] = t_all
    for name, rec in study["runs"].items():
        s_all = (read_json(res / f"heldout-{name}.json") or {}).get("perplexity")
        if s_all:
            rec["all_records_ppl"] = s_all
            rec["all_records_ratio"] = s_all / t_all if t_all else None
    if args.teacher_eval_ppl is None:  # the teacher on the runs' own --eval-data (rows of the study's SEQ)
        args.teacher_eval_ppl = (read_json(res / "heldout-teacher-seq.json") or {}).get("perplexity")
    study["teacher_eval_data_ppl"] = args.teacher_eval_ppl
    if args.teacher_eval_ppl:
        for rec in study["runs"].values():
            if rec.get("curve"):
                last = rec["curve"][-1]["ppl"]
                rec["end_of_training_eval_ppl"] = last
                rec["end_of_training_ratio_to_teacher"] = last / args.teacher_eval_ppl
    study["targets"] = {}
    for name, rec in study["runs"].items():
        if name.startswith("p") or rec.get("ratio_to_teacher") is None:
            continue
        must, aim = TARGETS[name[1:3]]
        study["targets"][f"{name}_within_{round((must - 1) * 100)}pct"] = rec["ratio_to_teacher"] <= must
        study["targets"][f"{name}_within_{round((aim - 1) * 100)}pct_aim"] = rec["ratio_to_teacher"] <= aim
        if rec.get("all_records_ratio"):
            study["targets"][f"{name}_within_{round((must - 1) * 100)}pct_all_records"] = rec["all_records_ratio"] <= must
    (out / "study.json").write_text(json.dumps(study, indent=1))

    lines = [f"| run | attention layers | tokens trained | eval-data ppl, start -> end (x teacher) | all records @{all_len} (x teacher) | eval ppl | x teacher | agreement | KL | passkey 1x / 4x / 20x |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rec in study["runs"].items():
        if not rec.get("curve") and not rec.get("eval"):
            continue  # a run this study did not make
        ev = rec.get("eval", {})
        agree = next((v["student"] for k, v in ev.items() if k.startswith("next-token agreement")), None)
        kl = next((v["student"] for k, v in ev.items() if k.startswith("KL(")), None)
        pk = [v["student"] for k, v in ev.items() if k.startswith("accuracy @")]
        f = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
        c = rec.get("curve") or []
        trail = (f"{c[0]['ppl']:.1f} -> {c[-1]['ppl']:.2f}" + (f" ({rec['end_of_training_ratio_to_teacher']:.2f}x)"
                 if rec.get("end_of_training_ratio_to_teacher") else "")) if c else "-"
        allr = (f"{rec['all_records_ppl']:.2f} ({f(rec.get('all_records_ratio'))}x)" if rec.get("all_records_ppl")
                else "-")
        lines.append(f"| {rec['what']} | {rec.get('attn_layers')} | {f((rec.get('tokens_trained') or 0) / 1e6, 1)} M | "
                     f"{trail} | {allr} | {f(rec.get('heldout_ppl'))} | {f(rec.get('ratio_to_teacher'), 3)} | {f(agree, 3)} | {f(kl, 3)} | "
                     f"{' / '.join(f(x) for x in pk) or '-'} |")
    first = next((r for r in study["runs"].values() if r.get("eval")), {})  # the teacher's passkey, any run's eval
    tpk = [v["teacher"] for k, v in (first.get("eval") or {}).items() if k.startswith("accuracy @")]
    lines.append(f"| teacher | all | - | {f(args.teacher_eval_ppl)} | {f(t_all)} | {f(teacher_ppl)} | 1 | - | - | {' / '.join(f(x) for x in tpk) or '-'} |")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(study["targets"]))
    plot(study, out / "curves.png")


def plot(study: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for rec in study["runs"].values():
        c = rec.get("curve") or []
        if not c:
            continue
        axes[0].plot([p["tokens"] / 1e6 for p in c], [p["ppl"] for p in c], marker=".", label=rec["what"])
        axes[1].plot([p["seconds"] / 60 for p in c], [p["ppl"] for p in c], marker=".", label=rec["what"])
    t = study.get("teacher_eval_data_ppl") or study.get("teacher_heldout_ppl")
    for ax in axes:
        if t:
            ax.axhline(t, color="k", lw=1, ls="--", label="teacher")
            ax.axhline(1.25 * t, color="tab:green", lw=1, ls=":", label="teacher + 25%")
            ax.axhline(1.5 * t, color="tab:olive", lw=1, ls=":", label="teacher + 50%")
        ax.set_yscale("log")
        ax.set_ylabel("held-out text perplexity (distill --eval-data)")
    axes[0].set_xlabel("tokens trained (M)")
    axes[1].set_xlabel("training time (min, steps only; the runs share one GPU)")
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct students: held-out perplexity while training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
