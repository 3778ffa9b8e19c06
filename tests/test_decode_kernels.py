"""The decode step's small Triton kernels (ops/triton_decode.py: residual add + RMSNorm, SwiGLU, the Mamba-2 step
with its gated norm) against their references under Triton's interpreter, in the form they take on sm90 and later,
where each lets a successor launched with programmatic dependent launch (the gemv op's pdl form) start early. The
interpreter has no grid dependency control (a no-op there); on CUDA the probes and the gpu tests run the real
instruction."""

from helpers import NEEDS_TRITON, PATCHED_SCRIPT_HEAD, interpreted_json


@NEEDS_TRITON
def test_the_decode_kernels_with_the_early_launch_of_their_successor_equal_the_references():
    errs = interpreted_json(PATCHED_SCRIPT_HEAD + r"""
from mamballama_cli.ops import triton_decode as d
seen = []
def on(t):
    seen.append(t.device.type)
    return True  # the sm90 form: TRIGGER compiled in
d._gdc_on = on
d._rand = lambda gen, *shape, dtype=torch.float32: torch.randn(*shape, generator=gen).to(dtype)
out = {}
for name, check in (("add_rmsnorm", d._check_add_rmsnorm), ("swiglu", d._check_swiglu),
                    ("ssm_step_gated", d._check_ssm_step_gated)):
    before = len(seen)
    out[name] = check(torch.Generator().manual_seed(0))
    out[name + " triggered"] = len(seen) - before
print(json.dumps(out))
""", str(__import__("pathlib").Path(__file__).parent), timeout=300)
    for name in ("add_rmsnorm", "swiglu", "ssm_step_gated"):
        assert errs[name + " triggered"] == 1, errs  # the launcher asked whether to compile the trigger in
        assert errs[name] < 1e-4, errs  # float32 throughout: the kernels match their references closely
