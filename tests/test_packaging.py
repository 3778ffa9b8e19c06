"""Packaging: the templates ship inside the package (a wheel install finds them), the repo's top-level templates/
stays byte-identical to them, and `mamballama templates list|show` shows them. The wheel itself is built,
installed non-editable and run by .ci/packaging.sh."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from clihelp import run_cli

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = ROOT / "mamballama_cli" / "templates"
READABLE = ROOT / "templates"


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_packaged_templates_equal_the_readable_copy():
    packaged, readable = _files(PACKAGED), _files(READABLE)
    assert "distill-default.yaml" in packaged and "accelerate/ddp.yaml" in packaged
    assert sorted(packaged) == sorted(readable), (
        "templates/ and mamballama_cli/templates/ hold different files; copy the change to both "
        "(cp -r templates/. mamballama_cli/templates/)")
    differ = [name for name in packaged if packaged[name] != readable[name]]
    assert not differ, f"edited in one copy only: {differ}; run `cp -r templates/. mamballama_cli/templates/`"


def test_templates_are_package_data():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = cfg["tool"]["setuptools"]["package-data"]["mamballama_cli"]
    for rel in _files(PACKAGED):
        assert any(Path("templates", rel).match(g) for g in globs), f"templates/{rel} is not in package-data"


def test_lookups_read_the_packaged_copy():
    from mamballama_cli.config import TEMPLATES_DIR, find_template
    from mamballama_cli.training.launch import resolve_accelerate_config

    assert TEMPLATES_DIR == PACKAGED
    assert find_template("distill-paper") == PACKAGED / "distill-paper.yaml"
    assert find_template("distill-default") == PACKAGED / "distill-default.yaml"
    assert resolve_accelerate_config("ddp") == PACKAGED / "accelerate" / "ddp.yaml"


def test_templates_list_names_each_with_its_first_comment(capsys):
    r = run_cli(["templates", "list"], capsys)
    assert r.code == 0, r.err
    lines = {line.split()[0]: line for line in r.out.splitlines()}
    for name in ("distill-default", "distill-paper", "distill-e2e", "distill-align", "sft", "dpo",
                 "accelerate/ddp", "accelerate/zero3"):
        assert name in lines
    assert "The default recipe" in lines["distill-default"]
    assert "Data parallel (DDP)" in lines["accelerate/ddp"]


def test_templates_list_json(capsys):
    import json

    r = run_cli(["templates", "list", "--json"], capsys)
    assert r.code == 0, r.err
    rows = {row["name"]: row["description"] for row in json.loads(r.out)}
    assert rows["distill-e2e"].startswith("End-to-end distillation")
    assert len(rows) == len(list(PACKAGED.glob("*.yaml"))) + len(list(PACKAGED.glob("accelerate/*.yaml")))


@pytest.mark.parametrize("name, path", [("distill-default", "distill-default.yaml"),
                                        ("accelerate/fsdp", "accelerate/fsdp.yaml"),
                                        ("ddp", "accelerate/ddp.yaml")])
def test_templates_show_prints_the_yaml(capsys, name, path):
    r = run_cli(["templates", "show", name], capsys)
    assert r.code == 0, r.err
    assert r.out == (PACKAGED / path).read_text()
    assert isinstance(yaml.safe_load(r.out), dict)


def test_templates_show_output_is_a_usable_template(capsys, tmp_path):
    from mamballama_cli.config import find_template, read_yaml

    r = run_cli(["templates", "show", "distill-e2e"], capsys)
    mine = tmp_path / "my.yaml"
    mine.write_text(r.out)
    assert read_yaml(find_template(str(mine))) == read_yaml(PACKAGED / "distill-e2e.yaml")


def test_templates_show_unknown_name(capsys):
    r = run_cli(["templates", "show", "distil-e2e"], capsys)
    assert r.code == 2 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert "'distil-e2e'" in lines[0] and "did you mean 'distill-e2e'" in lines[0]
    assert "Traceback" not in r.err


def test_install_metadata_does_not_fight_torch():
    """torch==2.13.0 from the public index needs triton==3.7.1: no extra may cap triton below that."""
    from packaging.requirements import Requirement

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [Requirement(r) for extra in cfg["project"]["optional-dependencies"].values() for r in extra]
    for req in reqs:
        if req.name == "triton":
            assert req.specifier.contains("3.7.1"), f"{req} excludes the triton that torch 2.13.0 needs"
