"""`mamballama eval MODEL ...`: run the asked tasks for student and teacher, cell by cell, and write the report.

Order of work: every cheap check first (files, options, optional packages), then the output directory
rule and checkpoint hashes, then the tasks. Models load on the first cell that needs them, so a fully
cached rerun only rewrites the report. Whatever happens, the report of the finished cells is written.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.evaluation import chat_tasks, speed_task
from mamballama_cli.evaluation.config import EvalConfig, parse_depths, parse_lengths, split_list
from mamballama_cli.evaluation.models import STUDENT, TEACHER, ModelPair
from mamballama_cli.evaluation.report import Report
from mamballama_cli.evaluation.run import Run, resolve_distill_length, safe_name, short_sha
from mamballama_cli.evaluation.store import CellStore, prepare_output
from mamballama_cli.output import every, log

RETRIEVAL_NEW_TOKENS = {"passkey": 8, "needle": 12}


# --- perplexity, agreement, KL ------------------------------------------------------------------------

def task_perplexity(run: Run) -> None:
    from mamballama_cli.evaluation import haystack
    from mamballama_cli.evaluation.perplexity import load_documents

    cfg, pair = run.cfg, run.pair
    sources = split_list(cfg.ppl_data) or [haystack.BUILTIN]
    detail = {}
    for src in sources:
        docs = [haystack.builtin_text()] if src == haystack.BUILTIN else load_documents(src, cfg.ppl_field)
        label = "built-in text" if src == haystack.BUILTIN else Path(src).name
        settings = {"source": src, "content": short_sha("\0".join(docs)), "max_length": cfg.ppl_max_length,
                    "max_tokens": cfg.ppl_max_tokens, "student": run.hashes[STUDENT],
                    "teacher": run.hashes.get(TEACHER)}

        def compute(docs=docs, label=label):
            from mamballama_cli.evaluation.perplexity import evaluate_windows, token_windows

            student, tok = pair.get(STUDENT)
            teacher = pair.get(TEACHER)[0] if pair.has_teacher else None
            windows = token_windows(tok, docs, cfg.ppl_max_length, cfg.ppl_max_tokens)
            log(f"[perplexity] {label}: {len(windows)} window(s), {sum(map(len, windows))} tokens")
            return evaluate_windows(windows, student, teacher, on_window=every(10.0, f"[perplexity] {label}: window"))

        res = run.store.run("perplexity", "pair", label, settings, compute)
        detail[label] = res
        t = res.get("teacher", {})
        s = res["student"]
        run.report.add("perplexity", f"perplexity ({label}, {res['tokens']} tokens)", t.get("perplexity"),
                       s["perplexity"], s["perplexity_stderr"])
        if "agreement" in res:
            run.report.add("perplexity", f"next-token agreement with teacher ({label})", None,
                           res["agreement"]["value"], res["agreement"]["stderr"])
            run.report.add("perplexity", f"KL(teacher‖student), nats/token ({label})", None,
                           res["kl_teacher_student"]["value"], res["kl_teacher_student"]["stderr"])
    run.report.details["perplexity"] = detail


# --- passkey and needle ---------------------------------------------------------------------------------

def task_retrieval(run: Run, kind: str) -> None:
    from mamballama_cli.evaluation import haystack, plots
    from mamballama_cli.evaluation.retrieval import PROMPT_VERSION, PromptBuilder, greedy_answerer, score_trials

    cfg, pair = run.cfg, run.pair
    distill = run.distill_length()
    lengths = parse_lengths(cfg.lengths, distill)
    depths = parse_depths(cfg.depths)
    hay_sentences, hay_source = None, None
    if kind == "needle":
        text, hay_source = haystack.load_text(cfg.haystack)
        hay_sentences = haystack.sentences(text)
    base = {"kind": kind, "trials": cfg.trials, "seed": cfg.seed, "prompt_version": PROMPT_VERSION,
            "max_new_tokens": RETRIEVAL_NEW_TOKENS[kind],
            "haystack": short_sha("".join(hay_sentences)) if hay_sentences else None}
    grids: dict[str, list[list[float]]] = {}
    per_length: dict[str, list[dict]] = {}
    cells_total = len(pair.roles) * len(lengths) * len(depths)
    done = 0
    for role in pair.roles:
        grid = [[float("nan")] * len(lengths) for _ in depths]
        counts = [{"correct": 0, "n": 0} for _ in lengths]

        for j, length in enumerate(lengths):
            for i, depth in enumerate(depths):
                settings = {**base, "length": length, "depth": depth, **run.model_key(role)}

                def compute(length=length, depth=depth, role=role):
                    model, tok = pair.get(role)
                    key = (role, kind)
                    if key not in run._builders:
                        run._builders[key] = PromptBuilder(kind, tok, hay_sentences)
                    builder = run._builders[key]
                    trials = [builder.build(length, depth, k, cfg.seed) for k in range(cfg.trials)]
                    t0 = time.perf_counter()
                    res = score_trials(trials, greedy_answerer(model, tok, RETRIEVAL_NEW_TOKENS[kind]))
                    log(f"[{kind}] {role} length {length} depth {depth:.2f}: {res['correct']}/{res['n']} "
                        f"({time.perf_counter() - t0:.1f} s)")
                    return res

                res = run.store.run(kind, role, f"L{length}-d{depth:.3f}", settings, compute)
                done += 1
                grid[i][j] = res["accuracy"]
                counts[j]["correct"] += res["correct"]
                counts[j]["n"] += res["n"]
        log(f"[{kind}] {done}/{cells_total} cells done")
        grids[role] = grid
        per_length[role] = counts

    def acc(c):
        return c["correct"] / c["n"] if c["n"] else float("nan")

    def se(c):
        p = acc(c)
        return (p * (1 - p) / c["n"]) ** 0.5 if c["n"] else float("nan")

    for j, length in enumerate(lengths):
        t = per_length.get(TEACHER)
        s = per_length[STUDENT][j]
        mark = f" ({length / distill:.3g}x distill)" if distill else ""
        run.report.add(kind, f"accuracy @ {length} tokens{mark}", acc(t[j]) if t else None, acc(s), se(s))
    total = {r: {"correct": sum(c["correct"] for c in v), "n": sum(c["n"] for c in v)} for r, v in per_length.items()}
    run.report.add(kind, "accuracy, all cells", acc(total[TEACHER]) if TEACHER in total else None,
                   acc(total[STUDENT]), se(total[STUDENT]))
    title = "Passkey retrieval" if kind == "passkey" else "Needle in a haystack"
    heat = plots.retrieval_heatmap(run.out / f"{kind}_heatmap.png", f"{title}: accuracy", lengths, depths, grids,
                                   distill)
    line = plots.accuracy_per_length(run.out / f"{kind}_accuracy.png", f"{title}: accuracy per length", lengths,
                                     {r: [acc(c) for c in v] for r, v in per_length.items()}, distill)
    run.report.plots += [{"title": f"{title}: depth x length", "path": heat.name},
                         {"title": f"{title}: accuracy per length", "path": line.name}]
    run.report.note(title, f"{cfg.trials} trial(s) per cell, seed {cfg.seed}, depths {depths}, lengths {lengths}; "
                    f"distillation length: {distill if distill else 'not recorded (pass --distill-length)'}"
                    + (f"; haystack: {hay_source}" if hay_source else "; filler: repeated plain sentences"))
    run.report.details[kind] = {"lengths": lengths, "depths": depths, "distill_length": distill, "grids": grids,
                                "per_length": per_length}


# --- lm-evaluation-harness --------------------------------------------------------------------------------

def task_lm_eval(run: Run) -> None:
    from mamballama_cli.evaluation import lm_eval_tasks as L
    from mamballama_cli.io import write_json_atomic

    cfg, pair = run.cfg, run.pair
    L.require_lm_eval()
    work = run.out / "lm_eval"
    specs, needs_index = L.resolve_specs(split_list(cfg.lm_eval_tasks), work)
    manager = []  # built on first need: indexing lm-eval's own tasks is slow

    def get_manager():
        if not manager:
            manager.append(L.task_manager(split_list(cfg.lm_eval_include), needs_index))
        return manager[0]

    def get_lm(role):
        if role not in run._lms:
            from mamballama_cli.evaluation.lm_eval_model import MamballamaLM

            model, tok = pair.get(role)
            run._lms[role] = MamballamaLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size)
        return run._lms[role]

    by_metric: dict[tuple, dict] = {}
    for role in pair.roles:
        for name, spec in specs:
            data_hash = None
            if isinstance(spec, dict):
                data_hash = short_sha(Path(spec["dataset_kwargs"]["data_files"]["test"]).read_text())
            elif Path(spec).is_file():
                data_hash = short_sha(Path(spec).read_text())
            settings = {"spec": spec, "data": data_hash, "limit": cfg.limit, "num_fewshot": cfg.num_fewshot,
                        "seed": cfg.seed, "include": split_list(cfg.lm_eval_include), **run.model_key(role)}

            def compute(spec=spec, role=role, name=name):
                log(f"[lm-eval] {role}: {name}")
                results, samples = L.run_task(get_lm(role), spec, get_manager(), cfg.limit, cfg.num_fewshot, cfg.seed)
                d = work / role
                d.mkdir(parents=True, exist_ok=True)
                for task_name, rows in samples.items():
                    from mamballama_cli.evaluation.store import write_text_atomic

                    write_text_atomic(d / f"{safe_name(task_name)}.samples.jsonl",
                                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                return results

            results = run.store.run("lm-eval", role, name, settings, compute)
            (work / role).mkdir(parents=True, exist_ok=True)
            write_json_atomic(work / role / f"{safe_name(name)}.json", results)  # lm-eval's own results JSON
            for r in L.metric_rows(results):
                by_metric.setdefault((r["name"], r["metric"]), {})[role] = r
    for (name, metric), per_role in by_metric.items():
        t, s = per_role.get(TEACHER), per_role.get(STUDENT)
        run.report.add("lm-eval", f"{name} {metric}", t["value"] if t else None, s["value"] if s else None,
                       s["stderr"] if s else None)
    run.report.note("lm-evaluation-harness", f"lm-eval's own results JSON per model: `lm_eval/<teacher|student>/"
                    f"<task>.json`, per-example records beside them. limit {cfg.limit}, num_fewshot "
                    f"{cfg.num_fewshot}, seed {cfg.seed}.")


# The function running each task (chat and speed live in their own modules).
TASK_FUNCTIONS = {
    "perplexity": task_perplexity,
    "passkey": lambda run: task_retrieval(run, "passkey"),
    "needle": lambda run: task_retrieval(run, "needle"),
    "lm-eval": task_lm_eval,
    "mt-bench": chat_tasks.task_mt_bench,
    "alpaca-eval": chat_tasks.task_alpaca_eval,
    "speed": speed_task.task_speed,
}


# --- the run -----------------------------------------------------------------------------------------------

def preflight(cfg: EvalConfig, tasks: list[str]) -> None:
    """Checks that need no model: optional packages and input files, so mistakes surface in a second."""
    from mamballama_cli.evaluation import chat, haystack
    from mamballama_cli.evaluation.perplexity import load_documents

    if "speed" in tasks:
        if why := speed_task.speed_available():
            raise MamballamaError(why)
    if "lm-eval" in tasks:
        from mamballama_cli.evaluation.lm_eval_tasks import require_lm_eval

        require_lm_eval()
    if {"passkey", "needle", "speed"} & set(tasks):  # their figures: a missing matplotlib fails before the work
        from mamballama_cli.figures import pyplot

        pyplot()
    if "perplexity" in tasks:
        for src in split_list(cfg.ppl_data):
            load_documents(src, cfg.ppl_field)
    if "needle" in tasks:
        haystack.load_text(cfg.haystack)
    if "mt-bench" in tasks:
        chat.load_mt_bench(cfg.mt_bench)
    if "alpaca-eval" in tasks:
        chat.load_alpaca_eval(cfg.alpaca_eval)


def check_lengths(run_cfg: EvalConfig, tasks: list[str], pair: ModelPair, distill: int | None) -> None:
    """Retrieval lengths resolve (multiples need a distillation length) and fit the prompts, before any work."""
    kinds = [k for k in ("passkey", "needle") if k in tasks]
    if not kinds:
        return
    from transformers import AutoTokenizer

    from mamballama_cli.evaluation.retrieval import shortest_prompt

    lengths = parse_lengths(run_cfg.lengths, distill)
    tok = AutoTokenizer.from_pretrained(str(pair.paths[STUDENT]))
    for role in pair.roles:
        limit = getattr(pair.configs[role], "max_position_embeddings", None)
        if limit and lengths[-1] > limit:
            log(f"note: --lengths goes to {lengths[-1]} tokens, beyond the {role}'s max_position_embeddings {limit}; "
                "it is measured there anyway (that is the point of the test)")
    for kind in kinds:
        need = shortest_prompt(kind, tok)
        if lengths[0] < need + 16:
            raise UsageError(f"--lengths {lengths[0]} is too short for the {kind} prompt ({need} tokens without "
                             f"filler); use lengths of at least {need + 16}")
    check_kv_fits(pair, lengths[-1])


def check_kv_fits(pair: ModelPair, length: int) -> None:
    """The longest prompt's attention K/V alone, a lower bound of what a trial needs, must fit the device's free
    memory: a runaway --lengths is refused at once instead of swapping the machine to a halt or being killed."""
    from mamballama_cli.generation.fast import available_bytes, kv_bytes_per_token

    device = pair.device()
    free = available_bytes(device)
    if free is None:
        return
    elsize = pair.torch_dtype().itemsize
    for role in pair.roles:
        c = pair.configs[role]
        per_token = kv_bytes_per_token(c, elsize)
        window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
        need = per_token * min(length, window or length)  # a sliding window bounds the cache it keeps
        if need > free:
            raise UsageError(f"--lengths {length}: the {role}'s attention K/V alone would take "
                             f"{need / 1e9:,.1f} GB at that length, more than the {free / 1e9:,.1f} GB "
                             f"free on {device}; use lengths up to about {free // per_token:,} tokens")


def _exit_on_sigterm():
    """Turn SIGTERM (a scheduler's or `kill`'s stop) into SystemExit so the partial report still gets written."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, old)


def run_eval(cfg: EvalConfig) -> dict:
    from mamballama_cli.evaluation.repro import build_repro, checkpoint_hash, model_block
    from mamballama_cli.io import cache_dir

    t_start = time.perf_counter()
    tasks = cfg.task_list()
    preflight(cfg, tasks)
    from mamballama_cli.io import check_writable_parent

    check_writable_parent(Path(cfg.output).expanduser())  # before any checkpoint is read or hashed
    pair = ModelPair(cfg.model, cfg.teacher, cfg.dtype, cfg.device)
    check_lengths(cfg, tasks, pair, resolve_distill_length(cfg, pair, warn=True))
    hash_cache = cache_dir() / "checkpoint_hashes.json"
    hashes = {role: checkpoint_hash(pair.paths[role], hash_cache) for role in pair.roles}
    out, resumed = prepare_output(cfg.output, cfg.force, hashes[STUDENT])
    if resumed:
        log(f"resuming the eval in {out}: finished cells are reused")
    blocks = {role: model_block(pair.specs[role], pair.paths[role], pair.configs[role], hashes[role])
              for role in pair.roles}
    repro = build_repro(blocks[STUDENT], blocks.get(TEACHER), cfg.seed, pair.device(), pair.torch_dtype())
    repro["tasks"] = tasks
    store = CellStore(out, repro)
    report = Report()
    run = Run(cfg, pair, store, out, hashes, report)
    title = f"mamballama eval: {pair.name(STUDENT)}" + (f" vs teacher {pair.name(TEACHER)}" if pair.has_teacher else "")
    from mamballama_cli.io import write_json_atomic
    from mamballama_cli.config import to_dict

    from mamballama_cli.redact import redact_url

    written = to_dict(cfg)
    written["judge_base_url"] = redact_url(cfg.judge_base_url)
    write_json_atomic(out / "eval_config.json", {"command": "eval", **written})
    restore = _exit_on_sigterm()
    try:
        for task in tasks:
            t0 = time.perf_counter()
            TASK_FUNCTIONS[task](run)
            log(f"[{task}] done in {time.perf_counter() - t0:.1f} s")
    except BaseException as exc:
        from mamballama_cli.redact import redact_text

        report.errors.append(f"stopped during the run: {type(exc).__name__}: {redact_text(str(exc))[:200]} (rerun "
                             "the same command to resume)")
        raise
    finally:
        restore()
        timing = {"wall_s": round(time.perf_counter() - t_start, 1), "computed": store.computed,
                  "reused": store.reused, "reused_cell_s": round(store.reused_seconds, 1)}
        report.write(out, title, repro, timing)
        log(f"wrote {out / 'report.md'} and {out / 'results.json'} ({timing['wall_s']:.0f} s; "
            f"{store.computed} cell(s) computed, {store.reused} reused)")
    calls = run.judge_calls
    if calls["total"] and calls["failed"] == calls["total"] and not cfg.allow_judge_failures:
        raise MamballamaError(
            f"all {calls['total']} judge call(s) failed (first: {calls['first_failure'][:160]}); the report has no "
            f"judgments. Check --judge-base-url and the endpoint, or pass --allow-judge-failures to accept this")
    if calls["failed"]:
        log(f"warning: {calls['failed']} of {calls['total']} judge call(s) failed; rerun the same command to ask "
            "them again")
    return {"output": str(out), "rows": report.rows, "table": report.table(), "timing": timing}
