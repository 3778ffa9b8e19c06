"""Draft-model providers for speculative decoding (entry-point group ``mamballama.drafts``).

A DraftSpec names a way to obtain a draft model for a given target; built-in specs are registered here
through the same registry third-party plugins use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
