"""Mamba-1 on CUDA: whichever backend the dispatch picks (mamba_ssm's CUDA scan, or the chunked PyTorch scan
when the extension is absent; mamba_ssm's Triton selective_state_update for decoding) against the float64
references, forward and backward, fp32 and bf16, on fresh random inputs. The replay op's Triton kernel
(ops/triton_selective_replay.py) against its reference at the mixer's shapes, and inside a captured CUDA graph."""

import pytest
import torch
import torch.nn.functional as F

from mamballama_cli import ops
from mamballama_cli.ops import cuda_mamba1  # noqa: F401  (registers the CUDA implementations)
from mamballama_cli.ops.selective_scan import (
    selective_scan,
    selective_scan_sequential_ref,
    selective_state_step,
    selective_state_step_ref,
)
from test_mamba1_replay import check_selective_replay, replay_inputs

pytestmark = pytest.mark.gpu

# dtype -> relative error allowed against the float64 reference (bf16 inputs carry 8 bits of mantissa)
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full fp32 matmuls and convolutions, so that fp32 tolerances measure the kernels, not TF32 rounding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def scan_inputs(dtype, b=2, l=300, heads=9, headdim=64, n=16, seed=0):
    """Shapes of the default teacher's Mamba-1 layer: dim = 9 * 64, groups of 16 channels."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dim, g = heads * headdim, heads * headdim // n
    kw = dict(device="cuda", generator=gen)
    x = torch.randn(b, l, dim, **kw).to(dtype)
    dt = F.softplus(torch.randn(b, l, dim, **kw) - 2.0)  # float32, positive (as the mixer passes it)
    A = -torch.arange(1.0, n + 1, device="cuda").expand(dim, n) * (1 + 0.1 * torch.rand(dim, n, **kw))
    B = (torch.randn(b, l, g, n, **kw) * 0.3).to(dtype)
    C = (torch.randn(b, l, g, n, **kw) * 0.3).to(dtype)
    D = torch.randn(dim, **kw)
    s0 = torch.randn(b, dim, n, **kw)
    return x, dt, A, B, C, D, s0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_state", [False, True])
def test_selective_scan_cuda_matches_reference_forward_and_backward(dtype, with_state):
    backend, _ = ops.dispatch("selective_scan", torch.device("cuda"))
    print(f"selective_scan backend on CUDA: {backend}")
    assert backend != "torch-ref", "the chunked CUDA scan is always available on CUDA"
    inputs = scan_inputs(dtype)
    results = []
    for impl in ("cuda", "ref"):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        x, dt, A, B, C, D, s0 = leaves
        init = s0 if with_state else None
        if impl == "cuda":
            y, s = selective_scan(x, dt, A, B, C, chunk_size=64, D=D, initial_state=init)
        else:
            y, s = selective_scan_sequential_ref(
                x.double(), dt.double(), A.double(), B.double(), C.double(), D.double(),
                initial_state=None if init is None else init.double(),
            )
        w = torch.randn(y.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        (y.double() * w.double()).sum().backward()  # mamba_ssm's final state carries no gradient
        results.append((y.detach(), s.detach(), [t.grad for t in leaves]))
    (y, s, grads), (y_ref, s_ref, grads_ref) = results
    assert y.dtype == dtype and s.dtype == torch.float32
    tol = TOL[dtype]
    assert rel_err(y, y_ref) <= tol
    assert rel_err(s, s_ref) <= tol
    names = ["x", "dt", "A", "B", "C", "D", "initial_state"]
    for name, g, g_ref in zip(names, grads, grads_ref):
        if name == "initial_state" and not with_state:
            continue
        assert g is not None, name
        assert rel_err(g, g_ref) <= 5 * tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_state_step_cuda_matches_reference(dtype):
    backend, _ = ops.dispatch("selective_state_step", torch.device("cuda"))
    print(f"selective_state_step backend on CUDA: {backend}")
    x, dt, A, B, C, D, s0 = scan_inputs(dtype, l=1)
    state = s0.clone()
    new_state, y = selective_state_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    ref_state, y_ref = selective_state_step_ref(s0.double(), x[:, 0].double(), dt[:, 0].double(), A.double(),
                                                B[:, 0].double(), C[:, 0].double(), D.double())
    assert torch.equal(state, s0), "the op must not modify its input state"
    assert new_state.dtype == torch.float32 and y.dtype == dtype
    assert rel_err(new_state, ref_state) <= TOL[dtype]
    assert rel_err(y, y_ref) <= TOL[dtype]


# --- speculative replay (selective_replay) ------------------------------------------------------------------------
def test_dispatch_picks_the_selective_replay_kernel():
    name, _ = ops.dispatch("selective_replay", torch.device("cuda"))
    assert name == "mamballama-triton", ops.backend_report("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,counts", [(1, [5]), (1, [2]), (3, [0, 2, 5])])
@pytest.mark.parametrize("ngroups", [256, 8])  # the mixer's (one group of B and C per 16 channels), and wide groups
def test_selective_replay_kernel_matches_reference(dtype, b, counts, ngroups):
    """dim 4096, dstate 16, a window of W = 5 and T = 5 new steps (K = 4 drafts), against the float64 reference."""
    seed = 10 * b + sum(counts)
    check_selective_replay("cuda", dtype, b, 5, 5, 4096, ngroups, 16, counts, seed=seed)
    check_selective_replay("cuda", dtype, b, 5, 5, 4096, ngroups, 16, counts, with_D=False, inplace=True, seed=seed)
    check_selective_replay("cuda", dtype, b, 0, 1, 4096, ngroups, 16, [0] * b, inplace=True, seed=seed)  # W = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_replay_kernel_in_a_cuda_graph_reads_the_counts_from_memory(dtype):
    """One captured kernel serves every accepted count: the loop bound is read on the device. Written as the mixer
    does it: the checkpoint over the input state, the final state into the live buffer."""
    from mamballama_cli.ops.selective_scan import selective_replay_ref
    from mamballama_cli.ops.triton_selective_replay import selective_replay_triton

    W = 5
    state, *rest = replay_inputs("cuda", dtype, 3, W, 5, 4096, 256, 16, [0, 0, 0], seed=3)
    n_buf = rest[3]  # (x_old, dt_old, B_old, n_replay, ...)
    ckpt, live = state.clone(), torch.empty_like(state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        selective_replay_triton(ckpt, *rest, state_out=ckpt, final_out=live)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, _, _ = selective_replay_triton(ckpt, *rest, state_out=ckpt, final_out=live)
    seen = []
    for counts in ([0, W, 2], [W, 1, 0], [3, 3, W]):
        n_buf.copy_(torch.tensor(counts))
        ckpt.copy_(state)
        graph.replay()
        y_ref, s_ref, f_ref = selective_replay_ref(state, *rest, return_final=True)
        assert rel_err(y, y_ref) <= TOL[dtype] / 3, counts
        assert rel_err(ckpt, s_ref) <= 1e-5 and rel_err(live, f_ref) <= 1e-5, counts
        seen.append(ckpt.clone())
    assert not torch.equal(seen[0], seen[1])  # the counts changed the result


def test_mamba1_hybrid_on_cuda_matches_cpu_and_caches_exactly():
    from helpers import decode_with_cache, tiny_hybrid

    student, _ = tiny_hybrid(attn_layers=(1, 3), n_heads=4, n_kv=2, mixer="mamba1", hidden=128)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    student.train()
    cpu_loss = student(ids, labels=ids).loss
    cpu_loss.backward()
    cpu_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    gpu = student.cuda()
    gpu_loss = gpu(ids.cuda(), labels=ids.cuda()).loss
    gpu_loss.backward()
    assert abs(gpu_loss.item() - cpu_loss.item()) <= 1e-4 * abs(cpu_loss.item())
    for n, p in gpu.named_parameters():
        assert rel_err(p.grad.cpu(), cpu_grads[n]) <= 1e-3, n
    gpu.eval()
    with torch.no_grad():
        prompt = ids[:, :9].cuda()
        steps, tokens, _ = decode_with_cache(gpu, prompt, 12)
        cached = torch.cat(steps, 1)
        parallel = gpu(tokens).logits
    assert (cached - parallel).abs().max().item() <= 1e-3
    assert torch.equal(cached.argmax(-1), parallel.argmax(-1))
