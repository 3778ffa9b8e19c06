"""The TMA GEMV experiment (ops/triton_gemv_tma.py: the weight tile loaded through a host-side tensor descriptor;
reference ``F.linear``, with ``glu`` ``silu(gate) * up``; timed on CUDA by benchmarks/gemv_tma.py): every tile of
``TMA_TILES`` against the float64 reference under Triton's interpreter, at 1, 5 and 8 rows, plain and with the
SwiGLU epilogue, on shapes that leave a partial last block of outputs and a partial last K tile, with x and the
weight at the start of buffers poisoned with NaN past their end (the descriptors' zero fill must keep every read
past M rows, K columns and the weight's last row out of the sums); and what it takes and refuses."""

from pathlib import Path

import pytest
import torch
from helpers import NEEDS_TRITON, PATCHED_SCRIPT_HEAD, interpreted_json


@NEEDS_TRITON
def test_every_tma_tile_equals_the_reference_under_the_interpreter():
    """fp16 only: the interpreter's tl.dot reads bf16 as raw bits (as in test_gemv_op.py); the benchmark checks
    each tile in bf16 against cuBLAS on the device before timing it."""
    from mamballama_cli.ops.triton_gemv_tma import TMA_TILES

    errs = interpreted_json(PATCHED_SCRIPT_HEAD + r"""
import torch.nn.functional as F
from mamballama_cli.ops.triton_gemv_tma import TMA_TILES, gemv_tma

def poisoned(shape, gen, scale):
    # the tensor at the start of a buffer of NaNs: a read past its end (unless zero filled) poisons the sums
    numel = shape[0] * shape[1]
    buf = torch.full((numel + 4096,), float("nan"), dtype=torch.float16)
    buf[:numel] = (torch.randn(numel, generator=gen) * scale).half()
    return buf[:numel].view(shape)

gen = torch.Generator().manual_seed(0)
out = {}
for lead, n, k, glu in (((1,), 70, 320, False), ((5,), 300, 200, False), ((1, 8), 48, 128, False),
                        ((1,), 2 * 37, 192, True), ((1, 5), 2 * 150, 136, True), ((8,), 2 * 48, 264, True)):
    rows = 1
    for d in lead:
        rows *= d
    x = poisoned((rows, k), gen, 1.0).view(*lead, k)
    w = poisoned((n, k), gen, 2 / k**0.5)  # gates of both signs, around 1 and 2
    gu = F.linear(x.double(), w.double())
    want = F.silu(gu[..., : n // 2]) * gu[..., n // 2:] if glu else gu
    for tile in TMA_TILES:
        y = gemv_tma(x, w, tile, glu=glu)
        assert y.shape == (*lead, n // 2 if glu else n) and y.dtype == torch.float16, (tile, y.shape)
        out[f"{lead} {n}x{k} glu={glu} {tile}"] = float((y.double() - want).norm() / want.norm())
print(json.dumps(out))
""", str(Path(__file__).parent), timeout=300)
    assert len(errs) == 6 * len(TMA_TILES)
    # fp16 rounds to nearest: one rounding of the output (the SwiGLU: each projection, silu, the product), about
    # 3e-4 here; a tile that summed a NaN, dropped a K tile or took the wrong up rows is off by far more.
    bad = {key: e for key, e in errs.items() if not e < 2e-3}
    assert not bad, bad


def test_every_tma_tile_keeps_its_boxes_and_shared_memory_in_bounds():
    from mamballama_cli.ops.triton_gemv_tma import SMEM_BUDGET, TMA_MODES, TMA_TILES, stage_bytes

    assert len(set(TMA_TILES)) == len(TMA_TILES) and {t[-1] for t in TMA_TILES} == set(TMA_MODES)
    for tile in TMA_TILES:
        bn, bk = tile[:2]
        assert max(bn, bk) <= 256 and all(v & (v - 1) == 0 for v in (bn, bk)), tile  # TMA's box, powers of two
        assert stage_bytes(tile) < stage_bytes(tile, glu=True) <= SMEM_BUDGET, tile
    assert stage_bytes((64, 128, 4, 4, "tmaw"), glu=True) == 3 * (2 * 64 + 8) * 128 * 2


@NEEDS_TRITON
def test_tma_gemv_takes_a_few_half_precision_rows_aligned_for_tma_without_autograd():
    from mamballama_cli.ops.triton_gemv_tma import TMA_AVAILABLE, tma_supported

    if not TMA_AVAILABLE:
        pytest.skip("this triton has no host-side TensorDescriptor")
    bf = torch.bfloat16
    x, w = torch.randn(5, 64, dtype=bf), torch.randn(32, 64, dtype=bf)
    assert tma_supported(x, w) and tma_supported(x[:1], w) and tma_supported(torch.randn(1, 5, 64, dtype=bf), w)
    assert tma_supported(x.half(), w.half()) and tma_supported(torch.randn(8, 64, dtype=bf), w)
    assert not tma_supported(torch.randn(9, 64, dtype=bf), w)  # more rows than tmaw's box
    assert not tma_supported(x.float(), w.float()) and not tma_supported(x, w.half())
    assert not tma_supported(torch.randn(5, 60, dtype=bf), torch.randn(32, 60, dtype=bf))  # 120-byte rows
    assert not tma_supported(x, torch.randn(32, 48, dtype=bf))  # K apart
    assert not tma_supported(x, w.t().contiguous().t())  # column-major
    assert not tma_supported(x, torch.randn(2, 32, 64, dtype=bf))
    flat = torch.randn(32 * 64 + 8, dtype=bf)
    assert not tma_supported(x, flat[1:1 + 32 * 64].view(32, 64))  # 2 bytes off a 16-byte boundary
    assert not tma_supported(x.clone().requires_grad_(), w)


def test_tma_gemv_refuses_an_odd_swiglu_weight_an_unknown_mode_and_too_many_rows():
    from mamballama_cli.ops.triton_gemv_tma import gemv_tma

    x, w = torch.randn(5, 64, dtype=torch.float16), torch.randn(63, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"\[gate; up\], an even number of weight rows, not 63"):
        gemv_tma(x, w, (16, 64, 4, 4, "tma"), glu=True)
    with pytest.raises(ValueError, match="a tile of mode tma or tmaw, not 'dotw'"):
        gemv_tma(x, w, (16, 64, 4, 4, "dotw"))
    with pytest.raises(ValueError, match="mode tmaw takes at most 8 rows, not 9"):
        gemv_tma(torch.randn(9, 64, dtype=torch.float16), w, (64, 64, 4, 8, "tmaw"))
