"""Options declared once: the ones most commands share, and whole commands built from a config dataclass.

A command built by :func:`config_command` (`distill`, `sft`, `dpo`) takes one option per field of its config
that was made with :func:`mamballama_cli.config.option`: the flag, the type and the help come from the field,
and the help ends with the default the command uses when the flag is not given: the field's default, or the
value the command's default template sets (``[default: 1024, from template distill-default]``). Fields made
without ``option`` are config-only keys (YAML, --config). Flags left out are "not given", so that a template or
a --config file below them keeps its value.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Optional
from collections.abc import Callable

import typer
from typer.models import OptionInfo

# What "auto" means for --dtype where the device decides.
DTYPE_BY_DEVICE = "float32 on CPU, bfloat16 on GPU"
DEVICE_HELP = "auto, cpu, cuda, cuda:1 ..."


def config_option() -> OptionInfo:
    return typer.Option(None, "--config", help="YAML file with any of these options (keys with underscores: "
                        "--some-option is some_option).")


def json_option(what: str = "the summary") -> OptionInfo:
    return typer.Option(False, "--json", help=f"Print {what} as JSON on stdout.")


def force_option(what: str = "--output") -> OptionInfo:
    return typer.Option(False, "--force", help=f"Replace a non-empty {what}.")


def dtype_option(auto: str = DTYPE_BY_DEVICE, choices: str = "float32, bfloat16, float16",
                 default: str | None = None) -> OptionInfo:
    return typer.Option(default, "--dtype", help=f"auto ({auto}), {choices}.")


def device_option(default: str | None = None) -> OptionInfo:
    return typer.Option(default, "--device", help=DEVICE_HELP)


def seed_option(what: str) -> OptionInfo:
    return typer.Option(None, "--seed", help=f"Seed of {what}.")


# --- commands built from a config dataclass -----------------------------------------------------------------------
def _value_type(tp):
    """The option's value type of a field type (``int | None`` -> int)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    if tp in (str, int, float, bool):
        return tp
    raise TypeError(f"a config option must be a str, int, float or bool field, not {tp}")


def _switch(f: dataclasses.Field, tp) -> bool:
    """A plain on-switch (--force): False stands for "not given"."""
    return tp is bool and not any("/" in x for x in f.metadata["flags"])


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def default_text(f: dataclasses.Field, template: str | None, template_data: dict | None) -> str | None:
    """How the help states the default: the default template's value where it sets the key, else the field's."""
    if template_data is not None:
        if f.name in template_data:
            return f"{_show(template_data[f.name])}, from template {template}"
        if any(isinstance(st, dict) and f.name in st for st in template_data.get("stages") or []):
            return f"per stage, from template {template}"
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    value = _field_default(f)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "on" if value else ("off" if "/" in "".join(f.metadata["flags"]) else None)
    return _show(value)


def option_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options, in the config's order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _option_parameter(f: dataclasses.Field, tp, help_text: str) -> inspect.Parameter:
    flags = f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)
    vt = _value_type(tp)
    if _switch(f, vt):
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                 default=typer.Option(False, *flags, help=help_text))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[vt],
                             default=typer.Option(None, *flags, help=help_text))


def config_command(cls, *, model_help: str, template_help: str, run: Callable[..., None],
                   default_template: str | None = None, stage_keys: tuple[str, ...] = ()) -> Callable:
    """A typer command ``(MODEL, one option per option field of cls, --template, --config, --json)`` that calls
    ``run(template=, config_file=, overrides=, json_out=)`` with every option given as an override.

    ``stage_keys`` (top-level keys a template's stages inherit) get a note that a flag replaces the stages'
    values; ``default_template`` is the template used when --template is not given, and its values are the
    defaults shown.
    """
    hints = typing.get_type_hints(cls)
    template_data = None
    if default_template is not None:
        from mamballama_cli.config import find_template, read_yaml
        from mamballama_cli.errors import UsageError

        try:
            template_data = read_yaml(find_template(default_template))
        except UsageError:  # a broken install: the help shows the config's defaults, the run names the problem
            template_data = None
    fields = option_fields(cls)
    params = [inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                default=typer.Argument(..., help=model_help))]
    for f in fields:
        text = f.metadata["help"]
        if f.name in stage_keys:
            text += " Replaces the template's per-stage values."
        shown = default_text(f, default_template, template_data)
        if shown is not None:
            text += f"  [default: {shown}]"
        params.append(_option_parameter(f, hints[f.name], text))
    params += [
        inspect.Parameter("template", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--template", help=template_help)),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=config_option()),
        inspect.Parameter("json_out", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=json_option("the run summary")),
    ]
    switches = {f.name for f in fields if _switch(f, _value_type(hints[f.name]))}

    def command(**kwargs):
        overrides = {"model": kwargs["model"]}
        for f in fields:
            value = kwargs[f.name]
            overrides[f.name] = None if (f.name in switches and not value) else value
        template = kwargs["template"] if kwargs["template"] is not None else default_template
        run(template=template, config_file=kwargs["config"], overrides=overrides, json_out=kwargs["json_out"])

    command.__signature__ = inspect.Signature(params)
    return command


def training_command(kind: str, cls, **kwargs) -> Callable:
    """:func:`config_command` of a training command (`distill`, `sft`, `dpo`): the help of MODEL and --template is
    the config's ``MODEL_HELP`` and ``TEMPLATE_HELP``; the run is ``training.launch.run_command(kind, cls, ...)``,
    imported when the command runs (torch stays out of --help)."""

    def run(**run_kwargs) -> None:
        from mamballama_cli.training.launch import run_command

        run_command(kind, cls, **run_kwargs)

    return config_command(cls, run=run, model_help=cls.MODEL_HELP, template_help=cls.TEMPLATE_HELP, **kwargs)
