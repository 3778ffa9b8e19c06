"""lm-evaluation-harness tasks inside the report: task specs, offline multiple-choice JSONL, per-model runs.

A task spec in ``--lm-eval-tasks`` is one of
- a task or group name lm-eval knows (``arc_easy``, ``mmlu``; needs its datasets, usually the network),
- a task YAML file (lm-eval's own format; its ``dataset_path`` can be ``json`` with local ``data_files``),
- a multiple-choice JSONL file, one question per line: ``{"question": "...", "choices": ["a", "b", ...],
  "answer": 0}`` (``answer`` is the index or the text of the right choice) -- scored like lm-eval's
  multiple-choice tasks (acc and acc_norm), fully offline,
- ``mamballama_tiny_mc``: a 30-question sample shipped with mamballama (written for it; a smoke test,
  not a benchmark).
Task directories in ``--lm-eval-include`` are searched as well (lm-eval's ``--include_path``).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from pathlib import Path

from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.io import read_jsonl

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN_TASKS = {"mamballama_tiny_mc": DATA_DIR / "tiny_mc.jsonl"}


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MamballamaError("--tasks lm-eval needs lm-evaluation-harness; run: pip install 'mamballama[eval]' "
                              "(or pip install lm-eval)") from None


def _normalise_mc(src: Path, dst: Path) -> int:
    """Check a multiple-choice JSONL and write it with integer answers; returns the number of questions."""
    rows = []
    for n, obj in read_jsonl(src, f"--lm-eval-tasks {src}"):
        question = obj.get("question", obj.get("query")) if isinstance(obj, dict) else None
        choices = obj.get("choices") if isinstance(obj, dict) else None
        answer = obj.get("answer", obj.get("gold", obj.get("label"))) if isinstance(obj, dict) else None
        if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) for c in choices):
            raise UsageError(f"--lm-eval-tasks {src} line {n}: need {{\"question\": str, \"choices\": [str, str, ...], "
                             "\"answer\": index or choice text}")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise UsageError(f"--lm-eval-tasks {src} line {n}: answer {answer!r} is neither a choice index "
                             f"(0..{len(choices) - 1}) nor one of the choices")
        rows.append({"question": question, "choices": choices, "answer": answer})
    if not rows:
        raise UsageError(f"--lm-eval-tasks {src} holds no questions")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def mc_task_config(name: str, data_file: Path, cache_dir: Path) -> dict:
    """An lm-eval task config (the dict form of a task YAML) for a normalised multiple-choice JSONL."""
    return {
        "task": name,
        "dataset_path": "json",
        # cache_dir keeps the datasets library's Arrow copy inside the output dir (not ~/.cache)
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": str(data_file)},
    }


def resolve_specs(specs: list[str], work_dir: Path) -> tuple[list[tuple[str, str | dict]], bool]:
    """[(display name, lm-eval task spec)], and whether lm-eval's built-in task index is needed."""
    out: list[tuple[str, str | dict]] = []
    needs_index = False
    for spec in specs:
        path = BUILTIN_TASKS.get(spec) or Path(spec).expanduser()
        if path.suffix.lower() == ".jsonl":
            if not path.is_file():
                raise UsageError(f"--lm-eval-tasks {spec}: no such file")
            name = re.sub(r"[^A-Za-z0-9_]+", "_", path.stem)
            data = work_dir / "tasks" / f"{name}.jsonl"
            _normalise_mc(path, data)
            out.append((name, mc_task_config(name, data, work_dir / ".datasets_cache")))
        elif path.suffix.lower() in (".yaml", ".yml"):
            if not path.is_file():
                raise UsageError(f"--lm-eval-tasks {spec}: no such file")
            out.append((path.stem, str(path.resolve())))
        else:
            if "/" in spec or spec.endswith(".json"):
                raise UsageError(f"--lm-eval-tasks {spec}: pass a task name, a task .yaml, or a multiple-choice .jsonl")
            out.append((spec, spec))
            needs_index = True
    return out, needs_index


def task_manager(include: list[str], needs_index: bool):
    """lm-eval's TaskManager; indexing its ~10k built-in YAMLs takes a while, so only when a name needs it."""
    from lm_eval.tasks import TaskManager

    for d in include:
        if not Path(d).expanduser().is_dir():
            raise UsageError(f"--lm-eval-include {d}: not a directory of task YAML files")
    paths = [str(Path(d).expanduser()) for d in include] or None
    return TaskManager(include_path=paths, include_defaults=needs_index)


@contextlib.contextmanager
def quiet_git_hash():
    """lm-eval records ``git describe`` of the working directory and lets git print "fatal: not a git
    repository" on stderr outside one; the same hash (or None) without git's stderr, unless --verbose."""
    from lm_eval import evaluator

    from mamballama_cli.output import STATE

    real = getattr(evaluator, "get_git_commit_hash", None)
    if real is None or STATE["verbose"]:
        yield
        return

    def quiet():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (OSError, subprocess.CalledProcessError):
            return None

    evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = real


def run_task(lm, spec, manager, limit, num_fewshot, seed: int) -> tuple[dict, dict]:
    """(lm-eval's results JSON without samples, {task: samples}) for one task on one model."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    if limit is not None:
        limit = int(limit) if float(limit) >= 1 else float(limit)
    try:
        with quiet_git_hash():
            results = simple_evaluate(model=lm, tasks=[spec], task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                      log_samples=True, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed)
    except KeyError as exc:
        raise UsageError(f"--lm-eval-tasks: lm-eval does not know {exc}; check the name (lm-eval ls tasks) or pass "
                         "a task .yaml / multiple-choice .jsonl") from None
    samples = results.pop("samples", {}) or {}
    results = json.loads(json.dumps(results, default=handle_non_serializable))
    samples = json.loads(json.dumps(samples, default=handle_non_serializable))
    return results, samples


def metric_rows(results: dict) -> list[dict]:
    """[{name, metric, value, stderr}] for top-level tasks/groups of one lm-eval results JSON."""
    subtasks = {s for subs in (results.get("group_subtasks") or {}).values() for s in subs}
    table = dict(results.get("results") or {})
    table.update(results.get("groups") or {})
    rows = []
    for name, metrics in table.items():
        if name in subtasks:
            continue
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"name": name, "metric": metric if filt == "none" else f"{metric} ({filt})",
                         "value": float(value), "stderr": stderr if isinstance(stderr, (int, float)) else None})
    return rows
