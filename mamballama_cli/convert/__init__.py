"""`mamballama convert`: teacher -> hybrid initialised from attention (design.md sections 1-2)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mamballama_cli.output import console, out
from mamballama_cli.errors import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ConvertConfig:
    """Options of `mamballama convert` (also readable from --config FILE)."""

    teacher: str = "default"
    output: str = ""
    ratio: float = 0.5  # fraction of layers that keep attention
    attn_layers: str | None = None  # explicit list "3,7,11" (overrides ratio); "" or "none" = no attention
    draft_layers: str | None = None  # build a shrunk Transformer draft from these teacher layers instead
    mixer: str = "mamba2"
    dtype: str = "auto"  # auto = the teacher's stored dtype
    seed: int = 0
    force: bool = False

    def validate(self) -> None:
        if not self.output:
            raise UsageError("--output is required: the directory to write the hybrid to")
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise UsageError(f"--ratio {self.ratio} is outside [0, 1]; it is the fraction of layers that keep attention")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.mixer not in ("mamba2", "mamba1"):
            raise UsageError(f"--mixer {self.mixer!r} is not supported; use mamba2 (default) or mamba1")


def check_mamba1_teacher(tconfig, d_state: int = 16) -> None:
    """Mamba-1 groups take d_state rows of W_K / W_Q each, so the head dim must be a multiple of d_state."""
    head_dim = getattr(tconfig, "head_dim", None) or tconfig.hidden_size // tconfig.num_attention_heads
    if head_dim % d_state:
        raise UsageError(
            f"--mixer mamba1 needs the teacher's head dim ({head_dim}) to be a multiple of {d_state} "
            "(B and C take 16 rows of W_K / W_Q per group of channels); use --mixer mamba2"
        )


def torch_dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_convert(cfg: ConvertConfig) -> dict:
    """Validate everything cheap first, then load, convert, check and save atomically. Returns the summary."""
    from mamballama_cli.convert.placement import attention_layers_for_ratio, parse_layer_list
    from mamballama_cli.io import check_output_dir

    out_dir = check_output_dir(cfg.output, cfg.force)
    from mamballama_cli.convert.families import family_for
    from mamballama_cli.convert.teacher import load_teacher, peek_teacher_config

    tconfig, source = peek_teacher_config(cfg.teacher)
    family = family_for(tconfig)
    n_layers = tconfig.num_hidden_layers
    if cfg.mixer == "mamba1" and cfg.draft_layers is None:
        check_mamba1_teacher(tconfig)
    if cfg.draft_layers is not None:
        from mamballama_cli.convert.draft import run_draft_convert

        return run_draft_convert(cfg, out_dir)
    if cfg.attn_layers is not None:
        attn_layers = parse_layer_list(cfg.attn_layers, n_layers)
    else:
        attn_layers = attention_layers_for_ratio(n_layers, float(cfg.ratio))

    from mamballama_cli.convert.converter import conversion_summary, convert_model
    from mamballama_cli.io import atomic_dir, write_json_atomic

    teacher, tokenizer, source = load_teacher(cfg.teacher, dtype=torch_dtype(cfg.dtype))
    dtype = torch_dtype(cfg.dtype) or next(teacher.parameters()).dtype
    log(f"converting {source.name} ({family.name}, {n_layers} layers) -> {cfg.mixer} hybrid keeping attention in "
        f"{len(attn_layers)} layer(s): {attn_layers}")
    student, report = convert_model(
        teacher, attn_layers, mixer=cfg.mixer, dtype=dtype, seed=cfg.seed,
        teacher_info={"name_or_path": source.name, "kind": source.kind},
    )
    summary = conversion_summary(teacher, student, report, dtype,
                                 ratio=None if cfg.attn_layers is not None else float(cfg.ratio))
    from mamballama_cli import __version__

    summary["mamballama_version"] = __version__
    with atomic_dir(out_dir) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "convert_summary.json", summary)
        write_json_atomic(tmp / "mamballama_config.json", {"command": "convert", **asdict(cfg)})
    summary["output"] = str(out_dir)
    return summary


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary_table(summary: dict):
    from rich.table import Table

    what = "draft" if summary.get("kind") == "draft" else "hybrid"
    t = Table(title=f"converted {summary['teacher'].get('name_or_path')} -> {summary['output']}", show_header=True)
    t.add_column("")
    t.add_column("teacher", justify="right")
    t.add_column(what, justify="right")
    L = summary["num_layers"]
    L_teacher = summary.get("teacher_num_layers", L)
    n_attn = len(summary["attn_layers"])
    t.add_row("layers", str(L_teacher), str(L) + (f" (teacher layers {summary['draft_layers']})"
                                                  if "draft_layers" in summary else ""))
    t.add_row("attention layers", str(L_teacher), f"{n_attn} {summary['attn_layers']}" if what == "hybrid"
              else str(n_attn))
    t.add_row("mamba layers", "0", f"{L - n_attn} ({summary['mixer']})" if what == "hybrid" else "0")
    p = summary["parameters"]
    t.add_row("parameters", f"{p['teacher']:,}", f"{p['hybrid']:,}")
    m = summary["state_memory"]
    t.add_row("K/V bytes per token", format_bytes(m["teacher_kv_bytes_per_token"]),
              format_bytes(m["hybrid_kv_bytes_per_token"]))
    t.add_row("fixed state per sequence", "0 B", format_bytes(m["hybrid_fixed_state_bytes_per_sequence"]))
    for ctx, v in m["at_context"].items():
        t.add_row(f"state at {int(ctx) // 1024}K tokens", format_bytes(v["teacher_bytes"]),
                  format_bytes(v["hybrid_bytes"]))
    return t


def print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        out(json.dumps(summary, indent=2, default=str))
        return
    console().print(summary_table(summary))
    print(f"summary written to {Path(summary['output']) / 'convert_summary.json'}", file=sys.stderr)
