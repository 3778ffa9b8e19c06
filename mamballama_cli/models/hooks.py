"""Forward hooks that record what modules read and write (teacher-forced alignment and calibration use them)."""

from __future__ import annotations

from torch import Tensor, nn


def capture_io(modules: dict[int, nn.Module]) -> tuple[list, dict[int, tuple[Tensor, Tensor]]]:
    """Hook each module; on its next forward store (first input, first output), detached, under its key.

    Works with modules called positionally or with ``hidden_states=`` and returning a tensor or a tuple
    (transformers' decoder layers and attention modules, and mamballama's own). Returns (handles, store);
    remove the handles after the forward.
    """
    store: dict[int, tuple[Tensor, Tensor]] = {}

    def make(key: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            store[key] = (x.detach(), y.detach())
        return hook

    handles = [m.register_forward_hook(make(k), with_kwargs=True) for k, m in modules.items()]
    return handles, store
