"""`mamballama sft` (not built yet: issue 4)."""

from mamballama_cli.cli.common import not_built

HELP = "Supervised fine-tuning of a hybrid or draft."
CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
command = not_built("sft", 4)
