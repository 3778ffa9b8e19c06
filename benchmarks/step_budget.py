"""Where a batch-1 decode step's time goes, from a speed JSON (``mamballama eval speed`` / ``benchmarks/speed.py``).

    python benchmarks/step_budget.py SPEED.json [--model hybrid] [--plot budget.png]

A batch-1 step of an 8B model is mostly GEMVs: each weight read once. The speed JSON holds the measured step
(decode tok/s), the copy bandwidth of the device and, per GEMV shape, the timings behind the kernel's choice
(``gemv_timings``: the gemv kernel and cuBLAS, each timed inside CUDA graphs). This script counts how many times a
step runs each shape and adds the served time up (the kernel where it won, else cuBLAS). What is left of the step is everything else: the norms, the Mamba-2 conv and step,
attention, and the gaps between kernels. The table gives each shape's share of the step and the bandwidth its
GEMV reached; ``--plot`` draws the same as bars beside the memory floor. Nothing here is estimated: an untimed
shape is reported as such, and where a tuning table (``--tuning``) handed the run its choices, so that nothing was
timed, the table says so and names the way to time them (run the speed step again without the table).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def projection_shapes(config: dict) -> Counter:
    """``"NxK"`` -> how many times one decode step of this model runs that GEMV. ``config``: the speed JSON's
    ``config`` and ``models`` merged (shape, ratio or attention layers, gate); the teacher is every layer
    attention."""
    import torch

    from mamballama_cli.convert.placement import attention_layers_for_ratio
    from mamballama_cli.evaluation.shapes import hybrid_config, teacher_config
    from mamballama_cli.models.modeling import MamballamaForCausalLM

    tc = teacher_config(config["shape"])
    n = tc.num_hidden_layers
    if config.get("model") == "teacher":
        layers = list(range(n))
    else:
        layers = config.get("attn_layers") or attention_layers_for_ratio(n, config["ratio"])
    hc = hybrid_config(tc, layers, mamba_gate=config.get("mamba_gate", True))
    with torch.device("meta"):
        model = MamballamaForCausalLM(hc)
    shapes: Counter = Counter()
    def name(rows, cols):
        return f"{rows}x{cols}"

    for layer in model.model.layers:
        if layer.is_attention:
            a = layer.self_attn
            shapes[name(sum(p.weight.shape[0] for p in (a.q_proj, a.k_proj, a.v_proj)), a.q_proj.weight.shape[1])] += 1
            shapes[name(*a.o_proj.weight.shape)] += 1
        else:
            shapes[name(*layer.mamba.in_proj.weight.shape)] += 1
            shapes[name(*layer.mamba.out_proj.weight.shape)] += 1
        mlp = layer.mlp
        shapes[name(2 * mlp.gate_proj.weight.shape[0], mlp.gate_proj.weight.shape[1])] += 1
        shapes[name(*mlp.down_proj.weight.shape)] += 1
    shapes[name(*model.lm_head.weight.shape)] += 1
    return shapes


def served_us(timing: dict, kernel: bool, pdl: bool) -> tuple[float, str]:
    """The time of what served a shape, the kernel's or cuBLAS's, timed alone in graphs. (A pdl launch's own timing
    has the norm before it in it, so the kernel's stands for it too: what pdl overlaps is in "everything else".)"""
    if kernel:
        return timing["kernel_us"], "kernel, pdl" if pdl else "kernel"
    return timing["cublas_us"], "cuBLAS"


def budget(data: dict, model: str = "hybrid") -> dict:
    """The step's budget for ``model``'s batch-1 decode row of a speed JSON."""
    rows = [r for r in data["rows"] if r.get("section") == "decode" and r["model"] == model and r["batch"] == 1]
    if not rows:
        raise SystemExit(f"error: no batch-1 decode row of {model!r} in this JSON; run eval speed with --batch-sizes 1")
    row = rows[0]
    dtype = data.get("dtype", "bfloat16")
    config = {**data["config"], **data.get("models", {}), "model": model}
    bandwidth = data["floor"]["copy_bandwidth_bytes_per_s"]
    step_us = 1e6 / row["decode_tok_s"]
    kernel, pdl = set(row.get("gemv_kernel_shapes", [])), set(row.get("gemv_pdl_shapes", []))
    glu = set(row.get("gemv_swiglu_shapes", []))
    conv = {name.split(" conv ")[0] for name in row.get("gemv_conv_shapes", [])}  # "NxK conv C": in_proj + its conv
    table_used = (row.get("tuning") or {}).get("status") == "used"
    untimed = "not timed: the tuning table chose it" if table_used else "not timed"
    items, total = [], 0.0
    for shape, count in sorted(projection_shapes(config).items(), key=lambda kv: -kv[1] * _size(kv[0])):
        timing = row.get("gemv_timings", {}).get(f"1x{shape} {dtype}")
        rows_, cols = (int(v) for v in shape.split("x"))
        weight = rows_ * cols * 2  # bytes of a bf16 / fp16 weight
        if timing is None:
            items.append({"shape": shape, "count": count, "served_by": untimed, "us": None, "step_us": None,
                          "share": None, "tb_s": None})
            continue
        us, how = served_us(timing, f"1x{shape}" in kernel, f"1x{shape}" in pdl)
        if f"1x{shape}" in glu:  # the SwiGLU GEMV served it: its own timing has the norm before it in it
            how = "gemv_swiglu (timed: the GEMV alone)"
        if shape in conv:  # in_proj with the conv step in its epilogue (ops/triton_gemv_conv.py)
            how = "gemv_conv (timed: the GEMV alone)"
        total += count * us
        items.append({"shape": shape, "count": count, "served_by": how, "us": us, "step_us": count * us,
                      "share": count * us / step_us, "tb_s": weight / us / 1e6})
    weights = data["floor"].get(model, {}).get("weight_bytes")
    return {"model": model, "device": data["machine"].get("name"), "date": data["machine"].get("date"),
            "tok_s": row["decode_tok_s"], "step_us": step_us, "gemv_us": total, "rest_us": step_us - total,
            "floor_us": weights / bandwidth * 1e6 if weights else None, "copy_tb_s": bandwidth / 1e12,
            "items": items, "tuning_table": table_used}


def _size(shape: str) -> int:
    r, c = shape.split("x")
    return int(r) * int(c)


def table(b: dict) -> str:
    head = (f"{b['model']}, batch 1: {b['tok_s']:.1f} tok/s = {b['step_us']:.0f} us a step on {b['device']} "
            f"({b['date']}); copy bandwidth {b['copy_tb_s']:.2f} TB/s")
    lines = [head,
             "", "| GEMV (N x K) | per step | served by | us a call | us a step | share of the step | TB/s |",
             "|---|---|---|---|---|---|---|"]
    for it in b["items"]:
        if it["us"] is None:
            lines.append(f"| {it['shape']} | {it['count']} | {it['served_by']} | | | | |")
            continue
        lines.append(f"| {it['shape']} | {it['count']} | {it['served_by']} | {it['us']:.2f} | {it['step_us']:.0f} | "
                     f"{100 * it['share']:.1f}% | {it['tb_s']:.2f} |")
    count = sum(i["count"] for i in b["items"])
    if any(it["us"] is not None for it in b["items"]):
        lines.append(f"| **all GEMVs** | {count} | | | **{b['gemv_us']:.0f}** | "
                     f"**{100 * b['gemv_us'] / b['step_us']:.1f}%** | |")
        lines.append(f"| everything else (norms, conv, SSM step, attention, gaps) | | | | {b['rest_us']:.0f} | "
                     f"{100 * b['rest_us'] / b['step_us']:.1f}% | |")
    else:  # nothing timed: no split of the step to give
        lines.append(f"| **all GEMVs** | {count} | not timed | | | | |")
        if b.get("tuning_table"):
            lines.append("\nthe GEMVs' choices came from a tuning table, untimed; for their times run the speed step "
                         "without it (--tuning left out, or TUNING=0 for gpu_session.sh)")
    if b["floor_us"]:
        lines.append(f"\nmemory floor over all weights: {b['floor_us']:.0f} us a step; the step is "
                     f"{b['step_us'] / b['floor_us']:.3f}x it")
    return "\n".join(lines)


def plot(b: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [it for it in b["items"] if it["us"] is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    left = 0.0
    for it in timed:
        ax1.barh(0, it["step_us"], left=left, label=f"{it['shape']} x{it['count']}")
        left += it["step_us"]
    ax1.barh(0, b["rest_us"], left=left, color="lightgray", label="everything else")
    if b["floor_us"]:
        ax1.axvline(b["floor_us"], color="black", linestyle="--", label="memory floor")
    ax1.set_yticks([])
    ax1.set_xlabel("microseconds a decode step")
    ax1.set_title(f"{b['model']}: {b['tok_s']:.1f} tok/s at batch 1")
    ax1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.22), ncol=3)
    ax2.bar([it["shape"] for it in timed], [it["tb_s"] for it in timed], color="tab:blue")
    ax2.axhline(b["copy_tb_s"], color="black", linestyle="--", label="copy bandwidth (read + write)")
    ax2.set_ylabel("TB/s reached")
    ax2.set_title("bandwidth of each GEMV (its served launch)")
    ax2.tick_params(axis="x", rotation=30, labelsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{b['device']}, {b['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("speed_json", type=Path)
    ap.add_argument("--model", default="hybrid", choices=("hybrid", "teacher"))
    ap.add_argument("--plot", type=Path, default=None, help="write the bars here (PNG)")
    ap.add_argument("--json", type=Path, default=None, help="write the budget here")
    args = ap.parse_args(argv)
    if not args.speed_json.is_file():
        print(f"error: {args.speed_json} is not a file; give the JSON that eval speed --output wrote", file=sys.stderr)
        return 2
    b = budget(json.loads(args.speed_json.read_text()), args.model)
    print(table(b))
    if args.plot:
        plot(b, args.plot)
    if args.json:
        args.json.write_text(json.dumps(b, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
