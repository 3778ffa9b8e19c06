"""Plugin registries fed by entry points, the way simonw/llm does it.

Two groups:
    mamballama.teachers  -> TeacherFamily objects (or a callable / list returning them)
    mamballama.drafts    -> DraftSpec objects (or a callable / list returning them)

Built-ins go through the very same ``register`` call as third-party plugins: the Llama family is
registered by :mod:`mamballama_cli.convert.families` (Mistral and Qwen2 by ``families_more``) exactly as a
plugin would register its own.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

TEACHER_GROUP = "mamballama.teachers"
DRAFT_GROUP = "mamballama.drafts"


@dataclass
class Registration:
    item: Any
    origin: str  # "built-in" or "<distribution> <version>"
    entry_point: str | None = None


@dataclass
class Registry:
    group: str
    builtin_modules: tuple[str, ...]  # imported before the first lookup so built-ins are present
    _items: dict[str, Registration] = field(default_factory=dict)
    _loaded: bool = False
    errors: list[str] = field(default_factory=list)

    def register(self, item: Any, origin: str = "built-in", entry_point: str | None = None) -> Any:
        name = getattr(item, "name", None)
        if not name:
            raise TypeError(f"{self.group}: registered object {item!r} has no .name")
        self._items[name] = Registration(item, origin, entry_point)
        return item

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self.builtin_modules:
            importlib.import_module(module)
        for ep in md.entry_points(group=self.group):
            dist = getattr(ep, "dist", None)
            origin = f"{dist.name} {dist.version}" if dist is not None else ep.value
            try:
                obj = ep.load()
                if callable(obj) and not hasattr(obj, "name"):
                    obj = obj()
                for item in obj if isinstance(obj, (list, tuple)) else [obj]:
                    self.register(item, origin=origin, entry_point=f"{ep.name} = {ep.value}")
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a broken plugin (even one calling sys.exit) must not take the CLI down
                what = (f"called sys.exit({exc.code!r}) on import" if isinstance(exc, SystemExit)
                        else f"failed to load: {type(exc).__name__}: {exc}")
                error = f"{origin}: entry point {ep.name!r} {what}"
                self.errors.append(error)
                print(f"warning: plugin not loaded: {error}", file=sys.stderr, flush=True)

    def get(self, name: str) -> Any | None:
        self._ensure_loaded()
        reg = self._items.get(name)
        return reg.item if reg else None

    def registrations(self) -> dict[str, Registration]:
        self._ensure_loaded()
        return dict(self._items)

    def names(self) -> list[str]:
        return sorted(self.registrations())

    def find(self, predicate: Callable[[Any], bool]) -> Any | None:
        for reg in self.registrations().values():
            if predicate(reg.item):
                return reg.item
        return None


teachers = Registry(TEACHER_GROUP, ("mamballama_cli.convert.families", "mamballama_cli.convert.families_more"))
drafts = Registry(DRAFT_GROUP, ("mamballama_cli.generation.drafts",))


def plugin_distributions() -> list[dict]:
    """Installed distributions that declare mamballama entry points, with what each registers."""
    rows: dict[str, dict] = {}
    for group in (TEACHER_GROUP, DRAFT_GROUP):
        for ep in md.entry_points(group=group):
            dist = getattr(ep, "dist", None)
            key = dist.name if dist is not None else ep.value
            row = rows.setdefault(key, {"name": key, "version": dist.version if dist else "?", "registers": []})
            row["registers"].append(f"{group}: {ep.name}")
    return sorted(rows.values(), key=lambda r: r["name"])
