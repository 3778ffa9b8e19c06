"""Which layers keep attention (design.md section 2): evenly spaced, last layer included.

One name and one resolver for every command: ``ratio`` is the fraction of layers that keep attention, an
explicit list (``--attn-layers 3,7,11``) wins over it, and :func:`resolve_attention_layers` turns the two into
layer indices for `convert`, the stages of `distill` and `eval speed --shape`.
"""

from __future__ import annotations

from mamballama_cli.errors import UsageError


def attention_layers_for_ratio(num_layers: int, ratio: float) -> list[int]:
    """Keep {L-1, L-1-s, L-1-2s, ...} with s = round(1 / ratio); ratio 0 keeps none.

    L = 32: 0.5 -> 1,3,...,31; 0.25 -> 3,7,...,31; 0.125 -> 7,15,23,31.
    """
    if not 0.0 <= ratio <= 1.0:
        raise UsageError(f"--ratio {ratio} is outside [0, 1]; it is the fraction of layers that keep attention")
    if ratio == 0.0:
        return []
    step = max(1, round(1.0 / ratio))
    return sorted(range(num_layers - 1, -1, -step))


def resolve_attention_layers(num_layers: int, ratio: float | None = None, layers: str | None = None
                             ) -> list[int] | None:
    """The attention layers asked for: the explicit list ``layers`` ("3,7,11"; "none" or "" for none) if given,
    else the evenly spaced layers of ``ratio``; None when neither is given (the caller's layout stays)."""
    if layers is not None:
        return parse_layer_list(layers, num_layers)
    if ratio is not None:
        return attention_layers_for_ratio(num_layers, float(ratio))
    return None


def parse_layer_list(text: str, num_layers: int, flag: str = "--attn-layers") -> list[int]:
    """Parse "3,7,11" (or "" for none); every index in [0, num_layers) and none repeated."""
    text = text.strip()
    if not text or text.lower() == "none":
        return []
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            idx = int(part)
        except ValueError:
            raise UsageError(f"{flag}: {part!r} is not a layer index; give comma-separated integers like 3,7,11")
        if not 0 <= idx < num_layers:
            raise UsageError(f"{flag}: layer {idx} is out of range; the teacher has layers 0..{num_layers - 1}")
        if idx in layers:
            raise UsageError(f"{flag}: layer {idx} is repeated; list each layer once")
        layers.append(idx)
    return sorted(layers)
