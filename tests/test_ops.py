"""Reference ops: the chunked SSD scan against the sequential recurrence, conv and norm properties."""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_chunked_scan_matches_sequential, rel_err
from mamballama_cli.ops.conv import causal_conv1d_ref, causal_conv1d_update_ref
from mamballama_cli.ops.norm import rmsnorm_gated_ref
from mamballama_cli.ops.ssd import ssd_chunk_scan_ref, ssd_sequential_ref, ssm_step_ref


def random_ssd_inputs(b=2, l=37, h=4, g=2, p=5, n=6, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = F.softplus(torch.randn(b, l, h, generator=gen, dtype=dtype) - 1.0)
    A = -torch.rand(h, generator=gen, dtype=dtype) * 2 - 0.1
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, h, n, generator=gen, dtype=dtype)
    D = torch.randn(h, generator=gen, dtype=dtype)
    s0 = torch.randn(b, h, p, n, generator=gen, dtype=dtype)
    return x, dt, A, B, C, D, s0


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
@pytest.mark.parametrize("seqlen", [1, 16, 37])
def test_chunked_ssd_equals_sequential_float64(chunk, seqlen):
    inputs = random_ssd_inputs(l=seqlen, seed=chunk * 100 + seqlen)
    assert_chunked_scan_matches_sequential(ssd_sequential_ref, ssd_chunk_scan_ref, inputs, chunk, [inputs[-1]])


def test_chunked_ssd_split_sequence_carries_state():
    x, dt, A, B, C, D, s0 = random_ssd_inputs(l=40, seed=3)
    y_full, s_full = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=8, D=D, initial_state=s0)
    y1, s1 = ssd_chunk_scan_ref(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], chunk_size=8, D=D, initial_state=s0)
    y2, s2 = ssd_chunk_scan_ref(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], chunk_size=8, D=D, initial_state=s1)
    assert rel_err(torch.cat([y1, y2], 1), y_full) <= 1e-10
    assert rel_err(s2, s_full) <= 1e-10


def test_step_matches_sequential_and_groups_are_read_per_head():
    x, dt, A, B, C, D, s0 = random_ssd_inputs(l=3, g=2, h=4, seed=5)
    state, y = ssm_step_ref(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    # head 3 must read B group 1 (= 3 // 2): recompute that head by hand
    dA = torch.exp(dt[:, 0, 3] * A[3])
    h3 = s0[:, 3] * dA[:, None, None] + (dt[:, 0, 3, None] * x[:, 0, 3])[:, :, None] * B[:, 0, 1][:, None, :]
    assert torch.allclose(state[:, 3], h3)
    assert torch.allclose(y[:, 3], torch.einsum("bpn,bn->bp", h3, C[:, 0, 3]) + D[3] * x[:, 0, 3])


def test_conv_with_carried_state_equals_full_conv():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 19, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    y_full, s_full = causal_conv1d_ref(x, w, bias, activation="silu")
    y1, s1 = causal_conv1d_ref(x[..., :7], w, bias, activation="silu")
    ys = [y1]
    state = s1
    for t in range(7, 19):
        yt, state = causal_conv1d_update_ref(x[..., t], state, w, bias, activation="silu")
        ys.append(yt[..., None])
    assert torch.allclose(torch.cat(ys, -1), y_full, atol=1e-12)
    assert torch.allclose(state, s_full)
    # causality: output at t depends only on inputs <= t
    x2 = x.clone()
    x2[..., 10:] = torch.randn_like(x2[..., 10:])
    assert torch.allclose(causal_conv1d_ref(x2, w, bias)[0][..., :10], causal_conv1d_ref(x, w, bias)[0][..., :10])


def test_gated_rmsnorm_groups():
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(3, 8, generator=gen)
    z = torch.randn(3, 8, generator=gen)
    w = torch.randn(8, generator=gen)
    out = rmsnorm_gated_ref(y, z, w, eps=1e-6, group_size=4)
    g = (y * F.silu(z)).reshape(3, 2, 4)
    expect = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)).reshape(3, 8) * w
    assert torch.allclose(out, expect, atol=1e-6)
    # without the group split the result differs (the groups are really per head)
    assert not torch.allclose(rmsnorm_gated_ref(y, z, w, eps=1e-6, group_size=8), expect, atol=1e-3)


def test_dispatch_uses_reference_on_cpu():
    from mamballama_cli import ops

    name, fn = ops.dispatch("ssd_scan", torch.device("cpu"))
    assert name == "torch-ref"
    rows = ops.backend_report("cpu")
    assert {"ssd_scan", "ssm_step", "causal_conv1d", "causal_conv1d_update", "rmsnorm_gated"} <= {r["op"] for r in rows}


def test_reference_loads_the_module_that_declares_an_op():
    """ops.reference finds a reference that a later module declares, in a process where nothing imported that
    module yet (the gpu suite's test_rope_kv_write failed with KeyError when it ran first on an xdist worker)."""
    import subprocess
    import sys

    code = ("from mamballama_cli import ops; assert 'rope_kv_write' not in ops.REFERENCES;"
            "fn = ops.reference('rope_kv_write'); from mamballama_cli.ops.decode import rope_kv_write_ref;"
            "assert fn is rope_kv_write_ref\ntry: ops.reference('no_such_op')\nexcept KeyError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "no_such_op" in out and "rope_kv_write" in out


def test_ref_ops_forces_the_reference_for_the_ops_named_only(monkeypatch):
    """MAMBALLAMA_REF_OPS names ops whose reference runs even on CUDA (a fake fast kernel that always probes ok
    stands in for a GPU here); the other ops keep their fast kernel."""
    from mamballama_cli import ops

    monkeypatch.setattr(ops, "_fast_loaded", True)  # no real kernel modules: only the fake ones below
    monkeypatch.setattr(ops, "FAST", {name: [] for name in ops.REFERENCES})
    for op in ("rotary", "rmsnorm"):
        ops.register_fast(op, "fake", lambda *a, **k: None, lambda: (True, "ok"))
    assert ops.dispatch("rotary", "cuda")[0] == "fake" and ops.dispatch("rmsnorm", "cuda")[0] == "fake"
    monkeypatch.setenv("MAMBALLAMA_REF_OPS", "rotary, ssd_scan")
    assert ops.dispatch("rotary", "cuda") == ("torch-ref", ops.REFERENCES["rotary"])
    assert ops.dispatch("rmsnorm", "cuda")[0] == "fake"
    report = {r["op"]: r for r in ops.backend_report("cuda")}
    assert report["rotary"]["backend"] == "torch-ref" and report["rmsnorm"]["backend"] == "fake"
    assert any("MAMBALLAMA_REF_OPS" in note for note in report["rotary"]["candidates"])
    monkeypatch.setenv("MAMBALLAMA_KERNELS", "ref")
    assert ops.dispatch("rmsnorm", "cuda")[0] == "torch-ref"


def test_rotary_op_keeps_q_dtype_and_equals_apply_rotary():
    """The rotary op's reference is apply_rotary with the result in q's dtype (float32 math under mixed inputs)."""
    from mamballama_cli import ops
    from mamballama_cli.models.rope import apply_rotary

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8).to(torch.bfloat16), torch.randn(2, 2, 5, 8).to(torch.bfloat16)
    ang = torch.rand(2, 5, 4) * 3
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    qo, ko = ops.rotary(q, k, cos, sin)
    qr, kr = apply_rotary(q, k, cos, sin)
    assert qo.dtype == ko.dtype == torch.bfloat16 and qr.dtype == torch.float32
    assert torch.equal(qo, qr.to(torch.bfloat16)) and torch.equal(ko, kr.to(torch.bfloat16))


def fresh_process_output(code: str) -> str:
    """stdout of ``code`` run by a new interpreter (imports and registries start empty there)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_ops_import_nothing_above_them():
    """ops/ is the ground floor: importing every ops module (kernels included) loads no other part of the package."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import mamballama_cli.ops as ops\n"
        "for m in pkgutil.iter_modules(ops.__path__):\n"
        "    try:\n"
        "        importlib.import_module('mamballama_cli.ops.' + m.name)\n"
        "    except ImportError:\n"
        "        pass  # a kernel module whose package (triton) is absent\n"
        "above = sorted(m for m in sys.modules if m.startswith('mamballama_cli.')\n"
        "               and not m.startswith('mamballama_cli.ops') and m != 'mamballama_cli._registration')\n"
        "print(above)\n"
    )
    assert fresh_process_output(code).strip() == "[]"


def test_no_python_file_of_the_package_passes_500_lines():
    """Issue 15's house rule: every Python file under mamballama_cli/ holds at most 500 lines (a module that grows
    past it splits along what it owns, docs/architecture.md)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "mamballama_cli"
    sizes = {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    assert len(sizes) > 50 and "ops/triton_gemv.py" in sizes
    assert {name: n for name, n in sizes.items() if n > 500} == {}


def test_fast_implementations_rank_by_module_not_by_import_order():
    """Implementations of one op rank in the order of ops.FAST_MODULES whichever module was imported first:
    installed packages' kernels ahead of the project's, except the project's opt-in RMSNorm, which must rank
    ahead of mamba_ssm's so that MAMBALLAMA_TRITON_NORM=1 takes effect (its probe refuses otherwise)."""
    pytest.importorskip("triton")
    code = (
        "import mamballama_cli.ops.triton_conv, mamballama_cli.ops.triton_norm\n"
        "from mamballama_cli import ops\n"
        "ops._load_fast()\n"
        "for op in ('rmsnorm', 'causal_conv1d', 'causal_conv1d_update'):\n"
        "    print(op, [i.fn.__module__.rsplit('.', 1)[1] for i in ops.FAST[op]])\n"
    )
    assert fresh_process_output(code).split("\n")[:3] == [
        "rmsnorm ['triton_norm', 'external']",
        "causal_conv1d ['external', 'triton_conv']",
        "causal_conv1d_update ['external', 'triton_decode']",
    ]


def test_kernels_option_chooses_references_per_process_and_names_bad_values(monkeypatch, capsys):
    """`--kernels` (ops.configure) replaces setting MAMBALLAMA_KERNELS / MAMBALLAMA_REF_OPS by hand."""
    from clihelp import run_cli

    from mamballama_cli import ops

    for name in ("MAMBALLAMA_KERNELS", "MAMBALLAMA_REF_OPS"):  # setenv first: teardown then restores "unset"
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    ops.configure("ref")
    assert ops.forced_reference() and ops.forced_reference("rotary")
    ops.configure("ref:rotary,add_rmsnorm")  # add_rmsnorm is a decode op, declared in ops/decode.py
    assert not ops.forced_reference() and ops.forced_reference("rotary") and ops.forced_reference("add_rmsnorm")
    assert not ops.forced_reference("rmsnorm")
    assert ops.dispatch("rotary", "cuda")[0] == "torch-ref"  # forced even where a kernel could run
    ops.configure("auto")
    assert not ops.forced_reference("rotary")
    for bad in ("fast", "ref:nope", "ref:"):
        with pytest.raises(ValueError, match="--kernels"):
            ops.configure(bad)
    r = run_cli(["--kernels", "ref:nope", "env"], capsys)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "nope" in r.err and "rotary" in r.err
    r = run_cli(["--kernels", "ref", "env", "--json"], capsys)
    assert r.code == 0, r.err
    import os

    assert os.environ.get("MAMBALLAMA_KERNELS") == "ref"  # inherited by accelerate / DeepSpeed workers
    ops.configure("auto")


def test_gpu_session_runs_parts_joined_by_plus_at_once_and_reports_each(tmp_path):
    """``gpu_session.sh part5+part4`` (benchmarks/gpu_session.sh ``together``) starts both parts before either ends
    (a stub python3 that waits for its sibling to start stands in for pytest), gives each its own log, prints each
    part's report after both, and leaves listing (and packing) the output folder to the parent; the tests run with
    Triton's autotuning cache on."""
    import os
    import stat
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    # each fake pytest run marks that it started, then waits (up to 20 s) until two runs have started
    stub.write_text(f"""#!/bin/sh
echo "$@"
echo "autotune cache: $TRITON_CACHE_AUTOTUNING"
touch "{tmp_path}/started.$$"
i=0
while [ "$(ls {tmp_path}/started.* | wc -l)" -lt 2 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
[ "$(ls {tmp_path}/started.* | wc -l)" -ge 2 ] && echo "1 passed" || echo "alone"
""")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "OUT": str(out), "DEADLINE": "120",
           "TRITON_CACHE_DIR": str(tmp_path / "cache"), "TCACHE": str(tmp_path / "no-tcache")}
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "part5+part4"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    logs = {p.name: p.read_text() for p in out.iterdir()}
    assert set(logs) == {"tests-part4.log", "tests-part5.log"}, logs
    assert "test_large_shapes_gpu.py" in logs["tests-part5.log"] and "1 passed" in logs["tests-part5.log"]
    assert "test_kd_fused.py" in logs["tests-part4.log"] and "1 passed" in logs["tests-part4.log"]
    # the tests' autotuning results go into the Triton cache (and travel with it); benchmarks tune afresh
    assert all("autotune cache: 1" in log for log in logs.values()), logs
    text = proc.stdout
    assert "together: part5, part4" in text
    assert text.index("== part5") < text.index("== part4") < text.rindex("done")
    assert text.count("tests-part4.log") == 1, text  # one listing of $OUT: the parent's, after the reports


def test_every_gpu_test_file_is_in_one_part_of_the_gpu_session():
    """The gpu suite runs on the H200 in named parts of at most 8 minutes (benchmarks/gpu_session.sh part1..6);
    a new gpu test file must be given a part, or it would never run there."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent
    mark = re.compile(r"^(@pytest\.mark\.gpu|pytestmark = .*pytest\.mark\.gpu)", flags=re.MULTILINE)
    marked = {p.name for p in root.glob("test_*.py") if mark.search(p.read_text())}
    script = (root.parent / "benchmarks" / "gpu_session.sh").read_text()
    parts = re.findall(r"^\s*(part\d)\) gputest \w+ (\d+) (.*?);;", script, flags=re.MULTILINE | re.DOTALL)
    assert [p[0] for p in parts] == ["part1", "part2", "part3", "part4", "part5", "part6"]
    assert all(int(cap) <= 480 for _, cap, _ in parts)
    files = [set(re.findall(r"tests/(test_\w+\.py)", body)) for _, _, body in parts]
    assert set().union(*files) == marked, sorted(marked ^ set().union(*files))
