"""`mamballama dpo MODEL --data PAIRS.jsonl --output RUN [--reference REF] [--beta 0.01] [--template dpo]`

The options are the fields of :class:`~mamballama_cli.training.config.DPOConfig` (cli/options.py).
"""

from __future__ import annotations

from mamballama_cli.cli.options import config_command
from mamballama_cli.training.config import DPOConfig

HELP = "Direct preference optimisation (sigmoid DPO) of a hybrid against a frozen reference."


def _run(**kwargs) -> None:
    from mamballama_cli.training.launch import run_command

    run_command("dpo", DPOConfig, **kwargs)


command = config_command(
    DPOConfig, run=_run,
    model_help="Checkpoint directory to train (usually the distilled/SFT hybrid).",
    template_help="Recipe from templates/ (e.g. dpo).",
)
