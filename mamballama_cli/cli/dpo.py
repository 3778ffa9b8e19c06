"""`mamballama dpo` (not built yet: issue 4)."""

from mamballama_cli.cli.common import not_built

HELP = "Direct preference optimisation (sigmoid DPO) of a hybrid."
CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
command = not_built("dpo", 4)
