"""The Triton RMSNorm (ops/triton_norm.py) against its reference, on CPU through Triton's interpreter.

Forward and both gradients, with and without a requested output dtype, rows wider and narrower than a power of
two, more row tiles than the backward has programs (so a program strides over several tiles, the last past the
end, and the weight gradient is a sum of partial sums). float64/float32 check the arithmetic; float16 input checks
the reference's rounding of the normalised input (the interpreter mishandles bfloat16). The compiled kernels run in tests/test_gpu_ops.py.
"""

from pathlib import Path

from helpers import NEEDS_TRITON, PATCHED_SCRIPT_HEAD, interpreted_json

pytestmark = NEEDS_TRITON

SCRIPT = PATCHED_SCRIPT_HEAD + r"""
from mamballama_cli.ops.triton_norm import rmsnorm_triton
from mamballama_cli.ops.norm import rmsnorm_ref
torch.manual_seed(0)
out = []
cases = [(torch.float64, torch.float64, None, (3, 7, 96)), (torch.float32, torch.float32, torch.float16, (2, 11, 100)),
         (torch.float16, torch.float32, None, (13, 64)), (torch.float32, torch.float32, None, (1, 1, 5)),
         (torch.float64, torch.float64, None, (5, 40, 64))]
for xdt, wdt, odt, shape in cases:
    x = (torch.randn(*shape, dtype=torch.float64) * 3).to(xdt)
    w = (1 + 0.1 * torch.randn(shape[-1], dtype=torch.float64)).to(wdt)
    g = torch.randn(*shape, dtype=torch.float64)
    res = []
    for fn in (rmsnorm_triton, rmsnorm_ref):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fn(xi, wi, 1e-5, odt)
        (y.double() * g).sum().backward()
        res.append((y.detach(), xi.grad, wi.grad))
    (y, gx, gw), (yr, gxr, gwr) = res
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())
    out.append({"case": str((xdt, wdt, odt, shape)), "dtype_ok": y.dtype == yr.dtype and y.shape == yr.shape,
                "y": rel(y, yr), "gx": rel(gx, gxr), "gw": rel(gw, gwr)})
print(json.dumps(out))
"""


def test_triton_rmsnorm_matches_reference_under_the_interpreter():
    for case in interpreted_json(SCRIPT, str(Path(__file__).parent)):
        tol = 2e-3 if "float16" in case["case"] else 1e-5  # float16 output or input: its rounding
        assert case["dtype_ok"] and case["y"] < tol and case["gx"] < tol and case["gw"] < tol, case
