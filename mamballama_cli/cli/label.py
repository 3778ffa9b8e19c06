"""`mamballama label TEACHER --prompts FILE --output FILE` (pseudo-labels for sequence-level distillation)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mamballama_cli.cli.common import config_from_flags
from mamballama_cli.cli.options import config_option, device_option, dtype_option, force_option, json_option, seed_option

from mamballama_cli.output import out

HELP = "Have the teacher answer a prompt file (pseudo-labels, resumable JSONL) for distill/sft."


def command(
    teacher: str = typer.Argument(..., help="Teacher checkpoint dir, .gguf, hub id or 'default'."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help=".jsonl ({'prompt': ...} or {'messages': "
                                          "[...]}), .txt (one prompt per line), a `data build` folder (its "
                                          "train prompts), or '-': stdin (JSONL, or one prompt per line)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="JSONL file of {'messages': [...]} records; "
                                         "'-': stdout, a line per prompt as its batch ends."),
    system: Optional[str] = typer.Option(None, "--system", help="System message before every prompt."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Default 512."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="0 = greedy (default)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling (default 1.0: off)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per generate call (default 8)."),
    seed: Optional[int] = seed_option("sampling (with --temperature > 0)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N prompts."),
    dtype: Optional[str] = dtype_option(),
    device: Optional[str] = device_option(),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed prompt lines (with a count) "
                                        "instead of stopping."),
    resume: bool = typer.Option(False, "--resume", help="Keep the answers already in --output; label the rest."),
    force: bool = force_option(),
    config: Optional[Path] = config_option(),
    json_out: bool = json_option(),
):
    from mamballama_cli.training.label import LabelConfig, run_label

    cfg = config_from_flags(
        LabelConfig, config, teacher=teacher, prompts=prompts, output=output, system=system,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed,
        limit=limit, dtype=dtype, device=device, skip_bad_lines=skip_bad_lines or None, resume=resume or None,
        force=force or None,
    )
    if cfg.output == "-" and json_out:
        from mamballama_cli.errors import UsageError

        raise UsageError("--json prints the summary on stdout, where --output - writes the answers: drop one")
    summary = run_label(cfg)
    if cfg.output == "-":
        return  # stdout holds the answers only (the summary went to stderr as progress)
    if json_out:
        out(json.dumps(summary, indent=2))
    else:
        out(f"labelled {summary['labelled_now']} prompt(s) ({summary['already_done']} already done, "
              f"{summary['new_tokens']} new tokens) -> {summary['output']}")
