"""`mamballama export MODEL --format granite-hybrid --output DIR`"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = "Export a hybrid to a standard architecture (GraniteMoeHybrid) for stock transformers and vLLM."
CONTEXT = {"help_option_names": ["-h", "--help"]}


def command(
    model: str = typer.Argument(..., help="Hybrid checkpoint directory (from convert, distill, sft or dpo)."),
    output: Optional[str] = typer.Option(
        None, "--output", "-o", help="Directory to write the exported model to."
    ),
    fmt: Optional[str] = typer.Option(
        None,
        "--format",
        "-f",
        help="Target architecture: granite-hybrid (GraniteMoeHybridForCausalLM). Default granite-hybrid.",
    ),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="auto (the hybrid's stored dtype), float32, bfloat16, float16."
    ),
    verify: Optional[bool] = typer.Option(
        None,
        "--verify/--no-verify",
        help="Reload the export with transformers "
        "and compare logits with the hybrid before keeping it (default on; "
        "holds a second float32 copy in memory).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of these options."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
):
    from mamballama_cli.config import merge_config
    from mamballama_cli.export import ExportConfig, print_summary, run_export

    cfg = merge_config(
        ExportConfig,
        config_file=config,
        overrides=dict(
            model=model, output=output, format=fmt, dtype=dtype, verify=verify, force=force or None
        ),
    )
    summary = run_export(cfg)
    print_summary(summary, json_out)
