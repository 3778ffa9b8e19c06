"""The verify window's A/B switches (``benchmarks/speculative_verify.py --no-spec-conv --no-replay-trigger
--replay-norm-margin --no-paired-glu``, gpu_session.sh ``verifync``, ``verifynt``, ``verifynp``, ``verifyold``): each option sets the switch the
kernels read, the JSON records them, a bad margin is a one-line error, and the replay kernel's trigger follows its
switch."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import NEEDS_TRITON

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("speculative_verify", ROOT / "benchmarks" / "speculative_verify.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@NEEDS_TRITON
def test_each_option_sets_its_switch_and_the_json_says_which(monkeypatch):
    from mamballama_cli.ops import replay_tiles, triton_gemv, triton_gemv_conv, triton_replay
    from mamballama_cli.ops.gemv_candidates import GLU_TILES, PAIRED_TILES, tile_name

    for mod, name in ((triton_gemv_conv, "SPEC_CONV"), (triton_replay, "EARLY_TRIGGER"),
                      (replay_tiles, "NORM_IN_KERNEL_MARGIN")):
        monkeypatch.setattr(mod, name, getattr(mod, name))  # restored after the test
    tuner = triton_gemv._skinny_glu_tuned
    monkeypatch.setattr(tuner, "configs", list(tuner.configs))  # restored after the test
    assert len(tuner.configs) == len(GLU_TILES)
    sv = _script()
    args = SimpleNamespace(no_spec_conv=False, no_replay_trigger=False, replay_norm_margin=None, no_paired_glu=False)
    assert sv.window_switches(args) == {"replay_norm_margin": 0.05, "spec_conv": True, "replay_trigger": True,
                                        "paired_glu": True}
    args = SimpleNamespace(no_spec_conv=True, no_replay_trigger=True, replay_norm_margin=0.0, no_paired_glu=True)
    assert sv.window_switches(args) == {"replay_norm_margin": 0.0, "spec_conv": False, "replay_trigger": False,
                                        "paired_glu": False}
    assert not triton_gemv_conv.SPEC_CONV and not triton_replay.EARLY_TRIGGER
    names = {tile_name(c) for c in tuner.configs}  # the dot tiles stay, the paired ones are gone
    assert names == {",".join(map(str, t)) for t in GLU_TILES if t not in PAIRED_TILES}
    assert replay_tiles.NORM_IN_KERNEL_MARGIN == 0.0
    # margin 0: the fastest replay tile, though a split-norm tile is within 5% of it
    plain, split = (32, 4, 2), (32, 4, 2, 1)
    assert replay_tiles._pick([plain, split], {plain: 10.0, split: 10.1}) == plain
    for bad in (-0.1, 1.0):
        with pytest.raises(SystemExit, match=f"--replay-norm-margin {bad}: give a share in"):
            sv.window_switches(SimpleNamespace(no_spec_conv=False, no_replay_trigger=False, replay_norm_margin=bad,
                                               no_paired_glu=False))


@NEEDS_TRITON
def test_the_replay_kernel_triggers_early_only_with_its_switch_on_and_where_the_device_can(monkeypatch):
    import torch

    from mamballama_cli.ops import triton_replay

    t = torch.zeros(1)
    assert not triton_replay._trigger(t)  # the CPU: no grid dependency control
    monkeypatch.setattr(triton_replay, "_gdc_on", lambda t: True)  # as on an sm90 GPU
    assert triton_replay._trigger(t)
    monkeypatch.setattr(triton_replay, "EARLY_TRIGGER", False)
    assert not triton_replay._trigger(t)


def test_the_script_takes_the_options_and_gpu_session_names_the_steps():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speculative_verify.py"), "--help"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    for option in ("--no-spec-conv", "--no-replay-trigger", "--replay-norm-margin", "--no-paired-glu", "--no-replay-call"):
        assert option in out.stdout
    session = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    assert 'verifyold) ab="--no-spec-conv --no-replay-trigger --replay-norm-margin 0 --no-paired-glu"' in session
    assert 'verifynp) ab="--no-paired-glu"' in session
    assert 'verifyr) ab="--no-replay-call"' in session


def test_a_run_cut_short_after_the_parts_keeps_them_in_its_json(tmp_path, monkeypatch):
    """The JSON is written once the parts are timed (``complete: false``), before the end-to-end loop, which
    compiles more and which a session's deadline may interrupt (2026-12-06: a cold H100 run timed its parts, then
    was stopped in the draft's autotuning and left no JSON); a finished run rewrites it whole (``complete: true``)."""
    sv = _script()
    out = tmp_path / "verify.json"

    def interrupted(*args, **kwargs):
        assert json.loads(out.read_text())["complete"] is False  # the parts are on disk before the loop starts
        raise KeyboardInterrupt

    from mamballama_cli.generation import speculative

    monkeypatch.setattr(speculative, "speculative_generate", interrupted)  # main() imports it from there
    argv = ["speculative_verify.py", "--shape", "tiny", "--device", "cpu", "--iters", "2", "--context", "16",
            "--loop-tokens", "4", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(KeyboardInterrupt):
        sv.main()
    got = json.loads(out.read_text())
    assert got["complete"] is False and got["loop"] is None and got["verify_step_ms"] > 0
    # the ratio is rounded from the unrounded times, so the stored (4-decimal) times give it to within 0.001
    assert got["verify_over_plain"] == pytest.approx(got["verify_step_ms"] / got["plain_step_ms"], abs=1.5e-3)
    assert not list(tmp_path.glob("*.tmp"))


def test_the_no_replay_call_is_timed_on_a_runner_of_its_own(tmp_path, monkeypatch):
    """``--no-replay-call`` times a K+1-token call that continues a window from the live state: the replay op runs
    without old steps (``read_old=False``), and the JSON gives its time beside the verify call's."""
    sv = _script()
    out = tmp_path / "verify.json"
    from mamballama_cli import ops
    from mamballama_cli.ops import replay  # noqa: F401  (registers the replay ops' references)

    seen = []
    real = ops.REFERENCES["ssm_replay_gated"]

    def spy(*args, **kwargs):
        seen.append((args[5].shape[1], kwargs.get("read_old", True)))  # (new steps, whether it replays old ones)
        return real(*args, **kwargs)

    monkeypatch.setitem(ops.REFERENCES, "ssm_replay_gated", spy)  # the CPU runs the references
    argv = ["speculative_verify.py", "--shape", "tiny", "--device", "cpu", "--iters", "2", "--context", "16",
            "--loop-tokens", "0", "--no-replay-call", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    sv.main()
    got = json.loads(out.read_text())
    assert got["complete"] is True and got["verify_step_ms_no_replay"] > 0
    assert got["no_replay_over_plain"] == pytest.approx(got["verify_step_ms_no_replay"] / got["plain_step_ms"],
                                                        abs=1.5e-3)
    assert (5, False) in seen and (5, True) in seen  # K = 4: the continuing call and the verify call
