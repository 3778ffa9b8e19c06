"""PNG plots for the report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from mamballama_cli.figures import pyplot as _pyplot
from mamballama_cli.figures import save as _save


def length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _distill_x(lengths: list[int], distill: int) -> float:
    """Position of the distillation length on a categorical axis of (sorted) lengths, interpolated in log space."""
    if len(lengths) == 1:
        return 0.0 if distill == lengths[0] else (-0.5 if distill < lengths[0] else 0.5)
    logs = [math.log(x) for x in lengths]
    d = math.log(distill)
    if d <= logs[0]:
        return -0.5 if d < logs[0] else 0.0
    if d >= logs[-1]:
        return len(lengths) - 0.5 if d > logs[-1] else len(lengths) - 1.0
    for i in range(len(logs) - 1):
        if logs[i] <= d <= logs[i + 1]:
            return i + (d - logs[i]) / (logs[i + 1] - logs[i])
    return 0.0


def retrieval_heatmap(path: Path, title: str, lengths: list[int], depths: list[float],
                      grids: dict[str, list[list[float]]], distill_length: int | None) -> Path:
    """One panel per model (teacher first), depth (rows) x length (columns), one shared 0..1 colour scale.

    ``grids[role][i][j]`` is the accuracy at depths[i], lengths[j] (NaN where not run).
    """
    plt = _pyplot()
    import numpy as np

    roles = list(grids)
    size = (2.2 + 1.1 * len(lengths) * len(roles), 1.2 + 0.5 * len(depths))
    fig, axes = plt.subplots(1, len(roles), figsize=size, squeeze=False, sharey=True)
    image = None
    for ax, role in zip(axes[0], roles):
        data = np.array(grids[role], dtype=float)
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", interpolation="nearest")
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if not np.isnan(data[i, j]):
                    dark = data[i, j] < 0.2 or data[i, j] > 0.8  # the colour map's ends are dark
                    ax.text(j, i, f"{data[i, j]:.0%}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(role)
        if distill_length:
            x = _distill_x(lengths, distill_length)
            ax.axvline(x, color="black", linestyle="--", linewidth=1.5)
            ax.text(x, -0.6, f"distill {length_label(distill_length)}", ha="center", va="bottom", fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=list(axes[0]), label="accuracy", fraction=0.046, pad=0.04)
    fig.suptitle(title, y=1.02)
    _save(fig, path)
    plt.close(fig)
    return path


def accuracy_per_length(path: Path, title: str, lengths: list[int], series: dict[str, list[float]],
                        distill_length: int | None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for role, acc in series.items():
        ax.plot(lengths, acc, marker="o", label=role)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [length_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    if distill_length:
        ax.axvline(distill_length, color="black", linestyle="--", linewidth=1.2,
                   label=f"distillation length {length_label(distill_length)}")
    ax.legend(fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def _series(rows: list[dict], section: str) -> dict[str, list[dict]]:
    """The measured rows of one section of the speed benchmark, per "model (engine)", in row order."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("section") == section and not r.get("error") and r.get("decode_tok_s") is not None:
            out.setdefault(f"{r['model']} ({r.get('engine', '?')})", []).append(r)
    return out


def speed_figure(path: Path, result: dict) -> Path:
    """The speed benchmark's result (``eval speed``) as one figure, a panel per section it measured: memory and
    decode tokens/s against context at batch 1, tokens/s against batch, and, for ``--max-batch``, each model's
    tokens/s at the largest batch it fits per context (the batch over each bar, the hybrid's ratio in the title),
    with ``--max-batch-curve`` also tokens/s at every batch the search ran.
    """
    rows = result.get("rows", [])
    context, decode = _series(rows, "context"), _series(rows, "decode")
    best = [r for r in rows if r.get("section") == "max-batch" and not r.get("error")]
    curves = {f"{r['model']}, {length_label(r['prompt_tokens'])}": sorted(
        (p["batch"], p["aggregate_tok_s"]) for p in r.get("probes", []) if p.get("aggregate_tok_s") is not None)
        for r in best}
    curves = {k: v for k, v in curves.items() if len(v) > 1}  # --max-batch-curve: tokens/s at every batch run
    panels = (["memory", "context"] if context else []) + (["batch"] if decode else []) + (["max"] if best else []) \
        + (["curve"] if curves else [])
    if not panels:
        from mamballama_cli.errors import MamballamaError

        raise MamballamaError("the speed result holds no measured row to plot (every row failed, or none ran)")
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel in ("memory", "context"):
            for label, rs in context.items():
                xs = [r["prompt_tokens"] for r in rs]
                if panel == "memory":
                    line = ax.plot(xs, [((r.get("kv_bytes") or 0) + (r.get("state_bytes") or 0)) / 1e9 for r in rs], marker="o",
                                   label=f"{label}: K/V + state")[0]
                    if all(r.get("peak_mem_bytes") for r in rs):
                        ax.plot(xs, [r["peak_mem_bytes"] / 1e9 for r in rs], linestyle="--",
                                color=line.get_color(), label=f"{label}: peak")
                else:
                    ax.plot(xs, [r["decode_tok_s"] for r in rs], marker="o", label=label)
            ticks = sorted({r["prompt_tokens"] for rs in context.values() for r in rs})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [length_label(n) for n in ticks])
            ax.minorticks_off()
            ax.set_xlabel("context (tokens), batch 1")
            ax.set_ylabel("GB" if panel == "memory" else "decode tokens/s")
            ax.set_title("memory against context" if panel == "memory" else "decode speed against context")
        elif panel == "batch":
            for label, rs in decode.items():
                ax.plot([r["batch"] for r in rs], [r["aggregate_tok_s"] for r in rs], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ticks = sorted({r["batch"] for rs in decode.values() for r in rs})
            ax.set_xticks(ticks, [str(b) for b in ticks])
            ax.minorticks_off()
            prompt = sorted({r["prompt_tokens"] for rs in decode.values() for r in rs})
            ax.set_xlabel(f"batch (prompt {', '.join(map(str, prompt))} tokens)")
            ax.set_ylabel("decode tokens/s, all sequences")
            ax.set_title("throughput against batch")
        elif panel == "curve":
            for label, pts in curves.items():
                ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # 16, not 2^4
            ax.set_xlabel("batch")
            ax.set_ylabel("decode tokens/s, all sequences")
            ax.set_title("throughput against batch, up to the largest that fits")
        else:
            contexts = sorted({r["prompt_tokens"] for r in best})
            models = sorted({r["model"] for r in best}, key=lambda m: (m != "hybrid", m))
            width = 0.8 / len(models)
            for k, model in enumerate(models):
                for i, n in enumerate(contexts):
                    r = next((r for r in best if r["model"] == model and r["prompt_tokens"] == n), None)
                    if r is None:
                        continue
                    x = i + (k - (len(models) - 1) / 2) * width
                    bar = ax.bar(x, r["aggregate_tok_s"], width, color=f"C{k}", label=model if i == 0 else None)
                    ax.bar_label(bar, [f"batch {r['batch']}"], fontsize=7)
            ax.set_xticks(range(len(contexts)), [length_label(n) for n in contexts])
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("decode tokens/s at the largest batch")
            ratios = [f"{length_label(int(n))}: {cell['hybrid_over_teacher']:.2f}x"
                      for n, cell in result.get("summary", {}).get("max_batch", {}).items()
                      if isinstance(cell, dict) and "hybrid_over_teacher" in cell]
            ax.set_title("largest batch that fits" + (f" (hybrid/teacher {'; '.join(ratios)})" if ratios else ""),
                         fontsize=9 if ratios else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = result.get("machine", {})
    fig.suptitle(f"mamballama eval speed: {m.get('name', '?')}, {result.get('dtype', '?')}, {m.get('date', '')}",
                 y=1.02)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
