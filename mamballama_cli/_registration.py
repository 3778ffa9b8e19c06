"""Register the hybrid with transformers' Auto classes without importing torch at package import.

``import mamballama_cli`` must be cheap (the CLI's ``--help`` answers in well under a second), yet after it
``AutoModelForCausalLM.from_pretrained(dir)`` must know ``model_type: mamballama``. We therefore register
when transformers' auto modules are imported: immediately if they already are, otherwise through a
post-import hook on ``sys.meta_path`` that fires once, right after those modules finish loading.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODELING_MODULE = "transformers.models.auto.modeling_auto"
_done: set[str] = set()


def _importing(module: str, name: str) -> bool:
    """True while ``module`` is half-initialised (it registers itself when its body finishes)."""
    mod = sys.modules.get(module)
    return mod is not None and not hasattr(mod, name)


def register_config() -> None:
    if "config" in _done or _importing("mamballama_cli.models.configuration", "MamballamaConfig"):
        return
    _done.add("config")
    from transformers import AutoConfig

    from mamballama_cli.models.configuration import MamballamaConfig

    AutoConfig.register(MamballamaConfig.model_type, MamballamaConfig, exist_ok=True)


def register_model() -> None:
    if "model" in _done or _importing("mamballama_cli.models.modeling", "MamballamaForCausalLM"):
        return
    register_config()
    _done.add("model")
    from transformers import AutoModel, AutoModelForCausalLM

    from mamballama_cli.models.configuration import MamballamaConfig
    from mamballama_cli.models.modeling import MamballamaForCausalLM, MamballamaModel

    AutoModel.register(MamballamaConfig, MamballamaModel, exist_ok=True)
    AutoModelForCausalLM.register(MamballamaConfig, MamballamaForCausalLM, exist_ok=True)


_HOOKS = {_CONFIG_MODULE: register_config, _MODELING_MODULE: register_model}


class _Loader(importlib.abc.Loader):
    """Wraps the real loader and runs our registration after the module body executed."""

    def __init__(self, inner: importlib.abc.Loader, callback):
        self._inner, self._callback = inner, callback

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        self._callback()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        callback = _HOOKS.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, callback)
                return spec
        return None


def install() -> None:
    if _MODELING_MODULE in sys.modules:
        register_model()
        return
    if _CONFIG_MODULE in sys.modules:
        register_config()
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
