"""`mamballama convert TEACHER --ratio R --output DIR`"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamballama_cli.cli.common import config_from_flags
from mamballama_cli.cli.options import config_option, dtype_option, force_option, json_option, seed_option

HELP = "Turn a Transformer teacher into a hybrid whose Mamba layers start from its attention."


def command(
    teacher: str = typer.Argument(..., help="Local HF checkpoint dir, a .gguf file, a hub id, or 'default' "
                                  "(the embedded SmolLM2-135M-Instruct)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Directory to write the hybrid to."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction of layers that keep attention, 0..1 "
                                          "(evenly spaced, last layer included; with --attn-layers auto, the "
                                          "count). Default 0.5."),
    attn_layers: Optional[str] = typer.Option(None, "--attn-layers", help="Explicit attention layers, e.g. "
                                              "3,7,11 (overrides --ratio; 'none' for an all-Mamba model), or "
                                              "'auto' with --ratio: keep attention where converting hurts most, "
                                              "measured on calibration text."),
    draft_layers: Optional[str] = typer.Option(None, "--draft-layers", help="Instead of a hybrid, cut a small "
                                               "Transformer draft from these teacher layers, e.g. 0,10,20,29."),
    feature_draft: bool = typer.Option(False, "--feature-draft", help="Instead of a hybrid, build an untrained "
                                       "one-layer draft that reads the teacher's features (EAGLE-style): its "
                                       "embedding, head, final norm and last attention layer copied; the teacher "
                                       "may be a hybrid. Train it with `distill --template "
                                       "distill-feature-draft`."),
    mixer: Optional[str] = typer.Option(None, "--mixer", help="mamba2 (default) or mamba1."),
    dtype: Optional[str] = dtype_option(auto="the teacher's"),
    seed: Optional[int] = seed_option("the freshly initialised parameters"),
    init: Optional[str] = typer.Option(None, "--init", help="How the mixers' fresh parts start: 'calibrated' "
                                       "(default: identity conv, open gate, D=0, output gains fitted by least "
                                       "squares to the attention output on built-in text), 'paper' (random conv "
                                       "and gate, D=1), or key=value pairs, e.g. 'gains=false'."),
    calibration_seqs: Optional[int] = typer.Option(None, "--calibration-seqs", help="Calibration sequences of "
                                                   "built-in text (default 8)."),
    calibration_len: Optional[int] = typer.Option(None, "--calibration-len", help="Tokens per calibration "
                                                  "sequence (default 256)."),
    placement_score: Optional[str] = typer.Option(None, "--placement-score", help="For --attn-layers auto: 'kl' "
                                                  "(KL to the teacher with that layer alone converted), "
                                                  "'recall' (worse recall of a code stated earlier in the text, "
                                                  "that layer alone converted), 'kl+recall' (default: both, each "
                                                  "scaled by its mean) or 'residual' (calibrated relative error)."),
    no_gate: bool = typer.Option(False, "--no-gate", help="Mamba-2 mixers without the z projection and its "
                                 "gate: the norm before out_proj is a plain per-head RMSNorm. n_h x head_dim fewer "
                                 "rows to read a token (0.81 GB at the 8B shape). The calibrated start's open gate "
                                 "is one number per token, positive on nearly every token of the default "
                                 "teacher, which that norm cancels: the start is nearly the same."),
    force: bool = force_option(),
    config: Optional[Path] = config_option(),
    json_out: bool = json_option(),
):
    from mamballama_cli.convert import ConvertConfig, print_summary, run_convert

    cfg = config_from_flags(ConvertConfig, config, teacher=teacher, output=output, ratio=ratio,
                            attn_layers=attn_layers, draft_layers=draft_layers, feature_draft=feature_draft or None,
                            mixer=mixer, dtype=dtype, seed=seed,
                            force=force or None, init=init, calibration_seqs=calibration_seqs,
                            calibration_len=calibration_len, placement_score=placement_score,
                            gate=False if no_gate else None)
    print_summary(run_convert(cfg), json_out)
