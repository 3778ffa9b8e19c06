"""`mamballama plugins list`: what the registries hold, who registered it, and what failed to load."""

from __future__ import annotations

import json

import typer

from mamballama_cli.cli.options import json_option

from mamballama_cli.cli.common import NOTATION, command_io
from mamballama_cli.output import console, out

app = typer.Typer(
    help="Installed plugins: teacher families and draft providers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def plugin_rows() -> tuple[list[dict], list[str]]:
    """One row per registered item (built-ins included) and the registries' load errors."""
    from mamballama_cli import __version__, plugins

    rows = []
    for kind, registry in (("teacher", plugins.teachers), ("draft", plugins.drafts)):
        for name, reg in sorted(registry.registrations().items()):
            origin = reg.origin
            plugin, _, version = (
                origin.partition(" ") if origin != "built-in" else ("built-in", "", __version__)
            )
            item = reg.item
            row = {
                "plugin": plugin,
                "version": version or None,
                "kind": kind,
                "name": name,
                "group": registry.group,
                "entry_point": reg.entry_point,
                "description": getattr(item, "description", ""),
            }
            if kind == "teacher":
                row["model_types"] = list(getattr(item, "model_types", ()))
            rows.append(row)
    errors = list(plugins.teachers.errors) + list(plugins.drafts.errors)
    return rows, errors


@app.command("list", help="List plugins (built-ins included), their versions and what each registers.",
             epilog=NOTATION)
@command_io
def list_plugins(json_out: bool = json_option("the list")):
    rows, errors = plugin_rows()
    if json_out:
        out(json.dumps({"registrations": rows, "errors": errors}, indent=2))
    else:
        from rich.table import Table

        t = Table(title="mamballama plugins")
        for col in ("plugin", "version", "registers", "name"):
            t.add_column(col, no_wrap=True)
        t.add_column("covers", overflow="fold")
        for r in rows:
            what = "teacher family" if r["kind"] == "teacher" else "draft provider"
            covers = ", ".join(r["model_types"]) if r["kind"] == "teacher" else r["description"]
            t.add_row(r["plugin"], r["version"] or "-", what, r["name"], covers)
        console().print(t)
    # A broken plugin does not stop the others from loading; the registry warned on stderr when it failed.
