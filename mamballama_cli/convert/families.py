"""Teacher families: how a transformers architecture maps onto the hybrid.

A family is data: which ``model_type`` values it covers, how the teacher config becomes a hybrid config,
and the key table (:class:`MappingTable`) the converter applies and checks. Built-in families register
through :mod:`mamballama_cli.plugins` exactly like third-party ones (entry-point group
``mamballama.teachers``). More built-in families (Mistral, Qwen2) live in :mod:`families_more`, which builds
on this module; the registry imports both before its first lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any
from collections.abc import Callable

from mamballama_cli import plugins


@dataclass(frozen=True)
class MappingTable:
    """Teacher -> student key table, relative to ``model.layers.{i}.`` for per-layer entries.

    shared:     student key -> teacher key, outside the layers (embeddings, final norm, head)
    per_layer:  student key -> teacher key, in every layer (norms, MLP)
    attention:  student key -> teacher key, in layers that keep attention
    mamba_roles: mixer role -> teacher key, in layers that become Mamba. Roles are what the attention
                weight plays in the mixer: "x" (W_V), "B" (W_K), "C" (W_Q), "out" (W_O), and optional
                bias roles "x_bias", "B_bias", "C_bias", "out_bias". Each mixer knows where a role lands.
    optional:   teacher keys (same spellings as above) that may be absent (biases, an untied head)
    dropped:    regular expressions of teacher keys deliberately not carried over
    """

    shared: dict[str, str]
    per_layer: dict[str, str]
    attention: dict[str, str]
    mamba_roles: dict[str, str]
    optional: frozenset[str] = frozenset()
    dropped: tuple[str, ...] = ()


@dataclass
class TeacherFamily:
    name: str
    model_types: tuple[str, ...]
    description: str
    hybrid_config: Callable[[Any], dict]  # teacher transformers config -> MamballamaConfig kwargs
    mapping: MappingTable
    notes: list[str] = field(default_factory=list)
    check: Callable[[Any], None] | None = None  # raises MamballamaError for unsupported variants


def _rope_parameters(tc) -> dict:
    params = getattr(tc, "rope_parameters", None)
    if params:
        params = dict(params)
        if "rope_theta" not in params and getattr(tc, "rope_theta", None) is not None:
            params["rope_theta"] = tc.rope_theta
        return params
    out = dict(getattr(tc, "rope_scaling", None) or {})
    out.setdefault("rope_theta", getattr(tc, "rope_theta", 10000.0))
    out.setdefault("rope_type", out.pop("type", "default"))
    return out


def llama_style_config(tc) -> dict:
    """Hybrid config fields common to Llama-style teachers (Llama, Mistral, Qwen2...)."""
    n_heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // n_heads
    bias = bool(getattr(tc, "attention_bias", False))
    return dict(
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=getattr(tc, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        hidden_act=getattr(tc, "hidden_act", "silu"),
        max_position_embeddings=getattr(tc, "max_position_embeddings", 4096),
        initializer_range=getattr(tc, "initializer_range", 0.02),
        rms_norm_eps=tc.rms_norm_eps,
        rope_parameters=_rope_parameters(tc),
        attention_qkv_bias=bias,
        attention_out_bias=bias,
        mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        bos_token_id=getattr(tc, "bos_token_id", None),
        eos_token_id=getattr(tc, "eos_token_id", None),
        pad_token_id=getattr(tc, "pad_token_id", None),
    )


LLAMA_STYLE_MAPPING = MappingTable(
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
        "self_attn.q_proj.weight": "self_attn.q_proj.weight",
        "self_attn.k_proj.weight": "self_attn.k_proj.weight",
        "self_attn.v_proj.weight": "self_attn.v_proj.weight",
        "self_attn.o_proj.weight": "self_attn.o_proj.weight",
        "self_attn.q_proj.bias": "self_attn.q_proj.bias",
        "self_attn.k_proj.bias": "self_attn.k_proj.bias",
        "self_attn.v_proj.bias": "self_attn.v_proj.bias",
        "self_attn.o_proj.bias": "self_attn.o_proj.bias",
    },
    mamba_roles={
        "x": "self_attn.v_proj.weight",
        "B": "self_attn.k_proj.weight",
        "C": "self_attn.q_proj.weight",
        "out": "self_attn.o_proj.weight",
    },
    optional=frozenset(
        {
            "lm_head.weight",
            "mlp.gate_proj.bias",
            "mlp.up_proj.bias",
            "mlp.down_proj.bias",
            "self_attn.q_proj.bias",
            "self_attn.k_proj.bias",
            "self_attn.v_proj.bias",
            "self_attn.o_proj.bias",
        }
    ),
    dropped=(r"(^|\.)rotary_emb\.inv_freq$",),
)


def _check_llama(tc) -> None:
    from mamballama_cli.errors import MamballamaError
    from mamballama_cli.models.rope import SUPPORTED_ROPE_TYPES

    rope_type = _rope_parameters(tc).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise MamballamaError(
            f"teacher uses rope_type={rope_type!r}, which the hybrid does not implement; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    act = getattr(tc, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise MamballamaError(f"teacher uses hidden_act={act!r}; the hybrid's MLP supports 'silu' only")


def llama_style_family(name: str, description: str, notes: list[str], *,
                       hybrid_config: Callable[[Any], dict] = llama_style_config,
                       check: Callable[[Any], None] | None = _check_llama, dropped: tuple[str, ...] = (),
                       model_types: tuple[str, ...] | None = None) -> TeacherFamily:
    """A family whose tensors are named as Llama's: Llama's key table, with ``dropped`` (regular expressions of
    teacher keys deliberately not carried over, e.g. the biases of layers that become Mamba) added to its own;
    the model type ``name`` unless ``model_types`` are given; Llama's config fields and checks unless
    ``hybrid_config`` / ``check`` replace them."""
    mapping = LLAMA_STYLE_MAPPING
    if dropped:
        mapping = replace(mapping, dropped=mapping.dropped + tuple(dropped))
    return TeacherFamily(name=name, model_types=model_types or (name,), description=description,
                         hybrid_config=hybrid_config, mapping=mapping, notes=list(notes), check=check)


LLAMA = llama_style_family(
    "llama", "Llama 2/3.x, SmolLM2, TinyLlama and other LlamaForCausalLM checkpoints",
    ["RoPE types default, linear and llama3 are reproduced exactly in attention layers"],
)

plugins.teachers.register(LLAMA)


def family_for(teacher_config) -> TeacherFamily:
    """The registered family handling ``teacher_config.model_type``; a clear error otherwise."""
    from mamballama_cli.errors import MamballamaError

    model_type = getattr(teacher_config, "model_type", None)
    family = plugins.teachers.find(lambda f: model_type in f.model_types)
    if family is None:
        supported = sorted(
            f"{reg.item.name} ({', '.join(reg.item.model_types)})" for reg in plugins.teachers.registrations().values()
        )
        raise MamballamaError(
            f"unsupported teacher architecture model_type={model_type!r}; supported families: "
            f"{'; '.join(supported)} (a plugin can add more: see docs/plugins.md)"
        )
    return family
