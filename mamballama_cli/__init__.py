"""mamballama: distil chat Transformers into fast Mamba hybrids.

Importing this package registers the hybrid architecture (model_type ``mamballama``) with transformers'
``AutoConfig`` and ``AutoModelForCausalLM``. The registration is lazy so that ``mamballama --help``
never pays for importing torch: it happens the moment transformers' auto classes are imported (or at
once, if they already are).
"""

__version__ = "0.1.0"

from mamballama_cli._registration import install as _install_registration

_install_registration()

__all__ = ["__version__"]
