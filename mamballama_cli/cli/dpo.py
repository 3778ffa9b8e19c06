"""`mamballama dpo MODEL --data PAIRS.jsonl --output RUN [--reference REF] [--beta 0.01] [--template dpo]`"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = "Direct preference optimisation (sigmoid DPO) of a hybrid against a frozen reference."
CONTEXT: dict = {}  # click context settings (none needed)


def command(
    model: str = typer.Argument(..., help="Checkpoint directory to train (usually the distilled/SFT hybrid)."),
    data: Optional[str] = typer.Option(None, "--data", help="JSONL of {'prompt', 'chosen', 'rejected'} (strings or "
                                       "message lists), a local data set (save_to_disk folder, .parquet, .arrow) or a "
                                       "Hugging Face dataset name; several comma-separated are concatenated."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run directory."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Frozen reference model (default: MODEL)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="DPO beta (default 0.01, the paper's)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="Conservative DPO (0 = off)."),
    max_prompt_length: Optional[int] = typer.Option(None, "--max-prompt-length", help="Prompt tokens kept (from "
                                                    "the end)."),
    template: Optional[str] = typer.Option(None, "--template", help="Recipe from templates/ (e.g. dpo)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of these options."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Held-out pairs: margin and accuracy."),
    steps: Optional[int] = typer.Option(None, "--steps"),
    epochs: Optional[float] = typer.Option(None, "--epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Prompt + answer tokens per row."),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Pairs per device per forward."),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, "--gradient-accumulation-steps"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm"),
    warmup: Optional[float] = typer.Option(None, "--warmup"),
    schedule: Optional[str] = typer.Option(None, "--schedule"),
    trainable: Optional[str] = typer.Option(None, "--trainable"),
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
    from mamballama_cli.training.config import DPOConfig
    from mamballama_cli.training.launch import run_command

    overrides = dict(
        model=model, data=data, output=output, reference=reference, beta=beta, label_smoothing=label_smoothing,
        max_prompt_length=max_prompt_length, eval_data=eval_data, steps=steps, epochs=epochs, max_steps=max_steps,
        seq_len=seq_len, micro_batch_size=micro_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, warmup=warmup, schedule=schedule,
        trainable=trainable, mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
        seed=seed, save_every=save_every, keep_checkpoints=keep_checkpoints, log_every=log_every,
        eval_every=eval_every, save_dtype=save_dtype, skip_bad_lines=skip_bad_lines or None,
        nan_patience=nan_patience, resume=resume or None, force=force or None, accelerate_config=accelerate_config,
    )
    run_command("dpo", DPOConfig, template=template, config_file=config, overrides=overrides, json_out=json_out)
