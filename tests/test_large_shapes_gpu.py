"""The gpu tests at large shapes (part5 of benchmarks/gpu_session.sh): prefill past 2^31 activation elements and
the lower-right causal attention of a later prefill piece at 64 rows x 70,000 keys. Each allocates tens of GiB
and, on a cold machine, compiles and autotunes its kernels at those shapes, so they run in a part of their own."""

import pytest
import torch

from helpers import tiny_hybrid


@pytest.mark.gpu
def test_prefill_past_two_to_the_31_activation_elements_equals_each_prompt_alone():
    """Issue 17's crash: batch 24 x 32K prompts at the 8B shape made activation tensors of more than 2^31 elements
    (CUDA illegal memory access in prefill). Here 64 rows x 70,000 tokens x the widest layer (in_proj, MLP)
    would pass 2^31 elements in one piece; the runtime prefills in pieces that stay under 2^30. The last rows,
    whose offsets would lie past 2^31 in a one-piece prefill, must give the logits their prompts give alone."""
    from mamballama_cli.models.runtime import Runtime, auto_prefill_chunk

    model, _ = tiny_hybrid(attn_layers=(1, 3), n_heads=4, n_kv=2, hidden=256, layers=4, seed=1)
    model = model.to("cuda", torch.float32).eval()
    b, n = 64, 70_000
    widest = max(model.config.intermediate_size, 4 * model.config.hidden_size)
    assert b * n * widest > 2**31 and b * auto_prefill_chunk(model.config, b) * widest <= 2**30
    ids = torch.randint(5, 96, (b, n), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        big = Runtime(model, b, n + 1).prefill(ids).float()
        assert torch.isfinite(big).all()
        for row in (0, b // 2, b - 2, b - 1):
            alone = Runtime(model, 1, n + 1).prefill(ids[row:row + 1]).float()
            assert torch.allclose(big[row], alone[0], atol=1e-2, rtol=1e-2), row  # tf32 GEMMs may tile by batch


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gqa", [False, True])
def test_lower_right_attention_on_cuda_equals_the_masked_attention(dtype, gqa):
    """A later prefill piece's attention on CUDA (flash, or the memory-efficient kernel with K/V repeated per
    query head where flash refuses float32) equals one masked SDPA call, and at 64 rows x 1,024 queries x 70,000
    keys it does not materialise the (b, h, Lq, Lk) scores (64 GiB) that a tensor mask would."""
    import torch.nn.functional as F

    from mamballama_cli.models import attention_masks

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 37, 64, generator=gen).cuda().to(dtype)
    k, v = (torch.randn(2, 2 if gqa else 8, 300, 64, generator=gen).cuda().to(dtype) for _ in range(2))
    qi = torch.arange(37, device="cuda")[:, None] + 263
    mask = (torch.arange(300, device="cuda")[None] <= qi)[None, None]
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.125,
                                          enable_gqa=gqa)
    got = attention_masks.lower_right_attention(q, k, v, 0.125, gqa).float()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    b, h, lq, lk = 64, 4, 1024, 70_000
    q = torch.randn(b, h, lq, 64, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, 2 if gqa else h, lk, 64, device="cuda", dtype=dtype) for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attention_masks.lower_right_attention(q, k, v, 0.125, gqa)
    torch.cuda.synchronize()
    assert torch.isfinite(out[:, :, -1]).all()
    assert torch.cuda.max_memory_allocated() - base < 16 * 2**30  # the scores alone would be 68 GiB in float32
