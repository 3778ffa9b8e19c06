"""Layer-wise alignment: each Mamba layer learns to reproduce the teacher layer it replaced, teacher-forced.

A freshly converted hybrid starts far from its teacher (on SmolLM2-135M the first held-out KL is about 13 nats
per token, worse than a uniform guess), and end-to-end KD spends its first steps recovering from that. The
per-layer objective is a much denser signal. The teacher's forward is already run for its logits; forward hooks
on the teacher's layers record, for every layer the student turned into Mamba, its input x_i and output y_i.
The student's layer i (its Mamba mixer, with the norms and MLP it shares with the teacher) then runs on x_i
alone, and the loss is

    sum_i  sum_tokens ||layer_i(x_i) - y_i||^2 / mean_tokens ||y_i - x_i||^2      (over real, unpadded tokens)

divided by the number of Mamba layers: the squared error relative to how much the teacher layer changes its
input, so a layer that passes its input through unchanged scores 1. Every Mamba layer trains at once and
independently of the others (a stage with ``trainable: mixers`` and ``w_hidden`` only, as in
templates/distill-align.yaml), then end-to-end KD takes over. This is the "hidden-state alignment" step of
later distillation work (e.g. MOHAWK, Bick et al. 2024), applied to the attention-initialised mixers here.

The student's layers are called directly, so the engines that shard or wrap parameters (FSDP, DeepSpeed,
DDP's reducer) are not supported: the trainer refuses ``w_hidden`` with more than one process.
"""

from __future__ import annotations

from torch import Tensor

from mamballama_cli.models.hooks import capture_io


def mamba_layer_indices(student) -> list[int]:
    """Indices of the student's layers that hold a Mamba mixer (the ones to align)."""
    return [i for i, layer in enumerate(student.model.layers) if not layer.is_attention]


def capture_layers(teacher, indices: list[int]) -> tuple[list, dict[int, tuple[Tensor, Tensor]]]:
    """Forward hooks on ``teacher.model.layers[i]`` storing (input, output) hidden states, detached.

    Returns (handles, store); remove the handles after the teacher's forward (models/hooks.py).
    """
    layers = teacher.model.layers
    if indices and max(indices) >= len(layers):
        raise ValueError(f"the teacher has {len(layers)} layers; the student aligns layer {max(indices)}")
    return capture_io({i: layers[i] for i in indices})


def alignment_loss(student, store: dict[int, tuple[Tensor, Tensor]], valid: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over valid tokens of the mean relative squared error over the aligned layers, valid token count).

    ``student``: the unwrapped MamballamaForCausalLM; ``valid``: (batch, seqlen) bool, True on real tokens.
    Each layer runs on the teacher's input to that layer in the student's residual dtype (float32 masters).
    """
    layers = student.model.layers
    w = valid.float()
    n_valid = w.sum().clamp_min(1.0)
    total = None
    for i, (x, y) in sorted(store.items()):
        x32, y32 = x.float(), y.float()
        out = layers[i](x32, None, None)
        err = (out.float() - y32).pow(2).sum(-1)  # (batch, seqlen)
        scale = ((y32 - x32).pow(2).sum(-1) * w).sum() / n_valid  # how much the teacher's layer moves x
        term = (err * w).sum() / scale.clamp_min(1e-12)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no layer to align: the student has no Mamba layer")
    return total / len(store), n_valid
