"""`mamballama distill MODEL --data FILE --output RUN [--teacher T] [--template distill-paper]`

The options are the fields of :class:`~mamballama_cli.training.config.DistillConfig` (cli/options.py).
"""

from __future__ import annotations

from mamballama_cli.cli.options import training_command
from mamballama_cli.training.config import INHERITED, DistillConfig

HELP = "Distil a hybrid from its teacher: forward/reverse KL and CE on responses, progressive stages."

command = training_command("distill", DistillConfig, default_template="distill-default", stage_keys=INHERITED)
