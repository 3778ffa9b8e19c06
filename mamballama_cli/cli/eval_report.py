"""`mamballama eval MODEL [--teacher T] --tasks ... --output DIR` (the teacher-vs-student report)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamballama_cli.cli.common import config_from_flags
from mamballama_cli.cli.options import config_option, device_option, dtype_option, force_option, json_option, seed_option

from mamballama_cli.output import out

HELP = "Evaluate MODEL against its teacher: perplexity, agreement, passkey/needle, lm-eval tasks, chat answers."
CONTEXT = {"help_option_names": ["-h", "--help"]}


def command(
    model: str = typer.Argument(..., help="Checkpoint directory (hybrid or transformers model), or 'default'."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Directory for results.json, report.md, "
                                         "plots and answer files. A previous eval of the same MODEL resumes there."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher checkpoint or 'default'; default: the one "
                                          "recorded in MODEL's config; 'none' to evaluate MODEL alone."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma list of perplexity, passkey, needle, lm-eval, "
                                        "mt-bench, alpaca-eval, speed. Default: perplexity,passkey,needle."),
    force: bool = force_option("--output that is not a resumable run"),
    config: Optional[Path] = config_option(),
    dtype: Optional[str] = dtype_option(),
    device: Optional[str] = device_option(),
    seed: Optional[int] = seed_option("the retrieval keys, lm-eval and sampling"),
    ppl_data: Optional[str] = typer.Option(None, "--ppl-data", help="Comma list of .txt / .jsonl files for "
                                           "perplexity; default: built-in English text."),
    ppl_field: Optional[str] = typer.Option(None, "--ppl-field", help="JSONL field with the text (default text)."),
    ppl_max_length: Optional[int] = typer.Option(None, "--ppl-max-length", help="Tokens per window (default 1024)."),
    ppl_max_tokens: Optional[int] = typer.Option(None, "--ppl-max-tokens", help="Tokens scored per file "
                                                 "(default 16384)."),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="Context lengths: tokens (512,2k) or multiples of "
                                          "the distillation length (1x,4x,20x). Default 1x,2x,4x."),
    depths: Optional[str] = typer.Option(None, "--depths", help="Needle depths, 0..1 (default 0,0.25,0.5,0.75,1)."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Random keys per (length, depth) cell (default 3)."),
    distill_length: Optional[int] = typer.Option(None, "--distill-length", help="Distillation length in tokens when "
                                                 "the checkpoint records none."),
    haystack: Optional[str] = typer.Option(None, "--haystack", help="Text file for the needle task; default: "
                                           "built-in English text."),
    lm_eval_tasks: Optional[str] = typer.Option(None, "--lm-eval-tasks", help="Comma list of lm-eval task names, task "
                                                ".yaml files or multiple-choice .jsonl files."),
    lm_eval_include: Optional[str] = typer.Option(None, "--lm-eval-include", help="Extra lm-eval task directories "
                                                  "(comma list)."),
    limit: Optional[float] = typer.Option(None, "--limit", help="Examples per lm-eval task (or a fraction < 1)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Few-shot examples for lm-eval tasks."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="lm-eval batch size (default 8)."),
    mt_bench: Optional[str] = typer.Option(None, "--mt-bench", help="MT-Bench question.jsonl; default: a built-in "
                                           "sample of 6 two-turn questions."),
    alpaca_eval: Optional[str] = typer.Option(None, "--alpaca-eval", help="AlpacaEval eval set (JSON/JSONL); default: "
                                              "a built-in sample of 6 instructions."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Chat answer length cap "
                                                 "(default 512)."),
    judge_base_url: Optional[str] = typer.Option(None, "--judge-base-url", help="OpenAI-compatible endpoint, e.g. "
                                                 "https://api.openai.com/v1; without it answers are written, "
                                                 "not judged."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="Judge model name at that endpoint."),
    judge_api_key_env: Optional[str] = typer.Option(None, "--judge-api-key-env", help="NAME of the environment "
                                                    "variable holding the API key (default OPENAI_API_KEY)."),
    judge_modes: Optional[str] = typer.Option(None, "--judge-modes", help="single,pairwise (default both)."),
    judge_concurrency: Optional[int] = typer.Option(None, "--judge-concurrency", help="Parallel judge requests "
                                                    "(default 4)."),
    allow_judge_failures: bool = typer.Option(False, "--allow-judge-failures", help="Exit 0 even when every "
                                              "judge call failed (by default that is an error)."),
    speed_contexts: Optional[str] = typer.Option(None, "--speed-contexts", help="speed: prompt lengths of the "
                                                 "context sweep (default 1k,4k; '' for none)."),
    speed_batch_sizes: Optional[str] = typer.Option(None, "--speed-batch-sizes", help="speed: batch sizes "
                                                    "(default 1)."),
    speed_new_tokens: Optional[int] = typer.Option(None, "--speed-new-tokens", help="speed: tokens decoded per "
                                                   "run (default 32)."),
    json_out: bool = json_option("the result rows (instead of the table)"),
):
    import json

    from mamballama_cli.evaluation.config import EvalConfig
    from mamballama_cli.evaluation.runner import run_eval

    cfg = config_from_flags(
        EvalConfig, config, model=model, output=output, teacher=teacher, tasks=tasks, force=force or None,
        dtype=dtype, device=device, seed=seed, ppl_data=ppl_data, ppl_field=ppl_field, ppl_max_length=ppl_max_length,
        ppl_max_tokens=ppl_max_tokens, lengths=lengths, depths=depths, trials=trials, distill_length=distill_length,
        haystack=haystack, lm_eval_tasks=lm_eval_tasks, lm_eval_include=lm_eval_include, limit=limit,
        num_fewshot=num_fewshot, batch_size=batch_size, mt_bench=mt_bench, alpaca_eval=alpaca_eval,
        max_new_tokens=max_new_tokens, judge_base_url=judge_base_url, judge_model=judge_model,
        judge_api_key_env=judge_api_key_env, judge_modes=judge_modes, judge_concurrency=judge_concurrency,
        allow_judge_failures=allow_judge_failures or None, speed_contexts=speed_contexts,
        speed_batch_sizes=speed_batch_sizes, speed_new_tokens=speed_new_tokens,
    )
    result = run_eval(cfg)
    if json_out:
        out(json.dumps({"output": result["output"], "rows": result["rows"], "timing": result["timing"]}, indent=2))
    else:
        out(result["table"])
