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


def test_eval_speed_usage_errors(capsys):
    res = run_cli(["eval", "speed"], capsys)
    assert res.code != 0 and "--shape" in res.err
    res = run_cli(["eval", "speed", "--shape", "llama3-8"], capsys)
    assert res.code != 0 and "did you mean 'llama3-8b'" in res.err
    res = run_cli(["eval", "speed", "--shape", "tiny", "--batch-sizes", "1,x"], capsys)
    assert res.code != 0 and "--batch-sizes" in res.err
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
