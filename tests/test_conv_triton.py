"""The Triton training conv (ops/triton_conv.py) against its reference, on CPU through Triton's interpreter.

The kernels run for real on the CUDA machine (tests/test_gpu_ops.py); here the same kernels run under
TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton is imported), in float64, so a
logic error in the forward or either backward pass shows without a GPU. Skipped when triton is not installed.
"""

from helpers import NEEDS_TRITON, interpreted_json

pytestmark = NEEDS_TRITON

SCRIPT = r"""
import json, torch
from mamballama_cli.ops.triton_conv import causal_conv1d_triton
from mamballama_cli.ops.conv import causal_conv1d_ref
torch.manual_seed(0)
out = []
for b, dim, L, W, act, with_bias in [(2, 70, 100, 4, "silu", True), (1, 33, 5, 4, None, False), (3, 64, 130, 3, "silu", False)]:
    base = torch.randn(b, L, dim + 7, dtype=torch.float64)
    x = base[..., 3:3 + dim].transpose(1, 2)  # a channel-last column slice, as in_proj's output
    w, bias = torch.randn(dim, W, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    grads, ys = [], []
    for fn in (causal_conv1d_triton, causal_conv1d_ref):
        leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        if with_bias:
            leaves.append(bias.clone().requires_grad_(True))
        y, s = fn(leaves[0], leaves[1], leaves[2] if with_bias else None, None, act)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        ys.append((y.detach(), s.detach()))
        grads.append([t.grad for t in leaves])
    err = max([(ys[0][0] - ys[1][0]).abs().max().item()] + [(a - r).abs().max().item() for a, r in zip(*grads)])
    out.append({"case": [b, dim, L, W, act, with_bias], "err": err, "state_equal": torch.equal(ys[0][1], ys[1][1]),
                "channel_last": ys[0][0].stride(1) == 1})
print(json.dumps(out))
"""


def test_triton_conv_matches_reference_under_the_interpreter():
    for case in interpreted_json(SCRIPT):
        # the kernels accumulate in float32: errors of a few 1e-6 on values of order 1-10
        assert case["err"] < 1e-4 and case["state_equal"] and case["channel_last"], case
