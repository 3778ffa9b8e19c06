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


@pytest.mark.parametrize("args,msg", [
    (["--speculative"], "needs --draft"),
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
