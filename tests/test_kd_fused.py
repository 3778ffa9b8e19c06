"""The fused distillation loss (ops/kd_triton.py) against its reference twin, ops.kd.kd_loss.

GPU tests (``pytest -m gpu``) compare the compiled kernel with the reference on random inputs: total, every
metric, and the gradient w.r.t. the student logits. The CPU test runs the same kernel under Triton's
interpreter (TRITON_INTERPRET=1, in a subprocess because the variable must be set before triton is
imported) on small shapes; it skips when triton is not installed.
"""

import importlib.util
import json
import textwrap
import zlib

import pytest
import torch

from helpers import interpreted_json
from mamballama_cli.ops.kd import kd_loss
from mamballama_cli.training.losses import kd_loss_auto

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEV = "cuda"

# (w_kl, w_rkl, w_ce, with a teacher)
WEIGHTS = {
    "kl": (1.0, 0.0, 0.0, True),
    "kl+rkl+ce": (1.0, 0.5, 0.3, True),
    "ce-only": (0.0, 0.0, 1.0, False),
    "rkl+ce": (0.0, 0.7, 1.0, True),
}


def test_kd_loss_auto_is_the_reference_on_cpu():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 37, generator=g), torch.randn(2, 4, 37, generator=g)
    y = torch.randint(0, 37, (2, 4), generator=g)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    kw = {"w_kl": 1.0, "w_rkl": 0.5, "w_ce": 0.3, "temperature": 2.0}
    a, ma = kd_loss_auto(s, t, y, mask, **kw)
    b, mb = kd_loss(s, t, y, mask, **kw)
    assert torch.equal(a, b) and ma.keys() == mb.keys()
    assert all(torch.equal(ma[k], mb[k]) for k in mb)


_INTERPRETER_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import torch
    from mamballama_cli.ops import kd_triton
    assert not [m for m in sys.modules if m.startswith("mamballama_cli.training")], "ops imported training"
    from mamballama_cli.ops.kd import kd_loss

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    out = []
    g = torch.Generator().manual_seed(0)
    B, L, V = 2, 3, 300
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    for dtype, T, (w_kl, w_rkl, w_ce, teach) in json.loads(sys.argv[1]):
        dtype = getattr(torch, dtype)
        s = (torch.randn(B, L, V, generator=g) * 3).to(dtype)
        t = (torch.randn(B, L, V, generator=g) * 3).to(dtype) if teach else None
        y = torch.randint(0, V, (B, L), generator=g)
        kw = dict(w_kl=w_kl, w_rkl=w_rkl, w_ce=w_ce, temperature=T)
        sf, sr = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        tf, mf = kd_triton.kd_loss_fused(sf, t, y, mask, block_v=128, **kw)  # 300 = 2 blocks + a tail
        (1.7 * tf).backward()
        tr, mr = kd_loss(sr, t, y, mask, **kw)
        (1.7 * tr).backward()
        errs = {k: rel(mf[k], mr[k]) for k in mr}
        errs["total"] = rel(tf, tr)
        errs["grad"] = rel(sf.grad, sr.grad)
        errs["grad_max_abs"] = float((sf.grad.double() - sr.grad.double()).abs().max())
        out.append({"keys": sorted(mf), "ref_keys": sorted(mr), "errs": errs,
                    "masked_grad": float(sf.grad[~mask].abs().max())})
    print(json.dumps(out))
""")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fused_kd_kernel_under_the_triton_interpreter():
    cases = [
        ("float32", 1.0, WEIGHTS["kl"]),
        ("float32", 2.0, WEIGHTS["kl+rkl+ce"]),
        ("float32", 2.0, WEIGHTS["ce-only"]),
        ("float32", 1.0, WEIGHTS["rkl+ce"]),
        ("bfloat16", 2.0, WEIGHTS["kl+rkl+ce"]),
    ]
    results = interpreted_json(_INTERPRETER_SCRIPT, json.dumps(cases), timeout=120)
    for (dtype, T, w), r in zip(cases, results):
        assert r["keys"] == r["ref_keys"], (dtype, T, w, r)
        assert r["masked_grad"] == 0.0, (dtype, T, w, r)
        e = r["errs"]
        for k in ("total", "ce", "kl", "rkl", "loss"):
            if k in e:
                assert e[k] < 1e-5, (dtype, T, w, k, e)
        # bf16: the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest) and the stored gradient is
        # rounded again when scaled by grad_output, so allow a few bf16 ulps.
        assert e["grad"] < (1e-5 if dtype == "float32" else 2e-2), (dtype, T, w, e)


# ------------------------------------------------------------------------------------------------
# GPU: the compiled kernel
# ------------------------------------------------------------------------------------------------
def _inputs(gen, b, L, V, dtype, teacher, scale=3.0):
    s = (torch.randn(b, L, V, generator=gen, device=DEV) * scale).to(dtype)
    t = (torch.randn(b, L, V, generator=gen, device=DEV) * scale).to(dtype) if teacher else None
    y = torch.randint(0, V, (b, L), generator=gen, device=DEV)
    mask = torch.rand(b, L, generator=gen, device=DEV) > 0.35
    mask[0, 0], mask[-1, -1] = True, False  # at least one row in, one row out
    return s, t, y, mask


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values in the fused result"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def gen(request):
    return torch.Generator(device=DEV).manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _fused():
    from mamballama_cli import ops

    name, fn = ops.dispatch("kd_loss", torch.device(DEV))
    assert name == "mamballama-triton", ops.backend_report(DEV)
    return fn


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,rows", [(1000, (3, 17)), (49155, (2, 5))])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_fused_kd_loss_matches_reference(gen, dtype, V, rows, T, weights):
    fused = _fused()
    w_kl, w_rkl, w_ce, teacher = WEIGHTS[weights]
    s, t, y, mask = _inputs(gen, *rows, V, dtype, teacher)
    kw = {"w_kl": w_kl, "w_rkl": w_rkl, "w_ce": w_ce, "temperature": T}
    sf, sr = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    tf, mf = fused(sf, t, y, mask, **kw)
    (0.37 * tf).backward()
    tr, mr = kd_loss(sr, t, y, mask, **kw)
    (0.37 * tr).backward()
    assert tf.dtype == torch.float32 and tf.dim() == 0
    assert sorted(mf) == sorted(mr)
    tol = 2e-5 if dtype == torch.float32 else 1e-4  # both compute in fp32 from the same logits
    assert _rel(tf, tr) < tol
    for k in mr:
        assert not mf[k].requires_grad
        assert _rel(mf[k], mr[k]) < tol, (k, float(mf[k]), float(mr[k]))
    assert sf.grad.dtype == dtype
    assert sf.grad[~mask].abs().max() == 0
    # bf16: the reference rounds the fp32 gradient once; the fused op stores it in bf16 and rounds again
    # after scaling by grad_output (up to 2 ulps per element)
    assert _rel(sf.grad, sr.grad) < (2e-5 if dtype == torch.float32 else 1e-2)
    if dtype == torch.bfloat16:
        assert ((sf.grad.float() - sr.grad.float()).abs() <= 2 ** -6 * sr.grad.float().abs() + 1e-6).all()


@pytest.mark.gpu
def test_fused_kd_loss_without_grad_and_on_sliced_logits(gen):
    fused = _fused()
    s, t, y, mask = _inputs(gen, 2, 9, 777, torch.bfloat16, True)
    big = torch.cat([s, s[:, :1]], dim=1)[:, :-1]  # a non-contiguous view, like logits[:, :-1]
    kw = {"w_kl": 0.0, "w_rkl": 0.5, "w_ce": 1.0, "temperature": 2.0}  # kl metric even with w_kl == 0
    with torch.no_grad():
        tf, mf = fused(big, t.float(), y, mask, **kw)
        tr, mr = kd_loss(big, t.float(), y, mask, **kw)
    assert sorted(mf) == sorted(mr) == ["ce", "kl", "loss", "rkl"]
    assert not tf.requires_grad and _rel(tf, tr) < 1e-4
    for k in mr:
        assert _rel(mf[k], mr[k]) < 1e-4, k


@pytest.mark.gpu
def test_fused_kd_loss_is_sync_free_and_capturable(gen):
    fused = _fused()
    s, t, y, mask = _inputs(gen, 2, 11, 3001, torch.bfloat16, True)
    kw = {"w_kl": 1.0, "w_rkl": 0.5, "w_ce": 0.3, "temperature": 2.0}
    fused(s.clone().requires_grad_(True), t, y, mask, **kw)  # compile outside the checks
    sf = s.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, _ = fused(sf, t, y, mask, **kw)
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # forward in a CUDA graph, replayed on new inputs copied into the captured buffers
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fused(s, t, y, mask, **kw)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_total, g_metrics = fused(s, t, y, mask, **kw)
        s2, t2, y2, mask2 = _inputs(gen, 2, 11, 3001, torch.bfloat16, True)
        s.copy_(s2), t.copy_(t2), y.copy_(y2), mask.copy_(mask2)
        graph.replay()
        ref, mref = kd_loss(s2, t2, y2, mask2, **kw)
    assert _rel(g_total, ref) < 1e-4
    for k in mref:
        assert _rel(g_metrics[k], mref[k]) < 1e-4, k
