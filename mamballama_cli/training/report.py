"""Progress on rank 0 (a rich bar on a terminal, plain lines otherwise; both on stderr) and metrics as JSONL."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Reporter:
    """Writes ``metrics.jsonl`` and shows progress. A no-op on every process but the main one."""

    KEYS = ("loss", "kl", "rkl", "ce", "hidden", "feature", "margin", "accuracy")
    MICRO_AFTER_S = 5.0  # progress inside a step only once it has run this long (a long step on CPU) ...
    MICRO_EVERY_S = 5.0  # ... and then at most this often

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, resume_step: int, trackers=None):
        self.enabled = enabled
        self.trackers = trackers  # the accelerator, where --report-to started trackers (engine.start_trackers)
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total = total_steps
        self.progress = None
        self.task = None
        self.t0 = time.perf_counter()
        self.steps_done_here = 0
        self.step_no = self.eval_no = 0
        self.step_t0 = self.micro_t = 0.0
        if not enabled:
            return
        self._truncate_after(resume_step)
        self.file = self.path.open("a", buffering=1)
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=total_steps, completed=resume_step, stats="")

    def _truncate_after(self, step: int) -> None:
        """On resume, forget records past the checkpoint so the curve has each step once."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if rec.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        """One strict JSON line: a non-finite value is written as null (a bare NaN breaks strict parsers)."""
        if self.enabled:
            from mamballama_cli.io import finite_json

            self.file.write(json.dumps(finite_json(record), allow_nan=False) + "\n")
            if self.trackers is not None:  # the numbers, at the record's step (the stage's name stays in the JSONL)
                values = {k: v for k, v in record.items()
                          if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
                self.trackers.log(values, step=record["step"])

    def stage(self, name: str, steps: int) -> None:
        if self.enabled and self.progress is None:
            print(f"stage {name}: {steps} step(s)", file=sys.stderr, flush=True)

    def step(self, record: dict, log_line: bool) -> None:
        if not self.enabled:
            return
        self.write(record)
        self.steps_done_here += 1
        stats = "  ".join(f"{k} {_fmt(record[k])}" for k in self.KEYS if k in record)
        stats += f"  {record.get('tokens_per_s', 0):,.0f} tok/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], description=record.get("stage", "train"),
                                 stats=stats)
        elif log_line:
            eta = self.eta(record["step"])
            print(f"[{record.get('stage', '')}] step {record['step']}/{self.total}  {stats}  lr {record['lr']:.3g}"
                  f"  eta {eta}", file=sys.stderr, flush=True)

    def replan(self, total_steps: int) -> None:
        """The run's step count changed (--fit-to-time): the bar, the progress lines and the ETA follow."""
        self.total = total_steps
        if self.progress is not None:
            self.progress.update(self.task, total=total_steps)

    def begin_step(self, step: int) -> None:
        self.step_no, self.step_t0 = step, time.perf_counter()
        self.micro_t = self.step_t0

    def begin_eval(self, step: int) -> None:
        self.eval_no, self.step_t0 = step, time.perf_counter()
        self.micro_t = self.step_t0

    def micro(self, done: int, total: int) -> None:
        """Micro-batch ``done`` of ``total`` finished: shown only inside a step that runs long (not part of the
        metrics). On a terminal it lives in the bar's stats; otherwise it is a plain line."""
        self._inside(done, total, f"step {self.step_no}/{self.total}: micro-batch")

    def eval_batch(self, done: int, total: int) -> None:
        """Batch ``done`` of ``total`` of a held-out evaluation (after :meth:`begin_eval`), shown as :meth:`micro`."""
        self._inside(done, total, f"eval at step {self.eval_no}: batch")

    def _inside(self, done: int, total: int, what: str) -> None:
        if not self.enabled or done >= total:
            return
        now = time.perf_counter()
        if now - self.step_t0 < self.MICRO_AFTER_S or (self.micro_t != self.step_t0
                                                        and now - self.micro_t < self.MICRO_EVERY_S):
            return
        self.micro_t = now
        msg = f"{what} {done}/{total} ({now - self.step_t0:.0f} s)"
        if self.progress is not None:
            self.progress.update(self.task, stats=msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def eta(self, step: int) -> str:
        elapsed = time.perf_counter() - self.t0
        if self.steps_done_here == 0:
            return "-"
        left = (self.total - step) * elapsed / self.steps_done_here
        return time.strftime("%H:%M:%S", time.gmtime(max(0.0, left)))

    def eval(self, record: dict) -> None:
        if not self.enabled:
            return
        self.write(record)
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k.startswith("eval_"))
        msg = f"eval at step {record['step']} ({record.get('stage', '')}): {shown}"
        if self.progress is not None:
            self.progress.console.print(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def note(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        self.file.close()
        if self.trackers is not None:  # not accelerate's end_training: that also ends the process group
            for tracker in self.trackers.trackers:
                tracker.finish()
        self.draw()

    def draw(self) -> None:
        """RUN/curves.png from metrics.jsonl, where matplotlib is installed; a figure never fails a run."""
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            return
        from mamballama_cli.errors import MamballamaError
        from mamballama_cli.training.curves import draw_curves

        try:
            path = draw_curves(self.path.parent)
        except (MamballamaError, OSError, ValueError) as exc:
            print(f"note: no curves.png ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
            return
        if path is not None:
            print(f"curves drawn in {path}", file=sys.stderr, flush=True)
