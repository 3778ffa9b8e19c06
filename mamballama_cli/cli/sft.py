"""`mamballama sft MODEL --data FILE --output RUN [--teacher T --w-kl 0.5] [--template sft]`"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = "Supervised fine-tuning (CE on responses, optional KL to a teacher) of a hybrid or draft."
CONTEXT: dict = {}  # click context settings (none needed)


def command(
    model: str = typer.Argument(..., help="Checkpoint directory to fine-tune (a hybrid, a draft, any causal LM)."),
    data: Optional[str] = typer.Option(None, "--data", help="JSONL ({'messages': [...]}, {'text': ...} or {'prompt', "
                                       "'response'}), a local data set (save_to_disk folder, .parquet, .arrow), a "
                                       "shard folder from `data generate`, a Hugging Face dataset name, or "
                                       "builtin:pydoc-topics; several comma-separated are concatenated."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Field holding each record's text (a "
                                             "string) or conversation (a message list); default: messages, text "
                                             "or prompt+response."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run directory."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Optional teacher for a KL term (--w-kl)."),
    template: Optional[str] = typer.Option(None, "--template", help="Recipe from templates/ (e.g. sft)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of these options."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Held-out data (CE, and KL with a teacher)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (instead of --epochs)."),
    epochs: Optional[float] = typer.Option(None, "--epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps; --resume "
                                            "continues."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len"),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size"),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, "--gradient-accumulation-steps"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm"),
    warmup: Optional[float] = typer.Option(None, "--warmup"),
    schedule: Optional[str] = typer.Option(None, "--schedule"),
    w_ce: Optional[float] = typer.Option(None, "--w-ce"),
    w_kl: Optional[float] = typer.Option(None, "--w-kl", help="Weight of KL(teacher || student); needs --teacher."),
    w_rkl: Optional[float] = typer.Option(None, "--w-rkl"),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    trainable: Optional[str] = typer.Option(None, "--trainable", help="all, or mixers."),
    packing: Optional[str] = typer.Option(None, "--packing", help="auto, on or off (hybrids are never packed)."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    save_every: Optional[int] = typer.Option(None, "--save-every"),
    keep_checkpoints: Optional[int] = typer.Option(None, "--keep-checkpoints"),
    log_every: Optional[int] = typer.Option(None, "--log-every"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every"),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype"),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines"),
    nan_patience: Optional[int] = typer.Option(None, "--nan-patience", help="Consecutive steps with a non-finite "
                                               "loss or gradient to skip before stopping (default 0: stop at the "
                                               "first, keeping the last finite checkpoint)."),
    resume: bool = typer.Option(False, "--resume"),
    force: bool = typer.Option(False, "--force"),
    accelerate_config: Optional[str] = typer.Option(None, "--accelerate-config"),
    json_out: bool = typer.Option(False, "--json"),
):
    from mamballama_cli.training.config import SFTConfig
    from mamballama_cli.training.launch import run_command

    overrides = dict(
        model=model, data=data, text_field=text_field, output=output, teacher=teacher, eval_data=eval_data, steps=steps, epochs=epochs,
        max_steps=max_steps, seq_len=seq_len, micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, lr=lr, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, warmup=warmup, schedule=schedule, w_ce=w_ce, w_kl=w_kl, w_rkl=w_rkl,
        temperature=temperature, trainable=trainable, packing=packing, mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing, seed=seed, save_every=save_every,
        keep_checkpoints=keep_checkpoints, log_every=log_every, eval_every=eval_every, save_dtype=save_dtype,
        skip_bad_lines=skip_bad_lines or None, nan_patience=nan_patience, resume=resume or None, force=force or None,
        accelerate_config=accelerate_config,
    )
    run_command("sft", SFTConfig, template=template, config_file=config, overrides=overrides, json_out=json_out)
