"""The chat-benchmark tasks of the report: answers in MT-Bench / AlpacaEval formats, judged through an
OpenAI-compatible endpoint (judge.py), every judgment cached as a cell and counted."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mamballama_cli.evaluation.config import EvalConfig
from mamballama_cli.evaluation.models import STUDENT, TEACHER
from mamballama_cli.evaluation.run import Run, safe_name, short_sha
from mamballama_cli.output import log

def _judge_client(cfg: EvalConfig):
    from mamballama_cli.evaluation.judge import JudgeClient

    if not cfg.judge_base_url:
        return None
    return JudgeClient(cfg.judge_base_url, cfg.judge_model, cfg.judge_api_key_env, cfg.judge_retries,
                       cfg.judge_backoff_s, cfg.judge_timeout_s, cfg.judge_max_tokens)


def _run_jobs(run: Run, jobs: list, label: str) -> list:
    """Run judge jobs (callables) on a thread pool; results in job order."""
    if not jobs:
        return []
    t0 = time.perf_counter()
    log(f"[{label}] {len(jobs)} judgment(s) from {run.cfg.judge_model} (cached ones are not asked again)")
    with ThreadPoolExecutor(max_workers=run.cfg.judge_concurrency) as pool:
        results = list(pool.map(lambda job: job(), jobs))
    log(f"[{label}] judged in {time.perf_counter() - t0:.1f} s")
    failed = [r for r in results if r["status"] == "failed"]
    run.judge_calls["total"] += len(results)
    run.judge_calls["failed"] += len(failed)
    if failed and not run.judge_calls["first_failure"]:
        run.judge_calls["first_failure"] = failed[0].get("detail") or "no detail"
    return results


def _judgment_cell(run: Run, task: str, role: str, name: str, settings: dict, call):
    """A judgment, cached unless the endpoint failed (a failed call is retried by the next run)."""
    cached = run.store.get(task, role, name, settings)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    result = call()
    if result["status"] != "failed":
        with run.lock:
            run.store.put(task, role, name, settings, result, time.perf_counter() - t0)
    return result


def _count(results: list[dict], parsed_key: str) -> dict:
    c = {"total": len(results), "parsed": 0, "unparsed": 0, "refused": 0, "malformed": 0, "failed": 0}
    for r in results:
        if r["status"] == "ok":
            c["parsed" if r.get(parsed_key) is not None else "unparsed"] += 1
        else:
            c[r["status"]] += 1
    return c


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, (var / len(values)) ** 0.5


def _single_job(run, client, bench, role, name, settings, system, user):
    from mamballama_cli.evaluation.judge import parse_rating

    def call():
        reply = client.chat(system, user)
        score = parse_rating(reply.text) if reply.status == "ok" else None
        return {"status": reply.status, "score": score, "judgment": reply.text, "detail": reply.detail}

    return lambda: _judgment_cell(run, f"{bench}-judge-single", role, name, settings, call)


def _pair_job(run, client, bench, name, settings, user, first: str):
    """A pairwise judgment; ``first`` says who is answer A: "student" (the contender) or "baseline"."""
    from mamballama_cli.evaluation.judge import PAIR_SYSTEM, parse_verdict

    def call():
        reply = client.chat(PAIR_SYSTEM, user)
        verdict = parse_verdict(reply.text) if reply.status == "ok" else None
        winner = None
        if verdict == "tie":
            winner = "tie"
        elif verdict is not None:
            winner = "student" if (verdict == "A") == (first == "student") else "baseline"
        return {"status": reply.status, "verdict": verdict, "winner": winner, "judgment": reply.text,
                "detail": reply.detail, "contender_shown_as": "A" if first == "student" else "B"}

    return lambda: _judgment_cell(run, f"{bench}-judge-pair", "pair", name, settings, call)


def _win_rate(results: list[dict]) -> tuple[float | None, float | None]:
    scores = [1.0 if r["winner"] == "student" else 0.5 if r["winner"] == "tie" else 0.0
              for r in results if r.get("winner") is not None]
    return _mean_se(scores)


def _judge_settings(cfg: EvalConfig, **extra) -> dict:
    from mamballama_cli.evaluation.judge import PROMPT_VERSION

    from mamballama_cli.redact import redact_url

    return {"judge_model": cfg.judge_model, "judge_url": redact_url(cfg.judge_base_url),
            "prompt_version": PROMPT_VERSION, "max_tokens": cfg.judge_max_tokens, **extra}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from mamballama_cli.evaluation.store import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def task_mt_bench(run: Run) -> None:
    from mamballama_cli.evaluation import chat
    from mamballama_cli.evaluation.judge import SINGLE_SYSTEM, judge_label, single_prompt, pair_prompt

    cfg, pair, rep = run.cfg, run.pair, run.report
    questions, source = chat.load_mt_bench(cfg.mt_bench)
    answers: dict[str, dict] = {}
    for role in pair.roles:
        answers[role] = {}
        for q in questions:
            settings = {"turns": q["turns"], "max_new_tokens": cfg.max_new_tokens, "system": cfg.system_prompt,
                        **run.model_key(role)}

            def compute(q=q, role=role):
                model, tok = pair.get(role)
                log(f"[mt-bench] {role}: question {q['question_id']}")
                return chat.answer_mt_bench(model, tok, q, cfg.max_new_tokens, cfg.system_prompt)

            answers[role][q["question_id"]] = run.store.run("mt-bench-answer", role, f"q{q['question_id']}",
                                                            settings, compute)
        _write_jsonl(run.out / "mt_bench" / "model_answer" / f"{safe_name(pair.name(role))}.jsonl",
                     [chat.mt_bench_record(q["question_id"], pair.name(role), answers[role][q["question_id"]])
                      for q in questions])
    rep.note("MT-Bench", f"questions: {source} ({len(questions)}); answers in FastChat's format under "
             f"`mt_bench/model_answer/` (greedy, max {cfg.max_new_tokens} new tokens, the model's chat template).")
    client = _judge_client(cfg)
    if client is None:
        rep.note("MT-Bench", "not judged: pass --judge-base-url and --judge-model to grade the answers.")
        return
    modes = cfg.judge_mode_list()
    n_turns = max(len(q["turns"]) for q in questions)
    if "single" in modes:
        jobs, keys = [], []
        for role in pair.roles:
            for q in questions:
                ans = answers[role][q["question_id"]]
                for turn in range(len(q["turns"])):
                    user = single_prompt(q["turns"], ans, turn, q.get("reference"))
                    settings = _judge_settings(cfg, prompt=short_sha(SINGLE_SYSTEM + user))
                    jobs.append(_single_job(run, client, "mt-bench", role, f"q{q['question_id']}-t{turn + 1}",
                                            settings, SINGLE_SYSTEM, user))
                    keys.append((role, q["question_id"], turn))
        results = _run_jobs(run, jobs, "mt-bench single")
        judged = [{"question_id": qid, "model": pair.name(role), "role": role, "turn": turn + 1,
                   "judge": [cfg.judge_model, "mamballama-single"], **res}
                  for (role, qid, turn), res in zip(keys, results)]
        _write_jsonl(run.out / "mt_bench" / "model_judgment" / f"{_slug(cfg.judge_model)}_single.jsonl", judged)
        counts = {}
        for role in pair.roles:
            mine = [j for j in judged if j["role"] == role]
            counts[role] = _count(mine, "score")
            rep.note("MT-Bench", f"single grading, {role}: {counts[role]['parsed']}/{counts[role]['total']} judgments "
                     f"parsed ({counts[role]['unparsed']} unparsed, {counts[role]['refused']} refused, "
                     f"{counts[role]['malformed']} malformed, {counts[role]['failed']} failed)")
        for turn in list(range(n_turns)) + [None]:
            stats = {}
            for role in pair.roles:
                vals = [j["score"] for j in judged if j["role"] == role and j["score"] is not None
                        and (turn is None or j["turn"] == turn + 1)]
                stats[role] = _mean_se(vals)
            label = f"score 1-10, turn {turn + 1}" if turn is not None else "score 1-10, all turns"
            t = stats.get(TEACHER, (None, None))
            rep.add("mt-bench", label, t[0], stats[STUDENT][0], stats[STUDENT][1])
        rep.details.setdefault("mt-bench", {})["single_counts"] = counts
    if "pairwise" in modes and pair.has_teacher:
        jobs = []
        for q in questions:
            s_ans, t_ans = answers[STUDENT][q["question_id"]], answers[TEACHER][q["question_id"]]
            for first in ("student", "baseline"):
                a, b = (s_ans, t_ans) if first == "student" else (t_ans, s_ans)
                user = pair_prompt(q["turns"], a, b)
                settings = _judge_settings(cfg, prompt=short_sha(user), first=first)
                jobs.append(_pair_job(run, client, "mt-bench", f"q{q['question_id']}-{first}-first", settings, user,
                                      first))
        results = _run_jobs(run, jobs, "mt-bench pairwise")
        c = _count(results, "verdict")
        wr, se = _win_rate(results)
        rep.add("mt-bench", "pairwise win rate of student vs teacher (ties 0.5)", None, wr, se, delta=None)
        rep.note("MT-Bench", f"pairwise student vs teacher, both orders per question: {c['parsed']}/{c['total']} "
                 f"judgments parsed ({c['unparsed']} unparsed, {c['refused']} refused, {c['malformed']} malformed, "
                 f"{c['failed']} failed)")
        _write_jsonl(run.out / "mt_bench" / "model_judgment" / f"{_slug(cfg.judge_model)}_pair.jsonl",
                     [{"question_id": questions[i // 2]["question_id"], "model_1": pair.name(STUDENT),
                       "model_2": pair.name(TEACHER), **res} for i, res in enumerate(results)])
        rep.details.setdefault("mt-bench", {})["pair_counts"] = c
    rep.note("MT-Bench", judge_label("mt-bench", cfg.judge_model))


def _slug(text: str) -> str:
    return safe_name(re.sub(r"[^A-Za-z0-9_.-]+", "_", text))


def task_alpaca_eval(run: Run) -> None:
    from mamballama_cli.evaluation import chat
    from mamballama_cli.evaluation.judge import judge_label, pair_prompt

    cfg, pair, rep = run.cfg, run.pair, run.report
    items, source = chat.load_alpaca_eval(cfg.alpaca_eval)
    outputs: dict[str, list[str]] = {}
    for role in pair.roles:
        outputs[role] = []
        for k, item in enumerate(items):
            settings = {"instruction": item["instruction"], "max_new_tokens": cfg.max_new_tokens,
                        "system": cfg.system_prompt, **run.model_key(role)}

            def compute(item=item, role=role, k=k):
                model, tok = pair.get(role)
                log(f"[alpaca-eval] {role}: instruction {k + 1}/{len(items)}")
                msgs = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + \
                    [{"role": "user", "content": item["instruction"]}]
                return chat.chat_reply(model, tok, msgs, cfg.max_new_tokens)

            outputs[role].append(run.store.run("alpaca-eval-answer", role, f"i{k}", settings, compute))
        name = pair.name(role)
        from mamballama_cli.io import write_json_atomic

        (run.out / "alpaca_eval" / safe_name(name)).mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.out / "alpaca_eval" / safe_name(name) / "model_outputs.json",
                          [chat.alpaca_eval_record(item, out, name) for item, out in zip(items, outputs[role])])
    lens = {role: sum(len(o) for o in outs) / len(outs) for role, outs in outputs.items()}
    rep.add("alpaca-eval", "mean answer length (characters)", lens.get(TEACHER), lens[STUDENT])
    rep.note("AlpacaEval", f"instructions: {source} ({len(items)}); outputs in AlpacaEval's format under "
             "`alpaca_eval/<model>/model_outputs.json` (run `alpaca_eval --model_outputs ...` on them for the official "
             "length-controlled win rate).")
    client = _judge_client(cfg)
    if client is None:
        rep.note("AlpacaEval", "not judged: pass --judge-base-url and --judge-model for pairwise win rates.")
        return
    if "pairwise" not in cfg.judge_mode_list():
        rep.note("AlpacaEval", "not judged: AlpacaEval is judged pairwise; add pairwise to --judge-modes.")
        return
    has_reference = all(isinstance(it.get("output"), str) for it in items)
    if has_reference:  # AlpacaEval's own setting: every model against the reference outputs in the eval set
        contenders = pair.roles
        baseline_name = items[0].get("generator", "the eval set's reference outputs")
    elif pair.has_teacher:
        contenders = [STUDENT]
        baseline_name = "teacher"
    else:
        rep.note("AlpacaEval", "not judged: the eval set has no reference outputs and there is no teacher to compare "
                 "against.")
        return
    rates: dict[str, tuple] = {}
    for role in contenders:
        jobs = []
        for k, item in enumerate(items):
            base = item["output"] if has_reference else outputs[TEACHER][k]
            mine = outputs[role][k]
            for first in ("student", "baseline"):
                a, b = (mine, base) if first == "student" else (base, mine)
                user = pair_prompt([item["instruction"]], [a], [b])
                settings = _judge_settings(cfg, prompt=short_sha(user), first=first)
                jobs.append(_pair_job(run, client, "alpaca-eval", f"{role}-i{k}-{first}-first", settings, user, first))
        results = _run_jobs(run, jobs, f"alpaca-eval {role}")
        c = _count(results, "verdict")
        rates[role] = _win_rate(results)  # "student" in the job means the contender, whichever role it is
        rep.note("AlpacaEval", f"pairwise {role} vs {baseline_name}, both orders per instruction: {c['parsed']}/"
                 f"{c['total']} judgments parsed ({c['unparsed']} unparsed, {c['refused']} refused, "
                 f"{c['malformed']} malformed, {c['failed']} failed)")
        rep.details.setdefault("alpaca-eval", {})[f"{role}_pair_counts"] = c
        _write_jsonl(run.out / "alpaca_eval" / safe_name(pair.name(role)) /
                     f"annotations_{_slug(cfg.judge_model)}.jsonl",
                     [{"instruction": items[i // 2]["instruction"], **res} for i, res in enumerate(results)])
    if has_reference:
        rep.add("alpaca-eval", f"win rate vs {baseline_name} (ties 0.5)", rates.get(TEACHER, (None,))[0],
                rates[STUDENT][0], rates[STUDENT][1])
    else:
        rep.add("alpaca-eval", "win rate of student vs teacher (ties 0.5)", None, rates[STUDENT][0],
                rates[STUDENT][1], delta=None)
    rep.note("AlpacaEval", judge_label("alpaca-eval", cfg.judge_model) + "; raw (not length-controlled) win rate.")
