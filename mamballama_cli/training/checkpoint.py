"""Checkpoints without pickle: model weights, optimizer state and RNG as safetensors, everything else as JSON.

Layout of ``RUN/checkpoints/step-00000100/``:
    config.json, model.safetensors, tokenizer files   the student, loadable with from_pretrained
    optimizer.safetensors + optimizer.json             full optimizer state (tensors + structure), keyed by
                                                       parameter name
    rng/rank{r}.safetensors + rank{r}.json             torch (CPU and CUDA), Python and NumPy generators
    trainer_state.json                                 stage, step, config hash, global batch, engine
    run_config.yaml                                    the resolved config of the run
    checksums.json                                     sha256 of every other file, verified on --resume

A checkpoint is written into ``.step-N.partial`` and renamed into place once every process has written its
part, so a crash leaves either the whole checkpoint or none; the newest ``keep_checkpoints`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from mamballama_cli.errors import MamballamaError
from mamballama_cli.io import write_json_atomic
from mamballama_cli.shards import file_sha256

CKPT_RE = re.compile(r"^step-(\d{8})$")
CHECKSUMS = "checksums.json"


def write_json(path: str | Path, data: Any) -> None:
    """Strict JSON, atomically (used by the trainer for trainer_state.json and training_summary.json)."""
    write_json_atomic(path, data)


# --- nested state <-> (tensors, JSON) -------------------------------------------------------------------------
def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure of dicts, lists, tuples, tensors and scalars into flat tensors + JSON."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x, path: str):
        if isinstance(x, torch.Tensor):
            key = path or "root"
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"__dict__": {k: walk(v, f"{path}/{k}") for k, v in x.items()}}
            return {"__items__": [[walk(k, f"{path}/k{i}"), walk(v, f"{path}/{i}")] for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).replace("torch.", "")}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} at {path or 'root'} without pickle")

    return tensors, walk(obj, "")


def unflatten_state(meta: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(x):
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__dict__" in x:
                return {k: walk(v) for k, v in x["__dict__"].items()}
            if "__items__" in x:
                return {walk(k): walk(v) for k, v in x["__items__"]}
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            if "__dtype__" in x:
                return getattr(torch, x["__dtype__"])
        return x

    return walk(meta)


def save_state(path_stem: Path, obj: Any) -> None:
    from safetensors.torch import save_file

    tensors, meta = flatten_state(obj)
    save_file(tensors, str(path_stem.with_suffix(".safetensors")))
    path_stem.with_suffix(".json").write_text(json.dumps(meta))


def load_state(path_stem: Path) -> Any:
    from safetensors.torch import load_file

    tensors = load_file(str(path_stem.with_suffix(".safetensors")))
    meta = json.loads(path_stem.with_suffix(".json").read_text())
    return unflatten_state(meta, tensors)


# --- random generators ------------------------------------------------------------------------------------------
def rng_state() -> dict:
    import numpy as np

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": np_state[0], "key": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# --- checkpoint directories -------------------------------------------------------------------------------------
def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial ones never match the name pattern)."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and CKPT_RE.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def partial_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f".step-{step:08d}.partial"


def final_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:08d}"


def begin(run_dir: Path, step: int) -> Path:
    """Rank 0: a fresh partial directory for the checkpoint of ``step`` (stale partials are removed)."""
    d = checkpoints_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(".step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = partial_dir(run_dir, step)
    tmp.mkdir()
    (tmp / "rng").mkdir()
    return tmp


def _files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _hash_all(ckpt: Path, names: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:  # hashlib releases the GIL
        return dict(zip(names, pool.map(lambda n: file_sha256(ckpt / n), names)))


def write_checksums(ckpt: Path) -> None:
    """Record the sha256 of every file of a complete checkpoint directory."""
    (ckpt / CHECKSUMS).write_text(json.dumps({"sha256": _hash_all(ckpt, _files(ckpt))}, indent=1) + "\n")


def verify_checksums(ckpt: Path) -> bool:
    """Check every file against checksums.json; a missing or changed file is an error naming it. Returns False
    for a checkpoint written before checksums existed (nothing to verify)."""
    try:
        recorded = json.loads((ckpt / CHECKSUMS).read_text())["sha256"]
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MamballamaError(f"checkpoint {ckpt}: {CHECKSUMS} is unreadable ({exc}); delete {ckpt} to resume from "
                              "the previous checkpoint") from None
    missing = [n for n in recorded if not (ckpt / n).is_file()]
    if missing:
        raise MamballamaError(f"checkpoint {ckpt}: {missing[0]} is missing; delete {ckpt} to resume from the "
                              "previous checkpoint")
    actual = _hash_all(ckpt, sorted(recorded))
    for name in sorted(recorded):
        if actual[name] != recorded[name]:
            raise MamballamaError(f"checkpoint {ckpt}: {name} does not match its sha256 in {CHECKSUMS} (corrupted "
                                  f"or modified); delete {ckpt} to resume from the previous checkpoint")
    return True


def commit(run_dir: Path, step: int, keep: int) -> Path:
    """Rank 0: checksum the partial directory, rename it into place, then drop all but the newest ``keep``."""
    tmp, final = partial_dir(run_dir, step), final_dir(run_dir, step)
    write_checksums(tmp)
    if final.exists():  # the same step saved again (e.g. the end of a stage that is also a save_every step)
        old = final.with_name(final.name + ".old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(run_dir)[:-max(1, keep)]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_trainer_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MamballamaError(f"checkpoint {ckpt} is unreadable ({exc}); delete it to resume from the previous one")
