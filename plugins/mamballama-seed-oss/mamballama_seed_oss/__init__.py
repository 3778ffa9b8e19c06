"""Seed-OSS teacher family for mamballama, registered through the ``mamballama.teachers`` entry point.

A family is data: the model types it covers, a function from the teacher's transformers config to the
hybrid's config fields, and a key table the converter applies and checks (every teacher tensor must be
consumed or listed as dropped; every hybrid parameter must be written).
"""

from __future__ import annotations

from mamballama_cli.convert.families import MappingTable, TeacherFamily, llama_style_config

__version__ = "0.1.0"

# Layer-relative keys are spelled after "model.layers.{i}.".
SEED_OSS_MAPPING = MappingTable(
    shared={
        "model.embed_tokens.weight": "model.embed_tokens.weight",
        "model.norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
    per_layer={
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        "mlp.gate_proj.weight": "mlp.gate_proj.weight",
        "mlp.up_proj.weight": "mlp.up_proj.weight",
        "mlp.down_proj.weight": "mlp.down_proj.weight",
        "mlp.gate_proj.bias": "mlp.gate_proj.bias",
        "mlp.up_proj.bias": "mlp.up_proj.bias",
        "mlp.down_proj.bias": "mlp.down_proj.bias",
    },
    attention={
        f"self_attn.{p}_proj.{kind}": f"self_attn.{p}_proj.{kind}"
        for p in "qkvo"
        for kind in ("weight", "bias")
    },
    # What each attention weight becomes in a Mamba-2 mixer: V -> x, K -> B, Q -> C, O -> out_proj.
    mamba_roles={
        "x": "self_attn.v_proj.weight",
        "B": "self_attn.k_proj.weight",
        "C": "self_attn.q_proj.weight",
        "out": "self_attn.o_proj.weight",
    },
    optional=frozenset(
        {"lm_head.weight"}
        | {f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")}
        | {f"self_attn.{p}_proj.bias" for p in "qkvo"}
    ),
    dropped=(
        r"(^|\.)rotary_emb\.inv_freq$",
        # Biases of layers that become Mamba (attention layers consume theirs first).
        r"(^|\.)self_attn\.[qkvo]_proj\.bias$",
    ),
)


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


SEED_OSS = TeacherFamily(
    name="seed_oss",
    model_types=("seed_oss",),
    description="ByteDance Seed-OSS (SeedOssForCausalLM) checkpoints",
    hybrid_config=seed_oss_config,
    mapping=SEED_OSS_MAPPING,
    notes=[
        "q/k/v (attention_bias) and o (attention_out_bias) biases kept in attention layers",
        "Mamba layers drop the attention biases (as the built-in qwen2 family does)",
        "dropout settings of the teacher do not apply at conversion (eval mode)",
    ],
    check=check_seed_oss,
)
