"""`mamballama eval speed ...` (decode speed and memory benchmark; not built yet: issue 3)."""

from mamballama_cli.cli.common import not_built

HELP = "Benchmark time to first token, decode tokens/s and memory for teacher vs hybrid."
CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
command = not_built("eval speed", 3)
