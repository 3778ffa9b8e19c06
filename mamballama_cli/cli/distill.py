"""`mamballama distill MODEL --data FILE --output RUN [--teacher T] [--template distill-paper]`

The options are the fields of :class:`~mamballama_cli.training.config.DistillConfig` (cli/options.py).
"""

from __future__ import annotations

from mamballama_cli.cli.options import config_command
from mamballama_cli.training.config import INHERITED, DistillConfig

HELP = "Distil a hybrid from its teacher: forward/reverse KL and CE on responses, progressive stages."


def _run(**kwargs) -> None:
    from mamballama_cli.training.launch import run_command

    run_command("distill", DistillConfig, **kwargs)


command = config_command(
    DistillConfig, run=_run, default_template="distill-default", stage_keys=INHERITED,
    model_help="The student: a hybrid from `convert` (or the teacher itself, with a template whose stages convert "
               "it), a checkpoint directory.",
    template_help="Recipe from templates/ (default: distill-default: layer-wise alignment, then KD of the mixers, "
                  "then KD of everything); distill-paper (the paper's recipe), distill-e2e, distill-align; 'none' for "
                  "the options alone.",
)
