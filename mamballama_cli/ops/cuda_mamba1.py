"""CUDA implementations of the Mamba-1 ops, registered with :func:`mamballama_cli.ops.register_fast`.

selective_scan, in order of preference:
  1. ``mamba_ssm-cuda``: mamba_ssm's ``selective_scan_fn`` (its compiled ``selective_scan_cuda`` extension).
     Many installs lack the extension (a pure-Python mamba_ssm wheel, or a placeholder module so that
     ``import mamba_ssm`` works), so the probe runs the kernel on a small input and compares it with the
     reference; anything short of a matching result leaves it unused. The kernel takes no initial state, so
     a call that continues from one (chunked prefill, speculative verification) uses the chunked scan.
  2. ``torch-chunked``: the pure-PyTorch chunked scan with each chunk recomputed in the backward pass
     (activation memory grows with seqlen / chunk_size states instead of seqlen).
selective_state_step: ``mamba_ssm-triton``, mamba_ssm's Triton ``selective_state_update`` (no extension needed).

Every probe really launches its kernel; nothing is imported at module import, so this module loads on
machines without CUDA, Triton or mamba_ssm.
"""

from __future__ import annotations

import math

import torch

from mamballama_cli import ops
from mamballama_cli.ops import selective_scan as sscan

_PROBE_TOL = 1e-3  # fp32 probe inputs; the kernels differ from the reference by rounding only


def _probe_inputs(dim=32, ngroups=2, dstate=16, seqlen=19, batch=2):
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    x = torch.randn(batch, seqlen, dim, device=dev, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(batch, seqlen, dim, device=dev, generator=gen) - 1.0)
    A = -torch.rand(dim, dstate, device=dev, generator=gen) * 4 - 0.1
    B = torch.randn(batch, seqlen, ngroups, dstate, device=dev, generator=gen)
    C = torch.randn(batch, seqlen, ngroups, dstate, device=dev, generator=gen)
    D = torch.randn(dim, device=dev, generator=gen)
    return x, dt, A, B, C, D


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error; inf for non-finite values (a NaN would slip through ``max`` and ``err <= tol``)."""
    err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
    return err if math.isfinite(err) else float("inf")


# --- selective_scan: mamba_ssm's CUDA extension ---------------------------------------------------------------
def selective_scan_mamba_ssm(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None):
    """mamba_ssm's fused selective scan (fp32 in and out; y returned in x's dtype, final state float32)."""
    if initial_state is not None:  # the kernel always starts from a zero state
        return selective_scan_torch_chunked(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=initial_state)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    sscan.check_scan_shapes(x, dt, A, B, C, D, None)
    # The kernel wants u, delta, B and C in one dtype; fp32 keeps dt and the inputs exact.
    u = x.float().transpose(1, 2).contiguous()  # (batch, dim, seqlen)
    delta = dt.float().transpose(1, 2).contiguous()  # (batch, dim, seqlen)
    Bk = B.float().permute(0, 2, 3, 1).contiguous()  # (batch, ngroups, dstate, seqlen)
    Ck = C.float().permute(0, 2, 3, 1).contiguous()
    y, last_state = selective_scan_fn(
        u, delta, A.float().contiguous(), Bk, Ck, None if D is None else D.float(),
        z=None, delta_bias=None, delta_softplus=False, return_last_state=True,
    )
    return y.transpose(1, 2).to(x.dtype), last_state.float()


def _extension_ready() -> tuple[bool, str]:
    try:
        import selective_scan_cuda  # noqa: F401  (mamba_ssm's compiled extension)
    except ImportError as exc:
        return False, f"mamba_ssm's CUDA extension is not importable ({exc})"
    if not hasattr(selective_scan_cuda, "fwd"):
        return False, "selective_scan_cuda is a placeholder without the compiled kernel (install mamba-ssm with CUDA)"
    return True, ""


def _scan_probe(fn, what: str, ready=lambda: (True, "")):
    """A probe that runs the scan ``fn`` on a small CUDA input against the sequential reference."""

    def probe() -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        ok, why = ready()
        if not ok:
            return False, why
        x, dt, A, B, C, D = _probe_inputs()
        y, s = fn(x, dt, A, B, C, chunk_size=8, D=D)
        y_ref, s_ref = sscan.selective_scan_sequential_ref(x.double(), dt.double(), A.double(), B.double(),
                                                            C.double(), D.double())
        err = max(_rel_err(y, y_ref), _rel_err(s, s_ref))
        if not err <= _PROBE_TOL:
            return False, f"{what} disagrees with the reference (relative error {err:.2e})"
        return True, "ok"

    return probe


# --- selective_scan: the chunked PyTorch scan with per-chunk recomputation -------------------------------------
def selective_scan_torch_chunked(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None):
    work = torch.promote_types(x.dtype, torch.float32)
    y, state = sscan.selective_scan_chunked_ref(
        x.to(work), dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=initial_state, checkpoint_chunks=True
    )
    return y.to(x.dtype), state


# --- selective_state_step: mamba_ssm's Triton selective_state_update ------------------------------------------
_ZERO_DT_BIAS: dict = {}


def selective_state_step_triton(state, x, dt, A, B, C, D=None):
    """One decoding step through mamba_ssm's Triton kernel; ``state`` is not modified (a copy is updated).

    The kernel's heads are our groups of channels: state (batch, ngroups, dim / ngroups, dstate). It has no
    backward, so a call that needs gradients runs the reference.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (state, x, dt, A, B, C, D)):
        return sscan._selective_state_step_ref(state, x, dt, A, B, C, D)
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    b, dim, n = state.shape
    g = B.shape[1]
    cg = dim // g
    if x.shape != (b, dim) or dt.shape != (b, dim) or A.shape != (dim, n) or B.shape != (b, g, n) \
            or C.shape != B.shape or dim % g:
        raise ValueError(f"selective_state_step: inconsistent shapes state {tuple(state.shape)}, x {tuple(x.shape)}, "
                         f"dt {tuple(dt.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}")
    key = (dim, state.device)
    if key not in _ZERO_DT_BIAS:  # mamba_ssm 2.3's launcher reads the strides of dt_bias and D even when None
        _ZERO_DT_BIAS[key] = torch.zeros(g, cg, dtype=torch.float32, device=state.device)
    zeros = _ZERO_DT_BIAS[key]
    new_state = state.float().clone()  # the kernel updates in place; callers keep the old state (speculative)
    y = selective_state_update(
        new_state.view(b, g, cg, n), x.reshape(b, g, cg), dt.reshape(b, g, cg), A.float().reshape(g, cg, n),
        B, C, zeros if D is None else D.float().reshape(g, cg), z=None, dt_bias=zeros, dt_softplus=False,
    )
    return new_state.to(state.dtype), y.reshape(b, dim)


def _probe_triton_step() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    x, dt, A, B, C, D = _probe_inputs(seqlen=1)
    state = torch.randn(x.shape[0], x.shape[2], A.shape[1], device="cuda")
    new_state, y = selective_state_step_triton(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    ref_state, y_ref = sscan.selective_state_step_ref(state.double(), x[:, 0].double(), dt[:, 0].double(),
                                                      A.double(), B[:, 0].double(), C[:, 0].double(), D.double())
    err = max(_rel_err(new_state, ref_state), _rel_err(y, y_ref))
    if not err <= _PROBE_TOL:
        return False, f"selective_state_update disagrees with the reference (relative error {err:.2e})"
    return True, "ok"


ops.register_fast("selective_scan", "mamba_ssm-cuda", selective_scan_mamba_ssm,
                  _scan_probe(selective_scan_mamba_ssm, "mamba_ssm selective scan", _extension_ready))
ops.register_fast("selective_scan", "torch-chunked", selective_scan_torch_chunked,
                  _scan_probe(selective_scan_torch_chunked, "chunked scan on CUDA"))
ops.register_fast("selective_state_step", "mamba_ssm-triton", selective_state_step_triton, _probe_triton_step)
