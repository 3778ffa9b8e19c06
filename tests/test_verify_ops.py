"""The speculative verify ops (ops/verify_ref.py) and their Triton kernels (ops/triton_attention.py for the
attention step, decode and windows alike; ops/triton_conv.py for spec_conv).

CPU: each reference equals the one-token decode reference at T = 1 and the computation the speculative
runner did before the ops existed (apply_rotary + index_copy + SDPA under a causal mask; gather + cat +
causal_conv1d + copy), for T in {1, 3, 5}, GQA groups 1 and 4, a random shift per row. The kernels run
under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess because the variable must be set before
triton is imported) on small shapes; that test skips when triton is not installed.
GPU (``pytest -m gpu``): the compiled kernels against the references in float32 and bfloat16, positions
near the start and the end of the buffer, batch 1 and 3, and inside a captured CUDA graph.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import run_interpreted
from mamballama_cli.ops.decode import conv_update_inplace_ref, decode_attention_ref, rope_kv_write_ref
from mamballama_cli.models.rope import RotaryEmbedding, apply_rotary
from mamballama_cli.ops.conv import causal_conv1d_ref
from mamballama_cli.ops.verify_ref import rope_kv_write_window_ref, spec_conv_ref, window_attention_ref

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _tables(cap, hd, dtype, device="cpu", partial=1.0):
    rope = RotaryEmbedding({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial}, hd)
    cos, sin = rope.to(device)(torch.arange(cap, device=device)[None], dtype)
    return cos[0].contiguous(), sin[0].contiguous()


def _rnd(gen, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


# ------------------------------------------------------------------------------------------------
# References (CPU)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nh,nkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rope_window_at_one_token_is_the_decode_op(nh, nkv, partial):
    b, hd, cap = 3, 16, 20
    gen = torch.Generator().manual_seed(nh + nkv)
    cos, sin = _tables(cap, hd, torch.float32, partial=partial)
    qkv = _rnd(gen, b, 1, (nh + 2 * nkv) * hd)
    k0, v0 = _rnd(gen, b, nkv, cap, hd), _rnd(gen, b, nkv, cap, hd)
    pos = torch.tensor([11])
    kw, vw, k1, v1 = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    q = rope_kv_write_window_ref(qkv, cos, sin, kw, vw, pos, nh, nkv)
    q1 = rope_kv_write_ref(qkv[:, 0], cos, sin, k1, v1, pos, nh, nkv)
    assert q.shape == (b, 1, nh, hd)
    assert torch.equal(q[:, 0], q1) and torch.equal(kw, k1) and torch.equal(vw, v1)


@pytest.mark.parametrize("T", [1, 3, 5])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (8, 2)])
def test_rope_window_equals_apply_rotary_and_index_copy(T, nh, nkv):
    b, hd, cap = 2, 16, 24
    gen = torch.Generator().manual_seed(T)
    cos, sin = _tables(cap, hd, torch.float32)
    qkv = _rnd(gen, b, T, (nh + 2 * nkv) * hd)
    k0, v0 = _rnd(gen, b, nkv, cap, hd), _rnd(gen, b, nkv, cap, hd)
    for p in (0, 9, cap - T):
        pos = torch.tensor(p)  # a 0-d device tensor, as the runner's eager path passes it
        kw, vw, kr, vr = k0.clone(), v0.clone(), k0.clone(), v0.clone()
        got = rope_kv_write_window_ref(qkv, cos, sin, kw, vw, pos, nh, nkv)
        # what HybridRunner._attention did before the op
        idx = pos + torch.arange(T)
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = (t.view(b, T, -1, hd).transpose(1, 2) for t in (q, k, v))
        c, s = cos.index_select(0, idx)[None].expand(b, T, -1), sin.index_select(0, idx)[None].expand(b, T, -1)
        q, k = apply_rotary(q, k, c, s)
        kr.index_copy_(2, idx, k)
        vr.index_copy_(2, idx, v)
        assert torch.equal(got, q.transpose(1, 2)) and torch.equal(kw, kr) and torch.equal(vw, vr)


@pytest.mark.parametrize("nh,nkv", [(4, 4), (8, 2)])
def test_window_attention_at_one_token_is_the_decode_op(nh, nkv):
    b, hd, cap = 3, 16, 40
    gen = torch.Generator().manual_seed(nh)
    q = _rnd(gen, b, 1, nh, hd)
    kc, vc = _rnd(gen, b, nkv, cap, hd), _rnd(gen, b, nkv, cap, hd)
    for p in (0, 17, cap - 1):
        got = window_attention_ref(q, kc, vc, torch.tensor([p]), hd**-0.5)
        want = decode_attention_ref(q[:, 0], kc, vc, torch.tensor([p + 1]), hd**-0.5)
        assert got.shape == (b, 1, nh, hd)
        torch.testing.assert_close(got[:, 0], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [1, 3, 5])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (8, 2)])
def test_window_attention_equals_masked_sdpa_over_the_buffer(T, nh, nkv):
    b, hd, cap = 2, 16, 30
    gen = torch.Generator().manual_seed(10 * T + nkv)
    q = _rnd(gen, b, T, nh, hd)
    kc, vc = _rnd(gen, b, nkv, cap, hd), _rnd(gen, b, nkv, cap, hd)
    for p in (0, 12, cap - T):
        got = window_attention_ref(q, kc, vc, torch.tensor(p), 0.3)
        # the graph path of HybridRunner._attention before the op: the whole buffer under a causal mask
        idx = p + torch.arange(T)
        mask = torch.arange(cap)[None, :] <= idx[:, None]
        want = F.scaled_dot_product_attention(q.transpose(1, 2), kc, vc, attn_mask=mask[None, None], scale=0.3,
                                              enable_gqa=nkv != nh).transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # and a float64 loop: query t of head h sees positions 0 .. p + t of KV head h // (nh // nkv)
        for t in (0, T - 1):
            for h in (0, nh - 1):
                kh = h // (nh // nkv)
                s = (kc[:, kh, : p + t + 1].double() @ q[:, t, h].double()[:, :, None])[..., 0] * 0.3
                o = (s.softmax(-1)[:, None, :] @ vc[:, kh, : p + t + 1].double())[:, 0]
                torch.testing.assert_close(got[:, t, h].double(), o, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 4])
def test_window_ops_with_a_position_per_row_equal_each_row_alone(T):
    """Rows of a continuously batched or speculative batch sit at different positions: a (batch,) position
    gives each row what a batch of that row alone at its own position gives (RoPE, K/V write, attention)."""
    b, nh, nkv, hd, cap = 3, 8, 2, 16, 40
    gen = torch.Generator().manual_seed(T)
    cos, sin = _tables(cap, hd, torch.float32)
    qkv = _rnd(gen, b, T, (nh + 2 * nkv) * hd)
    k0, v0 = _rnd(gen, b, nkv, cap, hd), _rnd(gen, b, nkv, cap, hd)
    pos = [0, 21, cap - T]
    kc, vc = k0.clone(), v0.clone()
    q = rope_kv_write_window_ref(qkv, cos, sin, kc, vc, torch.tensor(pos), nh, nkv)
    out = window_attention_ref(q, kc, vc, torch.tensor(pos), 0.25)
    for row, p in enumerate(pos):
        kr, vr = k0[row : row + 1].clone(), v0[row : row + 1].clone()
        qr = rope_kv_write_window_ref(qkv[row : row + 1], cos, sin, kr, vr, torch.tensor([p]), nh, nkv)
        assert torch.equal(q[row : row + 1], qr) and torch.equal(kc[row : row + 1], kr)
        assert torch.equal(vc[row : row + 1], vr)
        want = window_attention_ref(qr, kr, vr, torch.tensor([p]), 0.25)
        torch.testing.assert_close(out[row : row + 1], want, rtol=1e-6, atol=1e-6)
        if T == 1:  # the one-token decode ops take a (batch,) position and length the same way
            k1, v1 = k0.clone(), v0.clone()
            q1 = rope_kv_write_ref(qkv[:, 0], cos, sin, k1, v1, torch.tensor(pos), nh, nkv)
            assert torch.equal(q1, q[:, 0]) and torch.equal(k1, kc) and torch.equal(v1, vc)
            o1 = decode_attention_ref(q1, k1, v1, torch.tensor(pos) + 1, 0.25)
            torch.testing.assert_close(o1, out[:, 0], rtol=1e-6, atol=1e-6)


def _old_replay_conv(xbc, conv, keep, rebase, wlen, weight, bias, activation):
    """What Mamba2ReplayLayer.extend did before the spec_conv op (conv updated in place)."""
    b, T, dim = xbc.shape
    w1 = weight.shape[-1] - 1
    if rebase:
        idx = (keep.reshape(b, 1) + torch.arange(w1))[:, None, :].expand(b, dim, w1)
        prefix, offset = conv.gather(2, idx), 0
    else:
        prefix, offset = conv[:, :, wlen : wlen + w1], wlen
    full = torch.cat([prefix, xbc.transpose(1, 2)], dim=-1)
    post, _ = causal_conv1d_ref(full, weight, bias, None, activation)
    conv[:, :, offset : offset + w1 + T].copy_(full)
    return post[..., w1:].transpose(1, 2)


@pytest.mark.parametrize("T", [1, 3, 5])
@pytest.mark.parametrize("with_bias,activation", [(True, "silu"), (False, None)])
def test_spec_conv_equals_the_gather_cat_conv_path(T, with_bias, activation):
    b, dim, width, window = 3, 24, 4, 5
    gen = torch.Generator().manual_seed(T)
    weight = _rnd(gen, dim, width)
    bias = _rnd(gen, dim) if with_bias else None
    buf0 = _rnd(gen, b, dim, width - 1 + window)
    wide = _rnd(gen, b, T, dim + 9)
    xbc = wide[..., 5 : 5 + dim]  # a column slice of in_proj's output: not contiguous
    # rebase: a random accepted count per row; continue: append after wlen entries
    keep = torch.randint(0, window + 1, (b,), generator=gen)
    cases = [(True, keep, 0)] + [(False, torch.zeros(b, dtype=torch.long), w) for w in range(window - T + 1)]
    for rebase, shift, wlen in cases:
        got_buf, want_buf = buf0.clone(), buf0.clone()
        got = spec_conv_ref(xbc, got_buf, shift, 0 if rebase else wlen, weight, bias, activation)
        want = _old_replay_conv(xbc, want_buf, keep, rebase, wlen, weight, bias, activation)
        assert got.shape == (b, T, dim) and got.is_contiguous()
        assert torch.equal(got, want), (rebase, wlen)
        assert torch.equal(got_buf, want_buf), (rebase, wlen)


def test_spec_conv_one_token_is_the_conv_update():
    b, dim, width, window = 2, 12, 4, 5
    gen = torch.Generator().manual_seed(0)
    weight, bias = _rnd(gen, dim, width), _rnd(gen, dim)
    buf = _rnd(gen, b, dim, width - 1 + window)
    x = _rnd(gen, b, 1, dim)
    for offset in (0, 2):
        state = buf[:, :, offset : offset + width - 1].clone()
        y = conv_update_inplace_ref(x[:, 0], state, weight, bias, "silu")
        got = spec_conv_ref(x, buf.clone(), torch.zeros(b, dtype=torch.long), offset, weight, bias, "silu")
        torch.testing.assert_close(got[:, 0], y, rtol=1e-6, atol=1e-6)


def test_sliding_window_layers_keep_the_masked_attention(one_thread):
    """The window ops have no sliding window: such layers keep the masked SDPA, and rollback stays exact."""
    from helpers import tiny_hybrid

    from mamballama_cli.generation.speculative import HybridRunner

    target, _ = tiny_hybrid(attn_layers=(1,), seed=5)
    target.config.sliding_window = 4
    for layer in target.model.layers:
        if layer.is_attention:
            layer.self_attn.sliding_window = 4
    gen = torch.Generator().manual_seed(1)
    prompt, w1, w2 = (torch.randint(3, 96, (1, n), generator=gen) for n in (9, 5, 5))
    runner = HybridRunner(target, 1, max_length=32, window=5)
    runner.runtime.fns["rope_kv_write_window"] = runner.runtime.fns["window_attention"] = None  # not called
    with torch.no_grad():
        runner.prefill(prompt)
        runner.extend(w1, rebase=True)
        runner.commit(3)
        got = runner.extend(w2, rebase=True)
        want = target(torch.cat([prompt, w1[:, :3], w2], 1)).logits[:, -5:]
    assert (got - want).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------------
# Kernel checks, shared by the GPU tests and the interpreter test (device "cpu" under TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------------
def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values in the kernel's result"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _where(pos, device):
    """pos: one position for the whole batch (int) or one per row (list)."""
    return torch.tensor(pos if isinstance(pos, list) else [pos], device=device)


def check_rope_window(device, dtype, b, T, nh, nkv, hd, cap, pos, partial=1.0, seed=0):
    from mamballama_cli.ops.triton_attention import rope_kv_write_window_triton

    gen = torch.Generator(device=device).manual_seed(seed)
    cos, sin = _tables(cap, hd, dtype, device, partial)
    qkv = _rnd(gen, b, T, (nh + 2 * nkv) * hd, dtype=dtype, device=device)
    k0, v0 = (_rnd(gen, b, nkv, cap, hd, dtype=dtype, device=device) for _ in range(2))
    where = _where(pos, device)
    kf, vf, kr, vr = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    q = rope_kv_write_window_triton(qkv, cos, sin, kf, vf, where, nh, nkv)
    q_ref = rope_kv_write_window_ref(qkv, cos, sin, kr, vr, where, nh, nkv)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3}.get(dtype, 8e-3)  # the same roundings: an ulp at most
    assert q.shape == q_ref.shape and q.dtype == dtype
    assert _rel(q, q_ref) < tol and _rel(kf, kr) < tol, (_rel(q, q_ref), _rel(kf, kr))
    assert torch.equal(vf, vr)
    for row, p in enumerate(pos if isinstance(pos, list) else [pos] * b):
        untouched = torch.ones(cap, dtype=torch.bool, device=device)
        untouched[p : p + T] = False
        assert torch.equal(kf[row, :, untouched], k0[row, :, untouched])


def check_rope_one_token(device, dtype, b, nh, nkv, hd, cap, pos, seed=0):
    """The decode step's launcher (ops/triton_attention.py, T = 1) of the kernel the window op shares."""
    from mamballama_cli.ops.decode import rope_kv_write_ref
    from mamballama_cli.ops.triton_attention import rope_kv_write_triton

    gen = torch.Generator(device=device).manual_seed(seed)
    cos, sin = _tables(cap, hd, dtype, device, 1.0)
    qkv = _rnd(gen, b, (nh + 2 * nkv) * hd, dtype=dtype, device=device)
    k0, v0 = (_rnd(gen, b, nkv, cap, hd, dtype=dtype, device=device) for _ in range(2))
    where = _where(pos, device)
    kf, vf, kr, vr = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    q = rope_kv_write_triton(qkv, cos, sin, kf, vf, where, nh, nkv)
    q_ref = rope_kv_write_ref(qkv, cos, sin, kr, vr, where, nh, nkv)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3}.get(dtype, 8e-3)
    assert q.shape == (b, nh, hd) and _rel(q, q_ref) < tol and _rel(kf, kr) < tol, (_rel(q, q_ref), _rel(kf, kr))
    assert torch.equal(vf, vr)


def check_window_attention(device, dtype, b, T, nh, nkv, hd, cap, pos, seed=0):
    from mamballama_cli.ops.triton_attention import window_attention_triton

    gen = torch.Generator(device=device).manual_seed(seed)
    q = _rnd(gen, b, T, nh, hd, dtype=dtype, device=device)
    kc, vc = (_rnd(gen, b, nkv, cap, hd, dtype=dtype, device=device) for _ in range(2))
    where = _where(pos, device)
    out = window_attention_triton(q, kc, vc, where, hd**-0.5)
    ref = window_attention_ref(q.double(), kc.double(), vc.double(), where, hd**-0.5)
    err = _rel(out, ref)
    assert out.shape == (b, T, nh, hd) and out.dtype == dtype
    assert err < {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 1e-2), err


def check_decode_attention(device, dtype, b, nh, nkv, hd, cap, length, seed=0):
    """The decode step's attention: the window kernel at T = 1 with the last visible position length - 1."""
    from mamballama_cli.ops.triton_attention import decode_attention_triton

    gen = torch.Generator(device=device).manual_seed(seed)
    q = _rnd(gen, b, nh, hd, dtype=dtype, device=device)
    kc, vc = (_rnd(gen, b, nkv, cap, hd, dtype=dtype, device=device) for _ in range(2))
    n = _where(length, device)
    out = decode_attention_triton(q, kc, vc, n, hd**-0.5)
    ref = decode_attention_ref(q.double(), kc.double(), vc.double(), n, hd**-0.5)
    err = _rel(out, ref)
    assert out.shape == (b, nh, hd) and out.dtype == dtype
    assert err < {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 1e-2), err


def check_spec_conv(device, dtype, b, T, dim, width, window, rebase, with_bias=True, activation="silu", seed=0):
    from mamballama_cli.ops.triton_conv import spec_conv_triton

    gen = torch.Generator(device=device).manual_seed(seed)
    wide = _rnd(gen, b, T, dim + 11, dtype=dtype, device=device)
    xbc = wide[..., 7 : 7 + dim]
    buf = _rnd(gen, b, dim, width - 1 + window, dtype=dtype, device=device)
    weight = _rnd(gen, dim, width, dtype=dtype, device=device)
    bias = _rnd(gen, dim, dtype=dtype, device=device) if with_bias else None
    if rebase:
        shift, offset = torch.randint(0, window + 1, (b,), generator=gen, device=device), 0
    else:
        shift, offset = torch.zeros(b, dtype=torch.long, device=device), window - T
    got_buf, ref_buf = buf.clone(), buf.clone()
    out = spec_conv_triton(xbc, got_buf, shift, offset, weight, bias, activation)
    # float64 reference from the same inputs, the roundings of the activation dtype applied after the conv
    ref = spec_conv_ref(xbc.double(), ref_buf.double(), shift, offset, weight.double(),
                        bias.double() if bias is not None else None, None).to(dtype)
    if activation:
        ref = F.silu(ref.float()).to(dtype)
    spec_conv_ref(xbc, ref_buf, shift, offset, weight, bias, activation)
    assert out.shape == (b, T, dim) and out.is_contiguous() and out.dtype == dtype
    assert torch.equal(got_buf, ref_buf)  # the buffer update is a copy: exact
    err = _rel(out, ref)
    assert err < {torch.float32: 1e-6, torch.float16: 1e-3}.get(dtype, 8e-3), err


_INTERPRETER_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
from helpers import INTERPRETER_PATCH
exec(INTERPRETER_PATCH)

import test_verify_ops as t

torch.set_num_threads(1)  # tiny ops: threads fighting over the cores make them 100x slower

# The interpreter's bfloat16 tl.dot is wrong (and it truncates on casts): float16 checks the roundings.
cases = [(torch.float32, 1, 5, 8, 2, 32, 150, 62), (torch.float32, 3, 1, 4, 4, 16, 70, 69),
         (torch.float16, 2, 5, 4, 1, 16, 64, 0)]
cases += [(torch.float32, 3, 4, 4, 2, 16, 90, [0, 70, 33])]  # a position per row
for dtype, b, T, nh, nkv, hd, cap, pos in cases:
    t.check_rope_window("cpu", dtype, b, T, nh, nkv, hd, cap, pos, partial=0.5 if nkv == 1 else 1.0)
    t.check_window_attention("cpu", dtype, b, T, nh, nkv, hd, cap, pos)
    t.check_rope_one_token("cpu", dtype, b, nh, nkv, hd, cap, pos)
    length = [p + 1 for p in pos] if isinstance(pos, list) else pos + 1
    t.check_decode_attention("cpu", dtype, b, nh, nkv, hd, cap, length)
for dtype, b, T, rebase, with_bias, act in [(torch.float32, 3, 5, True, True, "silu"),
                                            (torch.float32, 1, 1, False, False, None),
                                            (torch.float16, 2, 3, False, True, "silu")]:
    t.check_spec_conv("cpu", dtype, b, T, 70, 4, 5, rebase, with_bias, act, seed=b * T)
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_verify_kernels_under_the_triton_interpreter():
    out = run_interpreted(_INTERPRETER_SCRIPT, str(Path(__file__).parent))
    assert out.strip().endswith("ok"), out[-3000:]


# ------------------------------------------------------------------------------------------------
# GPU: the compiled kernels
# ------------------------------------------------------------------------------------------------
GPU_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("b,T", [(1, 5), (3, 1), (3, 5)])
@pytest.mark.parametrize("where", ["start", "end"])
def test_gpu_rope_window(dtype, b, T, where):
    cap = 300
    pos = 0 if where == "start" else cap - T
    check_rope_window("cuda", dtype, b, T, 32, 8, 128, cap, pos, seed=b * 10 + T)
    check_rope_window("cuda", dtype, b, T, 4, 4, 64, cap, pos, partial=0.5, seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("b,T", [(1, 5), (3, 1), (3, 5)])
@pytest.mark.parametrize("cap,pos,nh,nkv,hd", [(300, 0, 32, 8, 128), (300, 295, 32, 8, 128), (300, 62, 32, 8, 128),
                                              (4096, 4091, 32, 8, 128), (500, 3, 9, 3, 64), (128, 60, 4, 4, 64)])
def test_gpu_window_attention(dtype, b, T, cap, pos, nh, nkv, hd):
    check_window_attention("cuda", dtype, b, T, nh, nkv, hd, cap, min(pos, cap - T), seed=cap + pos)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("T", [1, 5])
def test_gpu_attention_step_with_a_position_per_row(dtype, T):
    pos = [0, 4091 - T, 62, 300]
    check_rope_window("cuda", dtype, 4, T, 32, 8, 128, 4096, pos, seed=T)
    check_window_attention("cuda", dtype, 4, T, 32, 8, 128, 4096, pos, seed=T)
    if T == 1:
        check_rope_one_token("cuda", dtype, 4, 32, 8, 128, 4096, pos)
        check_decode_attention("cuda", dtype, 4, 32, 8, 128, 4096, [p + 1 for p in pos])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("b,T", [(1, 5), (3, 1), (3, 5)])
@pytest.mark.parametrize("rebase", [True, False])
def test_gpu_spec_conv(dtype, b, T, rebase):
    check_spec_conv("cuda", dtype, b, T, 6400, 4, 5, rebase, seed=b * T)  # an 8B-shape conv_dim (x | B | C)
    check_spec_conv("cuda", dtype, b, T, 100, 2, 6, rebase, with_bias=False, activation=None, seed=2)


@pytest.mark.gpu
def test_gpu_verify_ops_dispatch_to_the_kernels():
    from mamballama_cli import ops
    from mamballama_cli.ops import verify_ref  # noqa: F401

    for op in ("rope_kv_write_window", "window_attention", "spec_conv"):
        name, _ = ops.dispatch(op, torch.device("cuda"))
        assert name != "torch-ref", ops.backend_report("cuda")


@pytest.mark.gpu
def test_gpu_window_ops_in_a_cuda_graph_read_the_position_from_memory():
    from mamballama_cli.ops.triton_attention import rope_kv_write_window_triton, window_attention_triton

    b, T, nh, nkv, hd, cap = 1, 5, 32, 8, 128, 1000
    gen = torch.Generator(device="cuda").manual_seed(0)
    cos, sin = _tables(cap, hd, torch.bfloat16, "cuda")
    qkv = _rnd(gen, b, T, (nh + 2 * nkv) * hd, dtype=torch.bfloat16, device="cuda")
    k0, v0 = (_rnd(gen, b, nkv, cap, hd, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    kc, vc = k0.clone(), v0.clone()
    pos = torch.zeros(1, dtype=torch.long, device="cuda")

    def step():
        q = rope_kv_write_window_triton(qkv, cos, sin, kc, vc, pos, nh, nkv)
        return window_attention_triton(q, kc, vc, pos, hd**-0.5)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for p in (0, 63, 517, cap - T):
        kc.copy_(k0)
        vc.copy_(v0)
        pos.fill_(p)
        graph.replay()
        kr, vr = k0.clone(), v0.clone()
        q = rope_kv_write_window_ref(qkv, cos, sin, kr, vr, pos, nh, nkv)
        ref = window_attention_ref(q.double(), kr.double(), vr.double(), pos, hd**-0.5)
        assert torch.equal(vc, vr) and _rel(kc, kr) < 8e-3
        assert _rel(out, ref) < 1e-2, p
