"""PNG plots for the report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import os
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from mamballama_cli.errors import MamballamaError

        raise MamballamaError("plots need matplotlib; run: pip install 'mamballama[eval]' "
                              "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


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
