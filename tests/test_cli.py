"""The CLI through its real entry point: help, version, convert and generate, and every bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clihelp import run_cli
from helpers import save_teacher, tiny_llama

COMMANDS = ["convert", "distill", "sft", "dpo", "generate", "eval"]


def test_help_lists_the_six_commands_without_importing_torch():
    out = subprocess.run([sys.executable, "-c",
                          "import sys; sys.argv=['mamballama','--help']\n"
                          "from mamballama_cli.cli.main import main\n"
                          "try:\n    main()\nexcept SystemExit:\n    pass\n"
                          "assert 'torch' not in sys.modules, 'help imported torch'\n"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for cmd in COMMANDS:
        assert f"  {cmd} " in out.stdout


def test_console_script_version():
    exe = Path(sys.executable).parent / "mamballama"
    if not exe.exists():
        pytest.skip("console script not installed (pip install -e .)")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("mamballama ")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher"), n_heads=4, n_kv=2)


def test_convert_then_generate_through_the_cli(teacher_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "hybrid"
    r = run_cli(["convert", teacher_dir, "--ratio", "0.5", "--output", out, "--json"], capsys)
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["attn_layers"] == [1, 3] and summary["mamba_layers"] == [0, 2]
    assert summary["state_memory"]["hybrid_kv_bytes_per_token"] * 2 == summary["state_memory"]["teacher_kv_bytes_per_token"]
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "convert_summary.json", "tokenizer.json"} <= files
    assert json.loads((out / "convert_summary.json").read_text())["attn_layers"] == [1, 3]
    assert "chat_template" in (out / "tokenizer_config.json").read_text() or "chat_template.jinja" in files
    assert not [f for f in out.iterdir() if f.name.startswith(".")]

    r = run_cli(["generate", out, "--chat", "--prompt", "hello", "-n", "8", "--stats-json", tmp_path / "s.json"], capsys)
    assert r.code == 0, r.err
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["new_tokens"] >= 1 and stats["prompt_tokens"] > 5
    assert "tok/s" in r.err  # timing goes to stderr, text to stdout
    assert "tok/s" not in r.out

    r2 = run_cli(["generate", out, "--prompt", "-", "-n", "5", "--seed", "3", "-t", "0.8"], capsys,
                 stdin="hello from stdin", monkeypatch=monkeypatch)
    assert r2.code == 0, r2.err

    # one new token: no decode rate, said in words on stderr and as null in the stats (strict JSON, not NaN)
    r3 = run_cli(["generate", out, "--prompt", "hello", "-n", "1", "--stats-json", tmp_path / "one.json"], capsys)
    assert r3.code == 0, r3.err
    assert "no decode rate (fewer than 2 new tokens)" in r3.err and "nan" not in r3.err
    one = json.loads((tmp_path / "one.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the stats"))
    assert one["new_tokens"] == 1 and one["decode_tokens_per_s"] is None


def test_attn_layers_override_and_all_mamba(teacher_dir, tmp_path, capsys):
    r = run_cli(["convert", teacher_dir, "--attn-layers", "2", "--output", tmp_path / "a", "--json"], capsys)
    assert r.code == 0, r.err
    assert json.loads(r.out)["attn_layers"] == [2]
    r = run_cli(["convert", teacher_dir, "--ratio", "0", "--output", tmp_path / "b", "--json"], capsys)
    assert r.code == 0, r.err
    assert json.loads(r.out)["attn_layers"] == []


# --- bad input: one line, non-zero exit, nothing written ----------------------------------------------------
def assert_one_line_error(r, *needles):
    assert r.code != 0
    lines = [ln for ln in r.err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.err
    for n in needles:
        assert n in lines[0], lines[0]


def test_ratio_outside_range(teacher_dir, tmp_path, capsys):
    r = run_cli(["convert", teacher_dir, "--ratio", "1.5", "--output", tmp_path / "o"], capsys)
    assert_one_line_error(r, "--ratio 1.5", "[0, 1]")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("layers,msg", [("1,9", "layer 9 is out of range"), ("1,1", "layer 1 is repeated"),
                                        ("1,x", "'x' is not a layer index")])
def test_bad_attention_layers(teacher_dir, tmp_path, capsys, layers, msg):
    r = run_cli(["convert", teacher_dir, "--attn-layers", layers, "--output", tmp_path / "o"], capsys)
    assert_one_line_error(r, msg)
    assert not (tmp_path / "o").exists()


def test_teacher_path_missing(tmp_path, capsys):
    r = run_cli(["convert", tmp_path / "nope", "--output", tmp_path / "o"], capsys)
    assert_one_line_error(r, "does not exist")
    assert not (tmp_path / "o").exists()


def test_teacher_dir_without_weights(tmp_path, capsys):
    d = tmp_path / "t"
    d.mkdir()
    tiny_llama().config.save_pretrained(d)
    r = run_cli(["convert", d, "--output", tmp_path / "o"], capsys)
    assert_one_line_error(r, "holds no weights")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    r = run_cli(["convert", d, "--output", tmp_path / "o"], capsys)
    assert_one_line_error(r, "pickle", "safetensors")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_names_supported_families(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(d)
    r = run_cli(["convert", d, "--output", tmp_path / "o"], capsys)
    assert_one_line_error(r, "model_type='gpt2'", "llama")
    assert not (tmp_path / "o").exists()


def test_non_empty_output_needs_force(teacher_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run_cli(["convert", teacher_dir, "--output", out], capsys)
    assert_one_line_error(r, "not empty", "--force")
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1
    r = run_cli(["convert", teacher_dir, "--output", out, "--force", "--json"], capsys)
    assert r.code == 0, r.err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_gguf_without_gguf_package(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "block"
    (blocker / "gguf").mkdir(parents=True)
    (blocker / "gguf" / "__init__.py").write_text("raise ImportError('gguf blocked for this test')\n")
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    code = ("import sys; sys.argv=['mamballama','convert',%r,'--output',%r]\n"
            "from mamballama_cli.cli.main import main\nmain()\n") % (str(f), str(tmp_path / "o"))
    env = {**__import__("os").environ, "PYTHONPATH": str(blocker)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0
    assert "pip install gguf" in out.stderr and out.stderr.count("error:") == 1, out.stderr
    assert not (tmp_path / "o").exists()


def test_hub_id_offline_fails_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run_cli(["convert", "someorg/some-model", "--output", tmp_path / "o"], capsys)
    assert_one_line_error(r, "someorg/some-model", "Hugging Face Hub", "local directory",
                          "hf download someorg/some-model --local-dir DIR")
    assert "huggingface-cli" not in r.err  # deprecated by huggingface_hub
    assert not (tmp_path / "o").exists()


def test_unknown_config_key_gets_did_you_mean(teacher_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ratoi: 0.5\n")
    r = run_cli(["convert", teacher_dir, "--output", tmp_path / "o", "--config", cfg], capsys)
    assert_one_line_error(r, "'ratoi'", "did you mean 'ratio'")


def test_default_teacher_reuses_cache(tmp_path, capsys, monkeypatch):
    """`convert default` loads the cached safetensors copy when present instead of re-reading the GGUF."""
    from mamballama_cli.convert import teacher as T

    fake_gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake_gguf.write_bytes(b"GGUF-stand-in")
    monkeypatch.setattr(T, "default_gguf_path", lambda: fake_gguf)
    target = T.default_teacher_dir()
    save_teacher(target)
    (target / "mamballama_teacher.json").write_text(json.dumps({"gguf_size": fake_gguf.stat().st_size}))

    def no_gguf(*a, **k):
        raise AssertionError("the GGUF must not be read when the cache is valid")

    monkeypatch.setattr(T, "_load_gguf", no_gguf)
    r = run_cli(["convert", "default", "--ratio", "0.5", "--output", tmp_path / "o", "--json"], capsys)
    assert r.code == 0, r.err
    assert "using the cached default teacher" in r.err
    assert json.loads(r.out)["teacher"]["name_or_path"] == "SmolLM2-135M-Instruct"


def test_library_chatter_on_stdout_does_not_pollute_results(teacher_dir, tmp_path, capsys, monkeypatch):
    """Libraries that print while loading (DeepSpeed does) must not break `convert --json | jq`."""
    from mamballama_cli.convert import teacher as T

    real_load = T.load_teacher

    def chatty_load(*args, **kwargs):
        print("[WARNING] some library: setting accelerator to CPU")  # what DeepSpeed prints on import
        return real_load(*args, **kwargs)

    monkeypatch.setattr(T, "load_teacher", chatty_load)
    r = run_cli(["convert", teacher_dir, "--ratio", "0.5", "--output", tmp_path / "o", "--json"], capsys)
    assert r.code == 0, r.err
    assert json.loads(r.out)["attn_layers"] == [1, 3]
    assert "setting accelerator" in r.err


def test_library_progress_bars_only_with_verbose(teacher_dir, tmp_path):
    """transformers' per-file bars stay off stderr unless -v; the project's own lines stay."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}  # as a user's shell has it
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def convert(*flags, out):
        r = subprocess.run([sys.executable, "-m", "mamballama_cli", *flags, "convert", str(teacher_dir), "--ratio",
                            "0.5", "--output", str(out)], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        return r.stderr

    quiet = convert(out=tmp_path / "q")
    assert "converting" in quiet
    assert "Loading weights" not in quiet and "Writing model shards" not in quiet, quiet
    loud = convert("-v", out=tmp_path / "v")
    assert "Loading weights" in loud and "Writing model shards" in loud, loud


def _leaf_commands():
    import typer

    from mamballama_cli.cli.main import app

    def walk(cmd, path):
        if hasattr(cmd, "commands"):  # a group (typer vendors click: no isinstance against click's classes)
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), cmd

    return list(walk(typer.main.get_command(app), []))


def test_every_option_of_every_command_has_help_and_placeholders_are_explained():
    leaves = _leaf_commands()
    assert {"convert", "distill", "sft", "dpo", "eval report", "eval speed", "data build"} <= {n for n, _ in leaves}
    missing = [f"{name} {p.opts[0]}" for name, cmd in leaves for p in cmd.params
               if p.param_type_name == "option" and not (p.help or "").strip()]
    assert not missing, f"options without help: {missing}"
    # typer writes {model} for a required argument and <str>/<int> for an option's value: each help says so
    unexplained = [name for name, cmd in leaves if "Notation:" not in (cmd.epilog or "")]
    assert not unexplained, unexplained


def test_training_options_come_from_the_configs_with_the_defaults_the_command_uses():
    """distill/sft/dpo take one option per option field of their config; the help states the field's default, or
    the default template's value (distill), so help and config cannot drift apart."""
    import dataclasses

    from mamballama_cli.training.config import DistillConfig, DPOConfig, SFTConfig

    leaves = dict(_leaf_commands())
    for name, cls in (("distill", DistillConfig), ("sft", SFTConfig), ("dpo", DPOConfig)):
        params = {p.name: p for p in leaves[name].params}
        fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
        assert {f.name for f in fields} <= set(params), name
        for f in fields:
            assert f.metadata["help"] in params[f.name].help, (name, f.name)
    sft = {p.name: p.help for p in leaves["sft"].params}
    assert "[default: 2e-05]" in sft["lr"] and "[default: 2048]" in sft["seq_len"]
    distill = {p.name: p.help for p in leaves["distill"].params}
    assert "[default: 2048, from template distill-default]" in distill["seq_len"]
    assert "per stage, from template distill-default" in distill["lr"]
    assert "text_field" not in {p.name for p in leaves["dpo"].params}  # dpo reads prompt, chosen, rejected


def test_eval_help_shows_the_report_options(capsys):
    r = run_cli(["eval", "--help"], capsys)
    assert r.code == 0
    for flag in ("--teacher", "--tasks", "--output", "speed"):
        assert flag in r.out, r.out
    assert "Notation:" in r.out
