"""Draft-model providers for speculative decoding (entry-point group ``mamballama.drafts``).

A DraftSpec names a way to obtain a draft model for a given target; built-in specs are registered here
through the same registry third-party plugins use.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

from mamballama_cli import plugins


@dataclass
class DraftSpec:
    name: str
    description: str
    load: Callable[..., object]  # (target_model, **options) -> causal LM sharing the target's tokenizer


def _load_path(target_model=None, path: str | None = None, **_):
    from mamballama_cli.loading import load_causal_lm

    if not path:
        raise ValueError("the 'path' draft needs a checkpoint directory")
    return load_causal_lm(path)[0]


plugins.drafts.register(
    DraftSpec(
        name="path",
        description="any causal LM checkpoint directory sharing the target's tokenizer (transformers or hybrid)",
        load=_load_path,
    )
)


def _load_self(target_model=None, **_):
    """The target drafting for itself: every draft is accepted at temperature 0 (an overhead check)."""
    if target_model is None:
        raise ValueError("the 'self' draft needs the target model")
    return target_model


def _teacher_spec(target_model) -> str:
    from mamballama_cli.errors import MamballamaError

    info = getattr(target_model.config, "teacher", None) or {}
    if info.get("kind") == "default":
        return "default"
    teacher = info.get("name_or_path")
    if not teacher:
        raise MamballamaError("the target records no teacher (config.teacher.name_or_path); pass --draft DIR")
    return teacher


def _load_teacher(target_model=None, **_):
    """The Transformer the hybrid was converted from (as recorded in its config)."""
    from mamballama_cli.convert.teacher import load_teacher

    return load_teacher(_teacher_spec(target_model), allow_download=False)[0]


def _load_layers(target_model=None, arg: str | None = None, **_):
    """A shrunk draft cut in memory from the target's teacher, e.g. ``layers:0,29`` (untrained: to try the
    pipeline; `convert --draft-layers` + `sft`/`distill` makes a useful one)."""
    from mamballama_cli.convert.draft import build_draft
    from mamballama_cli.convert.placement import parse_layer_list
    from mamballama_cli.convert.teacher import load_teacher
    from mamballama_cli.errors import UsageError

    if not arg:
        raise UsageError("--draft layers:LIST needs teacher layers, e.g. --draft layers:0,10,20,29")
    teacher = load_teacher(_teacher_spec(target_model), allow_download=False)[0]
    layers = parse_layer_list(arg, teacher.config.num_hidden_layers, flag="--draft layers:")
    if not layers:
        raise UsageError("--draft layers:LIST: list at least one teacher layer, e.g. layers:0,29")
    return build_draft(teacher, layers)


plugins.drafts.register(DraftSpec(
    name="self", description="the target itself (accepts everything at temperature 0; measures overhead)",
    load=_load_self))
plugins.drafts.register(DraftSpec(
    name="teacher", description="the Transformer the hybrid was converted from (config.teacher)",
    load=_load_teacher))
plugins.drafts.register(DraftSpec(
    name="layers", description="layers:0,10,20,29 - a shrunk draft cut from the teacher in memory (untrained)",
    load=_load_layers))


def _load_lookup(target_model=None, arg: str | None = None, **_):
    """``lookup``, ``lookup:N``, ``lookup:TABLE``, ``lookup:N:TABLE``: proposals copied from the context
    (generation/lookup.py), with an n-gram table where the context has nothing to copy; no weights."""
    from mamballama_cli.generation.lookup import parse_lookup

    return parse_lookup(arg)


plugins.drafts.register(DraftSpec(
    name="lookup", description="lookup[:N][:TABLE] - no model: the tokens that followed the last N-gram's latest "
    "earlier occurrence (prompt lookup; N = 3); TABLE (`data ngrams`) fills in where nothing matches",
    load=_load_lookup))
