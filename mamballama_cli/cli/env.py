"""`mamballama env`: versions, devices and, per op, which kernel backend runs and why."""

from __future__ import annotations

from typing import Optional

import typer

from mamballama_cli.cli.options import json_option

from mamballama_cli.output import out

HELP = "Print versions, devices and, per op, which kernel backend is used and why."
CONTEXT = {"help_option_names": ["-h", "--help"]}


def command(
    device: Optional[str] = typer.Option(None, "--device", help="Device whose backends to report: cuda (default "
                                         "when present), cuda:1, cpu."),
    json_out: bool = json_option("the report"),
):
    report = environment_report(device)
    if json_out:
        import json

        out(json.dumps(report, indent=2))
    else:
        out(format_environment(report))


def environment_report(device: str | None = None) -> dict:
    """Versions, devices and, per op, the backend that runs on ``device`` (cuda when present) and why."""
    import os
    import platform
    import sys

    import torch

    from mamballama_cli import __version__, ops
    from mamballama_cli.evaluation.speed_device import package_version

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    versions = {"mamballama": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "torch_cuda": torch.version.cuda}
    for name in ("transformers", "triton", "mamba_ssm", "causal_conv1d", "accelerate", "safetensors"):
        versions[name] = package_version(name)
    devices = [{"device": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"device": f"cuda:{i}", "name": p.name, "capability": f"{p.major}.{p.minor}",
                            "memory_bytes": int(p.total_memory), "multiprocessors": p.multi_processor_count})
    rows = []
    for row in ops.backend_report(dev):
        if row["backend"] == "torch-ref":
            if dev.type != "cuda":
                why = "reference on CPU (fast kernels are CUDA-only)"
            elif ops.forced_reference():
                why = "MAMBALLAMA_KERNELS=ref forces the reference"
            elif row["candidates"]:
                why = "no fast kernel usable: " + "; ".join(row["candidates"])
            else:
                why = "no fast kernel registered"
        else:
            why = next((c.split(": ", 1)[1] for c in row["candidates"] if c.startswith(row["backend"] + ":")), "ok")
        rows.append({"op": row["op"], "backend": row["backend"], "why": why, "candidates": row["candidates"]})
    report = {"versions": versions, "executable": sys.executable, "devices": devices, "report_device": str(dev),
              "ops": rows}
    from mamballama_cli.ops import tuning

    if tuning.STATE["file"]:  # the global --tuning FILE: what the table holds and whether this machine uses it
        report["tuning"] = tuning.check(tuning.STATE["file"])
    return report


def format_environment(report: dict) -> str:
    v = report["versions"]
    lines = [f"mamballama {v['mamballama']}  python {v['python']}  torch {v['torch']}"
             + (f" (CUDA {v['torch_cuda']})" if v.get("torch_cuda") else " (no CUDA build)")]
    lines.append("  ".join(f"{k} {v[k] or 'not installed'}"
                           for k in ("transformers", "triton", "mamba_ssm", "causal_conv1d", "accelerate")))
    lines.append("devices:")
    for d in report["devices"]:
        if d["device"] == "cpu":
            lines.append(f"  cpu      {d['name']}, {d['cores']} cores")
        else:
            lines.append(f"  {d['device']:8} {d['name']}, compute {d['capability']}, "
                         f"{d['memory_bytes'] / 2**30:.0f} GiB, {d['multiprocessors']} SMs")
    if len(report["devices"]) == 1:
        lines.append("  (no CUDA device)")
    lines.append(f"kernels on {report['report_device']}:")
    width = max(len(r["op"]) for r in report["ops"])
    bwidth = max(len(r["backend"]) for r in report["ops"])
    for r in report["ops"]:
        lines.append(f"  {r['op']:{width}}  {r['backend']:{bwidth}}  {r['why']}")
    t = report.get("tuning")
    if t:
        made = t["made_with"]
        origin = f", made on {made['device']} (triton {made['triton']}, torch {made['torch']})" if made else ""
        lines.append(f"tuning table {t['file']}: {t['entries']} entries{origin}; {t['status']}")
    return "\n".join(lines)
