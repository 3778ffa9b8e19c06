"""`mamballama templates list|show`: the recipes that `--template` and `--accelerate-config` take by name, so that
users can see them and copy one to edit (`mamballama templates show distill-default > my.yaml`)."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import typer

from mamballama_cli.cli.options import json_option

from mamballama_cli.cli.common import NOTATION, command_io
from mamballama_cli.output import out

app = typer.Typer(
    help="The packaged recipes: training templates (--template NAME) and accelerate configs (--accelerate-config).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def template_files() -> dict[str, Path]:
    """Name -> file: training templates by stem ("distill-e2e"), accelerate configs as "accelerate/ddp"."""
    from mamballama_cli.config import TEMPLATES_DIR

    files = {p.stem: p for p in sorted(TEMPLATES_DIR.glob("*.yaml"))}
    files.update({f"accelerate/{p.stem}": p for p in sorted((TEMPLATES_DIR / "accelerate").glob("*.yaml"))})
    return files


def description(path: Path) -> str:
    """The template's first comment line, without the '#'."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


@app.command("list", help="List the templates with their first comment line (distill: --template NAME; "
                          "accelerate/NAME: --accelerate-config NAME).", epilog=NOTATION)
@command_io
def list_templates(json_out: bool = json_option("the list")):
    rows = [{"name": name, "description": description(path)} for name, path in template_files().items()]
    if json_out:
        out(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        out(f"{r['name']:<{width}}  {r['description']}")


@app.command("show", help="Print a template's YAML on stdout, e.g. `mamballama templates show distill-default "
                          "> my.yaml`, then `--config my.yaml` or `--template my.yaml`.", epilog=NOTATION)
@command_io
def show_template(name: str = typer.Argument(..., help="A name from `mamballama templates list` "
                                                        "(e.g. distill-e2e, accelerate/ddp).")):
    from mamballama_cli.errors import UsageError

    files = template_files()
    key = name[:-5] if name.endswith(".yaml") else name
    if key not in files and f"accelerate/{key}" in files:  # `show ddp` is unambiguous: no training template is ddp
        key = f"accelerate/{key}"
    if key not in files:
        hint = difflib.get_close_matches(key, list(files), n=1)
        raise UsageError(f"no template {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + " (see `mamballama templates list`)")
    out(files[key].read_text(), end="")
