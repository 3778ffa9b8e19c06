"""The hybrid model: configuration, modules, cache.

Submodules are imported lazily: the configuration must be importable while transformers is still
initialising its auto classes (registration hook), without pulling in the modeling code.
"""

import importlib

_EXPORTS = {
    "HybridCache": "mamballama_cli.models.cache",
    "MamballamaConfig": "mamballama_cli.models.configuration",
    "MamballamaForCausalLM": "mamballama_cli.models.modeling",
    "MamballamaModel": "mamballama_cli.models.modeling",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)


__all__ = list(_EXPORTS)
