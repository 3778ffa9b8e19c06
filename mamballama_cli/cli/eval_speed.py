"""`mamballama eval speed (--shape NAME | --model CKPT) [--output JSON]`: decode speed and memory benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamballama_cli.cli.common import config_from_flags
from mamballama_cli.cli.options import config_option, device_option, dtype_option, seed_option

from mamballama_cli.output import out

HELP = ("Benchmark time to first token, decode tokens/s (batch 1, 8, 32) and memory against prompt length "
        "for the hybrid and its teacher, with the memory-bandwidth floor of this device.")
CONTEXT = {"help_option_names": ["-h", "--help"]}


def command(
    shape: Optional[str] = typer.Option(None, "--shape", help="Named shape with random weights: llama3-8b, "
                                        "llama3.2-1b, smollm2-135m, tiny."),
    model: Optional[str] = typer.Option(None, "--model", help="Hybrid checkpoint directory (instead of --shape)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher checkpoint (with --model; default: "
                                          "the teacher recorded in the hybrid's config)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="With --shape: fraction of layers that keep "
                                          "attention (default 0.25)."),
    attn_layers: Optional[str] = typer.Option(None, "--attn-layers", help="With --shape: explicit attention "
                                              "layers, e.g. 3,7,11."),
    no_gate: bool = typer.Option(False, "--no-gate", help="With --shape: the hybrid's Mamba-2 mixers without "
                                 "the z projection and its gate (convert --no-gate)."),
    dtype: Optional[str] = dtype_option(),
    device: Optional[str] = device_option(),
    prompt_tokens: Optional[int] = typer.Option(None, "--prompt-tokens", help="Prompt length of the batch runs "
                                                "(default 128)."),
    new_tokens: Optional[int] = typer.Option(None, "--new-tokens", help="Tokens decoded in the batch runs "
                                             "(default 256)."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Comma-separated (default 1,8,32)."),
    contexts: Optional[str] = typer.Option(None, "--contexts", help="Prompt lengths of the memory sweep, "
                                           "batch 1 (default 1k,2k,4k,8k,16k,32k,64k); '' for none."),
    context_new_tokens: Optional[int] = typer.Option(None, "--context-new-tokens", help="Tokens decoded at "
                                                     "each context length (default 32)."),
    teacher_new_tokens: Optional[int] = typer.Option(None, "--teacher-new-tokens", help="Cap on the tokens the "
                                                     "eager transformers teacher decodes per batch run (default "
                                                     "32; its rate is steady)."),
    models: Optional[str] = typer.Option(None, "--models", help="hybrid,teacher (default both)."),
    teacher_engines: Optional[str] = typer.Option(None, "--teacher-engines", help="transformers (default) "
                                                  "and/or static: the teacher's layers on the hybrid's static "
                                                  "decoder, e.g. transformers,static."),
    no_graphs: bool = typer.Option(False, "--no-graphs", help="Run the hybrid's decode step eagerly (no CUDA "
                                   "graph)."),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", help="Static engine: prompt tokens per "
                                                "row read in one piece (default: 4096, fewer for a large batch)."),
    max_batch: bool = typer.Option(False, "--max-batch", help="Per context length (--contexts): the largest "
                                   "batch that fits, for the hybrid and for the teacher on the same static "
                                   "engine, and decode tokens/s there (the largest batch the memory estimate "
                                   "allows first; below it only if that run fails)."),
    max_batch_curve: bool = typer.Option(False, "--max-batch-curve", help="With --max-batch: double from batch 1 "
                                         "and bisect, decoding at every step (tokens/s against batch; slower)."),
    memory_limit: Optional[float] = typer.Option(None, "--memory-limit", help="With --max-batch: GB a run may "
                                                 "use, weights included (default: the device's free memory)."),
    seed: Optional[int] = seed_option("the random weights and prompt tokens (default 0)"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the full results as JSON here (and "
                                         "the figure beside it as .png, where matplotlib is installed)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Draw the results here (PNG): memory and tokens/s "
                                       "against context and batch, the largest batches; needs matplotlib."),
    from_json: Optional[str] = typer.Option(None, "--from", help="Measure nothing: print the table of a saved "
                                            "--output JSON (and draw it with --plot)."),
    config: Optional[Path] = config_option(),
):
    from mamballama_cli.evaluation.speed import SpeedConfig, format_table, parse_int_list, run_speed, write_result

    if from_json is not None:
        _render_saved(from_json, plot, given=[f for f, v in (("--shape", shape), ("--model", model),
                                                               ("--output", output)) if v is not None])
        return

    def names(text):
        return None if text is None else [v.strip() for v in text.split(",") if v.strip()]

    cfg = config_from_flags(
        SpeedConfig, config, shape=shape, model=model, teacher=teacher, ratio=ratio, attn_layers=attn_layers,
        dtype=dtype, device=device, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
        contexts=[] if contexts is not None and not contexts.strip() else parse_int_list(contexts, "--contexts"),
        context_new_tokens=context_new_tokens, teacher_new_tokens=teacher_new_tokens, models=names(models),
        teacher_engines=names(teacher_engines), graphs=False if no_graphs else None, seed=seed, output=output,
        prefill_chunk=prefill_chunk, max_batch=max_batch or None, memory_limit_gb=memory_limit,
        max_batch_curve=max_batch_curve or None,
        gate=False if no_gate else None,
    )
    if cfg.output:
        parent = Path(cfg.output).expanduser().resolve().parent
        if not parent.is_dir():
            from mamballama_cli.errors import UsageError

            raise UsageError(f"--output {cfg.output}: folder {parent} does not exist")
    if plot:
        _check_plot_path(plot)
    result = run_speed(cfg)
    out(format_table(result))
    if cfg.output:
        write_result(result, cfg.output)
    _draw(result, plot, cfg.output)


def _check_plot_path(plot: str) -> None:
    from mamballama_cli.errors import UsageError

    path = Path(plot).expanduser()
    if path.suffix.lower() != ".png":
        raise UsageError(f"--plot {plot}: the figure is a PNG; name a .png file")
    if not path.resolve().parent.is_dir():
        raise UsageError(f"--plot {plot}: folder {path.resolve().parent} does not exist")


def _draw(result: dict, plot: str | None, output: str | None) -> None:
    """The figure: at --plot, else beside --output where matplotlib is installed (a note where it is not)."""
    import importlib.util

    from mamballama_cli.evaluation.plots import speed_figure
    from mamballama_cli.output import log

    if plot is None and output:  # the figure beside the JSON: a nicety, never the command's failure
        from mamballama_cli.errors import MamballamaError

        if importlib.util.find_spec("matplotlib") is None:
            log("note: no figure (matplotlib is not installed: pip install 'mamballama[eval]')")
            return
        try:
            log(f"figure written to {speed_figure(Path(output).with_suffix('.png'), result)}")
        except MamballamaError as exc:
            log(f"note: no figure ({exc})")
        return
    if plot:
        log(f"figure written to {speed_figure(Path(plot).expanduser(), result)}")


def _render_saved(path: str, plot: str | None, given: list[str]) -> None:
    import json

    from mamballama_cli.errors import UsageError
    from mamballama_cli.evaluation.speed import format_table

    if given:
        raise UsageError(f"--from {path} measures nothing: drop {', '.join(given)} (or drop --from to measure)")
    if plot:
        _check_plot_path(plot)
    try:
        result = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise UsageError(f"--from {path}: no such file; give the JSON an earlier `eval speed --output` wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--from {path}: not JSON ({exc}); give the JSON `eval speed --output` wrote") from None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list) or "floor" not in result:
        raise UsageError(f"--from {path}: not a speed result (no rows and floor); give the JSON `eval speed "
                         "--output` wrote")
    out(format_table(result))
    _draw(result, plot, None)
