"""The linears of a batch-1 decode or verify step as one op (``gemv``: reference ``F.linear`` in ops/decode.py,
Triton kernels in ops/triton_gemv.py): every autotuning candidate against the reference under Triton's interpreter
on CPU (one row and verify-window rows; shapes that leave partial blocks of outputs and of K; with and without
bias; bf16 and fp16), the arguments it must hand back to ``F.linear``, the decode step that routes its linears
through the op, and on CUDA (gpu, part1 of benchmarks/gpu_session.sh) the autotuned kernels at the 8B shape's
sizes and the per-shape choice between them and cuBLAS."""

import pytest
import torch
import torch.nn.functional as F

from helpers import NEEDS_TRITON, PATCHED_SCRIPT_HEAD, interpreted_json


@NEEDS_TRITON
def test_every_gemv_candidate_equals_the_reference_under_the_interpreter():
    from mamballama_cli.ops.triton_gemv import CONFIGS, SKINNY

    errs = interpreted_json(PATCHED_SCRIPT_HEAD + r"""
import torch.nn.functional as F
from mamballama_cli.ops.triton_gemv import CONFIGS, SKINNY, gemv_launch
gen = torch.Generator().manual_seed(0)
out = {}
for dtype in (torch.bfloat16, torch.float16):
    for lead, n, k, bias in (((1,), 37, 2048, True), ((1, 1), 64, 1000, False), ((1,), 130, 4096, True),
                             ((5,), 70, 1000, True), ((1, 8), 64, 512, False), ((2, 1), 33, 768, False),
                             ((1,), 300, 200, True), ((3,), 260, 96, False),  # these two wide (N > K)
                             ((7,), 40, 640, True)):  # acc mode: 4 + 4 rows, the last one padding
        x = torch.randn(*lead, k, generator=gen).to(dtype)
        w = torch.randn(n, k, generator=gen).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype) if bias else None
        want = F.linear(x.double(), w.double(), b.double() if bias else None)
        cfgs = CONFIGS if x.numel() == k else SKINNY
        if x.numel() > k and dtype == torch.bfloat16:  # the interpreter's tl.dot reads bf16 as raw bits:
            cfgs = [c for c in SKINNY if c[-1] != "dot"]  # those in fp16 here, in bf16 in the gpu test
        for cfg in cfgs:
            y = gemv_launch(x, w, b, config=cfg)
            assert y.shape == (*lead, n) and y.dtype == dtype
            err = float((y.double() - want).norm() / want.norm())
            out[f"{dtype} {lead} {n}x{k} {cfg}"] = err
print(json.dumps(out))
""", str(__import__("pathlib").Path(__file__).parent), timeout=600)
    n_dot = sum(c[-1] == "dot" for c in SKINNY)
    assert {c[-1] for c in SKINNY} == {"dot", "sum", "acc"}
    assert len(errs) == 2 * 4 * len(CONFIGS) + 5 * len(SKINNY) + 5 * (len(SKINNY) - n_dot)
    bad = {k: v for k, v in errs.items() if not v < 4e-3}  # one rounding of the output to bf16 / fp16
    assert not bad, bad


@NEEDS_TRITON
def test_the_acc_mode_splits_rows_into_two_power_of_two_groups():
    from mamballama_cli.ops.triton_gemv import MAX_ROWS, _row_split

    got = {m: _row_split(m) for m in range(2, MAX_ROWS + 1)}
    assert got == {2: (2, 0), 3: (2, 1), 4: (4, 0), 5: (4, 1), 6: (4, 2), 7: (4, 4), 8: (8, 0)}
    for m, (a, b) in got.items():  # every row covered, at most one padding row
        assert a + b >= m and a + b - m <= 1


@NEEDS_TRITON
def test_gemv_takes_only_a_few_rows_half_precision_without_autograd():
    from mamballama_cli.ops.triton_gemv import gemv_supported

    x, w = torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    assert gemv_supported(x, w) and gemv_supported(x, w, torch.randn(32, dtype=torch.bfloat16))
    assert gemv_supported(torch.randn(1, 5, 64, dtype=torch.bfloat16), w)  # a verify window at batch 1
    assert gemv_supported(torch.randn(8, 64, dtype=torch.bfloat16), w)  # a small batch
    assert not gemv_supported(torch.randn(9, 64, dtype=torch.bfloat16), w)  # more rows: cuBLAS
    assert gemv_supported(x, torch.randn(128, 64, dtype=torch.bfloat16))  # wide: offered too (timing decides)
    assert not gemv_supported(x.float(), w.float())  # float32 stays bit-equal to the model's forward
    assert not gemv_supported(x, w.t().contiguous().t())  # stored column-major
    assert not gemv_supported(x, w, torch.randn(32))  # a bias of another dtype
    assert not gemv_supported(x.requires_grad_(True), w)  # autograd: the reference


@NEEDS_TRITON
def test_a_kernel_that_fails_or_disagrees_on_a_shape_leaves_that_shape_to_cublas(monkeypatch):
    """The first use of a shape checks the kernel against ``F.linear`` before timing it: one that raises (does not
    build there) or gives another answer is not chosen, and nothing is timed."""
    from mamballama_cli.ops import triton_gemv

    x, w = torch.randn(5, 64, dtype=torch.float16), torch.randn(32, 64, dtype=torch.float16)

    def broken(*a, **k):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(triton_gemv, "gemv_launch", broken)
    assert triton_gemv._kernel_is_faster(x, w, None) is False
    monkeypatch.setattr(triton_gemv, "gemv_launch", lambda x, w, b=None: torch.zeros(5, 32, dtype=x.dtype))
    assert triton_gemv._kernel_is_faster(x, w, None) is False


@NEEDS_TRITON
def test_the_margin_over_cublas_applies_to_tall_weights_only(monkeypatch):
    """A kernel timed 5% slower than cuBLAS keeps a tall shape (cuBLAS adds a split-K reduction there, one more graph
    node) but not a wide one; timed 5% faster, it keeps both; 15% slower, neither. The timings are kept."""
    from mamballama_cli.ops import triton_gemv

    monkeypatch.setattr(triton_gemv, "gemv_launch", lambda x, w, b=None: F.linear(x, w, b))
    tall, wide = torch.randn(32, 64, dtype=torch.float16), torch.randn(128, 64, dtype=torch.float16)
    x = torch.randn(1, 64, dtype=torch.float16)
    for ratio, keeps_tall, keeps_wide in ((1.05, True, False), (0.95, True, True), (1.15, False, False)):
        monkeypatch.setattr(triton_gemv, "_timings",
                            lambda x, w, b: {"kernel_us": 10.0 * ratio, "cublas_us": 10.0, "how": "graph"})
        assert triton_gemv._kernel_is_faster(x, tall, None, key=("t", ratio)) is keeps_tall, ratio
        assert triton_gemv._kernel_is_faster(x, wide, None) is keeps_wide, ratio
        assert triton_gemv.TIMINGS.pop(("t", ratio))["kernel_us"] == round(10.0 * ratio, 2)


def test_the_decode_step_runs_its_linears_through_the_gemv_op():
    """Every projection of a one-token step (in_proj, out_proj, [q; k; v], o_proj, [gate; up], down_proj,
    lm_head) goes through the op table's ``gemv``, so the kernel (or ``--kernels ref:gemv``) applies to all."""
    from helpers import tiny_hybrid
    from mamballama_cli.models.runtime import Runtime

    model, _ = tiny_hybrid()
    rt = Runtime(model, 1, 32)
    calls = []
    ref = rt.fns["gemv"]
    rt.fns["gemv"] = lambda x, w, b=None: calls.append(tuple(w.shape)) or ref(x, w, b)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    rt.prefill(ids)
    step = rt.step(pos=torch.tensor([5]), length=torch.tensor([6]))
    logits = rt.walk(ids[:, -1], step)
    n_layers = model.config.num_hidden_layers
    assert len(calls) == 4 * n_layers + 1 and calls[-1] == tuple(model.lm_head.weight.shape)
    assert logits.shape == (1, model.config.vocab_size)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_kernel_on_cuda_equals_the_reference_and_is_chosen(dtype):
    from mamballama_cli import ops
    from mamballama_cli.ops.triton_gemv import CHOICES, TIMINGS, gemv_launch, gemv_supported, gemv_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, n, k, bias in ((1, 4096, 4096, False), (1, 4096, 14336, False), (1, 1000, 3001, True),
                             (5, 4096, 4096, False), (5, 4096, 14336, False), (3, 1000, 3001, True),
                             (1, 28672, 4096, False), (5, 14336, 4096, False), (1, 49152, 576, False)):  # wide
        x = torch.randn(rows, k, generator=gen, device="cuda").to(dtype)
        w = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).to(dtype)
        b = torch.randn(n, generator=gen, device="cuda").to(dtype) if bias else None
        assert gemv_supported(x, w, b)
        want = F.linear(x.double(), w.double(), b.double() if bias else None)
        y = gemv_launch(x, w, b)  # the autotuned kernel
        assert y.dtype == dtype and float((y.double() - want).norm() / want.norm()) < 4e-3, (rows, n, k)
        chosen = gemv_triton(x, w, b)  # the kernel or cuBLAS, whichever was timed faster on this shape
        key = (rows, n, k, dtype, x.device.index)
        assert torch.equal(chosen, y if CHOICES[key] else F.linear(x, w, b)), key
        assert TIMINGS[key]["how"] == "graph", TIMINGS[key]  # timed as a decode step runs it, not the fallback
        print("gemv", key, "kernel" if CHOICES[key] else "cuBLAS", TIMINGS[key])
    from mamballama_cli.ops.triton_gemv import CONFIGS, SKINNY

    for rows, cfgs in ((1, CONFIGS), (5, SKINNY)):  # every candidate compiled for the GPU, not only the tuned one
        x = torch.randn(rows, 1000, generator=gen, device="cuda").to(dtype)
        w = (torch.randn(300, 1000, generator=gen, device="cuda") / 1000**0.5).to(dtype)
        want = F.linear(x.double(), w.double())
        for cfg in cfgs:
            y = gemv_launch(x, w, config=cfg)
            assert float((y.double() - want).norm() / want.norm()) < 4e-3, cfg
    w = torch.randn(4096, 4096, device="cuda", dtype=dtype)
    many = torch.randn(9, 4096, device="cuda", dtype=dtype)
    assert torch.equal(gemv_triton(many, w), F.linear(many, w))  # more rows than MAX_ROWS: not taken, cuBLAS
    assert ops.dispatch("gemv", torch.device("cuda"))[0] == "mamballama-triton"


@NEEDS_TRITON
def test_the_choices_report_names_each_shape_and_its_timings(monkeypatch):
    from mamballama_cli.ops import triton_gemv

    monkeypatch.setattr(triton_gemv, "CHOICES", {(1, 4096, 4096, torch.bfloat16, 0): True,
                                                 (5, 4096, 4096, torch.bfloat16, 0): False})
    monkeypatch.setattr(triton_gemv, "TIMINGS", {(1, 4096, 4096, torch.bfloat16, 0): {"kernel_us": 9.0}})
    rep = triton_gemv.choices_report()
    assert rep == {"gemv_kernel_shapes": ["1x4096x4096"], "gemv_timings": {"1x4096x4096 bfloat16": {"kernel_us": 9.0}}}
