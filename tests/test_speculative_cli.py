"""`generate TARGET --speculative --draft DRAFT` through the real CLI entry point."""

import json

import pytest

from clihelp import run_cli
from helpers import save_teacher, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A hybrid target converted from a tiny teacher, and a 2-layer draft cut from the same teacher."""
    root = tmp_path_factory.mktemp("pair")
    teacher = str(save_teacher(root / "teacher", model=tiny_llama(seed=3, layers=4)))
    from mamballama_cli.config import merge_config
    from mamballama_cli.convert import ConvertConfig, run_convert

    run_convert(merge_config(ConvertConfig, overrides=dict(teacher=teacher, attn_layers="3",
                                                           output=str(root / "target"))))
    run_convert(merge_config(ConvertConfig, overrides=dict(teacher=teacher, draft_layers="0,3",
                                                           output=str(root / "draft"))))
    return root


def test_speculative_greedy_prints_the_plain_greedy_text_and_writes_stats(pair, tmp_path, capsys):
    target, draft = pair / "target", pair / "draft"
    plain = run_cli(["generate", target, "--prompt", "hello world", "-n", "24"], capsys)
    assert plain.code == 0, plain.err
    stats_file = tmp_path / "spec.json"
    spec = run_cli(["generate", target, "--prompt", "hello world", "-n", "24", "--speculative", "--draft", draft,
                    "-k", "3", "--stats-json", stats_file], capsys)
    assert spec.code == 0, spec.err
    assert spec.out == plain.out  # lossless at temperature 0
    stats = json.loads(stats_file.read_text())
    assert stats["k"] == 3 and stats["new_tokens"] >= 1 and stats["matches_plain_greedy"] is True
    for key in ("acceptance_rate", "tokens_per_call", "tokens_per_s", "speedup", "plain", "rounds", "drafted"):
        assert key in stats
    assert stats["drafted"] == 3 * stats["rounds"]
    assert stats["draft_runner"] == "TransformersRunner" and stats["target_runner"] == "HybridRunner"
    assert "acceptance" in spec.err and "tokens/call" in spec.err and "speedup" in spec.err
    assert "acceptance" not in spec.out
    # the summary counts the target's calls as the JSON does: the prefill and one verify call per round
    assert stats["target_calls"] == stats["rounds"] + 1
    assert f"in {stats['target_calls']} target calls (prefill + {stats['rounds']} verify)" in spec.err, spec.err


def test_builtin_self_draft_accepts_everything_and_sampling_is_seeded(pair, tmp_path, capsys):
    target = pair / "target"
    stats_file = tmp_path / "s.json"
    r = run_cli(["generate", target, "--prompt", "abc", "-n", "16", "--draft", "self", "-k", "4",
                 "--no-compare-plain", "--stats-json", stats_file], capsys)
    assert r.code == 0, r.err
    stats = json.loads(stats_file.read_text())
    assert stats["acceptance_rate"] == 1.0 and "plain" not in stats and stats["draft"] == "self"
    args = ["generate", target, "--prompt", "abc", "-n", "12", "--draft", "self", "-t", "0.9", "--top-p", "0.9",
            "--seed", "4", "--no-compare-plain"]
    a, b = run_cli(args, capsys), run_cli(args, capsys)
    assert a.code == 0 and a.out == b.out


def _lossless_through_cli(pair, tmp_path, capsys, *extra) -> dict:
    """`generate --draft ... EXTRA` prints exactly the plain greedy text; returns its statistics JSON."""
    target, draft = pair / "target", pair / "draft"
    plain = run_cli(["generate", target, "--prompt", "hello world", "-n", "24"], capsys)
    stats_file = tmp_path / "s.json"
    r = run_cli(["generate", target, "--prompt", "hello world", "-n", "24", "--draft", draft, *extra,
                 "--stats-json", stats_file], capsys)
    assert r.code == 0, r.err
    assert r.out == plain.out  # lossless
    return {**json.loads(stats_file.read_text()), "_err": r.err}


def test_adaptive_k_through_the_cli(pair, tmp_path, capsys):
    stats = _lossless_through_cli(pair, tmp_path, capsys, "-k", "5", "--adaptive-k")
    assert stats["adaptive_k"] is True and stats["k"] == 5 and stats["matches_plain_greedy"] is True
    assert sum(stats["rounds_by_k"].values()) == stats["rounds"] and len(stats["acceptance_by_position"]) <= 5
    assert "k<=5 adaptive" in stats["_err"]


def test_round_graph_through_the_cli(pair, capsys, tmp_path):
    """--round-graph: the whole round on the device (run eagerly on CPU), lossless; refuses --adaptive-k."""
    stats = _lossless_through_cli(pair, tmp_path, capsys, "-k", "3", "--round-graph")
    assert stats["captured_round"] is True and stats["matches_plain_greedy"] is True
    assert stats["drafted"] == 3 * stats["row_rounds"] and stats["produced"] == stats["accepted"] + stats["row_rounds"]
    bad = run_cli(["generate", pair / "target", "--prompt", "hi", "--draft", pair / "draft", "--round-graph",
                   "--adaptive-k"], capsys)
    assert bad.code != 0 and "--adaptive-k" in bad.err and len(bad.err.strip().splitlines()) == 1, bad.err


def test_spec_eval_benchmark_compares_the_engines_over_held_out_prompts(pair, tmp_path):
    """benchmarks/spec_eval.py on CPU: plain, host-loop and captured-round decoding of the same prompts; in float32
    both speculative engines write exactly the plain greedy tokens."""
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "data"
    data.mkdir()
    (data / "prompts-heldout.jsonl").write_text(json.dumps({"prompt": "say hello"}) + "\n")
    (data / "text-heldout.jsonl").write_text("".join(json.dumps({"text": f"record {i} " + "abc def " * 40}) + "\n"
                                                     for i in range(2)))
    out = tmp_path / "spec.json"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "spec_eval.py"), str(pair / "target"), "--draft",
                        str(pair / "draft"), "-k", "3", "--data", str(data), "--prompts", "4", "--max-new-tokens", "6",
                        "--text-window", "24", "--device", "cpu", "--dtype", "float32", "--parts-iters", "2",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                          "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["prompts"] == 4 and set(res["engines"]) == {"plain", "loop", "round"}
    for name in ("loop", "round"):
        e = res["engines"][name]
        assert e["matches_plain"] == 4 and e["decode_tokens"] == 4 * 5 and "speedup" in e, e
        assert 0 <= e["acceptance_rate"] <= 1 and 1 <= e["tokens_per_call"] <= 4
        sim = e["simulated"]  # from the draft's teacher-forced agreement; its last round per prompt sees less
        assert 0 <= sim["agreement"] <= 1 and len(sim["accepted_hist"]) == 4 and sum(sim["accepted_hist"]) >= e["calls"]
    parts = res["parts"]  # a round's parts timed on their own (benchmarks/round_parts.py)
    assert parts["plain_step_ms"] > 0 and parts["draft_step_ms"] > 0 and set(parts["verify_step_ms"]) == {"1", "4"}
    assert parts["sum_ms"] == round(3 * parts["draft_step_ms"] + parts["verify_step_ms"]["4"], 4)
    assert parts["round_ms_end_to_end"] > 0 and parts["round_ms_replayed"] > 0  # eager rounds on CPU
    assert parts["round_ms_replayed_commit_ref"] > 0 and "commit A/B skipped" not in r.stderr
    assert parts["verify_backends"]["ssm_replay_gated"] == "torch-ref"  # on CPU the references run every op


def _acceptance(target_dir, draft_dir, shard_dir, n=8):
    """Mean greedy acceptance (k=4, 32 new tokens) on the first 64 prompt tokens of the last n samples."""
    from pathlib import Path

    import numpy as np
    import torch

    from mamballama_cli.generation.speculative import speculative_generate
    from mamballama_cli.loading import load_causal_lm
    from mamballama_cli.training.records import read_shard_dir

    target = load_causal_lm(str(target_dir), dtype="float32", device="cpu")[0]
    draft = load_causal_lm(str(draft_dir), dtype="float32", device="cpu")[0]
    sh = read_shard_dir(Path(shard_dir))[-1].shard
    rates = []
    for i in range(n):
        o, pl = int(sh.offsets[-2 - i]), int(sh.prompt_lens[-2 - i])
        prompt = torch.as_tensor(np.asarray(sh.tokens[o:o + min(pl, 64)], dtype=np.int64))[None]
        rates.append(speculative_generate(target, draft, prompt, k=4, max_new_tokens=32).stats.acceptance_rate)
    return sum(rates) / n


def test_distill_draft_template_raises_acceptance_on_the_targets_own_samples(pair, tmp_path, capsys):
    """templates/distill-draft.yaml: the target is the teacher, its own samples the data: the cut draft learns
    the target's distribution and the target keeps more of its proposals."""
    target, draft, samples = pair / "target", pair / "draft", tmp_path / "samples"
    r = run_cli(["data", "generate", target, "--prompts", "builtin", "--tokens", "120000", "--batch-size", "32",
                 "--max-new-tokens", "128", "--temperature", "0", "--output", samples], capsys)
    assert r.code == 0, r.err
    before = _acceptance(target, draft, samples)
    out = tmp_path / "draft2"
    r = run_cli(["distill", draft, "--teacher", target, "--template", "distill-draft", "--data", samples,
                 "--eval-data", samples, "--eval-every", "150", "--steps", "150", "--seq-len", "256",
                 "--micro-batch-size", "8", "--gradient-accumulation-steps", "1", "--output", out, "--json"], capsys)
    assert r.code == 0, r.err
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_kl" in x]
    assert evals[-1]["eval_kl"] < 0.7 * evals[0]["eval_kl"], evals
    after = _acceptance(target, out, samples)
    assert after > 2 * before and after > 0.02, (before, after)


def test_draft_from_the_plugin_registry(pair, capsys):
    from mamballama_cli import plugins
    from mamballama_cli.generation.drafts import DraftSpec
    from transformers import AutoModelForCausalLM

    calls = []

    def load(target_model, arg=None, **_):
        calls.append(arg)
        return AutoModelForCausalLM.from_pretrained(pair / "draft")

    plugins.drafts.register(DraftSpec(name="test-shrunk", description="test", load=load), origin="test")
    r = run_cli(["generate", pair / "target", "--prompt", "hi", "-n", "6", "--draft", "test-shrunk:xyz",
                 "--no-compare-plain"], capsys)
    assert r.code == 0, r.err
    assert calls == ["xyz"]


def test_speculative_alone_uses_the_gated_lookup_draft_at_k_6_and_a_model_draft_keeps_k_4(pair, tmp_path, capsys):
    """`generate --speculative` with no --draft decodes with DEFAULT_DRAFT (lookup:3:gate=2, no model) and -k 6,
    losslessly; a model draft without -k gets 4; the summary line names the draft."""
    from mamballama_cli.generation.speculative_run import DEFAULT_DRAFT

    target = pair / "target"
    plain = run_cli(["generate", target, "--prompt", "abc abc abc", "-n", "20"], capsys)
    stats_file = tmp_path / "s.json"
    r = run_cli(["generate", target, "--prompt", "abc abc abc", "-n", "20", "--speculative", "--stats-json",
                 stats_file], capsys)
    assert r.code == 0, r.err
    assert r.out == plain.out  # lossless at temperature 0
    stats = json.loads(stats_file.read_text())
    assert DEFAULT_DRAFT == "lookup:3:gate=2" and stats["draft"] == DEFAULT_DRAFT and stats["k"] == 6
    assert "step_rounds" in stats and f"draft {DEFAULT_DRAFT}, k=6" in r.err, r.err
    r = run_cli(["generate", target, "--prompt", "abc", "-n", "8", "--draft", pair / "draft", "--no-compare-plain",
                 "--stats-json", stats_file], capsys)
    assert r.code == 0 and json.loads(stats_file.read_text())["k"] == 4, r.err


@pytest.mark.parametrize("args,msg", [
    (["--speculative", "-k", "0"], "-k 0"),
    (["--draft", "self", "-k", "0"], "-k 0"),
    (["--draft", "no-such-provider"], "neither a checkpoint directory nor a draft provider"),
    (["--draft", "self", "--draft-runner", "magic"], "--draft-runner"),
])
def test_bad_speculative_options(pair, capsys, args, msg):
    r = run_cli(["generate", pair / "target", "--prompt", "hi", "-n", "4", *args], capsys)
    assert r.code == 2 and msg in r.err and r.err.strip().splitlines()[-1].startswith("error:"), r.err


def test_draft_with_another_vocabulary_is_refused(pair, tmp_path, capsys):
    other = save_teacher(tmp_path / "other", model=tiny_llama(seed=1, vocab=64), tokenizer=False)
    r = run_cli(["generate", pair / "target", "--prompt", "hi", "-n", "4", "--draft", other], capsys)
    assert r.code == 1 and "vocabulary" in r.err
