"""What the three training commands share after parsing: merge the config, hand over to `accelerate launch`
when asked to, run, print the summary."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from mamballama_cli.output import out
from mamballama_cli.errors import UsageError

CHILD_ENV = "MAMBALLAMA_UNDER_ACCELERATE"


def launched_by_accelerate() -> bool:
    return bool(os.environ.get(CHILD_ENV)) or "LOCAL_RANK" in os.environ or "ACCELERATE_DYNAMO_MODE" in os.environ


def resolve_accelerate_config(spec: str) -> Path:
    """A file path, or the name of one of templates/accelerate/*.yaml (single-gpu, ddp, fsdp, zero2, zero3), read
    from the package's copy (mamballama_cli/templates/accelerate/) so that it works after a wheel install."""
    from mamballama_cli.config import TEMPLATES_DIR

    path = Path(spec).expanduser()
    if path.is_file():
        return path
    named = TEMPLATES_DIR / "accelerate" / f"{spec}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in (TEMPLATES_DIR / "accelerate").glob("*.yaml"))
    raise UsageError(f"--accelerate-config {spec} is neither a file nor one of {', '.join(known)}")


def delegate_to_accelerate(config_file: str) -> int:
    """Re-run this very command line under `accelerate launch --config_file FILE` and return its exit code."""
    path = resolve_accelerate_config(config_file)
    argv = list(sys.argv[1:])
    for i, a in enumerate(argv):
        if a == "--accelerate-config":
            del argv[i:i + 2]
            break
        if a.startswith("--accelerate-config="):
            del argv[i]
            break
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "-m", "mamballama_cli",
           *argv]
    print(f"launching: accelerate launch --config_file {path} -m mamballama_cli {' '.join(argv)}", file=sys.stderr,
          flush=True)
    env = {**os.environ, CHILD_ENV: "1"}
    return subprocess.run(cmd, env=env).returncode


def run_command(kind: str, cls, *, template: str | None, config_file, overrides: dict, json_out: bool) -> None:
    import typer

    from mamballama_cli.training.config import merge_train_config

    cfg = merge_train_config(cls, template=template, config_file=config_file, overrides=overrides)
    if cfg.accelerate_config and not launched_by_accelerate():
        code = delegate_to_accelerate(cfg.accelerate_config)
        raise typer.Exit(code)
    from mamballama_cli.training.trainer import run_training

    # stdout carries the result only: libraries that print (DeepSpeed logs to stdout) go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_training(cfg, kind)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if json_out:
        out(json.dumps(summary, indent=2, default=str))
        return
    out(format_summary(summary))


def format_summary(s: dict) -> str:
    last = s.get("last") or {}
    parts = [f"{s['command']}: {s['steps']}/{s['total_steps']} steps"]
    for k in ("loss", "kl", "ce", "feature", "margin", "accuracy"):
        if k in last and last[k] is not None:
            parts.append(f"{k} {last[k]:.4g}")
    evals = s.get("evals") or []
    if len(evals) >= 2:
        first, final = evals[0], evals[-1]
        for k in ("eval_kl", "eval_ce", "eval_feature", "eval_margin"):
            if k in first and k in final:
                parts.append(f"{k} {first[k]:.4g} -> {final[k]:.4g}")
    where = (f"model in {s['model']}" if s.get("model")
             else f"stopped early; continue with --resume (checkpoint {s.get('checkpoint')})")
    return "; ".join(parts) + f"; {where}"
