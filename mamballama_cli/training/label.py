"""Pseudo-labels for sequence-level distillation: the teacher answers each prompt, one JSONL line per prompt.

Output lines are training records as `distill`/`sft` read them:
    {"id": 7, "prompt_sha": "...", "messages": [..., {"role": "assistant", "content": ANSWER}],
     "new_tokens": 93, "finish": "stop"}
Each batch is appended and flushed to disk before the next starts. ``--resume`` keeps the complete lines of
an earlier run (a line cut short by a crash is dropped), checks they belong to the same prompts and labels
only what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.output import log


@dataclass
class LabelConfig:
    """Options of `mamballama label` (also readable from --config FILE)."""

    teacher: str = "default"
    prompts: str = ""  # .jsonl ({"prompt": ...} or {"messages": [...]}) or .txt (one prompt per line)
    output: str = ""  # .jsonl file
    system: str | None = None  # system message put before every prompt
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0
    limit: int | None = None  # label only the first N prompts
    dtype: str = "auto"
    device: str = "auto"
    resume: bool = False
    force: bool = False
    skip_bad_lines: bool = False

    def validate(self) -> None:
        if not self.prompts:
            raise UsageError("--prompts is required: a .jsonl or .txt file of prompts")
        if not self.output:
            raise UsageError("--output is required: the .jsonl file to write the answers to ('-': stdout)")
        if self.resume and self.force:
            raise UsageError("--force and --resume contradict each other: --force starts over, --resume continues")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise UsageError("--batch-size and --max-new-tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit {self.limit} must be at least 1")


def read_prompts(cfg: LabelConfig) -> list[tuple[int, list[dict]]]:
    """(source line, prompt messages) per prompt."""
    from mamballama_cli.training.records import DataError, read_records

    path = Path(cfg.prompts).expanduser()
    if cfg.prompts == "-":
        out = _stdin_prompts(cfg)
    elif path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"prompts file {path} does not exist")
        out = _line_prompts(path.read_text(encoding="utf-8").splitlines(), f"prompts file {path} holds no prompt")
    else:
        recs = read_records(cfg.prompts, kind="prompt", skip_bad=cfg.skip_bad_lines)
        out = _prompt_messages(recs)
    if cfg.system:
        out = [(n, [{"role": "system", "content": cfg.system}] + [m for m in msgs if m["role"] != "system"])
               for n, msgs in out]
    return out[: cfg.limit] if cfg.limit else out


def _stdin_prompts(cfg: LabelConfig) -> list[tuple[int, list[dict]]]:
    """``--prompts -``: JSONL records when the first line is a JSON object, else one prompt per line."""
    import sys

    from mamballama_cli.training.records import checked_records, jsonl_records

    lines = sys.stdin.read().splitlines()
    first = next((x for x in lines if x.strip()), "")
    if first.lstrip().startswith("{"):
        return _prompt_messages(checked_records("stdin", jsonl_records(lines, "stdin", cfg.skip_bad_lines), "prompt",
                                                cfg.skip_bad_lines))
    return _line_prompts(lines, "--prompts -: stdin holds no prompt (one per line, or JSONL records)")


def _line_prompts(lines: list[str], empty: str) -> list[tuple[int, list[dict]]]:
    """One user turn per non-blank line (a .txt prompts file, or stdin); ``empty``: the error where there is none."""
    from mamballama_cli.training.records import DataError

    out = [(n, [{"role": "user", "content": line}]) for n, line in enumerate(lines, 1) if line.strip()]
    if not out:
        raise DataError(empty)
    return out


def _prompt_messages(recs) -> list[tuple[int, list[dict]]]:
    """(line, the messages the teacher answers) of checked prompt records."""
    from mamballama_cli.training.records import DataError

    out = []
    for r in recs:
        if "prompt" in r.data:
            msgs = [{"role": "user", "content": r.data["prompt"]}]
        else:  # a conversation: drop a trailing assistant turn so the teacher writes it
            msgs = [dict(m) for m in r.data["messages"]]
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
            if not msgs:
                raise DataError(f"{r.where}: the conversation has no turn before the answer")
        out.append((r.line, msgs))
    return out


def prompt_sha(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def existing_labels(path: Path, prompts: list[tuple[int, list[dict]]]) -> set[int]:
    """Ids already labelled; drops a trailing partial line and refuses labels of other prompts."""
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1  # everything up to the last complete line
    done: set[int] = set()
    for n, line in enumerate(raw[:good_end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            i = int(rec["id"])
        except (ValueError, KeyError, TypeError):
            raise MamballamaError(f"--resume: {path} line {n} is not a label record; use --force to start over")
        if not 0 <= i < len(prompts) or rec.get("prompt_sha") != prompt_sha(prompts[i][1]):
            raise MamballamaError(
                f"--resume: {path} line {n} answers a different prompt than {i} of the prompts file; resume with "
                "the same prompts (and --system), or use --force to start over"
            )
        done.add(i)
    if good_end != len(raw):
        with path.open("r+b") as f:
            f.truncate(good_end)
        log(f"note: dropped an incomplete last line of {path}")
    return done


def run_label(cfg: LabelConfig) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    from mamballama_cli.generation.result import stop_token_ids
    from mamballama_cli.generation.sampling import SamplingConfig, transformers_kwargs
    from mamballama_cli.loading import resolve_device, resolve_dtype
    from mamballama_cli.training.models import load_frozen

    hf_logging.disable_progress_bar()
    to_stdout = cfg.output == "-"
    out = Path(cfg.output)
    if to_stdout and cfg.resume:
        raise UsageError("--resume continues an --output file; stdout (--output -) has nothing to resume")
    if not to_stdout and out.is_dir():
        raise UsageError(f"--output {out} is a directory; give a .jsonl file path")
    from mamballama_cli.io import check_writable_parent

    if not to_stdout:
        check_writable_parent(out)  # before the teacher is loaded
    prompts = read_prompts(cfg)
    done: set[int] = set()
    if not to_stdout and out.is_file() and out.stat().st_size > 0:
        if cfg.resume:
            done = existing_labels(out, prompts)
        elif not cfg.force:
            raise UsageError(f"--output {out} exists and is not empty; pass --resume to continue it or --force to "
                             "replace it")
        else:
            out.unlink()
    todo = [i for i in range(len(prompts)) if i not in done]
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tok, name = load_frozen(cfg.teacher, dtype, device, "teacher")
    if tok is None:
        raise MamballamaError(f"teacher {cfg.teacher!r} has no tokenizer files; labelling needs one")
    if not getattr(tok, "chat_template", None):
        raise MamballamaError(f"teacher {cfg.teacher!r} has no chat template; pseudo-labels are chat answers")
    stops = stop_token_ids(model, tok)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
    log(f"labelling {len(todo)} of {len(prompts)} prompt(s) with {name} (batch {cfg.batch_size}, "
        f"{'greedy' if cfg.temperature == 0 else f'temperature {cfg.temperature}'}, max {cfg.max_new_tokens} new "
        f"tokens) -> {'stdout' if to_stdout else out}")
    if not to_stdout:
        out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    new_tokens = 0
    from mamballama_cli.output import results_stream

    with (contextlib.nullcontext(results_stream()) if to_stdout else out.open("a", encoding="utf-8")) as f:
        for b in range(0, len(todo), cfg.batch_size):
            ids = todo[b: b + cfg.batch_size]
            encoded = [tok(tok.apply_chat_template(prompts[i][1], tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"] for i in ids]
            L = max(len(e) for e in encoded)
            # Left padding: every prompt ends where generation starts.
            input_ids = torch.tensor([[pad] * (L - len(e)) + e for e in encoded], device=device)
            mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in encoded], device=device)
            torch.manual_seed(cfg.seed + ids[0])
            kwargs = dict(max_new_tokens=cfg.max_new_tokens, eos_token_id=stops or None, pad_token_id=pad,
                          **transformers_kwargs(sampling))
            with torch.inference_mode():
                gen = model.generate(input_ids, attention_mask=mask, **kwargs)[:, L:].tolist()
            for i, seq in zip(ids, gen):
                finish = "length"
                for j, t in enumerate(seq):
                    if t in stops:
                        seq, finish = seq[:j], "stop"
                        break
                text = tok.decode(seq, skip_special_tokens=True).strip()
                new_tokens += len(seq)
                rec = {"id": i, "prompt_sha": prompt_sha(prompts[i][1]), "source_line": prompts[i][0],
                       "messages": prompts[i][1] + [{"role": "assistant", "content": text}],
                       "new_tokens": len(seq), "finish": finish}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            if not to_stdout:
                os.fsync(f.fileno())
            done_now = min(b + cfg.batch_size, len(todo))
            rate = new_tokens / max(time.perf_counter() - t0, 1e-9)
            log(f"  {done_now}/{len(todo)} prompts, {rate:.1f} new tok/s")
    return {"output": "stdout" if to_stdout else str(out), "prompts": len(prompts), "labelled_now": len(todo), "already_done": len(done),
            "new_tokens": new_tokens, "seconds": round(time.perf_counter() - t0, 2), "teacher": name}
