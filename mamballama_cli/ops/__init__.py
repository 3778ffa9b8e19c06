"""One dispatch for every op the mixers use.

Each op has a pure-PyTorch reference (``*_ref``, the CPU path and the ground truth) and may have fast
implementations registered for CUDA tensors. :func:`dispatch` picks the first fast implementation whose
probe succeeded for the tensor's device, else the reference. :func:`configure` (the CLI's global
``--kernels ref`` or ``--kernels ref:rotary,rmsnorm``) forces the references everywhere or for the ops named
(useful to bisect a numerical difference or to measure one kernel's share of a step).

Public ops (the signatures every implementation honours):
    ssd_scan(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None) -> (y, final_state)
    ssm_step(state, x, dt, A, B, C, D=None) -> (new_state, y)
    causal_conv1d(x, weight, bias=None, initial_state=None, activation=None) -> (y, final_state)
    causal_conv1d_update(x, conv_state, weight, bias=None, activation=None) -> (y, new_state)
    rmsnorm_gated(y, z, weight, eps, group_size) -> out
    rmsnorm(x, weight, eps, out_dtype=None) -> out   (Llama's RMSNorm; training and prefill, with autograd)
    rotary(q, k, cos, sin) -> (q, k)                  (RoPE of attention; results in q's dtype; with autograd)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

from mamballama_cli.ops.conv import causal_conv1d_ref, causal_conv1d_update_ref
from mamballama_cli.ops.norm import rmsnorm_gated_ref, rmsnorm_ref
from mamballama_cli.ops.rope_ops import rotary_ref
from mamballama_cli.ops.ssd import ssd_chunk_scan_ref, ssm_step_ref


def _ssd_scan_ref(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None):
    # The reference accumulates in at least float32 whatever the activations' dtype (bf16 training).
    work = torch.promote_types(x.dtype, torch.float32)
    y, state = ssd_chunk_scan_ref(
        x.to(work), dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=initial_state
    )
    return y.to(x.dtype), state


@dataclass
class FastImpl:
    name: str
    fn: Callable
    probe: Callable[[], tuple[bool, str]]  # -> (usable, reason); called once, lazily
    _result: tuple[bool, str] | None = field(default=None, repr=False)

    def usable(self) -> tuple[bool, str]:
        if self._result is None:
            try:
                self._result = self.probe()
            except Exception as exc:  # a broken install must fall back, not crash the model
                self._result = (False, f"{type(exc).__name__}: {exc}")
        return self._result


REFERENCES: dict[str, Callable] = {
    "ssd_scan": _ssd_scan_ref,
    "ssm_step": ssm_step_ref,
    "causal_conv1d": causal_conv1d_ref,
    "causal_conv1d_update": causal_conv1d_update_ref,
    "rmsnorm_gated": rmsnorm_gated_ref,
    "rmsnorm": rmsnorm_ref,
    "rotary": rotary_ref,
}
FAST: dict[str, list[FastImpl]] = {name: [] for name in REFERENCES}
_fast_loaded = False


# Modules that register fast implementations when imported (each may be absent). Their order is the precedence
# of implementations of one op (see _load_fast): installed packages' kernels (mamba_ssm, causal-conv1d) first.
# triton_norm first: its RMSNorm is opt-in (its probe refuses unless MAMBALLAMA_TRITON_NORM=1), and once opted in it
# must rank ahead of mamba_ssm's (ops.external), as documented; off, the probe's refusal leaves mamba_ssm's in front.
FAST_MODULES = ("mamballama_cli.ops.triton_norm", "mamballama_cli.ops.external", "mamballama_cli.ops.triton_decode",
                "mamballama_cli.ops.triton_gemv", "mamballama_cli.ops.triton_gemv_swiglu",
                "mamballama_cli.ops.triton_gemv_fused", "mamballama_cli.ops.triton_gemv_conv",
                "mamballama_cli.ops.cuda_mamba1", "mamballama_cli.ops.triton_replay",
                "mamballama_cli.ops.triton_selective_replay", "mamballama_cli.ops.triton_attention",
                "mamballama_cli.ops.kd_triton", "mamballama_cli.ops.triton_conv", "mamballama_cli.ops.triton_rope",
                "mamballama_cli.ops.triton_commit", "mamballama_cli.ops.triton_lookup")


def register_reference(op: str, fn: Callable) -> None:
    """Declare a new op by its pure-PyTorch reference (other mixers add their ops this way)."""
    REFERENCES[op] = fn
    FAST.setdefault(op, [])


def register_fast(op: str, name: str, fn: Callable, probe: Callable[[], tuple[bool, str]]) -> None:
    """Register a CUDA implementation of ``op``; earlier registrations take precedence."""
    if op not in REFERENCES:
        raise KeyError(f"unknown op {op!r}; ops are {sorted(REFERENCES)}")
    FAST[op].append(FastImpl(name, fn, probe))


def _load_fast() -> None:
    global _fast_loaded
    if _fast_loaded:
        return
    _fast_loaded = True
    import importlib

    for module in FAST_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    # Whichever module a caller happened to import first, implementations of one op rank in the order of
    # FAST_MODULES (the defining module of each), then in the order they were registered.
    for impls in FAST.values():
        impls.sort(key=_precedence)


def _precedence(impl: FastImpl) -> int:
    module = getattr(impl.fn, "__module__", None)
    return FAST_MODULES.index(module) if module in FAST_MODULES else len(FAST_MODULES)


_REF_WORDS = ("ref", "reference", "torch")
# The ops/ modules that declare more ops by their references (register_reference), beside the ones above.
REFERENCE_MODULES = ("mamballama_cli.ops.decode", "mamballama_cli.ops.kd", "mamballama_cli.ops.replay",
                     "mamballama_cli.ops.selective_scan", "mamballama_cli.ops.verify_ref", "mamballama_cli.ops.commit",
                     "mamballama_cli.ops.lookup")


def _load_references() -> None:
    import importlib

    for module in REFERENCE_MODULES:
        importlib.import_module(module)


def configure(kernels: str = "auto") -> None:
    """Choose the kernels for this process (the CLI's global ``--kernels``): ``auto`` (fast kernels where their
    probe passes), ``ref`` (the PyTorch references everywhere) or ``ref:OP,OP`` (references for the ops named,
    e.g. ``ref:rotary,rmsnorm`` to bisect a numerical difference or measure one kernel's share of a step).

    The choice is written to the environment (``MAMBALLAMA_KERNELS`` / ``MAMBALLAMA_REF_OPS``) so that worker
    processes that accelerate or DeepSpeed start inherit it; those variables are also how a non-CLI user sets it.
    """
    text = (kernels or "auto").strip()
    head, colon, tail = text.partition(":")
    if head.lower() == "auto" and not colon:
        os.environ.pop("MAMBALLAMA_KERNELS", None)
        os.environ.pop("MAMBALLAMA_REF_OPS", None)
        return
    if head.lower() not in _REF_WORDS:
        raise ValueError(f"--kernels {kernels!r}: use auto, ref, or ref:OP,OP (`mamballama env` lists the ops)")
    if not colon:
        os.environ["MAMBALLAMA_KERNELS"] = "ref"
        os.environ.pop("MAMBALLAMA_REF_OPS", None)
        return
    _load_references()  # every op that exists, for the names' check
    names = [n.strip() for n in tail.split(",") if n.strip()]
    unknown = [n for n in names if n not in REFERENCES]
    if unknown or not names:
        raise ValueError(f"--kernels {kernels!r}: unknown op {', '.join(unknown) or '(none given)'}; "
                         f"ops: {', '.join(REFERENCES)}")
    os.environ.pop("MAMBALLAMA_KERNELS", None)
    os.environ["MAMBALLAMA_REF_OPS"] = ",".join(names)


def forced_reference(op: str | None = None) -> bool:
    """True when the references are forced everywhere, or (given ``op``) for that op (:func:`configure`)."""
    if os.environ.get("MAMBALLAMA_KERNELS", "").lower() in _REF_WORDS:
        return True
    return op is not None and op in {s.strip() for s in os.environ.get("MAMBALLAMA_REF_OPS", "").split(",")}


def reference(op: str) -> Callable:
    """The pure-PyTorch reference of ``op``, whichever module declares it (loaded here if no caller has yet)."""
    if op not in REFERENCES:
        _load_references()
    if op not in REFERENCES:
        raise KeyError(f"unknown op {op!r}; ops are {sorted(REFERENCES)}")
    return REFERENCES[op]


def dispatch(op: str, device) -> tuple[str, Callable]:
    """Return (backend name, function) for ``op`` on ``device``."""
    if getattr(device, "type", device) == "cuda" and not forced_reference(op):
        _load_fast()
        for impl in FAST[op]:
            ok, _ = impl.usable()
            if ok:
                return impl.name, impl.fn
    return "torch-ref", REFERENCES[op]


def backend_report(device="cuda") -> list[dict]:
    """Per op: which backend runs on ``device`` and why the others do not."""
    _load_fast()
    rows = []
    for op in REFERENCES:
        chosen, _ = dispatch(op, device)
        notes = []
        for impl in FAST[op]:
            ok, reason = impl.usable()
            notes.append(f"{impl.name}: {'ok' if ok else reason}")
        if forced_reference(op):
            notes.append("--kernels ref (MAMBALLAMA_KERNELS / MAMBALLAMA_REF_OPS) forces the reference")
        rows.append({"op": op, "backend": chosen, "candidates": notes})
    return rows


def ssd_scan(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None):
    return dispatch("ssd_scan", x.device)[1](
        x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=initial_state
    )


def ssm_step(state, x, dt, A, B, C, D=None):
    return dispatch("ssm_step", x.device)[1](state, x, dt, A, B, C, D)


def causal_conv1d(x, weight, bias=None, initial_state=None, activation=None):
    return dispatch("causal_conv1d", x.device)[1](x, weight, bias, initial_state, activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    return dispatch("causal_conv1d_update", x.device)[1](x, conv_state, weight, bias, activation)


def rmsnorm_gated(y, z, weight, eps, group_size):
    return dispatch("rmsnorm_gated", y.device)[1](y, z, weight, eps, group_size)


def rmsnorm(x, weight, eps, out_dtype=None):
    return dispatch("rmsnorm", x.device)[1](x, weight, eps, out_dtype)


def rotary(q, k, cos, sin):
    return dispatch("rotary", q.device)[1](q, k, cos, sin)
