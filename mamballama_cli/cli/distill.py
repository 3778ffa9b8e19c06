"""`mamballama distill` (not built yet: issue 4)."""

from mamballama_cli.cli.common import not_built

HELP = "Distil a hybrid from its teacher (KL/CE, progressive stages)."
CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
command = not_built("distill", 4)
