"""The state one `mamballama eval` run hands every task (:class:`Run`) and the small helpers tasks share.

Below the runner and every task module: the runner builds a :class:`Run` and calls the tasks of its table
(runner.py, chat_tasks.py, speed_task.py) with it; none of them imports the runner.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from mamballama_cli.evaluation.config import EvalConfig
from mamballama_cli.evaluation.models import ModelPair
from mamballama_cli.evaluation.report import Report
from mamballama_cli.evaluation.store import CellStore
from mamballama_cli.output import log


def safe_name(name: str) -> str:
    """A task or model name as one file name inside the output directory: no separators, no '..', no dot first
    (an lm-eval task named '../../x' must not write outside --output)."""
    import re

    cleaned = re.sub(r"[^\w.=+-]+", "_", str(name)).lstrip(".")
    return cleaned[:120] or "_"


def short_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Run:
    """State shared by the task functions of one run."""

    def __init__(self, cfg: EvalConfig, pair: ModelPair, store: CellStore, out: Path, hashes: dict, report: Report):
        self.cfg, self.pair, self.store, self.out, self.hashes, self.report = cfg, pair, store, out, hashes, report
        self._lms: dict = {}
        self._builders: dict = {}
        self.lock = threading.Lock()
        self.judge_calls = {"total": 0, "failed": 0, "first_failure": ""}  # judgments asked in this run

    def model_key(self, role: str) -> dict:
        return {"model_sha256": self.hashes[role]}

    def distill_length(self) -> int | None:
        return resolve_distill_length(self.cfg, self.pair)


def resolve_distill_length(cfg: EvalConfig, pair: ModelPair, warn: bool = False) -> int | None:
    """The checkpoint's config.distill_max_length when recorded, else --distill-length, else None."""
    recorded = pair.distill_length()
    if warn and recorded and cfg.distill_length and int(cfg.distill_length) != int(recorded):
        log(f"note: the checkpoint records distill_max_length {recorded}; --distill-length {cfg.distill_length} "
            "is ignored")
    return int(recorded) if recorded else (int(cfg.distill_length) if cfg.distill_length else None)
