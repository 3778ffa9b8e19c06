"""`mamballama export MODEL --format granite-hybrid --output DIR`"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamballama_cli.cli.common import config_from_flags
from mamballama_cli.cli.options import config_option, dtype_option, force_option, json_option

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
    dtype: Optional[str] = dtype_option(auto="the hybrid's stored dtype"),
    verify: Optional[bool] = typer.Option(
        None,
        "--verify/--no-verify",
        help="Reload the export with transformers "
        "and compare logits with the hybrid before keeping it (default on; "
        "holds a second float32 copy in memory).",
    ),
    force: bool = force_option(),
    config: Optional[Path] = config_option(),
    json_out: bool = json_option(),
):
    from mamballama_cli.export import ExportConfig, print_summary, run_export

    cfg = config_from_flags(ExportConfig, config, model=model, output=output, format=fmt, dtype=dtype, verify=verify,
                            force=force or None)
    print_summary(run_export(cfg), json_out)
