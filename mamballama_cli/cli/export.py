"""`mamballama export` (not built yet: issue 7)."""

from mamballama_cli.cli.common import not_built

HELP = "Export a hybrid to a standard architecture (GraniteMoeHybrid) for stock transformers and vLLM."
CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
command = not_built("export", 7)
