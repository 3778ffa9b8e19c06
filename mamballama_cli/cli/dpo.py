"""`mamballama dpo MODEL --data PAIRS.jsonl --output RUN [--reference REF] [--beta 0.01] [--template dpo]`

The options are the fields of :class:`~mamballama_cli.training.config.DPOConfig` (cli/options.py).
"""

from __future__ import annotations

from mamballama_cli.cli.options import training_command
from mamballama_cli.training.config import DPOConfig

HELP = "Direct preference optimisation (sigmoid DPO) of a hybrid against a frozen reference."

command = training_command("dpo", DPOConfig)
