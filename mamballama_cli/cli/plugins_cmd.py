"""`mamballama plugins list` (not built yet: issue 7)."""

import typer

from mamballama_cli.cli.common import not_built

app = typer.Typer(help="Installed plugins: teacher families and draft providers.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_show_locals=False)
app.command("list", help="List plugins and what each registers.")(not_built("plugins list", 7))
