"""The Triton rotary kernel (ops/triton_rope.py) against its reference, on CPU through Triton's interpreter.

q and k rotated forward and backward, with GQA (more q heads than k heads), tables shared by the batch or per
row, q as a transposed view of a projection's output (the model's layout) or contiguous, float32 throughout,
float16 activations with float32 tables (the autocast case: float32 arithmetic, one rounding) and float16 tables
too (every product rounded, as PyTorch's kernels do: the forward must then equal the reference exactly). The
interpreter mishandles bfloat16, so float16 stands in for it. The compiled kernel runs in tests/test_gpu_ops.py.
"""

from pathlib import Path

from helpers import NEEDS_TRITON, PATCHED_SCRIPT_HEAD, interpreted_json

pytestmark = NEEDS_TRITON

SCRIPT = PATCHED_SCRIPT_HEAD + r"""
from mamballama_cli.ops.triton_rope import rotary_triton
from mamballama_cli.ops.rope_ops import rotary_ref
torch.manual_seed(0)
out = []
f16, f32 = torch.float16, torch.float32
cases = [  # q dtype, table dtype, table batch, transposed view, hq, hk, head_dim, only q reaches the loss
    (f32, f32, 1, True, 6, 2, 16, False), (f16, f32, 2, True, 4, 4, 8, False),
    (f16, f16, 1, False, 3, 1, 16, False), (f32, f32, 2, False, 5, 5, 4, True)]
for qdt, tdt, tb, view, hq, hk, D, only_q in cases:
    b, L = 2, 7
    def make(h):
        x = torch.randn(b, L, h, D) * 2
        return x.to(qdt).transpose(1, 2) if view else x.transpose(1, 2).contiguous().to(qdt)
    q, k = make(hq), make(hk)
    ang = torch.rand(tb, L, D // 2) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(tdt), torch.cat([ang.sin()] * 2, -1).to(tdt)
    gq, gk = torch.randn(b, hq, L, D, dtype=torch.float64), torch.randn(b, hk, L, D, dtype=torch.float64)
    res = []
    for fn in (rotary_triton, rotary_ref):
        qi, ki = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        qo, ko = fn(qi, ki, cos, sin)
        loss = (qo.double() * gq).sum() + (0 if only_q else (ko.double() * gk).sum())
        loss.backward()
        res.append((qo.detach(), ko.detach(), qi.grad, ki.grad if ki.grad is not None else torch.zeros_like(k)))
    rel = lambda a, c: float((a.double() - c.double()).norm() / c.double().norm().clamp_min(1e-30))
    (qo, ko, dq, dk), (qr, kr, dqr, dkr) = res
    out.append({"case": str((qdt, tdt, tb, view, hq, hk, D, only_q)), "dtype_ok": qo.dtype == qr.dtype == qdt
                and ko.dtype == qdt and qo.stride() == q.stride(), "q": rel(qo, qr), "k": rel(ko, kr),
                "dq": rel(dq, dqr), "dk": rel(dk, dkr) if not only_q else float(dk.abs().max()),
                "max_abs_fwd": max(float((qo.double() - qr.double()).abs().max()),
                                   float((ko.double() - kr.double()).abs().max()))})
# partial rotary (tables narrower than the head) goes to the reference
q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
ang = torch.rand(1, 5, 2)
cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
a, r = rotary_triton(q, k, cos, sin), rotary_ref(q, k, cos, sin)
out.append({"partial_equal": bool(torch.equal(a[0], r[0]) and torch.equal(a[1], r[1]))})
print(json.dumps(out))
"""


def test_triton_rotary_matches_reference_under_the_interpreter():
    cases = interpreted_json(SCRIPT, str(Path(__file__).parent))
    assert cases[-1] == {"partial_equal": True}
    for case in cases[:-1]:
        assert case["dtype_ok"], case
        if "float16, torch.float16" in case["case"]:
            # 16-bit arithmetic: the forward rounds exactly as the reference; the backward rounds once where the
            # reference rounds each of its two branches
            assert case["max_abs_fwd"] == 0.0, case
            tol = 2e-3
        elif "float16" in case["case"]:
            tol = 1e-3  # float32 arithmetic, one rounding to float16 at the end on both sides
        else:
            tol = 1e-6
        assert case["q"] < tol and case["k"] < tol and case["dq"] < tol, case
        assert case["dk"] < tol, case  # for only_q: the k gradient is exactly zero (dk holds its max |.|)
