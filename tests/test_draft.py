"""`convert TEACHER --draft-layers`: a shrunk Transformer draft cut from teacher layers."""

import json

import pytest
import torch

from clihelp import run_cli
from helpers import save_teacher, tiny_llama


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher"), model=tiny_llama(seed=1, layers=4, tie=True))


def test_draft_layers_cut_a_loadable_transformer_of_the_teachers_architecture(teacher_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    out = tmp_path / "draft"
    r = run_cli(["convert", teacher_dir, "--draft-layers", "0,3", "--output", out, "--json"], capsys)
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["kind"] == "draft" and summary["draft_layers"] == [0, 3] and summary["num_layers"] == 2
    assert {"config.json", "model.safetensors", "tokenizer.json", "convert_summary.json"} <= {p.name for p in out.iterdir()}

    draft = AutoModelForCausalLM.from_pretrained(out)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert type(draft) is LlamaForCausalLM and draft.config.num_hidden_layers == 2
    tsd, dsd = teacher.state_dict(), draft.state_dict()
    for new, old in ((0, 0), (1, 3)):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(dsd[f"model.layers.{new}.{name}"], tsd[f"model.layers.{old}.{name}"])
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(dsd[name], tsd[name])
    assert draft.config.tie_word_embeddings and torch.equal(draft.lm_head.weight, teacher.lm_head.weight)

    # It computes exactly the teacher with the other layers removed.
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[0], teacher.model.layers[3]])
    teacher.config.num_hidden_layers = 2
    for i, layer in enumerate(teacher.model.layers):
        layer.self_attn.layer_idx = i
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(draft(ids).logits, teacher(ids).logits, atol=1e-5)


@pytest.mark.parametrize("layers,msg", [("0,9", "out of range"), ("1,1", "repeated"), ("", "at least one"),
                                        ("a", "not a layer index")])
def test_bad_draft_layers(teacher_dir, tmp_path, capsys, layers, msg):
    r = run_cli(["convert", teacher_dir, "--draft-layers", layers, "--output", tmp_path / "o"], capsys)
    assert r.code == 2 and msg in r.err and r.err.startswith("error: --draft-layers")
    assert not (tmp_path / "o").exists()


def test_draft_layers_refuse_attn_layers_and_a_non_empty_output(teacher_dir, tmp_path, capsys):
    r = run_cli(["convert", teacher_dir, "--draft-layers", "0", "--attn-layers", "1", "--output", tmp_path / "o"],
                capsys)
    assert r.code == 2 and "--attn-layers" in r.err
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run_cli(["convert", teacher_dir, "--draft-layers", "0", "--output", out], capsys)
    assert r.code == 2 and "--force" in r.err and (out / "keep.txt").exists()
