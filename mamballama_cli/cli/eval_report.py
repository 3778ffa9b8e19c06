"""`mamballama eval MODEL ...` (the teacher-vs-student report; not built yet: issue 6)."""

from mamballama_cli.cli.common import not_built

HELP = "Evaluate MODEL against its teacher: perplexity, agreement, passkey/needle, lm-eval tasks, chat answers."
CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
command = not_built("eval", 6)
