"""Training: data and masking, losses, progressive stages, the accelerate loop, pickle-free checkpoints, and
pseudo-labelling. Commands `distill`, `sft`, `dpo` and `label` call into it (docs/training.md)."""
