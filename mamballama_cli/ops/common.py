"""What the kernel modules of ops/ share: the Triton import, launch helpers and the probe machinery.

A probe runs its kernel once on small random CUDA inputs and compares it with the reference, so a broken
install falls back to the reference with the reason recorded (``mamballama env`` prints it). The names keep
their leading underscore: they serve the kernel modules of ops/, not the package's users.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os

import torch

from mamballama_cli.ops.conv import causal_conv1d_update_ref

try:
    import triton
    import triton.language as tl

    TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the machine
    triton = tl = None
    TRITON_ERROR = f"triton does not import ({type(exc).__name__}: {exc})"

# Grid dependency control (programmatic dependent launch, sm90 and later). A kernel launched with ``launch_pdl``
# may start while the kernel before it finishes; it must call ``_grid_wait`` before it reads anything that kernel
# wrote or writes anything at all. ``_grid_launch_dependents`` in the kernel before lets it start early (nothing
# changes for a successor launched without ``launch_pdl``). The interpreter has neither: no-ops there.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
try:
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except Exception:  # pragma: no cover - no triton, or one without grid dependency control
    _gdc_launch = _gdc_wait = None
GDC = _gdc_wait is not None and _gdc_launch is not None and not INTERPRETING

if triton is not None:
    if GDC:
        _grid_wait, _grid_launch_dependents = _gdc_wait, _gdc_launch
    else:

        @triton.jit
        def _grid_wait():
            pass

        @triton.jit
        def _grid_launch_dependents():
            pass


_GDC_DEVICES: dict[int, bool] = {}


def _gdc_on(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device may use grid dependency control: a CUDA device of sm90 or later, a triton
    that has it, not the interpreter (the instructions do not assemble for older GPUs)."""
    if not (GDC and t.is_cuda):
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _GDC_DEVICES:
        _GDC_DEVICES[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _GDC_DEVICES[index]


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ================================================================================================
# Probes: import, run once on small random CUDA inputs, compare with the reference
# ================================================================================================
def _rel(a, b) -> float:
    """Relative error of ``a`` against ``b``; inf when either holds a non-finite value, so that ``max`` over several
    errors and every tolerance check treat it as a failure (Python's max drops a NaN that is not first)."""
    a, b = a.double(), b.double()
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return err if math.isfinite(err) else float("inf")


def _cuda_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def _triton_ready() -> tuple[bool, str]:
    ok, why = _cuda_ready()
    if not ok:
        return ok, why
    if triton is None:
        return False, TRITON_ERROR
    return True, ""


def exact_probe(check, fn, what: str) -> tuple[bool, str]:
    """The probe of an integer kernel: Triton ready, then ``check(fn)`` (how many outputs differ from the op's
    reference on ``what``) must be 0."""
    ok, why = _triton_ready()
    if not ok:
        return ok, why
    bad = check(fn)
    return (True, f"ok (equal to the reference on {what})") if bad == 0 else \
        (False, f"wrong result on {what} ({bad} outputs differ)")


def _module_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


def _probe(check, needs: str | None = None, tol: float = 2e-3):
    """Wrap a check() -> relative error into a probe -> (usable, reason)."""

    def probe():
        ok, why = _triton_ready()
        if not ok:
            return False, why
        if needs:
            try:
                importlib.import_module(needs)
            except Exception as exc:
                return False, f"{needs} does not import ({type(exc).__name__}: {exc})"
        gen = torch.Generator(device="cuda").manual_seed(0)
        err = check(gen)
        if not math.isfinite(err) or err > tol:
            return False, f"wrong result on a probe input (relative error {err:.2e})"
        return True, f"ok (probe relative error {err:.1e})"

    return probe


def _rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)



_COUNT_SCRATCH: dict = {}  # (owner, device, rows, floats a row) -> (float32 rows, int32 counts at zero)


def count_scratch(owner: str, device, rows: int, width: int, capturing: bool):
    """The scratch of a kernel whose programs split a row and count themselves in, the last to arrive finishing it
    (the split Mamba-2 step tiles, the split-norm replay tiles): ``rows`` x ``width`` float32 values and ``rows``
    int32 counts at zero (each kernel sets its count back), made once per shape outside any CUDA graph's recording;
    inside one, where none exists yet: None (the caller runs a tile that needs none)."""
    key = (owner, device, rows, width)
    if key not in _COUNT_SCRATCH:
        if capturing:
            return None
        _COUNT_SCRATCH[key] = (torch.empty(max(1, rows * width), dtype=torch.float32, device=device),
                               torch.zeros(rows, dtype=torch.int32, device=device))
    return _COUNT_SCRATCH[key]

# Shared by the causal-conv1d wrapper (external.py) and the project's conv-window kernel (triton_decode.py).
def _check_conv_update(fn, inplace=False):
    def check(gen):
        x, w, bias, s0 = _rand(gen, 2, 200), _rand(gen, 200, 4), _rand(gen, 200), _rand(gen, 2, 200, 3)
        y_ref, s_ref = causal_conv1d_update_ref(x.double(), s0.double(), w, bias, "silu")
        state = s0.clone()
        if inplace:
            y, s = fn(x, state, w, bias, "silu"), state
        else:
            y, s = fn(x, state, w, bias, "silu")
            if not torch.equal(state, s0):
                return float("inf")  # the op must leave its input state alone
        return max(_rel(y, y_ref), _rel(s, s_ref))

    return check
