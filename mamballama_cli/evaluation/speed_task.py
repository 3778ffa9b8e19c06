"""The speed task of the report: a small run of the speed benchmark (evaluation/speed.py, `eval speed`)."""

from __future__ import annotations

import importlib
import importlib.util

from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.evaluation.models import STUDENT, TEACHER
from mamballama_cli.evaluation.run import Run

SPEED_MODULE = "mamballama_cli.evaluation.speed"


def speed_available() -> str | None:
    """None when the speed benchmark can run, else the reason."""
    if importlib.util.find_spec(SPEED_MODULE) is None:
        return (f"--tasks speed: the speed benchmark ({SPEED_MODULE}) is not part of this build yet; drop speed from "
                "--tasks")
    return None


def _speed_rows(result: dict) -> list[tuple[str, dict | None, dict | None]]:
    """(metric, teacher row, hybrid row) pairs from the speed benchmark's rows."""
    def pick(section, model, **match):
        for r in result.get("rows", []):
            if r.get("section") == section and r.get("model") == model and "error" not in r \
                    and all(r.get(k) == v for k, v in match.items()):
                return r
        return None

    out = []
    for r in result.get("rows", []):
        if r.get("model") != "hybrid" or "error" in r:
            continue
        t = pick(r["section"], "teacher", batch=r["batch"], prompt_tokens=r["prompt_tokens"])
        where = f"batch {r['batch']}, {r['prompt_tokens']}-token prompt"
        out.append((f"decode tokens/s per sequence ({where})", t and t["decode_tok_s"], r["decode_tok_s"]))
        out.append((f"time to first token, s ({where})", t and t["ttft_s"], r["ttft_s"]))
        mb = 1e6
        if r.get("kv_bytes") is not None:
            hyb = r["kv_bytes"] + (r.get("state_bytes") or 0)
            out.append((f"cache MB, K/V + state ({where})", t and t.get("kv_bytes") / mb, hyb / mb))
        if r.get("peak_mem_bytes") is not None:
            out.append((f"peak memory MB ({where})", t and t.get("peak_mem_bytes") and t["peak_mem_bytes"] / mb,
                        r["peak_mem_bytes"] / mb))
    return out


def task_speed(run: Run) -> None:
    mod = importlib.import_module(SPEED_MODULE)
    if not hasattr(mod, "run_speed") or not hasattr(mod, "SpeedConfig"):
        raise MamballamaError(f"--tasks speed: {SPEED_MODULE} has no run_speed(); run `mamballama eval speed` "
                              "separately and drop speed from --tasks")
    cfg, pair = run.cfg, run.pair
    contexts = (cfg.speed_contexts or "").strip()
    options = {"contexts": mod.parse_int_list(contexts, "--speed-contexts") if contexts else [],
               "batch_sizes": mod.parse_int_list(cfg.speed_batch_sizes, "--speed-batch-sizes"),
               "new_tokens": cfg.speed_new_tokens, "context_new_tokens": cfg.speed_new_tokens,
               "teacher_new_tokens": cfg.speed_new_tokens, "prompt_tokens": cfg.speed_prompt_tokens}
    options = {k: v for k, v in options.items() if v is not None}
    if pair.configs[STUDENT].model_type != "mamballama":
        raise UsageError("--tasks speed measures a hybrid against its teacher; MODEL is not a mamballama hybrid")
    settings = {"device": cfg.device, "dtype": cfg.dtype, "seed": cfg.seed, **options,
                "student": run.hashes[STUDENT], "teacher": run.hashes.get(TEACHER)}

    def compute():
        scfg = mod.SpeedConfig(model=str(pair.paths[STUDENT]),
                               teacher=str(pair.paths[TEACHER]) if pair.has_teacher else None,
                               models=["hybrid", "teacher"] if pair.has_teacher else ["hybrid"],
                               dtype=cfg.dtype, device=cfg.device, seed=cfg.seed, **options)
        scfg.validate()
        return mod.run_speed(scfg)

    result = run.store.run("speed", "pair", "speed", settings, compute)
    from mamballama_cli.evaluation.store import write_text_atomic
    from mamballama_cli.io import write_json_atomic

    (run.out / "speed").mkdir(exist_ok=True)
    write_json_atomic(run.out / "speed" / "speed.json", result)  # the speed benchmark's own JSON
    if hasattr(mod, "format_table"):
        write_text_atomic(run.out / "speed" / "speed.txt", mod.format_table(result) + "\n")
    if any("error" not in r for r in result.get("rows", [])):  # the figure beside the JSON
        from mamballama_cli.evaluation.plots import speed_figure

        figure = speed_figure(run.out / "speed" / "speed.png", result)
        run.report.plots.append({"title": "Speed: memory and decode tokens/s", "path": f"speed/{figure.name}"})
    for metric, t, s in _speed_rows(result):
        run.report.add("speed", metric, t, s)
    machine = result.get("machine", {})
    run.report.note("Speed", f"from the speed benchmark (`mamballama eval speed`, full output in `speed/`): "
                    f"{machine.get('name', '')} ({machine.get('device', '')}), {result.get('dtype', '')}; the hybrid "
                    "decodes with the static decoder, the teacher through transformers.")
    run.report.details["speed"] = {"summary": result.get("summary"), "floor": result.get("floor")}
