"""Plugins: the example plugin in plugins/mamballama-seed-oss is installed (by `make install`, or here if it
is missing), shows in `mamballama plugins list`, and `mamballama convert` handles its teacher family."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clihelp import run_cli
from helpers import TINY_TEACHER, seeded_teacher, tiny_tokenizer

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "plugins" / "mamballama-seed-oss"
DIST = "mamballama-seed-oss"


def _reset_registries():
    """Entry points are read once per process; make the registries read them again."""
    from mamballama_cli import plugins

    for registry in (plugins.teachers, plugins.drafts):
        registry._loaded = False
        registry.errors.clear()


@pytest.fixture(scope="module")
def seed_oss_plugin():
    try:
        md.distribution(DIST)
    except md.PackageNotFoundError:
        # Same as the Makefile's install step; no build isolation, so no network is needed.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-e",
                str(PLUGIN_DIR),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    if importlib.util.find_spec("mamballama_seed_oss") is None:
        # An editable install is wired up by a .pth file, which Python reads at start-up only; do here
        # what the next interpreter start would do.
        sys.path.insert(0, str(PLUGIN_DIR))
    _reset_registries()
    yield md.distribution(DIST)
    _reset_registries()


def tiny_seed_oss(seed=0, out_bias=True):
    from transformers import SeedOssConfig, SeedOssForCausalLM

    cfg = SeedOssConfig(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
        attention_out_bias=out_bias, tie_word_embeddings=False, **TINY_TEACHER,
    )
    return seeded_teacher(SeedOssForCausalLM, cfg, seed, bias_std=0.5)


def test_plugins_list_shows_builtins_and_the_example_plugin(seed_oss_plugin, capsys):
    r = run_cli(["plugins", "list"], capsys)
    assert r.code == 0, r.err
    assert "mamballama-seed-oss" in r.out and seed_oss_plugin.version in r.out and "seed_oss" in r.out
    for builtin in ("llama", "mistral", "qwen2", "path"):
        assert builtin in r.out
    assert "built-in" in r.out and "teacher family" in r.out and "draft provider" in r.out


def test_plugins_list_json(seed_oss_plugin, capsys):
    from mamballama_cli import __version__

    r = run_cli(["plugins", "list", "--json"], capsys)
    assert r.code == 0, r.err
    data = json.loads(r.out)
    rows = {(row["kind"], row["name"]): row for row in data["registrations"]}
    seed = rows[("teacher", "seed_oss")]
    assert seed["plugin"] == DIST and seed["version"] == "0.1.0" and seed["model_types"] == ["seed_oss"]
    assert seed["entry_point"] == "seed_oss = mamballama_seed_oss:SEED_OSS"
    for name, types in (("llama", ["llama"]), ("mistral", ["mistral"]), ("qwen2", ["qwen2"])):
        assert rows[("teacher", name)]["plugin"] == "built-in"
        assert rows[("teacher", name)]["version"] == __version__
        assert rows[("teacher", name)]["model_types"] == types
    assert rows[("draft", "path")]["plugin"] == "built-in"
    assert data["errors"] == []


def test_convert_through_the_plugin_family(seed_oss_plugin, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    teacher = tiny_seed_oss(seed=4)
    teacher.save_pretrained(tmp_path / "t", safe_serialization=True)
    tiny_tokenizer(96).save_pretrained(tmp_path / "t")
    r = run_cli(
        ["convert", tmp_path / "t", "--ratio", "1.0", "--output", tmp_path / "full", "--json"], capsys
    )
    assert r.code == 0, r.err
    assert json.loads(r.out)["family"] == "seed_oss"
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32).eval()
    assert full.config.attention_qkv_bias and full.config.attention_out_bias
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (full(ids).logits - teacher(ids).logits).abs().max().item() <= 1e-5
    # A real hybrid: Mamba layers drop the attention biases, listed by name in the summary.
    r = run_cli(
        ["convert", tmp_path / "t", "--ratio", "0.5", "--output", tmp_path / "half", "--json"], capsys
    )
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["mamba_layers"] == [0, 2]
    assert sorted(summary["mapping"]["dropped"]) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in (0, 2) for p in "qkvo"
    )


def test_a_broken_plugin_is_reported_and_the_others_still_load(
    seed_oss_plugin, tmp_path, monkeypatch, capsys
):
    info = tmp_path / "mamballama_broken-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mamballama-broken\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(
        "[mamballama.teachers]\nbroken = mamballama_no_such_module:FAMILY\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _reset_registries()
    r = run_cli(["plugins", "list", "--json"], capsys)
    assert r.code == 0
    data = json.loads(r.out)
    assert len(data["errors"]) == 1 and "mamballama-broken 0.0.1" in data["errors"][0]
    assert "mamballama_no_such_module" in data["errors"][0]
    assert "warning: plugin not loaded" in r.err
    assert any(row["name"] == "seed_oss" for row in data["registrations"])
    monkeypatch.undo()
    _reset_registries()
