"""`mamballama sft MODEL --data FILE --output RUN [--teacher T --w-kl 0.5] [--template sft]`

The options are the fields of :class:`~mamballama_cli.training.config.SFTConfig` (cli/options.py).
"""

from __future__ import annotations

from mamballama_cli.cli.options import config_command
from mamballama_cli.training.config import SFTConfig

HELP = "Supervised fine-tuning (CE on responses, optional KL to a teacher) of a hybrid or draft."


def _run(**kwargs) -> None:
    from mamballama_cli.training.launch import run_command

    run_command("sft", SFTConfig, **kwargs)


command = config_command(
    SFTConfig, run=_run,
    model_help="Checkpoint directory to fine-tune (a hybrid, a draft, any causal LM).",
    template_help="Recipe from templates/ (e.g. sft).",
)
