"""Fast CUDA ops against their pure-PyTorch references (run on the CUDA machine: ``pytest -m gpu``).

Every check draws fresh random inputs (never zeros), compares forward outputs and, for the ops that
training uses, gradients, against the reference computed in float64 from the same (upcast) inputs. The
decode-only kernels must also hand autograd over to the reference (their backward is the reference's).
"""

import zlib

import pytest
import torch
import torch.nn.functional as F

from mamballama_cli import ops

pytestmark = pytest.mark.gpu
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16]
# Relative error (norm of the difference over norm of the reference) allowed per dtype. float32 entries
# allow for tf32 in mamba_ssm's matmuls; our own decode kernels use IEEE float32 and are far tighter.
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}
TOL_GRAD = {torch.float32: 1e-2, torch.bfloat16: 6e-2}


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values in the fast result"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rnd(gen, *shape, dtype=torch.float32, scale=1.0, requires_grad=False):
    t = (torch.randn(*shape, generator=gen, device=DEV) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


@pytest.fixture
def gen(request):
    # different inputs for every test and parametrisation, reproducible from the test id
    return torch.Generator(device=DEV).manual_seed(zlib.crc32(request.node.nodeid.encode()))


def fast(op):
    name, fn = ops.dispatch(op, torch.device(DEV))
    assert name != "torch-ref", f"{op}: no fast kernel usable here: {ops.backend_report(DEV)}"
    return fn


# ------------------------------------------------------------------------------------------------
# mamba_ssm kernels used by prefill and training: forward and backward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen,chunk", [(1, 128), (100, 128), (300, 128)])  # one chunk size: one autotune
def test_ssd_scan_forward_backward(gen, dtype, seqlen, chunk):
    b, h, g, p, n = 2, 8, 2, 32, 32
    x = rnd(gen, b, seqlen, h, p, dtype=dtype, requires_grad=True)
    dt = F.softplus(rnd(gen, b, seqlen, h) - 1.0).detach().requires_grad_(True)
    A = (-torch.rand(h, generator=gen, device=DEV) * 2 - 0.2).requires_grad_(True)
    B = rnd(gen, b, seqlen, g, n, dtype=dtype, requires_grad=True)
    C = rnd(gen, b, seqlen, h, n, dtype=dtype, requires_grad=True)
    D = rnd(gen, h, requires_grad=True)
    s0 = rnd(gen, b, h, p, n, requires_grad=True)
    y, s = fast("ssd_scan")(x, dt, A, B, C, chunk_size=chunk, D=D, initial_state=s0)
    leaves = [x, dt, A, B, C, D, s0]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    y_ref, s_ref = ops.reference("ssd_scan")(*ref_leaves[:5], chunk_size=chunk, D=ref_leaves[5],
                                              initial_state=ref_leaves[6])
    assert y.dtype == dtype and y.shape == y_ref.shape and s.shape == s_ref.shape
    assert rel(y, y_ref) < TOL[dtype]
    assert rel(s, s_ref) < TOL[dtype]
    gy, gs = rnd(gen, *y.shape), rnd(gen, *s.shape)
    ((y.float() * gy).sum() + (s.float() * gs).sum()).backward()
    ((y_ref * gy.double()).sum() + (s_ref * gs.double()).sum()).backward()
    for name, t, r in zip("x dt A B C D s0".split(), leaves, ref_leaves):
        assert t.grad is not None, name
        assert rel(t.grad, r.grad) < TOL_GRAD[dtype], name


@pytest.mark.parametrize("dtype", DTYPES)
def test_ssm_step_forward(gen, dtype):
    b, h, g, p, n = 3, 8, 2, 64, 64
    s0 = rnd(gen, b, h, p, n)
    x, dt = rnd(gen, b, h, p, dtype=dtype), F.softplus(rnd(gen, b, h) - 1)
    A = -torch.rand(h, generator=gen, device=DEV) - 0.2
    B, C, D = rnd(gen, b, g, n, dtype=dtype), rnd(gen, b, h, n, dtype=dtype), rnd(gen, h)
    s_ref, y_ref = ops.reference("ssm_step")(s0.double(), x.double(), dt, A, B, C, D)
    s, y = fast("ssm_step")(s0.clone(), x, dt, A, B, C, D)
    assert y.dtype == dtype
    assert rel(y, y_ref) < TOL[dtype] and rel(s, s_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_gated_forward_backward(gen, dtype):
    y = rnd(gen, 3, 7, 256, dtype=dtype, requires_grad=True)
    z = rnd(gen, 3, 7, 256, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * rnd(gen, 256)).to(dtype).detach().requires_grad_(True)
    out = fast("rmsnorm_gated")(y, z, w, 1e-5, 64)
    refs = [t.detach().double().requires_grad_(True) for t in (y, z, w)]
    out_ref = ops.reference("rmsnorm_gated")(*refs, 1e-5, 64)
    assert out.dtype == dtype and rel(out, out_ref) < TOL[dtype]
    g = rnd(gen, *out.shape)
    (out.float() * g).sum().backward()
    (out_ref * g.double()).sum().backward()
    for t, r in zip((y, z, w), refs):
        assert rel(t.grad, r.grad) < TOL_GRAD[dtype]


@pytest.mark.parametrize("impl", ["dispatched", "triton_norm"])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.float32, torch.bfloat16)])  # the last: under autocast
def test_rmsnorm_forward_backward(gen, impl, dtype, out_dtype):
    """The backend the model uses, and ops/triton_norm.py (opt-in with MAMBALLAMA_TRITON_NORM=1 until this passes
    on a GPU) called directly; more rows than that kernel's backward has programs."""
    if impl == "dispatched":
        fn = fast("rmsnorm")
    else:
        from mamballama_cli.ops.triton_norm import rmsnorm_triton as fn
    x = rnd(gen, 5, 333, 576, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * rnd(gen, 576)).to(dtype).detach().requires_grad_(True)
    out = fn(x, w, 1e-5, out_dtype)
    refs = [t.detach().double().requires_grad_(True) for t in (x, w)]
    out_ref = ops.reference("rmsnorm")(*refs, 1e-5)
    dtype = out_dtype or dtype
    assert out.dtype == dtype and out.shape == x.shape and rel(out, out_ref) < TOL[dtype]
    g = rnd(gen, *out.shape)
    (out.float() * g).sum().backward()
    (out_ref * g.double()).sum().backward()
    for t, r in zip((x, w), refs):
        assert rel(t.grad, r.grad) < TOL_GRAD[dtype]


@pytest.mark.parametrize("q_dtype,tab_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("hq,hk,head_dim", [(9, 3, 64), (32, 8, 128)])  # SmolLM2, Llama-3-8B
def test_rotary_forward_backward(gen, q_dtype, tab_dtype, hq, hk, head_dim):
    """ops/triton_rope.py (the model's RoPE on CUDA) against the reference: q as the transposed view of a
    projection, tables per batch row; bf16 with float32 tables is training under autocast."""
    b, L = 2, 300
    q = rnd(gen, b, L, hq, head_dim, dtype=q_dtype).transpose(1, 2).requires_grad_(True)
    k = rnd(gen, b, L, hk, head_dim, dtype=q_dtype).transpose(1, 2).requires_grad_(True)
    pos = torch.arange(L, device=DEV)[None].expand(b, L) + torch.tensor([[0], [1000]], device=DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=DEV).float() / head_dim))
    ang = pos[..., None].float() * inv
    cos, sin = torch.cat([ang, ang], -1).cos().to(tab_dtype), torch.cat([ang, ang], -1).sin().to(tab_dtype)
    qo, ko = fast("rotary")(q, k, cos, sin)
    refs = [t.detach().double().requires_grad_(True) for t in (q, k)]
    qr, kr = ops.reference("rotary")(*refs, cos.double(), sin.double())
    assert qo.dtype == ko.dtype == q_dtype and qo.shape == q.shape and ko.shape == k.shape
    tol = 1e-6 if q_dtype == torch.float32 else 1e-2
    assert rel(qo, qr) < tol and rel(ko, kr) < tol
    if q_dtype == tab_dtype:  # same arithmetic and roundings as the reference in that dtype: equal
        same = ops.reference("rotary")(q.detach(), k.detach(), cos, sin)
        assert torch.equal(qo, same[0]) and torch.equal(ko, same[1])
    gq, gk = rnd(gen, *q.shape), rnd(gen, *k.shape)
    ((qo.float() * gq).sum() + (ko.float() * gk).sum()).backward()
    ((qr * gq.double()).sum() + (kr * gk.double()).sum()).backward()
    assert rel(q.grad, refs[0].grad) < tol and rel(k.grad, refs[1].grad) < tol


def test_padded_in_proj_equals_in_proj_forward_backward(gen):
    """Mamba2Mixer.project_in pads the weight to aligned rows on CUDA: same values and gradients."""
    from mamballama_cli.models.configuration import MamballamaConfig
    from mamballama_cli.models.mixers import Mamba2Mixer

    cfg = MamballamaConfig(vocab_size=64, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=3, num_key_value_heads=1, head_dim=32, attn_layers=[1])
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg, 0).to(DEV)
    assert mixer.in_proj.out_features % 8, "the test needs an unaligned in_proj"
    h = rnd(gen, 2, 100, 96, requires_grad=True)
    out = mixer.project_in(h)
    ref = F.linear(h, mixer.in_proj.weight, mixer.in_proj.bias)
    assert out.shape == ref.shape and rel(out, ref) < 1e-5
    g = rnd(gen, *out.shape)
    gh, gw = torch.autograd.grad((out * g).sum(), (h, mixer.in_proj.weight))
    rh, rw = torch.autograd.grad((ref * g).sum(), (h, mixer.in_proj.weight))
    assert rel(gh, rh) < 1e-5 and rel(gw, rw) < 1e-5


def test_prefill_conv_backend_is_usable_or_reference(gen):
    """causal-conv1d's kernel when it imports and runs; otherwise the reference (F.conv1d) on the GPU."""
    name, fn = ops.dispatch("causal_conv1d", torch.device(DEV))
    x, w, bias, s0 = rnd(gen, 2, 96, 50), rnd(gen, 96, 4), rnd(gen, 96), rnd(gen, 2, 96, 3)
    y, s = fn(x, w, bias, s0, "silu")
    y_ref, s_ref = ops.reference("causal_conv1d")(x.double(), w.double(), bias.double(), s0.double(), "silu")
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-6, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,with_bias", [("silu", True), (None, False)])
def test_causal_conv1d_forward_backward_from_zeros(gen, dtype, act, with_bias):
    """The training conv (no carried state) on a channel-last column slice, as the mixer feeds it."""
    b, L, dim = 3, 333, 200
    base = rnd(gen, b, L, dim + 24, dtype=dtype)
    x = base[..., 8:8 + dim].transpose(1, 2).detach().requires_grad_(True)  # (b, dim, L), strided
    w = rnd(gen, dim, 4, dtype=dtype, requires_grad=True)
    bias = rnd(gen, dim, dtype=dtype, requires_grad=True) if with_bias else None
    name, fn = ops.dispatch("causal_conv1d", torch.device(DEV))
    y, s = fn(x, w, bias, None, act)
    leaves = [t for t in (x, w, bias) if t is not None]
    refs = [t.detach().double().requires_grad_(True) for t in leaves]
    y_ref, s_ref = ops.reference("causal_conv1d")(refs[0], refs[1], refs[2] if with_bias else None, None, act)
    assert y.shape == y_ref.shape and y.dtype == dtype and rel(y, y_ref) < TOL[dtype], name
    assert torch.equal(s.double(), s_ref)
    g = rnd(gen, *y.shape)
    (y.float() * g).sum().backward()
    (y_ref * g.double()).sum().backward()
    for t, r in zip(leaves, refs):
        assert rel(t.grad, r.grad) < TOL_GRAD[dtype], name


# ------------------------------------------------------------------------------------------------
# Decode kernels (mamballama-triton)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm(gen, dtype, with_residual):
    x, r, w = rnd(gen, 5, 4096, dtype=dtype), rnd(gen, 5, 4096, dtype=dtype), (1 + 0.1 * rnd(gen, 4096)).to(dtype)
    out, res = fast("add_rmsnorm")(x, r if with_residual else None, w, 1e-5)
    out_ref, res_ref = ops.reference("add_rmsnorm")(x, r if with_residual else None, w, 1e-5)
    assert out.dtype == dtype and rel(out, out_ref) < TOL[dtype] / 4
    assert torch.equal(res, res_ref)  # the residual sum is rounded exactly as torch rounds it


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(gen, dtype):
    gu = rnd(gen, 3, 2 * 5000, dtype=dtype)
    assert rel(fast("swiglu")(gu), ops.reference("swiglu")(gu.double())) < TOL[dtype] / 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["causal_conv1d_update", "conv_update_inplace"])
def test_conv_update(gen, dtype, op):
    b, dim, width = 3, 1000, 4
    x, w, bias, s0 = (rnd(gen, b, dim, dtype=dtype), rnd(gen, dim, width, dtype=dtype), rnd(gen, dim, dtype=dtype),
                      rnd(gen, b, dim, width - 1, dtype=dtype))
    y_ref, s_ref = ops.reference("causal_conv1d_update")(x.double(), s0.double(), w.double(), bias.double(), "silu")
    state = s0.clone()
    if op == "causal_conv1d_update":
        y, s = fast(op)(x, state, w, bias, "silu")
        assert torch.equal(state, s0), "causal_conv1d_update must not modify its input state"
    else:
        y, s = fast(op)(x, state, w, bias, "silu"), state
    assert rel(y, y_ref) < TOL[dtype] / 4
    assert torch.equal(s, s_ref.to(dtype))  # the window slides exactly


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", ["z", "norm", None])  # the gated norm, the norm alone (convert --no-gate), none
def test_ssm_step_gated(gen, dtype, gated):
    b, h, g, p, n = 3, 32, 8, 128, 128  # Llama-3-8B head shape
    s0 = rnd(gen, b, h, p, n)
    args = [rnd(gen, b, g, p, dtype=dtype), rnd(gen, b, g, n, dtype=dtype), rnd(gen, b, h, n, dtype=dtype),
            rnd(gen, b, h, dtype=dtype), (rnd(gen, h) - 3).to(dtype), rnd(gen, h, dtype=dtype),
            rnd(gen, h, dtype=dtype), rnd(gen, b, h, p, dtype=dtype) if gated == "z" else None,
            (1 + 0.1 * rnd(gen, h * p)).to(dtype) if gated else None]
    s_ref = s0.double()
    y_ref = ops.reference("ssm_step_gated")(s_ref, *[a.double() if a is not None else None for a in args], 1e-5)
    s = s0.clone()
    y = fast("ssm_step_gated")(s, *args, 1e-5)  # autotuned over STEP_TILES, the state restored after each timing
    assert y.dtype == dtype and rel(y, y_ref) < TOL[dtype] / 2
    assert rel(s, s_ref) < 1e-5
    from mamballama_cli.ops.triton_decode import STEP_TILES, ssm_step_gated_triton

    for tile in STEP_TILES:  # every candidate compiled and run on the device, not only the one the timing kept
        s = s0.clone()
        y = ssm_step_gated_triton(s, *args, 1e-5, tile=tile)
        assert rel(y, y_ref) < TOL[dtype] / 2 and rel(s, s_ref) < 1e-5, tile


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos", [0, 37, 299])
def test_rope_kv_write(gen, dtype, pos):
    from mamballama_cli.models.rope import RotaryEmbedding

    b, nh, nkv, hd, cap = 2, 32, 8, 128, 300
    rope = RotaryEmbedding({"rope_type": "default", "rope_theta": 500000.0}, hd).to(DEV)
    cos, sin = rope(torch.arange(cap, device=DEV)[None], dtype)
    cos, sin = cos[0].contiguous(), sin[0].contiguous()
    qkv = rnd(gen, b, (nh + 2 * nkv) * hd, dtype=dtype)
    k0, v0 = rnd(gen, b, nkv, cap, hd, dtype=dtype), rnd(gen, b, nkv, cap, hd, dtype=dtype)
    where = torch.tensor([pos], device=DEV)
    kr, vr, kf, vf = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    q_ref = ops.reference("rope_kv_write")(qkv, cos, sin, kr, vr, where, nh, nkv)
    q = fast("rope_kv_write")(qkv, cos, sin, kf, vf, where, nh, nkv)
    # same roundings as the reference: equal up to one ulp of the activation dtype
    assert rel(q, q_ref) < (1e-6 if dtype == torch.float32 else 4e-3)
    assert rel(kf, kr) < (1e-6 if dtype == torch.float32 else 4e-3)
    assert torch.equal(vf, vr)
    untouched = torch.ones(cap, dtype=torch.bool, device=DEV)
    untouched[pos] = False
    assert torch.equal(kf[:, :, untouched], k0[:, :, untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap,length,nh,nkv", [(300, 1, 32, 8), (300, 217, 32, 8), (4096, 4096, 32, 8),
                                               (33000, 32769, 32, 8), (500, 333, 9, 3), (128, 100, 4, 4)])
def test_decode_attention(gen, dtype, cap, length, nh, nkv):
    b, hd = 2, 128 if nh == 32 else 64
    q = rnd(gen, b, nh, hd, dtype=dtype)
    kc, vc = rnd(gen, b, nkv, cap, hd, dtype=dtype), rnd(gen, b, nkv, cap, hd, dtype=dtype)
    n = torch.tensor([length], device=DEV)
    out = fast("decode_attention")(q, kc, vc, n, hd**-0.5)
    ref = ops.reference("decode_attention")(q.double(), kc[:, :, :length].double(), vc[:, :, :length].double(),
                                             torch.tensor([length], device=DEV), hd**-0.5)
    assert out.dtype == dtype and rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("op", ["add_rmsnorm", "swiglu", "ssm_step_gated"])
def test_decode_kernels_hand_autograd_to_the_reference(gen, op):
    """Decode kernels have no backward of their own: with inputs that need gradients they run the reference,
    so training code that happens to call them still gets correct gradients."""
    if op == "add_rmsnorm":
        args = [rnd(gen, 4, 256, requires_grad=True), rnd(gen, 4, 256, requires_grad=True),
                rnd(gen, 256, requires_grad=True), 1e-5]
        run = lambda f, a: f(*a)[0]  # noqa: E731
    elif op == "swiglu":
        args = [rnd(gen, 4, 512, requires_grad=True)]
        run = lambda f, a: f(*a)  # noqa: E731
    else:
        b, h, g, p, n = 2, 4, 2, 16, 16
        args = [rnd(gen, b, h, p, n), rnd(gen, b, g, p, requires_grad=True), rnd(gen, b, g, n, requires_grad=True),
                rnd(gen, b, h, n, requires_grad=True), rnd(gen, b, h, requires_grad=True), rnd(gen, h),
                rnd(gen, h), rnd(gen, h), rnd(gen, b, h, p, requires_grad=True), rnd(gen, h * p), 1e-5]
        run = lambda f, a: f(a[0].clone(), *a[1:])  # noqa: E731
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = []
    for fn in (fast(op), ops.reference(op)):
        out = run(fn, args)
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for a, b in zip(*grads):
        assert rel(a, b) < 1e-6


# ------------------------------------------------------------------------------------------------
# The model on the fast path: forward and backward against the reference path
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_hybrid_forward_backward_fast_equals_reference(monkeypatch, dtype):
    from helpers import tiny_hybrid

    model, _ = tiny_hybrid(attn_layers=(3,), n_heads=4, n_kv=2, hidden=128, layers=4)
    model = model.to(DEV, dtype).train()
    ids = torch.randint(5, model.config.vocab_size, (2, 150), device=DEV)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()
                                             if p.grad is not None}

    logits_fast, grads_fast = run()
    monkeypatch.setenv("MAMBALLAMA_KERNELS", "ref")
    logits_ref, grads_ref = run()
    assert rel(logits_fast, logits_ref) < TOL[dtype]
    mamba_grads = [n for n in grads_ref if ".mamba." in n]
    assert mamba_grads
    for name in grads_ref:
        assert rel(grads_fast[name], grads_ref[name]) < 3 * TOL_GRAD[dtype], name
