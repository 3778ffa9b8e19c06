"""`mamballama sft MODEL --data FILE --output RUN [--teacher T --w-kl 0.5] [--template sft]`

The options are the fields of :class:`~mamballama_cli.training.config.SFTConfig` (cli/options.py).
"""

from __future__ import annotations

from mamballama_cli.cli.options import training_command
from mamballama_cli.training.config import SFTConfig

HELP = "Supervised fine-tuning (CE on responses, optional KL to a teacher) of a hybrid or draft."

command = training_command("sft", SFTConfig)
