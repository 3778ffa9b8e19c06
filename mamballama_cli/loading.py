"""Load any causal LM checkpoint the CLI accepts: a hybrid, a plain transformers model, or 'default'."""

from __future__ import annotations

import sys
from pathlib import Path

from mamballama_cli.errors import MamballamaError, UsageError


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device):
    import torch

    if dtype == "auto":
        # CPU matmuls are fastest and exact in float32; GPUs want bfloat16.
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise UsageError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16, float16") from None


def checkpoint_dir(spec: str) -> Path:
    """'default' -> the cached default teacher; otherwise an existing checkpoint directory."""
    if spec == "default":
        from mamballama_cli.convert.teacher import ensure_default_teacher_cached

        return ensure_default_teacher_cached()
    path = Path(spec).expanduser()
    if not path.exists():
        raise MamballamaError(f"model {spec!r} does not exist; pass a checkpoint directory (from convert/distill) "
                              "or 'default'")
    if not (path / "config.json").is_file():
        raise MamballamaError(f"model {spec!r}: {path} has no config.json; pass a checkpoint directory")
    if not any(path.glob("*.safetensors")):
        raise MamballamaError(f"model {spec!r}: {path} holds no *.safetensors weights")
    return path


def auto_model(spec: str, path: Path, dtype, refused=(ValueError,)):
    """``AutoModelForCausalLM.from_pretrained(path)`` (no remote code). Unreadable weights raise the
    damaged-file error; an exception of a ``refused`` type becomes a one-line :class:`MamballamaError`."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)
    except Exception as exc:
        from mamballama_cli.convert.teacher import unreadable_weights

        if damaged := unreadable_weights(spec, path, exc):
            raise damaged from exc
        if isinstance(exc, refused):
            first_line = str(exc).splitlines()[0]
            raise MamballamaError(f"model {spec!r}: transformers cannot load it ({first_line})") from exc
        raise


def load_causal_lm(spec: str, dtype: str = "auto", device: str = "auto"):
    """(model in eval mode on device, tokenizer or None, path)."""
    import mamballama_cli  # noqa: F401  (registers the hybrid with the Auto classes)

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = checkpoint_dir(spec)
    from transformers import AutoTokenizer

    model = auto_model(spec, path, dt).to(dev).eval()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        print(f"warning: no tokenizer in {path} ({type(exc).__name__})", file=sys.stderr)
        tok = None
    return model, tok, path
