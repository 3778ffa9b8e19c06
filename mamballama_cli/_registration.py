"""Register the hybrid with transformers' Auto classes without importing torch at package import.

``import mamballama_cli`` must be cheap (the CLI's ``--help`` answers in well under a second), yet after it
``AutoModelForCausalLM.from_pretrained(dir)`` must know ``model_type: mamballama``. We therefore register
when transformers' auto modules are imported: immediately if they already are, otherwise through a
post-import hook on ``sys.meta_path``.

The hook never registers while a transformers module is still half-initialised: our modeling code imports
transformers internals (``modeling_layers``) that may be exactly the module whose import pulled in the auto
classes. Registration is then deferred to the end of the outermost transformers import. Likewise, when the
auto classes arrive while our own configuration or modeling module is still executing its body, registration
waits for the end of that module's import: the same hook wraps their loaders. This module is the one place
that registers; the model modules know nothing of it (the layers run one way: registration -> models).
"""

from __future__ import annotations

import importlib.abc
import sys

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODELING_MODULE = "transformers.models.auto.modeling_auto"
_OUR_CONFIG = "mamballama_cli.models.configuration"
_OUR_MODELING = "mamballama_cli.models.modeling"
_done: set[str] = set()
_pending: set[str] = set()


def _importing(module: str, name: str) -> bool:
    """True while ``module`` is half-initialised (registration then waits for the end of its import)."""
    mod = sys.modules.get(module)
    return mod is not None and not hasattr(mod, name)


def _due(kind: str, module: str, name: str) -> bool:
    """Should ``kind`` register now? Not when it has; not yet while our ``module`` is half-initialised (it then
    waits in ``_pending``, flushed when that module's body has run)."""
    if kind in _done:
        return False
    if _importing(module, name):
        _pending.add(kind)
        return False
    return True


def register_config() -> None:
    if not _due("config", _OUR_CONFIG, "MamballamaConfig"):
        return
    _done.add("config")
    from transformers import AutoConfig

    from mamballama_cli.models.configuration import MamballamaConfig

    AutoConfig.register(MamballamaConfig.model_type, MamballamaConfig, exist_ok=True)


def register_model() -> None:
    if not _due("model", _OUR_MODELING, "MamballamaForCausalLM"):
        return
    register_config()
    if "config" not in _done:  # the configuration module is still executing its body
        _pending.add("model")
        return
    _done.add("model")
    from transformers import AutoModel, AutoModelForCausalLM

    from mamballama_cli.models.configuration import MamballamaConfig
    from mamballama_cli.models.modeling import MamballamaForCausalLM, MamballamaModel

    AutoModel.register(MamballamaConfig, MamballamaModel, exist_ok=True)
    AutoModelForCausalLM.register(MamballamaConfig, MamballamaForCausalLM, exist_ok=True)


_HOOKS = {_CONFIG_MODULE: "config", _MODELING_MODULE: "model"}
_OURS = (_OUR_CONFIG, _OUR_MODELING)  # their end flushes what waited for them
_REGISTER = {"config": register_config, "model": register_model}


def _transformers_busy(except_name: str) -> bool:
    """Is any transformers module (other than ``except_name``) still executing its body?"""
    for name, mod in list(sys.modules.items()):
        if name == except_name or not name.startswith("transformers"):
            continue
        spec = getattr(mod, "__spec__", None)
        if spec is not None and getattr(spec, "_initializing", False):
            return True
    return False


def _flush(just_loaded: str) -> None:
    if not _pending or _transformers_busy(just_loaded):
        return
    for what in ("config", "model"):
        if what in _pending:
            _pending.discard(what)
            _REGISTER[what]()  # re-adds itself to _pending when one of our modules is still half-initialised


class _Loader(importlib.abc.Loader):
    """Wraps a transformers module's (or one of our model modules') loader; after its body ran, registers
    whatever is pending."""

    def __init__(self, inner, fullname: str):
        self._inner, self._fullname = inner, fullname

    def __getattr__(self, name):  # get_source, get_filename, resource readers...
        return getattr(self._inner, name)

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        what = _HOOKS.get(self._fullname)
        if what is not None and what not in _done:
            _pending.add(what)
        _flush(self._fullname)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if _done >= {"config", "model"} and not _pending:
            return None
        if not fullname.startswith("transformers") and fullname not in _OURS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    for module, what in _HOOKS.items():
        if module in sys.modules:
            _pending.add(what)
    _flush("")
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
