"""`mamballama distill MODEL --data FILE --output RUN [--teacher T] [--template distill-paper]`"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamballama_cli.cli.common import TEXT_FIELD_OPTION, TRAIN_DATA_OPTION

HELP = "Distil a hybrid from its teacher: forward/reverse KL and CE on responses, progressive stages."
CONTEXT: dict = {}  # click context settings (none needed)


def command(
    model: str = typer.Argument(..., help="The student: a hybrid from `convert` (or the teacher itself, with a "
                                "template whose stages convert it), a checkpoint directory."),
    data: Optional[str] = TRAIN_DATA_OPTION,
    text_field: Optional[str] = TEXT_FIELD_OPTION,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run directory: checkpoints, metrics, final "
                                         "model."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher checkpoint, .gguf, hub id or 'default' "
                                          "(default: the teacher recorded by convert)."),
    template: Optional[str] = typer.Option(None, "--template", help="Recipe from templates/ (default: "
                                           "distill-default: layer-wise alignment, then KD of the mixers, then "
                                           "KD of everything); distill-paper (the paper's recipe), distill-e2e, "
                                           "distill-align; 'none' for flags alone."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of these options."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Held-out data: KL and CE to the teacher at "
                                            "stage starts and ends."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps per stage (instead of --epochs)."),
    tokens: Optional[float] = typer.Option(None, "--tokens", help="Tokens per stage (instead of --steps/--epochs)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data per stage (default 1)."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Wall-clock budget: stop there and "
                                                "still write the final model."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps in all (with a "
                                            "checkpoint); --resume continues."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default 2048)."),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Sequences per device per "
                                                   "forward."),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, "--gradient-accumulation-steps",
                                                              help="Micro-batches per optimizer step (global batch = "
                                                              "micro-batch x this x processes; default 1)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (replaces the template's stage values)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0)."),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Clip the gradient norm (0: off)."),
    warmup: Optional[float] = typer.Option(None, "--warmup", help="Warm-up: a fraction (<1) or steps (>=1)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine, linear or constant."),
    w_kl: Optional[float] = typer.Option(None, "--w-kl", help="Weight of KL(teacher || student)."),
    w_rkl: Optional[float] = typer.Option(None, "--w-rkl", help="Weight of KL(student || teacher)."),
    w_ce: Optional[float] = typer.Option(None, "--w-ce", help="Weight of CE on the response tokens."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Softening of both distributions."),
    w_hidden: Optional[float] = typer.Option(None, "--w-hidden", help="Weight of the layer-wise alignment of each "
                                             "Mamba layer to the teacher layer it replaced (one process)."),
    loss_positions: Optional[str] = typer.Option(None, "--loss-positions", help="responses (the target "
                                                 "tokens) or all (every real token, prompts included)."),
    kl_reduction: Optional[str] = typer.Option(None, "--kl-reduction", help="token (mean per token) or "
                                               "sequence (summed per sequence, as the paper's code)."),
    trainable: Optional[str] = typer.Option(None, "--trainable", help="all, or mixers (Mamba mixers only)."),
    packing: Optional[str] = typer.Option(None, "--packing", help="auto, on, off, or concat (records joined into "
                                          "full rows, positions running on: exact for KD with any model)."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="auto (bf16 on CUDA), bf16, "
                                                  "fp16, no."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                          help="Recompute activations in the backward pass: less "
                                                          "memory, slower."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the data order and of freshly initialised "
                                       "parameters (default 0)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Steps between checkpoints (0: stage ends)."),
    keep_checkpoints: Optional[int] = typer.Option(None, "--keep-checkpoints", help="Checkpoints kept in the run "
                                                   "directory, older ones deleted (default 2)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Steps between progress lines when stderr is "
                                            "not a terminal (metrics.jsonl has every step)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Steps between held-out evaluations "
                                             "(default 0: stage starts and ends only)."),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="Final model dtype (auto: the input's)."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed data lines (with a "
                                        "count) instead of stopping."),
    nan_patience: Optional[int] = typer.Option(None, "--nan-patience", help="Consecutive steps with a non-finite "
                                               "loss or gradient to skip before stopping (default 0: stop at the "
                                               "first, keeping the last finite checkpoint)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --output."),
    accelerate_config: Optional[str] = typer.Option(None, "--accelerate-config", help="Run under `accelerate "
                                                    "launch` with this config (templates/accelerate/*.yaml)."),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
):
    from mamballama_cli.training.config import DistillConfig
    from mamballama_cli.training.launch import run_command

    overrides = dict(
        model=model, data=data, text_field=text_field, output=output, teacher=teacher, eval_data=eval_data,
        steps=steps, epochs=epochs, tokens=tokens, max_seconds=max_seconds, loss_positions=loss_positions,
        kl_reduction=kl_reduction,
        max_steps=max_steps, seq_len=seq_len, micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, lr=lr, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, warmup=warmup, schedule=schedule, w_kl=w_kl, w_rkl=w_rkl, w_ce=w_ce,
        temperature=temperature, w_hidden=w_hidden, trainable=trainable, packing=packing, mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing, seed=seed, save_every=save_every,
        keep_checkpoints=keep_checkpoints, log_every=log_every, eval_every=eval_every, save_dtype=save_dtype,
        skip_bad_lines=skip_bad_lines or None, nan_patience=nan_patience, resume=resume or None, force=force or None,
        accelerate_config=accelerate_config,
    )
    if template is None:
        template = "distill-default"
    run_command("distill", DistillConfig, template=template, config_file=config, overrides=overrides,
                json_out=json_out)
