"""Filler text for needle-in-a-haystack and the default perplexity text, read at run time (nothing committed).

The built-in source is the prose of Python's own reference documentation, shipped with every CPython
as ``pydoc_data/topics.py``: plain English technical text. Grammar blocks, code examples and headings
are dropped so that only running sentences remain.
"""

from __future__ import annotations

import re
from pathlib import Path

from mamballama_cli.errors import MamballamaError, UsageError

BUILTIN = "builtin:python-docs"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def _prose_paragraphs(text: str) -> list[str]:
    paras = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue  # indented: grammar, code or a literal block
        para = " ".join(line.strip() for line in lines)
        if len(para) < 80 or "::=" in para or ">>>" in para or set(para) <= set("*=-~ "):
            continue
        if not para[0].isupper() or not para.rstrip().endswith((".", ":")):
            continue
        paras.append(para.rstrip(":") + ("." if para.endswith(":") else ""))
    return paras


def builtin_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise MamballamaError("the built-in haystack reads Python's pydoc_data/topics.py, which this Python lacks; "
                              "pass --haystack FILE (any long English text)") from None
    paras: list[str] = []
    for name in sorted(topics):
        paras += _prose_paragraphs(topics[name])
    return "\n\n".join(paras)


def load_text(path: str | None) -> tuple[str, str]:
    """(text, source name) from a file, or the built-in text when ``path`` is None."""
    if path is None or path == BUILTIN:
        return builtin_text(), BUILTIN
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--haystack {path}: no such file; pass a UTF-8 text file (or leave it out for the "
                         "built-in text)")
    text = p.read_text(encoding="utf-8", errors="replace")
    if len(text) < 2000:
        raise UsageError(f"--haystack {path} holds only {len(text)} characters; pass a longer text (it is "
                         "repeated to fill long contexts, but needs some variety)")
    return text, str(p)


def sentences(text: str) -> list[str]:
    """Split into sentences, each ending with one space so they concatenate cleanly."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s.strip() + " " for s in _SENTENCE_END.split(flat) if s.strip()]
