"""`mamballama sft MODEL --data FILE --output RUN [--teacher T --w-kl 0.5] [--template sft]`"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamballama_cli.cli.common import TEXT_FIELD_OPTION, TRAIN_DATA_OPTION

HELP = "Supervised fine-tuning (CE on responses, optional KL to a teacher) of a hybrid or draft."
CONTEXT: dict = {}  # click context settings (none needed)


def command(
    model: str = typer.Argument(..., help="Checkpoint directory to fine-tune (a hybrid, a draft, any causal LM)."),
    data: Optional[str] = TRAIN_DATA_OPTION,
    text_field: Optional[str] = TEXT_FIELD_OPTION,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run directory."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Optional teacher for a KL term (--w-kl)."),
    template: Optional[str] = typer.Option(None, "--template", help="Recipe from templates/ (e.g. sft)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of these options."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Held-out data (CE, and KL with a teacher)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (instead of --epochs)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (default 1)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps; --resume "
                                            "continues."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default 2048)."),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Sequences per device per "
                                                   "forward (default 4)."),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, "--gradient-accumulation-steps",
                                                              help="Micro-batches per optimizer step (global batch = "
                                                              "micro-batch x this x processes; default 1)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 2e-5)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0)."),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Clip the gradient norm (0: off)."),
    warmup: Optional[float] = typer.Option(None, "--warmup", help="Warm-up: a fraction (<1) or steps (>=1)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine, linear or constant."),
    w_ce: Optional[float] = typer.Option(None, "--w-ce", help="Weight of CE on the response tokens."),
    w_kl: Optional[float] = typer.Option(None, "--w-kl", help="Weight of KL(teacher || student); needs --teacher."),
    w_rkl: Optional[float] = typer.Option(None, "--w-rkl", help="Weight of KL(student || teacher); needs --teacher."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Softening of both distributions in the "
                                                "KL terms."),
    trainable: Optional[str] = typer.Option(None, "--trainable", help="all, or mixers."),
    packing: Optional[str] = typer.Option(None, "--packing", help="auto, on or off (hybrids are never packed)."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="auto (bf16 on CUDA), bf16, fp16, "
                                                  "no."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                          help="Recompute activations in the backward pass: less "
                                                          "memory, slower."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the data order and of freshly initialised "
                                       "parameters (default 0)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Steps between checkpoints (0: only at the "
                                             "end)."),
    keep_checkpoints: Optional[int] = typer.Option(None, "--keep-checkpoints", help="Checkpoints kept in the run "
                                                   "directory, older ones deleted (default 2)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Steps between progress lines when stderr is "
                                            "not a terminal (metrics.jsonl has every step)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Steps between held-out evaluations "
                                             "(default 0: stage starts and ends only)."),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="Final model dtype (auto: the input's)."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed data lines (with a count) "
                                        "instead of stopping."),
    nan_patience: Optional[int] = typer.Option(None, "--nan-patience", help="Consecutive steps with a non-finite "
                                               "loss or gradient to skip before stopping (default 0: stop at the "
                                               "first, keeping the last finite checkpoint)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --output."),
    accelerate_config: Optional[str] = typer.Option(None, "--accelerate-config", help="Run under `accelerate "
                                                    "launch` with this config (templates/accelerate/*.yaml)."),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
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
