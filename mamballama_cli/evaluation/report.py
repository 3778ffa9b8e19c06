"""Results of one eval run: rows of (task | metric | teacher | student | delta | stderr), notes and plots,
written as results.json and report.md."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mamballama_cli.evaluation.store import write_text_atomic
from mamballama_cli.io import write_json_atomic

COLUMNS = ("task", "metric", "teacher", "student", "delta", "stderr")


def compact_json(data) -> str:
    """Indented JSON with lists of numbers kept on one line (attention layer lists stay readable)."""
    text = json.dumps(data, indent=2)
    return re.sub(r"\[\s*((?:-?[\d.]+,\s*)*-?[\d.]+)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 100:
        return str(int(x))
    ax = abs(x)
    if ax >= 100:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.3f}"
    return f"{x:.4f}"


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)
    sections: dict[str, list[str]] = field(default_factory=dict)  # heading -> markdown lines
    plots: list[dict] = field(default_factory=list)  # {"title", "path"} (relative to the output dir)
    details: dict = field(default_factory=dict)  # per-task machine-readable detail for results.json
    errors: list[str] = field(default_factory=list)

    def add(self, task: str, metric: str, teacher=None, student=None, stderr=None, delta="auto") -> None:
        teacher, student, stderr = _num(teacher), _num(student), _num(stderr)
        if delta == "auto":
            both = isinstance(teacher, (int, float)) and isinstance(student, (int, float))
            delta = student - teacher if both else None
        self.rows.append({"task": task, "metric": metric, "teacher": teacher, "student": student,
                          "delta": _num(delta), "stderr": stderr})

    def note(self, heading: str, line: str) -> None:
        self.sections.setdefault(heading, []).append(line)

    def table(self) -> str:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in self.rows:
            cells = (fmt(r[c]) if c not in ("task", "metric") else r[c] for c in COLUMNS)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)

    def markdown(self, title: str, repro: dict, timing: str) -> str:
        out = [f"# {title}", "", f"Command: `{repro.get('command', '')}`", "", timing, "", self.table(), "",
               "delta = student - teacher. stderr = standard error of the student's value (lm-eval's own for its "
               "tasks; binomial for accuracies; per-token for perplexity, agreement and KL; over judgments for "
               "judge scores).", ""]
        if self.errors:
            out += ["## Not finished", ""] + [f"- {e}" for e in self.errors] + [""]
        for heading, lines in self.sections.items():
            out += [f"## {heading}", ""] + lines + [""]
        if self.plots:
            out += ["## Plots", ""]
            for p in self.plots:
                out += [f"### {p['title']}", "", f"![{p['title']}]({p['path']})", ""]
        out += ["## Reproducibility", "", "```json", compact_json(repro), "```", ""]
        return "\n".join(out)

    def write(self, out_dir: Path, title: str, repro: dict, timing: dict) -> None:
        timing_line = (f"Wall time {timing['wall_s']:.0f} s; {timing['computed']} cell(s) computed, "
                       f"{timing['reused']} reused from an earlier run.")
        write_json_atomic(out_dir / "results.json", {
            "kind": "mamballama-eval", "title": title, "columns": list(COLUMNS), "rows": self.rows,
            "details": self.details, "plots": self.plots, "errors": self.errors, "timing": timing, "repro": repro,
        })
        write_text_atomic(out_dir / "report.md", self.markdown(title, repro, timing_line))
