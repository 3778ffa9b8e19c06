"""The ``gemv_swiglu`` op on CUDA: the MLP's [gate; up] projection and its SwiGLU in one kernel, 1-8 rows.

A decode step runs, per layer, ``add_rmsnorm``, the [gate; up] GEMV, ``swiglu`` and down_proj. Where the norm does
not fuse with the GEMV (ops/triton_gemv_fused.py: at the 8B shape every fused tile was timed slower than the ops
apart on the H200, 2026-12-05), the SwiGLU still can: the one-row GEMV kernel (ops/triton_gemv.py, ``GLU=True``)
takes each block of gate rows together with the up rows N further, keeps a second accumulator and writes
silu(gate . x) * (up . x) in its epilogue, in the roundings of the ops apart. That is one kernel launch and one
round trip of the (2 x 14,336) projection less per layer, and the same weight bytes. At 2-8 rows (a verify window)
the several-row kernel does the same in its tensor-core modes (``dot``, ``dotw``), tuned apart over their tiles.

Like the other per-shape kernels, it serves a shape only where, on its first use, it agreed with the ops apart
and was timed faster than them inside CUDA graphs, behind the norm that comes before it in a step
(:data:`GLU_TIMINGS` keeps the numbers; benchmarks report them as ``gemv_swiglu_timings``). Anything the GEMV
kernel does not take goes to the ops apart.
"""

from __future__ import annotations

import torch

from mamballama_cli import ops
from mamballama_cli.ops import (
    decode as _decode_refs,  # registers the decode ops' references (gemv_swiglu too)
)
from mamballama_cli.ops import tuning
from mamballama_cli.ops.common import _probe, _rand, _rel
from mamballama_cli.ops.graph_timing import chosen, failed, graph_ab_us, shape_report, timed_choice
from mamballama_cli.ops.triton_gemv import (
    PDL_CHOICES,
    _pdl_usable,
    _rows,
    gemv_launch,
    gemv_supported,
    triton,
    tuned_tiles,
)

if triton is not None:
    from mamballama_cli.ops.triton_gemv import _gemv_glu_tuned, _skinny_glu_tuned

# (rows, 2N, K, dtype, device index), as the gemv op's keys -> whether the SwiGLU kernel serves that [gate; up]
# shape; GLU_TIMINGS: the timings behind each choice (microseconds per call, the kernel against the ops apart).
GLU_CHOICES: dict[tuple, bool] = {}
GLU_TIMINGS: dict[tuple, dict] = {}
tuning.register_choices("gemv_swiglu", GLU_CHOICES)
GLU = True  # False: never the kernel, the two ops apart (benchmarks/speed.py --no-glu, the A/B over a step)


def glu_supported(x, weight, bias=None) -> bool:
    """Whether :func:`gemv_swiglu_triton` can run its kernel here: what the GEMV kernels take (1 to ``MAX_ROWS``
    rows), an even number of outputs ([gate; up]), the references not forced for ``gemv`` (``--kernels ref:gemv``,
    the A/B against cuBLAS: then every projection is cuBLAS's), and :data:`GLU` on."""
    return (GLU and gemv_supported(x, weight, bias) and weight.shape[0] % 2 == 0
            and not ops.forced_reference("gemv"))


def _apart(x, weight, bias):
    """What the SwiGLU kernel replaces: the ``gemv`` and ``swiglu`` ops as dispatched on x's device."""
    return ops.dispatch("swiglu", x.device)[1](ops.dispatch("gemv", x.device)[1](x, weight, bias))


def _glu_is_faster(x, weight, bias, key) -> bool:
    """Check the autotuned SwiGLU kernel against the ops apart, then time both inside CUDA graphs behind the
    ``add_rmsnorm`` kernel that comes before [gate; up] in a step (a pdl launch overlaps it), the kernel in the
    launch the gemv op chose for this weight (:data:`~mamballama_cli.ops.triton_gemv.PDL_CHOICES`); the timings go
    into :data:`GLU_TIMINGS`."""
    norm = ops.dispatch("add_rmsnorm", x.device)[1]
    norm_w = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    tuner = _gemv_glu_tuned if key[0] == 1 else _skinny_glu_tuned
    try:
        want = _apart(x, weight, bias)  # also settles the gemv op's own choice for this weight (and its pdl form)
        pdl = PDL_CHOICES.get(key, False)
        cached = set(tuner.cache)
        got = gemv_launch(x, weight, bias, pdl=pdl, glu=True)  # autotunes, outside the timing
        if not _rel(got, want) < 1e-2:
            GLU_TIMINGS[key] = {"how": "disagrees"}
            return False
    except Exception as exc:  # noqa: BLE001 - a kernel that does not build or run: the two ops serve the shape
        GLU_TIMINGS[key] = failed(exc)
        return False

    def glu(w):
        return gemv_launch(norm(x, None, norm_w, 1e-5)[0], w, bias, pdl=pdl, glu=True)

    def apart(w):
        return _apart(norm(x, None, norm_w, 1e-5)[0], w, bias)

    return timed_choice(GLU_TIMINGS, key, ("glu_us", "apart_us"), glu, apart, weight, (tuner, cached, key[0]),
                        graph_ab_us, lambda: ({"pdl": pdl}, tuned_tiles(tuner)))


def gemv_swiglu_triton(x, weight, bias=None):
    """Same contract as :func:`~mamballama_cli.ops.decode.gemv_swiglu_ref`: silu(gate . x) * (up . x) for
    weight = [gate; up]. One kernel where :func:`glu_supported` and where, on this shape's first use, it agreed
    with the ops apart and was timed faster than them; else ``gemv`` then ``swiglu``. The first call of a shape
    should not be inside a CUDA graph's recording (the static decoder's warm-up makes it); one that is gets the
    ops apart, not remembered."""
    if not glu_supported(x, weight, bias):
        return _apart(x, weight, bias)
    key = (_rows(x, weight), *weight.shape, x.dtype, x.device.index)
    if not chosen(GLU_CHOICES, key, x, lambda: _glu_is_faster(x, weight, bias, key)):
        return _apart(x, weight, bias)
    return gemv_launch(x, weight, bias, pdl=PDL_CHOICES.get(key, False) and _pdl_usable(x), glu=True)


def choices_report() -> dict:
    """For a benchmark's JSON: the [gate; up] shapes (rows x 2N x K) the SwiGLU kernel serves, and the timings
    behind every choice."""
    return shape_report(GLU_CHOICES, GLU_TIMINGS, lambda k: f"{k[0]}x{k[1]}x{k[2]}", "gemv_swiglu_shapes",
                        "gemv_swiglu_timings")


def _check_gemv_swiglu(gen):
    errs = []
    for n, k, bias in ((96, 320, True), (1024, 4096, False), (600, 3000, True)):
        x, w = _rand(gen, 1, k, dtype=torch.bfloat16), _rand(gen, 2 * n, k, dtype=torch.bfloat16)
        b = _rand(gen, 2 * n, dtype=torch.bfloat16) if bias else None
        errs.append(_rel(gemv_launch(x, w, b, glu=True),
                         _decode_refs.gemv_swiglu_ref(x.double(), w.double(), b.double() if bias else None)))
    return max(errs)


if triton is not None:
    ops.register_fast("gemv_swiglu", "mamballama-triton", gemv_swiglu_triton, _probe(_check_gemv_swiglu, tol=1e-2))
