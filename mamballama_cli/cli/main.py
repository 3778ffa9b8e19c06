"""Entry point of the `mamballama` command. Heavy imports (torch, transformers) happen inside commands."""

from __future__ import annotations

import sys
import traceback

import typer

from mamballama_cli import __version__
from mamballama_cli.cli import common, convert, distill, dpo, env, export, generate, plugins_cmd, sft, templates_cmd
from mamballama_cli.cli import chat as chat_cmd
from mamballama_cli.cli import data as data_cmd
from mamballama_cli.cli import eval as eval_cmd
from mamballama_cli.cli.common import NOTATION, command_io
from mamballama_cli.output import STATE

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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors, and the libraries' "
                                 "own progress bars (loading and writing weights, downloads)."),
    kernels: str = typer.Option("auto", "--kernels", metavar="auto|ref|ref:OP,...", help="Which implementation "
                                "of each op runs on the GPU: 'auto' (fast kernels where their probe passes), 'ref' "
                                "(the PyTorch references everywhere) or 'ref:rotary,rmsnorm' (references for the "
                                "ops named; `mamballama env` lists the ops)."),
    tuning: str = typer.Option(None, "--tuning", metavar="FILE", help="A tuning table (JSON) for the GPU kernels: "
                               "the tiles and per-shape choices a run on the same code, software and GPU settled on "
                               "are taken from it, so that they are neither compiled nor timed again, and this run's "
                               "are written back at the end. A table made elsewhere is set aside with a note."),
):
    STATE["verbose"] = verbose
    common.library_output(verbose)
    if tuning:
        from mamballama_cli.errors import UsageError
        from mamballama_cli.ops import tuning as tables

        try:
            tables.open_table(tuning)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if kernels != "auto":
        from mamballama_cli import ops
        from mamballama_cli.errors import UsageError

        try:
            ops.configure(kernels)
        except ValueError as exc:
            raise UsageError(str(exc)) from None



def _add(name: str, module) -> None:
    """Each command module exposes HELP, command and optionally CONTEXT (click context settings)."""
    app.command(name, help=module.HELP, context_settings=getattr(module, "CONTEXT", None), epilog=NOTATION)(
        command_io(module.command)
    )


_add("convert", convert)
_add("distill", distill)
_add("sft", sft)
_add("dpo", dpo)
from mamballama_cli.cli import label as label_cmd  # noqa: E402  (pseudo-labels for distill)
_add("label", label_cmd)
app.add_typer(data_cmd.app, name="data")
_add("generate", generate)
_add("chat", chat_cmd)
app.add_typer(eval_cmd.app, name="eval")
_add("export", export)
from mamballama_cli.cli import serve as serve_cmd  # noqa: E402
_add("serve", serve_cmd)
app.add_typer(plugins_cmd.app, name="plugins")
app.add_typer(templates_cmd.app, name="templates")
_add("env", env)


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
        if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError) or (
                isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in str(exc)):  # the GPU's, or the CPU's
            common.err("error: out of memory; reduce --micro-batch-size or sequence length, enable gradient "
                       "checkpointing, or shard with ZeRO-3/FSDP")
            sys.exit(1)
        hint = "" if STATE["verbose"] else " (rerun with --verbose for the traceback)"  # shown above otherwise
        common.err(f"error: {type(exc).__name__}: {exc}{hint}")
        sys.exit(1)


if __name__ == "__main__":
    main()
