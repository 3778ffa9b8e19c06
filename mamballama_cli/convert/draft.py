"""Shrunk Transformer drafts cut from teacher layers (`convert --draft-layers`)."""

from __future__ import annotations

from mamballama_cli.errors import UsageError


def run_draft_convert(cfg, out_dir):
    raise UsageError("convert --draft-layers is not built yet (tracked in issue 5)")
