"""Options of `mamballama eval MODEL ...` (the teacher-vs-student report), merged once by config.merge_config."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from mamballama_cli.errors import UsageError

# Canonical task names and the spellings users reach for.
TASKS = ("perplexity", "passkey", "needle", "lm-eval", "mt-bench", "alpaca-eval", "speed")
ALIASES = {"ppl": "perplexity", "lm_eval": "lm-eval", "lmeval": "lm-eval", "mt_bench": "mt-bench",
           "mtbench": "mt-bench", "alpaca_eval": "alpaca-eval", "alpacaeval": "alpaca-eval", "niah": "needle"}
JUDGE_MODES = ("single", "pairwise")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def split_list(value) -> list[str]:
    """'a,b , c' or ['a', 'b,c'] -> ['a', 'b', 'c'] (YAML lists and comma strings both work)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    for item in items:
        out += [p.strip() for p in str(item).split(",") if p.strip()]
    return out


@dataclass
class EvalConfig:
    """Everything `mamballama eval MODEL` reads (also from --config FILE). Lists are comma strings or YAML lists."""

    model: str = ""
    teacher: str | None = None  # None: the teacher recorded in the hybrid's config; "none": no teacher
    tasks: str = "perplexity,passkey,needle"
    output: str = ""
    force: bool = False
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 1234

    # perplexity / agreement / KL
    ppl_data: list[str] = field(default_factory=list)  # .txt (one document) or .jsonl files; empty: built-in text
    ppl_field: str = "text"  # JSONL field holding the text
    ppl_max_length: int = 1024  # tokens per window (non-overlapping windows)
    ppl_max_tokens: int = 16384  # cap on tokens scored per file

    # passkey / needle-in-a-haystack
    lengths: str = "1x,2x,4x"  # absolute ("512,2k") or multiples of the distillation length ("1x,4x,20x")
    depths: str = "0,0.25,0.5,0.75,1"
    trials: int = 3  # random keys per (length, depth) cell
    distill_length: int | None = None  # used when the checkpoint records no distill_max_length
    haystack: str | None = None  # text file for the needle task; default: built-in public text

    # lm-evaluation-harness
    lm_eval_tasks: list[str] = field(default_factory=list)  # names, task YAML files, or multiple-choice JSONL
    lm_eval_include: list[str] = field(default_factory=list)  # extra task directories (offline YAML tasks)
    limit: float | None = None  # examples per lm-eval task (int) or fraction (< 1)
    num_fewshot: int | None = None
    batch_size: int = 8

    # chat benchmarks
    mt_bench: str | None = None  # question.jsonl in MT-Bench's format; default: the built-in sample
    alpaca_eval: str | None = None  # AlpacaEval eval set (JSON list or JSONL); default: the built-in sample
    max_new_tokens: int = 512
    system_prompt: str | None = None
    judge_base_url: str | None = None  # any OpenAI-compatible endpoint, e.g. https://api.openai.com/v1
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key (never the key)
    judge_modes: str = "single,pairwise"
    judge_concurrency: int = 4
    judge_retries: int = 5
    judge_backoff_s: float = 2.0
    judge_timeout_s: float = 120.0
    judge_max_tokens: int = 1024
    allow_judge_failures: bool = False  # exit 0 even when every judge call failed

    # speed (the speed benchmark of `mamballama eval speed`, run with small settings for the report)
    speed_contexts: str | None = "1k,4k"  # prompt lengths of the memory/context sweep ("" for none)
    speed_batch_sizes: str | None = "1"
    speed_prompt_tokens: int | None = 128
    speed_new_tokens: int | None = 32

    # --- derived views -------------------------------------------------------------------------------
    def task_list(self) -> list[str]:
        tasks: list[str] = []
        for raw in split_list(self.tasks):
            name = ALIASES.get(raw.lower(), raw.lower())
            if name not in TASKS:
                hint = difflib.get_close_matches(name, TASKS + tuple(ALIASES), n=1)
                raise UsageError(f"--tasks: unknown task {raw!r}; " + (f"did you mean {hint[0]!r}? " if hint else "")
                                 + f"known tasks: {', '.join(TASKS)}")
            if name not in tasks:
                tasks.append(name)
        return tasks

    def judge_mode_list(self) -> list[str]:
        modes = split_list(self.judge_modes)
        for m in modes:
            if m not in JUDGE_MODES:
                raise UsageError(f"--judge-modes: {m!r} is not one of {', '.join(JUDGE_MODES)}")
        return modes

    def validate(self) -> None:
        if not self.model:
            raise UsageError("MODEL is required: a checkpoint directory (hybrid or transformers model) or 'default'")
        if not self.output:
            raise UsageError("--output is required: the directory to write results.json, report.md and plots to")
        tasks = self.task_list()
        if not tasks:
            raise UsageError("--tasks is empty; pass e.g. --tasks perplexity,passkey,needle")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name, value, low in (("--ppl-max-length", self.ppl_max_length, 2),
                                 ("--ppl-max-tokens", self.ppl_max_tokens, 2),
                                 ("--trials", self.trials, 1), ("--batch-size", self.batch_size, 1),
                                 ("--max-new-tokens", self.max_new_tokens, 1),
                                 ("--judge-concurrency", self.judge_concurrency, 1)):
            if int(value) < low:
                raise UsageError(f"{name} {value} must be at least {low}")
        if self.distill_length is not None and int(self.distill_length) < 1:
            raise UsageError(f"--distill-length {self.distill_length} must be a positive number of tokens")
        if self.limit is not None and float(self.limit) <= 0:
            raise UsageError(f"--limit {self.limit} must be positive (a count, or a fraction below 1)")
        if "lm-eval" in tasks and not self.lm_eval_tasks:
            raise UsageError("--tasks lm-eval needs --lm-eval-tasks, e.g. arc_easy,hellaswag or my_task.jsonl "
                             "(built-in sample: mamballama_tiny_mc)")
        if self.judge_base_url and not self.judge_model:
            raise UsageError("--judge-base-url needs --judge-model (the judge model's name at that endpoint)")
        if self.judge_base_url and not self.judge_base_url.startswith(("http://", "https://")):
            raise UsageError(f"--judge-base-url {self.judge_base_url!r} must start with http:// or https://")
        self.judge_mode_list()
        parse_depths(self.depths)
        parse_lengths(self.lengths, None, check_only=True)


def parse_depths(text: str) -> list[float]:
    depths = []
    for part in split_list(text):
        try:
            d = float(part.rstrip("%")) / (100.0 if part.endswith("%") else 1.0)
        except ValueError:
            raise UsageError(f"--depths: {part!r} is not a number; use fractions like 0,0.5,1 or percents "
                             "0%,50%") from None
        if not 0.0 <= d <= 1.0:
            raise UsageError(f"--depths: {part!r} is outside [0, 1] (0 = needle at the start, 1 = at the end)")
        depths.append(d)
    if not depths:
        raise UsageError("--depths is empty; e.g. --depths 0,0.25,0.5,0.75,1")
    return sorted(set(depths))


def parse_lengths(text: str, distill_length: int | None, check_only: bool = False) -> list[int]:
    """'512,2k,1x,4x' -> token counts; 'Nx' multiplies the distillation length."""
    lengths = []
    for part in split_list(text):
        p = part.lower()
        try:
            if p.endswith("x"):
                mult = float(p[:-1])
                if check_only:
                    lengths.append(1)
                    continue
                if distill_length is None:
                    raise UsageError(
                        f"--lengths {part}: multiples need a distillation length, but the checkpoint records none "
                        "(config.distill_max_length); pass --distill-length N or absolute lengths like 512,2k"
                    )
                n = int(round(mult * distill_length))
            elif p.endswith("k"):
                n = int(round(float(p[:-1]) * 1024))
            else:
                n = int(p)
        except ValueError:
            raise UsageError(f"--lengths: {part!r} is not a length; use tokens (512), kilo-tokens (2k) or multiples "
                             "of the distillation length (4x)") from None
        if n < 1:
            raise UsageError(f"--lengths: {part!r} must be positive")
        lengths.append(n)
    if not lengths:
        raise UsageError("--lengths is empty; e.g. --lengths 1x,2x,4x or --lengths 512,1k,2k")
    return sorted(set(lengths))
