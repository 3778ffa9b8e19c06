"""Tuning tables (ops/tuning.py, the global ``--tuning FILE``): a later process on the same code, software and GPU
takes its kernels' tiles and per-shape choices from the table, without timing or compiling the other candidates;
anywhere else the table is set aside and everything is timed as before."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import FunctionType, SimpleNamespace

import pytest
import torch
from clihelp import run_cli
from helpers import NEEDS_TRITON, PATCHED_SCRIPT_HEAD, run_interpreted

from mamballama_cli.ops import tuning

TESTS = str(Path(__file__).parent)


@pytest.fixture
def clean(monkeypatch):
    """This process's registry and state, emptied for the test and given back after it."""
    monkeypatch.setattr(tuning, "TUNERS", {})
    monkeypatch.setattr(tuning, "CHOICES", {})
    monkeypatch.setattr(tuning, "SOURCES", {})
    monkeypatch.setattr(tuning, "STATE", {"table": None, "file": None, "why": "no table given",
                                          "seeded": {"tuners": 0, "choices": 0}, "left": 0})
    monkeypatch.delenv(tuning.ENV, raising=False)
    yield
    os.environ.pop(tuning.ENV, None)  # set by the CLI's --tuning in this process, which monkeypatch did not record


def _config(n, warps):
    return SimpleNamespace(kwargs={"BLOCK_N": n}, num_warps=warps, num_stages=3, num_ctas=1)


def _tuner():
    return SimpleNamespace(configs=[_config(32, 4), _config(64, 4), _config(64, 8)], cache={})


def test_a_table_round_trips_tiles_and_choices_and_never_overrides_what_a_process_chose(clean, tmp_path):
    made = _tuner()
    made.cache[(4096, 4096, "torch.bfloat16")] = made.configs[2]
    made.cache[(14336, 4096, "torch.bfloat16")] = made.configs[1]
    replay = {(1, 32, 128, 128, 5, 5, True, torch.bfloat16, 0): (32, 8, 2),
              (1, 32, 128, 128, 5, 1, True, torch.bfloat16, None): True}  # the second: untimed, off CUDA
    gemv = {(5, 4096, 4096, torch.bfloat16, 0): False}
    tuning.register_tuner("gemv", made)
    tuning.register_choices("replay", replay)
    tuning.register_choices("gemv", gemv)
    path = tmp_path / "t" / "tuning.json"
    assert tuning.save(path) == 4  # two tiles, two choices: the untimed one is not a decision
    assert [p.name for p in path.parent.iterdir()] == ["tuning.json"]  # written under a temporary name, renamed

    # a later process: its modules register after the table is opened, one of them with a shape of its own
    tuning.TUNERS.clear()
    tuning.CHOICES.clear()
    tuning.STATE.update(table=None, seeded={"tuners": 0, "choices": 0})
    assert tuning.use(path) == "used"
    fresh, own = _tuner(), {(5, 4096, 4096, torch.bfloat16, 0): True}
    fresh.cache[(14336, 4096, "torch.bfloat16")] = fresh.configs[0]  # chosen by this process: kept
    tuning.register_tuner("gemv", fresh)
    replay2 = {}
    tuning.register_choices("replay", replay2)
    tuning.register_choices("gemv", own)
    assert fresh.cache[(4096, 4096, "torch.bfloat16")] is fresh.configs[2]
    assert fresh.cache[(14336, 4096, "torch.bfloat16")] is fresh.configs[0]
    assert replay2 == {(1, 32, 128, 128, 5, 5, True, torch.bfloat16, 0): (32, 8, 2)}
    assert own == {(5, 4096, 4096, torch.bfloat16, 0): True}
    assert tuning.report()["status"] == "used" and tuning.report()["seeded"]["tuners"] == 2


def test_a_table_made_with_another_gpu_or_software_is_set_aside_and_everything_is_timed(clean, tmp_path, capsys):
    made = _tuner()
    made.cache[(4096, 4096, "torch.bfloat16")] = made.configs[2]
    tuning.register_tuner("gemv", made)
    path = tmp_path / "tuning.json"
    tuning.save(path)
    saved = path.read_text()
    for field, other in (("device", "NVIDIA H200"), ("triton", "0.0"), ("torch", "0.0")):
        table = json.loads(saved)
        table["fingerprint"][field] = other
        path.write_text(json.dumps(table))
        fresh = _tuner()
        tuning.TUNERS.clear()
        tuning.register_tuner("gemv", fresh)
        why = tuning.use(path)
        assert why.startswith(f"set aside: made with another {field}"), why
        assert fresh.cache == {}
        assert f"--tuning {path}: set aside" in capsys.readouterr().err


def test_entries_timed_on_other_code_are_timed_again_and_the_rest_of_the_table_is_used(clean, tmp_path):
    made, choices = _tuner(), {(5, 4096, 4096, torch.bfloat16, 0): False}
    made.cache[(4096, 4096, "torch.bfloat16")] = made.configs[2]
    tuning.register_tuner("gemv", made)
    tuning.register_choices("replay", choices, source=str(tuning.OPS / "replay_tiles.py"))
    path = tmp_path / "tuning.json"
    assert tuning.save(path) == 2
    table = json.loads(path.read_text())
    assert table["code"]["tuners"]["gemv"] == {"module": "test_tuning.py", "hash": tuning.code_hash(__file__)}
    assert table["code"]["choices"]["replay"]["module"] == "replay_tiles.py"
    table["code"]["tuners"]["gemv"]["hash"] = "0" * 16  # as if this module's code had changed since
    path.write_text(json.dumps(table))
    fresh, again = _tuner(), {}
    tuning.TUNERS.clear()
    tuning.CHOICES.clear()
    assert tuning.use(path) == "used"
    tuning.register_tuner("gemv", fresh)
    tuning.register_choices("replay", again, source=str(tuning.OPS / "replay_tiles.py"))
    assert fresh.cache == {} and again == {(5, 4096, 4096, torch.bfloat16, 0): False}
    report = tuning.report()
    assert report["code_changed"] == ["gemv"] and report["stale_entries"] == 1 and report["seeded"]["choices"] == 1
    check = tuning.check(path)
    assert check["code_changed"] == ["gemv"] and check["status"].startswith("used here, but for gemv (their code")
    fresh.cache[(1, "torch.bfloat16")] = fresh.configs[0]
    assert tuning.save(path) == 2  # the stale entry is not carried over; this run's and the replay's are
    table = json.loads(path.read_text())
    assert table["tuners"]["gemv"] == [[[1, "torch.bfloat16"], tuning.config_id(fresh.configs[0])]]
    assert table["code"]["tuners"]["gemv"]["hash"] == tuning.code_hash(__file__)


def test_a_table_of_the_older_format_is_set_aside_and_written_over(clean, tmp_path, capsys):
    path = tmp_path / "tuning.json"
    here = tuning.fingerprint()
    path.write_text(json.dumps({"format": 1, "fingerprint": {**here, "code": "b8f3ac66e8f41c89"},
                                "tuners": {"gemv": [[[4096, "torch.bfloat16"], tuning.config_id(_config(64, 8))]]},
                                "choices": {}}))
    fresh = _tuner()
    tuning.register_tuner("gemv", fresh)
    assert tuning.use(path) == "set aside: an older table (format 1); everything is timed as before"
    assert fresh.cache == {} and "an older table (format 1)" in capsys.readouterr().err
    assert tuning.check(path)["status"] == "set aside here: made with another format"
    fresh.cache[(1, "torch.bfloat16")] = fresh.configs[0]
    assert tuning.save(path) == 1 and json.loads(path.read_text())["format"] == tuning.FORMAT


def test_saving_keeps_a_same_fingerprint_tables_entries_and_replaces_another(clean, tmp_path):
    path = tmp_path / "tuning.json"
    first = _tuner()
    first.cache[(1, "torch.bfloat16")] = first.configs[1]
    tuning.register_tuner("gemv", first)
    tuning.save(path)
    first.cache.clear()
    first.cache[(2, "torch.bfloat16")] = first.configs[0]
    assert tuning.save(path) == 2  # the earlier run's shape is kept beside this one's
    table = json.loads(path.read_text())
    table["fingerprint"]["torch"] = "0.0"
    path.write_text(json.dumps(table))
    assert tuning.save(path) == 1  # another torch's entries are not carried over


def test_a_config_no_longer_offered_is_timed_again_and_counted(clean, tmp_path):
    made = _tuner()
    made.cache[(7, "torch.float16")] = made.configs[2]
    tuning.register_tuner("gemv", made)
    path = tmp_path / "tuning.json"
    tuning.save(path)
    fresh = _tuner()
    fresh.configs = fresh.configs[:2]  # the 8-warp tile was removed since
    tuning.TUNERS.clear()
    tuning.register_tuner("gemv", fresh)
    tuning.use(path)
    assert fresh.cache == {} and tuning.report()["stale_entries"] == 1


def test_a_file_that_is_not_a_table_is_one_line_naming_it_before_any_work(clean, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 2}')
    with pytest.raises(ValueError, match=r"--tuning .*bad.json: not a tuning table \(format 1 to 2\); give a file"):
        tuning.read(bad)
    bad.write_text("not json")
    r = run_cli(["--tuning", bad, "plugins", "list"], capsys)
    assert r.code != 0
    lines = [ln for ln in r.err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "bad.json: not a tuning table" in lines[0], r.err
    assert tuning.STATE["file"] is None


def test_the_cli_option_on_cpu_runs_the_command_and_writes_no_table(clean, tmp_path, capsys):
    path = tmp_path / "tuning.json"
    r = run_cli(["--tuning", path, "plugins", "list"], capsys)
    assert r.code == 0, r.err
    assert tuning.STATE["file"] == str(path) and tuning.report()["status"] == "not used: no GPU kernel ran"
    assert not path.exists()


# Under the interpreter: the gemv op's real autotuner, a table saved by one process, opened by the next through the
# variable a parent sets for its workers before the kernel module's import (the timer replaced: the interpreter has
# no device to time on; it times the candidates 100, 99, ... so that the last one wins, not the first).
TABLE_SCRIPT = PATCHED_SCRIPT_HEAD + r"""
from mamballama_cli.ops import tuning
from mamballama_cli.ops import triton_gemv as g

mode, path = sys.argv[2], sys.argv[3]
timed = []
def bench(kernel_call, quantiles):
    kernel_call()
    timed.append(1)
    return [100.0 - len(timed)] * 3
g._gemv_tuned._do_bench = bench
gen = torch.Generator().manual_seed(0)
x = torch.randn(1, 64, generator=gen).half()
w = torch.randn(48, 64, generator=gen).half()
y = g.gemv_launch(x, w)
err = ((y.float() - x.float() @ w.float().T).abs().max() / (x.float() @ w.float().T).abs().max()).item()
if mode == "save":
    tuning.save(path)
print(json.dumps({"timed": len(timed), "err": err, "best": tuning.config_id(g._gemv_tuned.best_config),
                  "last": tuning.config_id(g._gemv_tuned.configs[-1]), "report": tuning.report()}))
"""


@NEEDS_TRITON
def test_the_next_process_runs_the_tables_tile_without_timing_and_a_stale_table_times_again(tmp_path):
    path = tmp_path / "tuning.json"

    def run(mode):
        env_script = f"import os; os.environ[{tuning.ENV!r}] = {str(path)!r}\n" if mode != "save" else ""
        return json.loads(run_interpreted(env_script + TABLE_SCRIPT, TESTS, mode, str(path)).splitlines()[-1])

    first = run("save")
    assert first["timed"] == 7 and first["best"] == first["last"] and first["err"] < 1e-2
    assert json.loads(path.read_text())["tuners"]["gemv"]
    later = run("use")
    assert later["timed"] == 0 and later["best"] == first["best"] and later["err"] < 1e-2
    assert later["report"]["status"] == "used" and later["report"]["seeded"]["tuners"] == 1
    table = json.loads(path.read_text())
    assert table["code"]["tuners"]["gemv"]["module"] == "triton_gemv.py"
    table["code"]["tuners"]["gemv"]["hash"] = "0" * 16  # as if the gemv kernel's code had changed since
    path.write_text(json.dumps(table))
    stale = run("use")
    assert stale["timed"] == 7 and stale["report"]["status"] == "used"
    assert stale["report"]["code_changed"] == ["gemv"] and stale["report"]["stale_entries"] == 1


# On CUDA: the gemv op's real choice (the kernel timed against cuBLAS in CUDA graphs) and its autotuner (real
# timings, counted), a table saved by one process and opened by the next as a worker would open it. Triton's own
# cache of autotuning results is off, so that only the table can spare the second process the timing.
GPU_SCRIPT = r"""
import json, sys
import torch
import torch.nn.functional as F
from mamballama_cli.ops import tuning
from mamballama_cli.ops import triton_gemv as g

mode, path = sys.argv[1], sys.argv[2]
timed, decided = [], []
bench = g._skinny_tuned.do_bench
g._skinny_tuned._do_bench = lambda call, quantiles: (timed.append(1), bench(call, quantiles=quantiles))[1]
decide = g._kernel_is_faster
g._kernel_is_faster = lambda *a, **k: (decided.append(1), decide(*a, **k))[1]
gen = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(5, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) / 64
y = g.gemv_triton(x, w)
ref = F.linear(x.float(), w.float())
if mode == "save":
    tuning.save(path)
best = getattr(g._skinny_tuned, "best_config", None)
print(json.dumps({"timed": len(timed), "decided": len(decided), "use": g.CHOICES[(5, 4096, 4096, torch.bfloat16, 0)],
                  "best": tuning.config_id(best) if best is not None else None,
                  "err": ((y.float() - ref).abs().max() / ref.abs().max()).item(), "report": tuning.report()}))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_next_process_takes_the_gemv_ops_choice_and_tile_from_the_table_untimed(tmp_path):
    import os
    import subprocess
    import sys

    path = tmp_path / "tuning.json"

    def run(mode):
        env = {**os.environ, "TRITON_CACHE_AUTOTUNING": "0"}
        env.pop(tuning.ENV, None)
        if mode == "use":
            env[tuning.ENV] = str(path)
        proc = subprocess.run([sys.executable, "-c", GPU_SCRIPT, mode, str(path)], env=env, capture_output=True,
                              text=True, timeout=400, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = run("save")
    assert first["decided"] == 1 and first["err"] < 2e-2
    later = run("use")
    assert later["report"]["status"] == "used", later["report"]
    assert later["decided"] == 0 and later["timed"] == 0 and later["use"] == first["use"]
    assert later["err"] < 2e-2
    if first["use"]:  # the kernel serves the shape: with the first process's tile (else it never runs)
        assert later["best"] == first["best"]


def test_the_end_of_run_save_skips_what_a_table_cannot_keep_and_never_fails_the_run(clean, tmp_path, monkeypatch,
                                                                                      capsys):
    made = _tuner()
    made.cache[(4096, "torch.bfloat16")] = made.configs[0]
    made.cache[(object(), "torch.bfloat16")] = made.configs[1]  # not a key a file can hold: left out
    tuning.register_tuner("gemv", made)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tuning, "fingerprint", lambda device=None: {"triton": "t", "torch": "t",
                                                                    "device": "NVIDIA H100 80GB HBM3"})
    path = tmp_path / "tuning.json"
    tuning._save_at_exit(path)
    assert json.loads(path.read_text())["tuners"]["gemv"] == [[[4096, "torch.bfloat16"], tuning.config_id(
        made.configs[0])]]
    blocked = tmp_path / "a-folder"
    blocked.mkdir()
    (blocked / "x").write_text("")
    tuning._save_at_exit(blocked)  # a folder where the file should be: one line, no exception
    assert f"note: --tuning {blocked}: not written" in capsys.readouterr().err


def test_env_says_what_a_table_holds_and_whether_this_machine_would_use_it(clean, tmp_path, capsys, monkeypatch):
    made = _tuner()
    made.cache[(4096, 4096, "torch.bfloat16")] = made.configs[2]
    tuning.register_tuner("gemv", made)
    here = tuning.fingerprint()
    monkeypatch.setattr(tuning, "fingerprint", lambda device=None: {**here, "device": "NVIDIA H100 80GB HBM3"})
    path = tmp_path / "tuning.json"
    tuning.save(path)
    monkeypatch.setattr(tuning, "fingerprint", lambda device=None: here)  # this machine: the CPU
    r = run_cli(["--tuning", path, "env"], capsys)
    assert r.code == 0, r.err
    line = next(ln for ln in r.out.splitlines() if ln.startswith("tuning table"))
    assert line == (f"tuning table {path}: 1 entries, made on NVIDIA H100 80GB HBM3 (triton {here['triton']}, "
                    f"torch {here['torch']}); set aside here: made with another device")
    r = run_cli(["--tuning", tmp_path / "none.json", "env", "--json"], capsys)
    assert json.loads(r.out)["tuning"]["status"] == "no table there yet"


def test_the_code_hash_reads_code_not_comments_or_docstrings(tmp_path):
    base = ('"""Module doc \u2013 5.9 us."""\nimport os  # for the path\n\n\ndef f(x):\n    """Doc: 5.9 us on an H100\n    (\u00b5s)."""'
            '  # why\n    s = "# not a comment"\n    return x + 1  # measured 2026-12-06\n')
    variants = {"a": base, "b": base.replace("5.9 us on an H100", "6.1 us on an H200").replace("12-06", "12-07"),
                "c": base.replace("x + 1", "x + 2"), "d": base.replace('"# not a comment"', '"# changed"'),
                "e": base.replace("  # why", "").replace("\n\n\ndef", "\ndef")}
    for n, text in variants.items():
        (tmp_path / f"{n}.py").write_text(text)
    code = {n: tuning._code(tmp_path / f"{n}.py") for n in variants}
    assert code["a"] == code["b"] == code["e"] and code["a"] != code["c"] and code["a"] != code["d"]
    assert code["a"] == b'import os\ndef f(x):\n    s = "# not a comment"\n    return x + 1'


def test_the_code_hash_of_a_kernel_module_covers_the_ops_modules_it_imports_and_nothing_else(tmp_path):
    imports = {p.name for p in tuning._imports(tuning.OPS / "triton_gemv.py")}
    assert {"common.py", "gemv_candidates.py", "triton_gemv_tiles.py", "graph_timing.py"} <= imports
    assert not {"tuning.py", "__init__.py", "triton_replay.py"} & imports
    mod = tmp_path / "kernels.py"
    mod.write_text("from mamballama_cli.ops import tuning, common\nfrom mamballama_cli import ops\n\n"
                   "def k():\n    from mamballama_cli.ops.triton_gemv_tiles import _tiles\n    return _tiles\n")
    assert tuning._imports(mod) == {tuning.OPS / "common.py", tuning.OPS / "triton_gemv_tiles.py"}
    first = tuning.code_hash(str(mod))
    mod.write_text(mod.read_text() + "# a comment\n")
    tuning.code_hash.cache_clear()
    assert tuning.code_hash(str(mod)) == first
    mod.write_text(mod.read_text().replace("return _tiles", "return None"))
    tuning.code_hash.cache_clear()
    assert tuning.code_hash(str(mod)) != first


def test_code_run_from_no_file_registers_and_its_entries_are_left_out_of_the_table(clean, tmp_path):
    made = _tuner()
    made.cache[(4096, "torch.bfloat16")] = made.configs[0]
    def register(name, tuner):
        tuning.register_tuner(name, tuner)

    fileless = FunctionType(register.__code__, {"tuning": tuning})  # globals without __file__, as `python -c` has
    fileless("script", made)
    tuning.register_tuner("gemv", _tuner())
    tuning.TUNERS["gemv"].cache[(1, "torch.bfloat16")] = made.configs[1]
    assert "script" in tuning.TUNERS and ("tuners", "script") not in tuning.SOURCES
    path = tmp_path / "tuning.json"
    tuning.save(path)
    table = json.loads(path.read_text())
    assert set(table["code"]["tuners"]) == {"gemv"}
    fresh = _tuner()
    tuning.TUNERS.clear()
    tuning.use(path)
    fileless("script", fresh)
    assert fresh.cache == {} and tuning.report()["code_changed"] == ["script"]
