"""Built-in teacher families beyond Llama (Mistral, Qwen2): ratio 1.0 reproduces the teacher exactly, the
family-specific parts (sliding window, q/k/v biases) are really in effect, and the CLI picks the family."""

from __future__ import annotations

import json

import pytest
import torch

from clihelp import run_cli
from helpers import TINY_TEACHER, tiny_tokenizer
from mamballama_cli.convert.converter import convert_model
from mamballama_cli.errors import MamballamaError

def _randomise(model, seed):
    """Non-trivial norms and biases (the default init zeroes biases, which would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_mistral(sliding_window=16, n_heads=4, n_kv=2, tie=False, seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        sliding_window=sliding_window,
        tie_word_embeddings=tie,
        **TINY_TEACHER,
    )
    return _randomise(MistralForCausalLM(cfg), seed)


def tiny_qwen2(n_heads=4, n_kv=2, tie=False, seed=0, **kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        num_attention_heads=n_heads, num_key_value_heads=n_kv, tie_word_embeddings=tie, **TINY_TEACHER, **kw
    )
    return _randomise(Qwen2ForCausalLM(cfg), seed)


IDS = torch.randint(0, 96, (2, 60), generator=torch.Generator().manual_seed(0))


def logit_diff(a, b, ids=IDS) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


@pytest.mark.parametrize("n_heads,n_kv,tie", [(4, 2, False), (8, 2, True)])
def test_mistral_ratio_one_identity_with_sliding_window(n_heads, n_kv, tie):
    teacher = tiny_mistral(sliding_window=16, n_heads=n_heads, n_kv=n_kv, tie=tie, seed=n_heads)
    student, report = convert_model(teacher, list(range(4)), dtype=torch.float32)
    assert report.family == "mistral" and student.config.sliding_window == 16
    assert logit_diff(student, teacher) <= 1e-5
    # The window is really in effect over these 60 tokens: without it the hybrid leaves the teacher.
    unwindowed, _ = convert_model(
        teacher, list(range(4)), dtype=torch.float32, config_overrides={"sliding_window": None}
    )
    assert logit_diff(unwindowed, teacher) > 1e-3


def test_mistral_without_window_and_hybrid_layers():
    teacher = tiny_mistral(sliding_window=None, seed=3)
    student, _ = convert_model(teacher, list(range(4)), dtype=torch.float32)
    assert student.config.sliding_window is None and logit_diff(student, teacher) <= 1e-5
    hybrid, report = convert_model(teacher, [1, 3], dtype=torch.float32)
    assert report.dropped == [] and hybrid.config.mamba_layers == [0, 2]


@pytest.mark.parametrize("n_heads,n_kv,tie", [(4, 4, False), (4, 2, True), (8, 2, False)])
def test_qwen2_ratio_one_identity_with_qkv_biases(n_heads, n_kv, tie):
    teacher = tiny_qwen2(n_heads=n_heads, n_kv=n_kv, tie=tie, seed=n_heads + n_kv)
    student, report = convert_model(teacher, list(range(4)), dtype=torch.float32)
    cfg = student.config
    assert report.family == "qwen2" and cfg.attention_qkv_bias and not cfg.attention_out_bias
    assert logit_diff(student, teacher) <= 1e-5
    # The biases matter: the same teacher without them computes something else.
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.k_proj.bias.zero_()
            layer.self_attn.q_proj.bias.zero_()
    assert logit_diff(student, teacher) > 1e-3


def test_qwen2_mamba_layers_drop_the_biases_attention_layers_keep_them():
    teacher = tiny_qwen2(seed=5)
    student, report = convert_model(teacher, [1, 3], dtype=torch.float32)
    expected = sorted(f"model.layers.{i}.self_attn.{p}_proj.bias" for i in (0, 2) for p in "qkv")
    assert sorted(report.dropped) == expected
    assert student.model.layers[0].mamba.in_proj.bias is None
    t, s = teacher.model.layers[1].self_attn, student.model.layers[1].self_attn
    for p in "qkv":
        assert torch.equal(getattr(s, f"{p}_proj").bias, getattr(t, f"{p}_proj").bias)
    assert s.o_proj.bias is None
    m, tl = student.model.layers[2].mamba, teacher.model.layers[2].self_attn
    sl = m.in_proj_slices()
    assert torch.equal(m.in_proj.weight[sl["B"]], tl.k_proj.weight)


def test_qwen2_sliding_window_all_layers_kept_mixed_refused():
    teacher = tiny_qwen2(seed=2, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    student, _ = convert_model(teacher, list(range(4)), dtype=torch.float32)
    assert student.config.sliding_window == 16 and logit_diff(student, teacher) <= 1e-5
    mixed = tiny_qwen2(seed=2, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    with pytest.raises(MamballamaError, match=r"sliding-window attention in layers 2\.\.3 only"):
        convert_model(mixed, list(range(4)), dtype=torch.float32)


@pytest.mark.parametrize("builder,family", [(tiny_mistral, "mistral"), (tiny_qwen2, "qwen2")])
def test_convert_cli_picks_the_family(builder, family, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    teacher = builder(seed=1)
    teacher.save_pretrained(tmp_path / "t", safe_serialization=True)
    tiny_tokenizer(96).save_pretrained(tmp_path / "t")
    r = run_cli(["convert", tmp_path / "t", "--ratio", "1.0", "--output", tmp_path / "h", "--json"], capsys)
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["family"] == family and summary["teacher"]["model_type"] == family
    hybrid = AutoModelForCausalLM.from_pretrained(tmp_path / "h", dtype=torch.float32).eval()
    assert logit_diff(hybrid, teacher) <= 1e-5


def test_unsupported_model_type_lists_every_family(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(d)
    r = run_cli(["convert", d, "--output", tmp_path / "o"], capsys)
    assert r.code == 1
    for name in ("llama (llama)", "mistral (mistral)", "qwen2 (qwen2)"):
        assert name in r.err
