"""The hybrid as a transformers model: cached decoding, generate, padding, save/load, registration."""

import subprocess
import sys

import pytest
import torch

from helpers import assert_left_padding_changes_nothing, decode_with_cache, tiny_hybrid


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("attn_layers", [(1, 3), ()])
def test_cached_step_by_step_equals_parallel_forward(n_heads, n_kv, attn_layers):
    student, _ = tiny_hybrid(attn_layers=attn_layers, n_heads=n_heads, n_kv=n_kv)
    student.config.mamba_chunk_size = 8
    for layer in student.model.layers:
        if not layer.is_attention:
            layer.mamba.chunk_size = 8
    prompt = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    steps = 32
    with torch.no_grad():
        # greedy decoding with the cache, one token at a time
        logits_steps, tokens, cache = decode_with_cache(student, prompt, steps)
        cached = torch.cat(logits_steps, 1)
        # the same sequence in one parallel forward
        parallel = student(tokens).logits
    assert (cached - parallel).abs().max().item() <= 1e-4
    assert torch.equal(cached.argmax(-1), parallel.argmax(-1))
    assert cache.seqlen == tokens.shape[1]


def test_generate_greedy_matches_manual_argmax_and_sampling_is_seeded():
    student, _ = tiny_hybrid()
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        g = student.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        x = prompt
        for _ in range(20):
            x = torch.cat([x, student(x).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(g, x)
    torch.manual_seed(5)
    s1 = student.generate(prompt, max_new_tokens=15, do_sample=True, temperature=1.0, top_p=0.9,
                          eos_token_id=None, pad_token_id=0)
    torch.manual_seed(5)
    s2 = student.generate(prompt, max_new_tokens=15, do_sample=True, temperature=1.0, top_p=0.9,
                          eos_token_id=None, pad_token_id=0)
    assert torch.equal(s1, s2) and s1.shape[1] == 21


def test_left_padded_batch_equals_individual_sequences():
    student, _ = tiny_hybrid()
    assert_left_padding_changes_nothing(student, new_tokens=12)


def test_save_then_auto_load_gives_identical_logits_and_no_pickle(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    student, _ = tiny_hybrid()
    student.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert cfg.model_type == "mamballama" and cfg.attn_layers == [1, 3]
    assert cfg.teacher["family"] == "llama"
    assert cfg.mamba_n_heads == 4 and cfg.mamba_n_groups == 2 and cfg.mamba_d_state == 16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (2, 13))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


def test_import_registers_lazily_without_torch(tmp_path):
    student, _ = tiny_hybrid()
    student.save_pretrained(tmp_path)
    code = (
        "import sys, mamballama_cli\n"
        "assert 'torch' not in sys.modules, 'importing mamballama_cli must not import torch'\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "print(type(m).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "MamballamaForCausalLM"


def test_gradients_flow_through_every_parameter():
    student, _ = tiny_hybrid()
    student.train()
    ids = torch.randint(0, 96, (2, 20))
    loss = student(ids, labels=ids).loss
    loss.backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_rmsnorm_casts_once_under_autocast_without_changing_the_forward(monkeypatch):
    """Under autocast the norm hands its consumers (all projections) the autocast dtype directly."""
    from helpers import tiny_hybrid

    from mamballama_cli import ops
    from mamballama_cli.models import modeling

    model, _ = tiny_hybrid(seed=0)
    ids = torch.randint(3, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    norm = model.model.layers[0].input_layernorm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(torch.randn(2, 3, norm.weight.shape[0])).dtype == torch.bfloat16
        fast = model(ids).logits
    assert norm(torch.randn(2, 3, norm.weight.shape[0])).dtype == torch.float32  # no autocast: no cast
    monkeypatch.setattr(modeling.RMSNorm, "forward", lambda self, x: ops.rmsnorm(x, self.weight, self.variance_epsilon))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(ids).logits
    assert torch.equal(fast, plain)
