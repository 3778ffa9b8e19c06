"""Chat-benchmark answers in the benchmarks' own file formats, generated with the model's chat template.

MT-Bench (FastChat ``llm_judge``): questions are JSONL lines ``{"question_id", "category", "turns":
[turn1, turn2], "reference"?}``; answers are JSONL lines ``{"question_id", "answer_id", "model_id",
"choices": [{"index": 0, "turns": [answer1, answer2]}], "tstamp"}`` -- the layout FastChat's
``gen_judgment.py`` and ``show_result.py`` read from ``model_answer/<model_id>.jsonl``.

AlpacaEval: the eval set is a JSON list (or JSONL) of ``{"instruction", "output"?, "generator"?,
"dataset"?}``; model outputs are a JSON list of ``{"instruction", "output", "generator", "dataset"}``,
what ``alpaca_eval --model_outputs`` reads (its length-controlled win rate is computed there).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from mamballama_cli.errors import UsageError
from mamballama_cli.io import read_jsonl

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLE = "sample"
MT_BENCH_SAMPLE = DATA_DIR / "mt_bench_sample.jsonl"
ALPACA_EVAL_SAMPLE = DATA_DIR / "alpaca_eval_sample.json"


def load_mt_bench(path: str | None) -> tuple[list[dict], str]:
    """(questions, source); the built-in sample when ``path`` is None or 'sample'."""
    p = MT_BENCH_SAMPLE if path in (None, SAMPLE) else Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--mt-bench {path}: no such file; pass MT-Bench's question.jsonl (or leave it out for "
                         "the built-in sample)")
    questions = []
    for n, q in read_jsonl(p, f"--mt-bench {p}"):
        turns = q.get("turns") if isinstance(q, dict) else None
        if "question_id" not in (q if isinstance(q, dict) else {}) or not isinstance(turns, list) or not turns \
                or not all(isinstance(t, str) for t in turns):
            raise UsageError(f"--mt-bench {p} line {n}: need {{\"question_id\": ..., \"turns\": [str, ...]}}")
        questions.append(q)
    if not questions:
        raise UsageError(f"--mt-bench {p} holds no questions")
    return questions, ("built-in sample" if p == MT_BENCH_SAMPLE else str(p))


def load_alpaca_eval(path: str | None) -> tuple[list[dict], str]:
    p = ALPACA_EVAL_SAMPLE if path in (None, SAMPLE) else Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--alpaca-eval {path}: no such file; pass AlpacaEval's eval set (JSON or JSONL) or "
                         "leave it out for the built-in sample")
    text = p.read_text(encoding="utf-8")
    try:
        items = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError:
        raise UsageError(f"--alpaca-eval {p} is neither a JSON list nor JSONL") from None
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict) or not isinstance(item.get("instruction"), str):
            raise UsageError(f"--alpaca-eval {p} item {n}: need {{\"instruction\": str, ...}}")
    if not items:
        raise UsageError(f"--alpaca-eval {p} holds no instructions")
    return items, ("built-in sample" if p == ALPACA_EVAL_SAMPLE else str(p))


def chat_reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """Greedy reply to a conversation, formatted by the tokenizer's chat template."""
    from mamballama_cli.generation.plain import generate
    from mamballama_cli.generation.sampling import SamplingConfig

    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("chat benchmarks need a chat model: this tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return generate(model, tokenizer, ids, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)).text.strip()


def answer_mt_bench(model, tokenizer, question: dict, max_new_tokens: int, system: str | None) -> list[str]:
    """Answers to every turn; each turn sees the earlier turns and the model's own earlier answers."""
    messages = [{"role": "system", "content": system}] if system else []
    answers = []
    for turn in question["turns"]:
        messages.append({"role": "user", "content": turn})
        reply = chat_reply(model, tokenizer, messages, max_new_tokens)
        messages.append({"role": "assistant", "content": reply})
        answers.append(reply)
    return answers


def mt_bench_record(question_id, model_id: str, answers: list[str]) -> dict:
    return {"question_id": question_id,
            "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{question_id}").hex[:22],
            "model_id": model_id, "choices": [{"index": 0, "turns": answers}], "tstamp": time.time()}


def alpaca_eval_record(item: dict, output: str, generator: str) -> dict:
    return {"instruction": item["instruction"], "output": output, "generator": generator,
            "dataset": item.get("dataset", "mamballama")}
