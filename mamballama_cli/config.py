"""One documented config per command, merged once: defaults < template YAML < --config FILE < CLI flags.

Unknown keys are errors with a did-you-mean; cross-field checks live in each config's ``validate``; the
resolved config is saved beside every artefact.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from mamballama_cli.errors import UsageError

T = TypeVar("T")

# The templates ship inside the package (package data), so that a wheel install finds them; the repo's top-level
# templates/ is the readable copy, kept byte-identical by tests/test_packaging.py.
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


def option(default: Any = dataclasses.MISSING, *, help: str, flags: tuple[str, ...] = (),
           default_text: str | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that is also a command-line option: its help lives here, beside its default, once.

    Commands built from a config (cli/options.py) turn every field made with ``option`` into an option and
    show the default in its help; fields made without it are config-only keys (YAML, --config). ``flags``
    replaces the spelling ``--field-name`` (e.g. ``("--output", "-o")``; a boolean given as ``"--x/--no-x"``
    keeps an unset value apart from both); ``default_text`` says in words what an unset (None) default means.
    """
    metadata = {"help": help, "flags": tuple(flags), "default_text": default_text}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def template_names() -> list[str]:
    """The names of the training templates (templates/*.yaml), sorted."""
    return sorted(x.stem for x in TEMPLATES_DIR.glob("*.yaml")) if TEMPLATES_DIR.is_dir() else []


def find_template(name: str) -> Path:
    """A template by name ("distill-paper") or path. Named templates are package data (mamballama_cli/templates/,
    the same files as the repo's templates/)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for candidate in (TEMPLATES_DIR / f"{name}.yaml", TEMPLATES_DIR / name):
        if candidate.is_file():
            return candidate
    known = template_names()
    hint = difflib.get_close_matches(name, known, n=1)
    raise UsageError(
        f"template {name!r} not found" + (f"; did you mean {hint[0]!r}?" if hint else "")
        + (f" Available: {', '.join(known)}" if known else "")
    )


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"config file {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of keys to values")
    return data


def aliases(cls) -> dict[str, str]:
    """Old spellings of keys that ``cls`` still reads: its class attribute ``ALIASES = {old: new}``."""
    return dict(getattr(cls, "ALIASES", None) or {})


def canonical_keys(cls, data: dict, source: str = "config") -> dict:
    """``data`` with every old spelling of a key renamed to the current one (both spellings at once: an error)."""
    renames = aliases(cls)
    if not any(k in renames for k in data):
        return data
    out = {}
    for key, value in data.items():
        new = renames.get(key, key)
        if new in out or (new != key and new in data):
            raise UsageError(f"{source}: {key!r} and {new!r} are one key (its old and new name); give it once, as "
                             f"{new!r}")
        out[new] = value
    return out


def _check_keys(cls, data: dict, source: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)] + list(aliases(cls))
    for key in data:
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            raise UsageError(
                f"unknown key {key!r} in {source}" + (f"; did you mean {hint[0]!r}?" if hint else "")
            )


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def _bool(value, key: str) -> bool:
    """A real boolean, 0/1, or one of yes/no/true/false/on/off/1/0 (any case); anything else names the key."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise UsageError(f"{key}: {value!r} is not a boolean; use true or false (or yes/no, on/off, 1/0)")


def _parsed_text(value, parse):
    """``parse(value.strip())`` when ``value`` is a string that parses, else None."""
    if isinstance(value, str):
        try:
            return parse(value.strip())
        except ValueError:
            return None
    return None


def _int(value, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    parsed = _parsed_text(value, int)
    if parsed is None:
        raise UsageError(f"{key}: {value!r} is not an integer; give a whole number")
    return parsed


def _float(value, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    parsed = _parsed_text(value, float)
    if parsed is None:
        raise UsageError(f"{key}: {value!r} is not a number; give e.g. 0.5 or 1e-4")
    return parsed


def _coerce(tp, value, key: str):
    """Coerce YAML/CLI values to the dataclass field type: booleans, integers and numbers strictly (a wrong
    type is a one-line error naming the key), nested dataclasses and lists element by element."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _coerce(args[0], value, key)
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return build(tp, value, source=f"key {key!r}", prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, list):
            if typing.get_args(tp) and typing.get_args(tp)[0] is str:
                return value  # comma strings stand for lists of names (evaluation.config.split_list)
            raise UsageError(f"{key}: {value!r} is not a list; write it as a YAML list, e.g. [x, y]")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        return _bool(value, key)
    if tp is int:
        return _int(value, key)
    if tp is float:
        return _float(value, key)
    return value


def build(cls: type[T], data: dict, source: str = "config", prefix: str = "") -> T:
    """``cls`` from ``data``: unknown keys and values of the wrong type are errors naming the key."""
    _check_keys(cls, data, source)
    data = canonical_keys(cls, data, source)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(hints.get(k, Any), v, f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def check_types(cls, data: dict, source: str) -> None:
    """Check one source's values against ``cls`` (keys and types) so that an error names that source."""
    try:
        build(cls, data, source)
    except UsageError as exc:
        msg = str(exc)
        raise UsageError(msg if msg.startswith(("unknown key", source)) else f"{source}: {msg}") from None


def merge_config(cls: type[T], *, template: str | None = None, config_file: str | Path | None = None,
                 overrides: dict | None = None) -> T:
    """defaults < template < config file < overrides (keys whose value is None are 'not given')."""
    data: dict = {}
    if template:
        tpath = find_template(template)
        tdata = read_yaml(tpath)
        check_types(cls, tdata, f"template {tpath.name}")
        data.update(tdata)
    if config_file:
        fdata = read_yaml(config_file)
        check_types(cls, fdata, f"config file {config_file}")
        data.update(fdata)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    cfg = build(cls, data)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
