"""`mamballama eval speed` and `mamballama env` through the real CLI, on a tiny random shape on CPU."""

import json

from clihelp import run_cli


def test_eval_speed_tiny_shape_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    res = run_cli(["eval", "speed", "--shape", "tiny", "--device", "cpu", "--batch-sizes", "2",
                   "--prompt-tokens", "8", "--new-tokens", "4", "--contexts", "32", "--context-new-tokens", "3",
                   "--teacher-engines", "transformers,static", "--prefill-chunk", "5", "--output", out], capsys)
    assert res.code == 0, res.err
    assert "memory floor, hybrid" in res.out and "copy bandwidth" in res.out
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert not [r for r in rows if "error" in r]
    engines = {(r["section"], r["model"], r["engine"]) for r in rows}
    for section in ("decode", "context"):
        assert (section, "hybrid", "static-eager") in engines
        assert (section, "teacher", "transformers-eager") in engines
        assert (section, "teacher", "static-eager") in engines
    for r in rows:
        assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0
        assert abs(r["aggregate_tok_s"] - r["batch"] * r["decode_tok_s"]) < 1e-6 * r["aggregate_tok_s"]
    # tiny: 4 layers, --ratio 0.25 keeps attention in layer 3 only: a quarter of the teacher's K/V
    by = {(r["section"], r["model"], r["engine"], r["batch"], r["prompt_tokens"]): r for r in rows}
    hyb = by[("context", "hybrid", "static-eager", 1, 32)]
    tea = by[("context", "teacher", "transformers-eager", 1, 32)]
    assert hyb["kv_bytes"] * 4 == tea["kv_bytes"] == by[("context", "teacher", "static-eager", 1, 32)]["kv_bytes"]
    # three Mamba layers: conv window (3 x 128 channels: x 32, B 32, C 64) + SSM state (4 heads x 16 x 16),
    # float32
    assert hyb["state_bytes"] == 3 * (3 * 128 * 4 + 4 * 16 * 16 * 4)
    s = data["summary"]
    assert s["context"] == 32
    assert abs(s["cache_ratio"] - (hyb["kv_bytes"] + hyb["state_bytes"]) / tea["kv_bytes"]) < 1e-12
    floor = data["floor"]
    assert floor["copy_bandwidth_bytes_per_s"] > 0
    assert floor["hybrid"]["tok_s_read_weights"] >= floor["hybrid"]["tok_s_all_weights"] > 0
    assert data["models"]["attn_layers"] == [3]


def test_eval_speed_max_batch_finds_the_largest_batch_per_context_and_keeps_failures(tmp_path, capsys):
    from mamballama_cli.evaluation.speed_limit import largest_batch

    # the search itself: doubling, then bisecting, on a known threshold
    for limit in (1, 5, 8, 13, 4096):
        best, row, probes = largest_batch(lambda b: {"b": b} if b <= limit else {"error": "no"})
        assert best == limit and row == {"b": limit}
        assert limit == 4096 or any(p["batch"] == limit + 1 and not p["ok"] for p in probes)
    assert largest_batch(lambda b: {"error": "no"})[0] == 0

    out = tmp_path / "mb.json"
    res = run_cli(["eval", "speed", "--shape", "tiny", "--device", "cpu", "--contexts", "32,64",
                   "--context-new-tokens", "3", "--max-batch", "--memory-limit", "0.004", "--output", out], capsys)
    assert res.code == 0, res.err
    data = json.loads(out.read_text())
    assert "partial" not in data
    rows = {(r["model"], r["prompt_tokens"]): r for r in data["rows"]}
    assert set(rows) == {(m, n) for m in ("hybrid", "teacher") for n in (32, 64)}
    for r in rows.values():  # the batch that fitted, and the next one did not (by the estimate)
        b = r["batch"]
        assert b >= 1 and r["engine"].startswith("static") and r["estimated_bytes"] <= r["budget_bytes"]
        assert r["synthetic_context"] is True and r["ttft_s"] is None  # decode at the context, no long prefill
        assert any(p["batch"] == b + 1 and "estimated" in p["error"] for p in r["probes"] if not p["ok"])
    for m in ("hybrid", "teacher"):
        assert rows[(m, 64)]["batch"] <= rows[(m, 32)]["batch"]
    cell = data["summary"]["max_batch"]["32"]
    assert cell["hybrid"]["batch"] == rows[("hybrid", 32)]["batch"] and "hybrid_over_teacher" in cell
    assert "largest batch at 32 tokens" in res.out

    # a budget that batch 1 of one cell does not fit: that row is an error, the others are kept
    res = run_cli(["eval", "speed", "--shape", "tiny", "--device", "cpu", "--contexts", "32,64",
                   "--context-new-tokens", "3", "--max-batch", "--memory-limit", "0.0012", "--output", out], capsys)
    assert res.code == 0, res.err
    rows = json.loads(out.read_text())["rows"]
    failed = [r for r in rows if "error" in r]
    assert failed and all(r["batch"] == 0 and r["error"].startswith("batch 1 does not fit") for r in failed)
    assert len(rows) == 4 and len(failed) < 4


def test_eval_speed_usage_errors(capsys):
    res = run_cli(["eval", "speed"], capsys)
    assert res.code != 0 and "--shape" in res.err
    res = run_cli(["eval", "speed", "--shape", "llama3-8"], capsys)
    assert res.code != 0 and "did you mean 'llama3-8b'" in res.err
    res = run_cli(["eval", "speed", "--shape", "tiny", "--batch-sizes", "1,x"], capsys)
    assert res.code != 0 and "--batch-sizes" in res.err
    res = run_cli(["eval", "speed", "--shape", "tiny", "--max-batch", "--contexts", ""], capsys)
    assert res.code != 0 and "--max-batch" in res.err and len(res.err.strip().splitlines()) == 1
    res = run_cli(["eval", "speed", "--shape", "tiny", "--max-batch", "--memory-limit", "-1"], capsys)
    assert res.code != 0 and "--memory-limit -1" in res.err
    res = run_cli(["eval", "speed", "--shape", "tiny", "--prefill-chunk", "0"], capsys)
    assert res.code != 0 and "--prefill-chunk 0" in res.err and len(res.err.strip().splitlines()) == 1


def test_env_reports_versions_devices_and_backends(capsys):
    res = run_cli(["env"], capsys)
    assert res.code == 0, res.err
    assert "torch" in res.out and "devices:" in res.out and "ssd_scan" in res.out
    res = run_cli(["env", "--json", "--device", "cpu"], capsys)
    report = json.loads(res.out)
    ops = {r["op"]: r for r in report["ops"]}
    for op in ("ssd_scan", "ssm_step", "rmsnorm_gated", "causal_conv1d", "ssm_step_gated", "decode_attention"):
        assert ops[op]["backend"] == "torch-ref" and "CPU" in ops[op]["why"]
    assert report["versions"]["torch"] and report["devices"][0]["device"] == "cpu"


def test_synthetic_context_decodes_at_the_full_position_without_reading_the_prompt():
    """run_static(synthetic=True): a short prompt is read, then decoding continues at position prompt_len
    (what --max-batch measures: decode cost at a long context without minutes of prefill per probe)."""
    from helpers import tiny_hybrid
    from mamballama_cli.evaluation import speed

    model, _ = tiny_hybrid(attn_layers=(1,), seed=0)
    calls = []
    from mamballama_cli.generation import fast

    class Spy(fast.StaticDecoder):
        def decode(self, steps, **kw):
            calls.append(int(self.pos))
            return super().decode(steps, **kw)

    orig = fast.StaticDecoder
    fast.StaticDecoder = Spy
    try:
        row = speed.run_static(model, 2, 300, 4, graphs=False, seed=0, synthetic=True)
    finally:
        fast.StaticDecoder = orig
    assert row["synthetic_context"] is True and row["ttft_s"] is None and row["prompt_tokens"] == 300
    assert calls == [speed.SYNTHETIC_PROMPT, 300]  # the warm-up after the short prompt; the timed run at 300
    assert row["decode_tok_s"] > 0
