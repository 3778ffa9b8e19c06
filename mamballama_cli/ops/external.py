"""Fast implementations from installed packages, registered through ``register_fast``.

* mamba_ssm's Triton kernels: the SSD chunk scan with initial and final states (prefill and training,
  forward and backward), ``selective_state_update`` (one recurrent step), the gated RMSNorm and Llama's
  RMSNorm. mamba_ssm is often installed without its CUDA extension; only the Triton modules are needed, and
  each probe imports and runs exactly what it uses, so the package being present proves nothing by itself.
* causal-conv1d's kernels for the prefill conv and the one-token update, when that package imports and runs;
  otherwise the reference (a depthwise ``F.conv1d``, which is already a single cuDNN call) stays in place.

Every probe runs its kernel once on small random CUDA inputs and compares it with the reference, so a
broken install falls back to the reference with the reason recorded (``mamballama env`` prints it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamballama_cli import ops
from mamballama_cli.ops.common import _check_conv_update, _module_version, _needs_grad, _probe, _rand, _rel
from mamballama_cli.ops.conv import causal_conv1d_ref, causal_conv1d_update_ref
from mamballama_cli.ops.norm import rmsnorm_gated_ref, rmsnorm_ref
from mamballama_cli.ops.ssd import ssd_chunk_scan_ref, ssm_step_ref


# ================================================================================================
# mamba_ssm's Triton kernels
# ================================================================================================
def _expand_groups(t, groups: int):
    """(..., g, n) -> (..., groups, n), group i reading g-group i // (groups // g)."""
    g = t.shape[-2]
    return t if g == groups else t.repeat_interleave(groups // g, dim=-2)


def ssd_scan_mamba(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None):
    """mamba_chunk_scan_combined with initial and final states (differentiable through both)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    # mamba_ssm needs B and C at the same group count; here C has one group per head, B one per KV head
    groups = max(B.shape[2], C.shape[2])  # n_kv or n_heads: both divide the head count
    B, C = _expand_groups(B, groups), _expand_groups(C, groups)
    y, final = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, return_final_states=True
    )
    return y, final


_ZERO_BIAS: dict = {}


def ssm_step_mamba(state, x, dt, A, B, C, D=None):
    """selective_state_update; updates ``state`` in place and returns it."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    if _needs_grad(state, x, dt, A, B, C, D) or state.dtype not in (torch.float32, x.dtype):
        return ssm_step_ref(state, x, dt, A, B, C, D)
    b, h, p = x.shape
    n = state.shape[-1]
    groups = max(B.shape[1], C.shape[1])
    B, C = _expand_groups(B, groups), _expand_groups(C, groups)
    key = (h, state.device)
    if key not in _ZERO_BIAS:  # the launcher reads dt_bias's strides even when there is no bias
        _ZERO_BIAS[key] = torch.zeros(h, dtype=torch.float32, device=state.device)
    y = selective_state_update(
        state, x, dt[..., None].expand(b, h, p), A.float()[:, None, None].expand(h, p, n), B, C,
        D=D[:, None].expand(h, p) if D is not None else None,
        dt_bias=_ZERO_BIAS[key][:, None].expand(h, p), dt_softplus=False,
    )
    return state, y


def rmsnorm_gated_mamba(y, z, weight, eps, group_size):
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    return rmsnorm_fn(y, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)


def rmsnorm_mamba(x, weight, eps, out_dtype=None):
    """Llama's RMSNorm through mamba_ssm's fused Triton layer norm (forward and backward in one kernel each).

    The reference runs six elementwise kernels forward and more backward over the activations; in training
    that is one of the larger costs of a small-width model. Rounds once at the end (the reference rounds the
    normalised input to the input dtype before the weight), a difference well inside bf16's precision.
    """
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

    out = rms_norm_fn(x, weight, None, eps=eps)
    return out if out_dtype is None else out.to(out_dtype)


def causal_conv1d_pkg(x, weight, bias=None, initial_state=None, activation=None):
    from causal_conv1d import causal_conv1d_fn

    act = None if activation in (None, "identity") else "silu"
    if initial_state is not None:
        # causal-conv1d wants the carried window channel-last in memory
        initial_state = initial_state.transpose(1, 2).contiguous().transpose(1, 2)
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    y, final = causal_conv1d_fn(x, weight, bias, initial_states=initial_state, return_final_states=True,
                                activation=act)
    return y, final


def causal_conv1d_update_pkg(x, conv_state, weight, bias=None, activation=None):
    from causal_conv1d import causal_conv1d_update

    if _needs_grad(x, conv_state, weight, bias):
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    act = None if activation in (None, "identity") else "silu"
    y = causal_conv1d_update(x, conv_state, weight, bias, act)
    return y, conv_state


# ================================================================================================
# Probes: run once on small random CUDA inputs, compare with the reference
# ================================================================================================
def _check_ssd(gen):
    b, l, h, g, p, n = 2, 150, 4, 2, 32, 32
    x = _rand(gen, b, l, h, p)
    dt = F.softplus(_rand(gen, b, l, h) - 1)
    A = -torch.rand(h, generator=gen, device="cuda") - 0.5
    B, C = _rand(gen, b, l, g, n), _rand(gen, b, l, h, n)
    D, s0 = _rand(gen, h), _rand(gen, b, h, p, n)
    y, s = ssd_scan_mamba(x, dt, A, B, C, chunk_size=128, D=D, initial_state=s0)
    y_ref, s_ref = ssd_chunk_scan_ref(x.double(), dt, A, B, C, chunk_size=128, D=D, initial_state=s0)
    return max(_rel(y, y_ref), _rel(s, s_ref))


def _check_ssm_step(gen):
    b, h, g, p, n = 2, 4, 2, 16, 32
    s0 = _rand(gen, b, h, p, n)
    x, dt = _rand(gen, b, h, p), F.softplus(_rand(gen, b, h))
    A = -torch.rand(h, generator=gen, device="cuda") - 0.5
    B, C, D = _rand(gen, b, g, n), _rand(gen, b, h, n), _rand(gen, h)
    s_ref, y_ref = ssm_step_ref(s0.double(), x.double(), dt, A, B, C, D)
    s, y = ssm_step_mamba(s0.clone(), x, dt, A, B, C, D)
    return max(_rel(y, y_ref), _rel(s, s_ref))


def _check_gated_norm(gen):
    y, z, w = _rand(gen, 3, 5, 64), _rand(gen, 3, 5, 64), _rand(gen, 64)
    return _rel(rmsnorm_gated_mamba(y, z, w, 1e-5, 16), rmsnorm_gated_ref(y.double(), z.double(), w, 1e-5, 16))


def _check_rmsnorm(gen):
    x, w = _rand(gen, 3, 5, 300), 1 + 0.1 * _rand(gen, 300)
    return _rel(rmsnorm_mamba(x, w, 1e-5), rmsnorm_ref(x.double(), w.double(), 1e-5))


def _check_conv_pkg(gen):
    x, w, bias, s0 = _rand(gen, 2, 64, 20), _rand(gen, 64, 4), _rand(gen, 64), _rand(gen, 2, 64, 3)
    y, s = causal_conv1d_pkg(x, w, bias, s0, "silu")
    y_ref, s_ref = causal_conv1d_ref(x.double(), w, bias, s0, "silu")
    return max(_rel(y, y_ref), _rel(s, s_ref))


def _register() -> None:
    reg = ops.register_fast
    mamba = f"mamba_ssm-triton {_module_version('mamba_ssm')}"
    reg("ssd_scan", mamba, ssd_scan_mamba, _probe(_check_ssd, "mamba_ssm.ops.triton.ssd_combined", tol=5e-3))
    reg("ssm_step", mamba, ssm_step_mamba,
        _probe(_check_ssm_step, "mamba_ssm.ops.triton.selective_state_update"))
    reg("rmsnorm_gated", mamba, rmsnorm_gated_mamba,
        _probe(_check_gated_norm, "mamba_ssm.ops.triton.layernorm_gated"))
    reg("rmsnorm", mamba, rmsnorm_mamba, _probe(_check_rmsnorm, "mamba_ssm.ops.triton.layer_norm", tol=1e-4))
    conv_pkg = f"causal-conv1d {_module_version('causal_conv1d')}"
    reg("causal_conv1d", conv_pkg, causal_conv1d_pkg, _probe(_check_conv_pkg, "causal_conv1d"))
    reg("causal_conv1d_update", conv_pkg, causal_conv1d_update_pkg,
        _probe(_check_conv_update(causal_conv1d_update_pkg), "causal_conv1d"))


_register()
