"""Entry point of the `mamballama` command. Heavy imports (torch, transformers) happen inside commands."""

from __future__ import annotations

import sys
import traceback

import typer

from mamballama_cli import __version__
from mamballama_cli.cli import common, convert, generate
from mamballama_cli.cli.common import STATE, not_built

app = typer.Typer(
    name="mamballama",
    help="Distil a chat Transformer into a fast Mamba hybrid: convert, distill, sft, dpo, generate, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        print(f"mamballama {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
):
    STATE["verbose"] = verbose


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

app.command("convert", help="Turn a Transformer teacher into a hybrid whose Mamba layers start from its attention.")(
    convert.command
)
app.command("distill", help="Distil a hybrid from its teacher (KL/CE, progressive stages).",
            context_settings=_PASS_THROUGH)(not_built("distill", 4))
app.command("sft", help="Supervised fine-tuning of a hybrid or draft.", context_settings=_PASS_THROUGH)(
    not_built("sft", 4))
app.command("dpo", help="Direct preference optimisation (sigmoid DPO).", context_settings=_PASS_THROUGH)(
    not_built("dpo", 4))
app.command("generate", help="Generate text from a hybrid or Transformer checkpoint (stdout: text, stderr: timing).")(
    generate.command
)
app.command("eval", help="Evaluate a student against its teacher (quality, retrieval, speed).",
            context_settings=_PASS_THROUGH)(not_built("eval", 6))


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # one line for the user; the traceback only with --verbose
        from mamballama_cli.errors import MamballamaError

        if STATE["verbose"]:
            traceback.print_exc()
        if isinstance(exc, MamballamaError):
            common.err(f"error: {exc}")
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "OutOfMemoryError":
            common.err("error: out of memory; reduce --micro-batch-size or sequence length, enable gradient "
                       "checkpointing, or shard with ZeRO-3/FSDP")
            sys.exit(1)
        common.err(f"error: {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
