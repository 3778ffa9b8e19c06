"""`mamballama env` (not built yet: issue 3)."""

from mamballama_cli.cli.common import not_built

HELP = "Print versions, devices and, per op, which kernel backend is used and why."
CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
command = not_built("env", 3)
