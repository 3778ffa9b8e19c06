"""Conversion: exact identity at ratio 1.0, the attention -> Mamba mapping, placement, leftovers."""

import pytest
import torch

from helpers import assert_mixer_holds_attention, tiny_hybrid, tiny_llama
from mamballama_cli.convert.converter import ConversionError, convert_model
from mamballama_cli.convert.placement import attention_layers_for_ratio, parse_layer_list
from mamballama_cli.errors import UsageError


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (8, 2)])  # GQA group sizes 1, 2, 4
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_ratio_one_reproduces_teacher_logits(n_heads, n_kv, tie, rope):
    teacher = tiny_llama(n_heads=n_heads, n_kv=n_kv, tie=tie, rope=rope, seed=n_heads + n_kv)
    student, _ = convert_model(teacher, attention_layers_for_ratio(4, 1.0), dtype=torch.float32)
    # long enough that llama3 scaling (original context 32) changes the rotary tables
    ids = torch.randint(0, teacher.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (student(ids).logits - teacher(ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert student.config.tie_word_embeddings == tie
    if tie:
        assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()


def test_llama3_rope_tables_match_transformers():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from mamballama_cli.models.rope import RotaryEmbedding

    teacher = tiny_llama(rope="llama3")
    ours = RotaryEmbedding(teacher.config.rope_parameters, teacher.config.head_dim)
    theirs = LlamaRotaryEmbedding(teacher.config)
    pos = torch.arange(200)[None]
    x = torch.zeros(1, 200, 4)
    c1, s1 = ours(pos, torch.float32)
    c2, s2 = theirs(x, pos)
    assert torch.allclose(c1, c2, atol=1e-6) and torch.allclose(s1, s2, atol=1e-6)
    # and the scaling really changes something relative to plain RoPE
    plain = RotaryEmbedding({"rope_type": "default", "rope_theta": 500000.0}, teacher.config.head_dim)
    assert not torch.allclose(plain(pos, torch.float32)[0], c1, atol=1e-3)


@pytest.mark.parametrize("n_heads,n_kv", [(4, 2), (8, 2)])
def test_mamba_layers_hold_the_teachers_attention_weights(n_heads, n_kv):
    student, teacher = tiny_hybrid(attn_layers=[3], n_heads=n_heads, n_kv=n_kv)
    tsd = teacher.state_dict()
    for i in (0, 1, 2):
        mixer = assert_mixer_holds_attention(student, tsd, i)
        # fresh parts follow design.md: D = 1, A in [-16, -1], dt in [1e-3, 1e-1]
        assert torch.all(mixer.D == 1)
        A = -torch.exp(mixer.A_log)
        assert torch.all((A <= -1) & (A >= -16))
        dt = torch.nn.functional.softplus(mixer.dt_bias)
        assert torch.all((dt >= 1e-3 - 1e-6) & (dt <= 1e-1 + 1e-6))
    assert torch.equal(student.model.embed_tokens.weight, tsd["model.embed_tokens.weight"])
    assert torch.equal(student.model.norm.weight, tsd["model.norm.weight"])
    assert torch.equal(student.lm_head.weight, tsd["lm_head.weight"])


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (8, 2)])
def test_degenerate_mamba_layer_is_unnormalised_causal_linear_attention(n_heads, n_kv):
    """decay 1 (A = 0), dt = 1, identity conv, no gate/norm, D = 0 -> linear attention with W_Q, W_K, W_V, W_O."""
    from mamballama_cli.convert.converter import convert_model

    teacher = tiny_llama(n_heads=n_heads, n_kv=n_kv, seed=7)
    student, _ = convert_model(teacher, [3], dtype=torch.float64,
                               config_overrides=dict(mamba_activation="identity", mamba_gated_norm=False,
                                                     mamba_chunk_size=4))
    student = student.double()
    mixer = student.model.layers[0].mamba
    with torch.no_grad():
        mixer.A_log.fill_(float("-inf"))  # A = -exp(-inf) = 0: no decay
        s = mixer.in_proj_slices()
        mixer.in_proj.weight[s["dt"]] = 0.0
        mixer.dt_bias.fill_(torch.log(torch.expm1(torch.tensor(1.0, dtype=torch.float64))).item())  # softplus = 1
        mixer.conv1d.weight.zero_()
        mixer.conv1d.weight[:, 0, -1] = 1.0  # identity: output t = input t
        mixer.conv1d.bias.zero_()
        mixer.D.zero_()
    h = torch.randn(2, 11, teacher.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        out = mixer(h)
    att = teacher.model.layers[0].self_attn
    d = teacher.config.head_dim
    q = (h @ att.q_proj.weight.double().T).view(2, 11, n_heads, d)
    k = (h @ att.k_proj.weight.double().T).view(2, 11, n_kv, d).repeat_interleave(n_heads // n_kv, dim=2)
    v = (h @ att.v_proj.weight.double().T).view(2, 11, n_kv, d).repeat_interleave(n_heads // n_kv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()  # no softmax, no scaling, causal
    o = torch.einsum("bhts,bshd->bthd", scores, v).reshape(2, 11, n_heads * d)
    expect = o @ att.o_proj.weight.double().T
    assert ((out - expect).norm() / expect.norm()).item() < 1e-10


def test_placement_matches_design():
    assert attention_layers_for_ratio(32, 0.5) == list(range(1, 32, 2))
    assert attention_layers_for_ratio(32, 0.25) == list(range(3, 32, 4))
    assert attention_layers_for_ratio(32, 0.125) == [7, 15, 23, 31]
    assert attention_layers_for_ratio(32, 0.0) == []
    assert attention_layers_for_ratio(30, 1.0) == list(range(30))
    assert attention_layers_for_ratio(30, 0.5)[-1] == 29
    with pytest.raises(UsageError, match="outside"):
        attention_layers_for_ratio(32, 1.5)
    assert parse_layer_list("3, 7,11", 32) == [3, 7, 11]
    assert parse_layer_list("none", 32) == []
    with pytest.raises(UsageError, match="out of range"):
        parse_layer_list("3,40", 32)
    with pytest.raises(UsageError, match="repeated"):
        parse_layer_list("3,3", 32)


def test_unconsumed_teacher_tensor_is_reported_by_name():
    teacher = tiny_llama()
    teacher.model.layers[0].register_buffer("mystery_scale", torch.ones(3))  # persistent, unknown to the table
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mystery_scale"):
        convert_model(teacher, [1, 3])


def test_missing_required_teacher_tensor_is_reported():
    teacher = tiny_llama()
    del teacher.model.layers[2].mlp.up_proj  # teacher without the up projection
    teacher.model.layers[2].mlp.up_proj = None
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        convert_model(teacher, [3])


def test_all_mamba_and_summary_memory_accounting():
    from mamballama_cli.convert.converter import conversion_summary

    student, teacher = tiny_hybrid(attn_layers=[])
    assert student.config.attn_layers == [] and len(student.config.mamba_layers) == 4
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert torch.isfinite(student(ids).logits).all()
    from mamballama_cli.convert.converter import ConversionReport

    summary = conversion_summary(teacher, student, ConversionReport("llama", [], [0, 1, 2, 3]), torch.bfloat16, 0.0)
    mem = summary["state_memory"]
    assert mem["hybrid_kv_bytes_per_token"] == 0
    # teacher: 4 layers * 2 (K,V) * 2 kv heads * 16 head dim * 2 bytes
    assert mem["teacher_kv_bytes_per_token"] == 4 * 2 * 2 * 16 * 2
    state = summary["state_memory"]["hybrid_fixed_state_bytes_per_sequence"]
    cache_bytes = sum(t.numel() * t.element_size()
                      for layer in student.model.layers
                      for t in layer.mamba.allocate_state(1, torch.bfloat16, "cpu").values())
    assert state == cache_bytes
