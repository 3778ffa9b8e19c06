"""Seed-OSS teacher family for mamballama, registered through the ``mamballama.teachers`` entry point.

A family is data: the model types it covers, a function from the teacher's transformers config to the
hybrid's config fields, and a key table the converter applies and checks (every teacher tensor must be
consumed or listed as dropped; every hybrid parameter must be written).
"""

from __future__ import annotations

from mamballama_cli.convert.families import llama_style_config, llama_style_family

__version__ = "0.1.0"

def seed_oss_config(tc) -> dict:
    """Hybrid config fields from a SeedOssConfig: Llama's, plus its separate q/k/v and o bias switches."""
    kwargs = llama_style_config(tc)
    kwargs.update(
        attention_qkv_bias=bool(getattr(tc, "attention_bias", True)),
        attention_out_bias=bool(getattr(tc, "attention_out_bias", False)),
        mlp_bias=bool(getattr(tc, "mlp_bias", False)),
    )
    return kwargs


def check_seed_oss(tc) -> None:
    """Refuse variants the hybrid cannot reproduce, with the reason and the value."""
    from mamballama_cli.errors import MamballamaError
    from mamballama_cli.models.rope import SUPPORTED_ROPE_TYPES

    params = dict(getattr(tc, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise MamballamaError(
            f"Seed-OSS teacher uses rope_type={rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if getattr(tc, "hidden_act", "silu") not in ("silu", "swish"):
        raise MamballamaError(f"Seed-OSS teacher uses hidden_act={tc.hidden_act!r}; the hybrid supports silu")


# Seed-OSS names its tensors as Llama does (q/k/v/o and MLP biases optional), so the table is Llama's; the
# biases of layers that become Mamba are dropped (attention layers consume theirs first).
SEED_OSS = llama_style_family(
    "seed_oss", "ByteDance Seed-OSS (SeedOssForCausalLM) checkpoints",
    [
        "q/k/v (attention_bias) and o (attention_out_bias) biases kept in attention layers",
        "Mamba layers drop the attention biases (as the built-in qwen2 family does)",
        "dropout settings of the teacher do not apply at conversion (eval mode)",
    ],
    hybrid_config=seed_oss_config, check=check_seed_oss, dropped=(r"(^|\.)self_attn\.[qkvo]_proj\.bias$",),
)
