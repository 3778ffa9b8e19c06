"""The reproducibility block stored in every result: what ran, on what, from which code and weights."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "lm_eval", "numpy", "safetensors", "accelerate", "matplotlib")
_HASH_CACHE = ".checkpoint_hashes.json"


def checkpoint_hash(path: Path, cache_file: Path | None = None) -> str:
    """sha256 over config.json and every *.safetensors file (names and contents), in name order.

    Hashing 16 GB takes most of a minute, so digests are remembered in ``cache_file`` keyed by each
    file's size and modification time; a resumed run does not pay again.
    """
    files = sorted([p for p in path.glob("*.safetensors")] + [path / "config.json"], key=lambda p: p.name)
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    key = str(path.resolve())
    cache = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except ValueError:
            cache = {}
    hit = cache.get(key)
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    if cache_file is not None:
        from mamballama_cli.io import write_json_atomic

        cache[key] = {"stamp": stamp, "sha256": digest}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file, cache)
    return digest


def git_revision() -> dict:
    """The package's git commit (and whether the tree has local changes), or nulls outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return {"git_sha": None, "git_dirty": None}
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"git_sha": sha, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = None
    return out


def device_info(device) -> dict:
    import torch

    info = {"device": str(device), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = _cpu_name()
        info["cpu_count"] = os.cpu_count()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("mamballama", "__main__.py"):
        argv[0] = "mamballama"
    from mamballama_cli.redact import redact_text

    return redact_text(shlex.join(argv))  # a --judge-base-url with credentials is written redacted


def model_block(spec: str, path: Path, config, sha256: str) -> dict:
    """Name, location, content hash and layer layout of one checkpoint."""
    n = getattr(config, "num_hidden_layers", None)
    attn = getattr(config, "attn_layers", None)
    if getattr(config, "model_type", None) != "mamballama":
        attn = list(range(n)) if n is not None else None
    return {"spec": spec, "path": str(path), "sha256": sha256, "model_type": getattr(config, "model_type", None),
            "num_layers": n, "attn_layers": attn, "mixer": getattr(config, "mixer", None),
            "distill_max_length": getattr(config, "distill_max_length", None)}


def build_repro(student: dict, teacher: dict | None, seed: int, device, dtype) -> dict:
    from mamballama_cli import __version__

    return {"mamballama_version": __version__, **git_revision(), "command": command_line(),
            "student": student, "teacher": teacher, "seeds": {"seed": seed}, "dtype": str(dtype).replace("torch.", ""),
            "libraries": library_versions(), **device_info(device)}
