"""What the speed benchmark measures about the machine: device sync and memory, copy bandwidth, weight bytes,
versions (evaluation/speed.py)."""

from __future__ import annotations

import gc
import platform
import statistics
import time
from datetime import datetime, timezone


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device, collect: bool = False) -> None:
    """Return cached GPU memory; ``collect`` also runs the garbage collector (slow: only between models)."""
    import torch

    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device) -> None:
    import torch

    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def copy_bandwidth(device, nbytes: int | None = None, reps: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written (median of ``reps``)."""
    import torch

    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (64 << 20))
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def weight_bytes(model) -> dict:
    """Total parameter bytes and the bytes one batch-1 decode step reads (an untied embedding table is
    read one row per token, so it does not count; a tied one is read in full as the LM head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = emb.data_ptr() == head.data_ptr()
    emb_bytes = emb.numel() * emb.element_size()
    return {"total": total, "read_per_token": total - (0 if tied else emb_bytes), "tied_embeddings": tied}


def device_info(device) -> dict:
    import torch
    import transformers

    info = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_bytes=int(props.total_memory),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        info.update(name=platform.processor() or platform.machine(), cores=__import__("os").cpu_count())
    for mod in ("triton", "mamba_ssm", "causal_conv1d"):
        info[mod] = package_version(mod)
    return info


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (name, name.replace("_", "-")):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None
