"""The run's curves (``RUN/curves.png``): what metrics.jsonl holds, drawn at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path

# Panels and the record keys each draws, in order; a panel none of whose keys a run wrote is left out.
PANELS = (
    ("training loss (per target token)", ("loss", "kl", "rkl", "ce", "hidden", "feature")),
    ("preference pairs", ("margin", "accuracy", "reward_chosen", "reward_rejected")),
    ("held-out", None),  # every eval_* key
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("tokens/s", ("tokens_per_s",)),
)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a line a crash cut short is skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def curve_panels(records: list[dict]) -> tuple[list[tuple[str, dict[str, tuple[list[int], list[float]]]]],
                                               list[tuple[int, str]]]:
    """(panels, stage starts): each panel a title and {key: (steps, values)} without the null (non-finite) values;
    each stage start the step before the stage's first step and its name."""
    steps = [r for r in records if "step" in r and not any(k.startswith("eval_") for k in r)]
    evals = [r for r in records if "step" in r and any(k.startswith("eval_") for k in r)]
    panels = []
    for title, keys in PANELS:
        rows = evals if keys is None else steps
        if keys is None:
            keys = sorted({k for r in evals for k in r if k.startswith("eval_")})
        series = {}
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts and not (key != "loss" and title.startswith("training") and _same(pts, rows)):
                series[key] = ([s for s, _ in pts], [float(v) for _, v in pts])
        if series:
            panels.append((title, series))
    starts, last = [], None
    for r in steps:
        if r.get("stage") != last:
            starts.append((r["step"] - 1, str(r.get("stage"))))
            last = r.get("stage")
    return panels, starts


def _same(pts, rows) -> bool:
    """A loss term equal to the loss at every step (a run with one term) adds nothing to the panel."""
    loss = {r["step"]: r.get("loss") for r in rows}
    return all(loss.get(s) is not None and abs(loss[s] - v) <= 1e-9 * max(1.0, abs(v)) for s, v in pts)


def draw_curves(run_dir: Path) -> Path | None:
    """``RUN/curves.png`` from ``RUN/metrics.jsonl`` (None where it holds no step yet)."""
    from mamballama_cli.figures import pyplot, save

    run_dir = Path(run_dir)
    panels, starts = curve_panels(read_metrics(run_dir / "metrics.jsonl"))
    if not panels:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for key, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 or title == "held-out" else None, markersize=3, label=key)
        for step, name in starts:
            ax.axvline(step, color="grey", linestyle=":", linewidth=1)
        positive = [y for _, ys in series.values() for y in ys if y > 0]
        if title.startswith(("training", "held-out")) and positive and len(positive) == sum(
                len(ys) for _, ys in series.values()) and max(positive) > 20 * min(positive):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if starts and len(starts) > 1:  # name the stages once, over the first panel
        top = axes.flat[0]
        for step, name in starts:
            top.text(step, 1.0, f" {name}", transform=top.get_xaxis_transform(), fontsize=7, va="top",
                     color="grey", rotation=90)
    fig.suptitle(f"{run_dir.name}: metrics.jsonl, stage starts dotted", y=1.01)
    fig.tight_layout()
    path = run_dir / "curves.png"
    save(fig, path)
    plt.close(fig)
    return path
