"""`mamballama env`: versions, devices and, per op, which kernel backend runs and why."""

from __future__ import annotations

from typing import Optional

import typer

from mamballama_cli.output import out

HELP = "Print versions, devices and, per op, which kernel backend is used and why."
CONTEXT = {"help_option_names": ["-h", "--help"]}


def command(
    device: Optional[str] = typer.Option(None, "--device", help="Device whose backends to report: cuda (default "
                                         "when present), cuda:1, cpu."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    from mamballama_cli.ops.cuda import environment_report, format_environment

    report = environment_report(device)
    if json_out:
        import json

        out(json.dumps(report, indent=2))
    else:
        out(format_environment(report))
