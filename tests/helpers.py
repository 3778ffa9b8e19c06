"""Builders for tiny teachers, hybrids and tokenizers used across the tests."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

VOCAB = 96
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class StandInGraph:
    """A CUDA graph's stand-in on a CPU: :meth:`record` runs the call once for its output's shape and undoes what
    it did (``before``: a recording runs nothing), and :meth:`replay` reruns the call into that output (a call
    that returns nothing, such as a decode step writing its own buffers, is just rerun)."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    @classmethod
    def record(cls, fn, before):
        out = fn()
        if out is not None:
            with torch.inference_mode(False):  # a real graph's replay writes its output whatever the mode
                out = out.clone()
        if before is not None:
            before()
        graph = cls(fn, out)
        return graph, out

    def replay(self):
        got = self.fn()
        if self.out is not None:
            self.out.copy_(got)

    def pool(self):
        return "pool"


def tiny_llama_config(n_heads=4, n_kv=2, tie=False, rope="default", layers=4, hidden=64, vocab=VOCAB, **kw):
    from transformers import LlamaConfig

    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    if rope == "llama3":
        rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=hidden // n_heads,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_parameters=rope_parameters,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1, **kw,
    )


# The size every tiny teacher of another family shares with the Llama one (tests name heads, ties, biases).
TINY_TEACHER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def seeded_teacher(model_cls, config, seed=0, bias_std=None):
    """``model_cls(config)`` in eval mode after ``torch.manual_seed(seed)``, with non-trivial norms (so that
    copying them is actually tested) and, with ``bias_std``, biases drawn from N(0, bias_std) (the default init
    zeroes them, which would test nothing)."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if bias_std is not None and name.endswith("bias"):
                p.normal_(0.0, bias_std)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def tiny_llama(seed=0, **kw):
    from transformers import LlamaForCausalLM

    return seeded_teacher(LlamaForCausalLM, tiny_llama_config(**kw), seed)


def tiny_tokenizer(vocab=VOCAB):
    """A byte-ish word-level tokenizer with ChatML specials and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab_map = {t: i for i, t in enumerate(specials)}
    for ch in chars:
        if len(vocab_map) >= vocab:
            break
        vocab_map.setdefault(ch, len(vocab_map))
    tok = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_teacher(dirpath: Path, model=None, tokenizer=True, **kw) -> Path:
    model = model if model is not None else tiny_llama(**kw)
    dirpath = Path(dirpath)
    model.save_pretrained(dirpath, safe_serialization=True)
    if tokenizer:
        tiny_tokenizer(model.config.vocab_size).save_pretrained(dirpath)
    return dirpath


def teacher_and_half_hybrid(root: Path) -> tuple[Path, Path]:
    """A tiny teacher saved under ``root`` and its 50% hybrid at ``root/h50`` (through the real convert path)."""
    from mamballama_cli.convert import ConvertConfig, run_convert

    teacher = save_teacher(root / "teacher", n_heads=4, n_kv=2)
    run_convert(ConvertConfig(teacher=str(teacher), output=str(root / "h50"), ratio=0.5))
    return teacher, root / "h50"


def tiny_hybrid(attn_layers=(1, 3), n_heads=4, n_kv=2, seed=0, mixer="mamba2", overrides=None, **kw):
    """A converted tiny hybrid (via the real converter) in float32 (``overrides``: hybrid config fields)."""
    from mamballama_cli.convert.converter import convert_model

    teacher = tiny_llama(seed=seed, n_heads=n_heads, n_kv=n_kv, **kw)
    student, _ = convert_model(teacher, list(attn_layers), mixer=mixer, dtype=torch.float32, seed=seed,
                               config_overrides=overrides)
    return student, teacher


def decode_with_cache(model, prompt, steps: int):
    """Greedy decoding of ``steps`` tokens after ``prompt``, one token at a time through the cache:
    (the logits of the prefill and of every step, a list; the tokens so far; the cache)."""
    from mamballama_cli.models.modeling import output_cache

    out = model(prompt, use_cache=True)
    cache = output_cache(out)
    logits, tokens = [out.logits], prompt
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        tokens = torch.cat([tokens, nxt], 1)
        out = model(nxt, past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        nxt = out.logits[:, -1:].argmax(-1)
    return logits, tokens, cache


def assert_left_padding_changes_nothing(model, new_tokens: int):
    """Greedy generation of a left-padded batch of two equals that of each sequence alone."""
    a = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(3))
    b = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)], 0)
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    greedy = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        g = model.generate(batch, attention_mask=mask, **greedy)
        ga = model.generate(a, **greedy)
        gb = model.generate(b, **greedy)
    assert torch.equal(g[0, 9:], ga[0, 9:])
    assert torch.equal(g[1, 9:], gb[0, 5:])


def assert_mixer_holds_attention(student, teacher_sd: dict, i: int):
    """Layer ``i``'s mixer holds the teacher's W_V, W_K, W_Q (in_proj rows x, B, C) and W_O, and the layer's
    norms and MLP are the teacher's; returns the mixer (for checks of its fresh parts)."""
    mixer = student.model.layers[i].mamba
    s = mixer.in_proj_slices()
    W = mixer.in_proj.weight
    pre = f"model.layers.{i}."
    assert torch.equal(W[s["x"]], teacher_sd[pre + "self_attn.v_proj.weight"])
    assert torch.equal(W[s["B"]], teacher_sd[pre + "self_attn.k_proj.weight"])
    assert torch.equal(W[s["C"]], teacher_sd[pre + "self_attn.q_proj.weight"])
    assert torch.equal(mixer.out_proj.weight, teacher_sd[pre + "self_attn.o_proj.weight"])
    ssd = student.state_dict()
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight"):
        assert torch.equal(ssd[pre + name], teacher_sd[pre + name]), name
    return mixer


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_chunked_scan_matches_sequential(sequential, chunked, inputs, chunk_size: int, initial_states, tol=1e-10):
    """A chunked reference scan (SSD or Mamba-1) gives the sequential recurrence's outputs and final state, from
    each of ``initial_states``; ``inputs`` is (x, dt, A, B, C, D, s0)."""
    x, dt, A, B, C, D, _ = inputs
    for init in initial_states:
        y_ref, s_ref = sequential(x, dt, A, B, C, D, initial_state=init)
        y, s = chunked(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=init)
        assert rel_err(y, y_ref) <= tol
        assert rel_err(s, s_ref) <= tol


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


# Prepended to scripts that run Triton kernels under TRITON_INTERPRET=1. Triton's interpreter holds scalars as
# 1-element arrays and calls int() on them for loop bounds that are runtime values, which numpy >= 2.3 refuses;
# this converts through reshape (interpreter only: compiled kernels are unaffected).
INTERPRETER_PATCH = r"""
import numpy as np
from triton.runtime import interpreter

_patch = interpreter._patch_lang_tensor
def _patched(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
interpreter._patch_lang_tensor = _patched
"""


# The head of a script run under the interpreter that needs the patch: argv[1] is this folder (tests/).
PATCHED_SCRIPT_HEAD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from helpers import INTERPRETER_PATCH
exec(INTERPRETER_PATCH)
"""

# pytestmark of the modules that run Triton kernels under the interpreter.
NEEDS_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def run_interpreted(script: str, *args: str, timeout: int = 300) -> str:
    """Run ``script`` in a fresh Python under Triton's interpreter and return its stdout (the variable must be set
    before triton is imported, hence the subprocess). A failing script fails the test with its stderr."""
    proc = subprocess.run([sys.executable, "-c", script, *args], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def interpreted_check(module: str, check: str, kernel: str, seeds=(0, 1)) -> list[int]:
    """Per seed, how many outputs the kernel launcher ``module.kernel`` gets wrong under the interpreter, as counted
    by ``module.check(fn, device, seed)`` against the op's reference (the check the kernel's probe runs on CUDA)."""
    out = run_interpreted(PATCHED_SCRIPT_HEAD + f"""
from {module} import {check} as check, {kernel} as kernel
print(*[check(kernel, "cpu", seed) for seed in {list(seeds)}])
""", str(Path(__file__).parent))
    return [int(x) for x in out.split()]


def write_heldout_text(data: Path, n: int = 2) -> Path:
    """A data folder holding only ``text-heldout.jsonl`` (n repetitive records), as spec_eval.py reads it."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "text-heldout.jsonl").write_text("".join(json.dumps({"text": f"record {i} " + "abc def " * 40}) + "\n"
                                                     for i in range(n)))
    return data


def interpreted_json(script: str, *args: str, timeout: int = 300):
    """:func:`run_interpreted`, and the JSON the script printed on its last line."""
    return json.loads(run_interpreted(script, *args, timeout=timeout).strip().splitlines()[-1])


def assert_equal_and_close(out: dict, runs: int, tol_bf16: float = 2e-2, tol: float = 2e-3) -> None:
    """An interpreter script's verdicts, ``{run: [equal to the ops apart bit for bit, relative error against the
    float64 reference]}``: ``runs`` of them, every one equal, each error under the tolerance of its dtype (bf16:
    the interpreter truncates where CUDA rounds to nearest)."""
    assert len(out) == runs
    differ = [k for k, (same, _) in out.items() if not same]
    assert not differ, differ
    bad = {k: e for k, (_, e) in out.items() if not e < (tol_bf16 if "bfloat16" in k else tol)}
    assert not bad, bad


def route_conv_op(rt, name: str, apart, refuse: str) -> list:
    """In a runtime's op table: the fused in_proj + conv op ``name`` replaced by ``apart`` (the two ops it fuses, by
    their references) when given, else kept; either way each call's conv start (its argument ``start``) recorded in
    the list returned; the op ``refuse`` (the conv apart) made to fail the test if called."""
    import inspect

    calls, op = [], apart or rt.fns[name]
    at = list(inspect.signature(op).parameters).index("start")
    rt.fns[name] = lambda *a: calls.append(a[at]) or op(*a)
    rt.fns[refuse] = lambda *a: pytest.fail(f"{refuse} ran apart from in_proj")
    return calls
