"""`mamballama eval`: a group whose default subcommand is the report.

    mamballama eval MODEL --teacher T --tasks ...   -> eval_report.command
    mamballama eval speed ...                       -> eval_speed.command
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from mamballama_cli.cli import eval_report, eval_speed
from mamballama_cli.cli.common import NOTATION, command_io


class _DefaultToReport(TyperGroup):
    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["report", *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter):
        """`eval --help` also shows the report's arguments and options: `eval MODEL ...` runs it."""
        super().format_help(ctx, formatter)
        report = self.commands["report"]
        formatter.write_paragraph()
        formatter.write_text("`mamballama eval MODEL [OPTIONS]` (the report, also `eval report`) takes:")
        report.format_options(type(ctx)(report, info_name="report", parent=ctx), formatter)
        formatter.write_paragraph()
        formatter.write_text(NOTATION)


app = typer.Typer(
    cls=_DefaultToReport,
    help="Evaluate a student against its teacher (quality, retrieval, speed). "
    "`mamballama eval MODEL ...` runs the report; `mamballama eval speed ...` the speed benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command("report", help=eval_report.HELP, context_settings=getattr(eval_report, "CONTEXT", None),
             epilog=NOTATION)(
    command_io(eval_report.command)
)
app.command("speed", help=eval_speed.HELP, context_settings=getattr(eval_speed, "CONTEXT", None),
             epilog=NOTATION)(
    command_io(eval_speed.command)
)
