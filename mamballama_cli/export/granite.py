"""Hybrid -> GraniteMoeHybridForCausalLM (design.md section 7), as a table of renames plus one expansion.

GraniteMoeHybrid is a decoder whose layers are either full attention or a Mamba-2 mixer, with a dense
"shared" MLP and no experts when ``num_local_experts = 0``. It holds our hybrid exactly when:

    attention head size = hidden_size / num_attention_heads     (Granite has no head_dim field)
    mamba_n_heads = n_h, mamba_n_groups = n_h                   (one B/C group per head)
    mamba_d_head = P, mamba_d_state = N, mamba_expand = n_h * P / hidden_size (an integer)

Our mixer keeps GQA: x and B have n_kv groups and SSM head i reads group i // r (r = n_h / n_kv). Granite
has one group per head, so the x and B rows of ``in_proj`` (and their conv channels, ordered [x, B, C]
like ours) are repeated r times per group. Everything else is a rename:

    mlp.gate_proj, mlp.up_proj -> shared_mlp.input_linear  (rows [gate; up])
    mlp.down_proj              -> shared_mlp.output_linear

A hybrid without Mamba-2's gate (``convert --no-gate``) gets the gate Granite always applies, made constant: its
z rows of ``in_proj`` are zero and their bias is ``UNIT_GATE``, where silu is 1, so the gated norm is the plain
per-head norm (the projections take biases then, zero where the hybrid has none; in bf16 silu(bias) rounds to
1.0028, which scales the norm's eps by 0.9945).

Scalars: attention_multiplier = head_dim ** -0.5 (the softmax scale), embedding / residual multipliers and
logits_scaling 1. Granite's gated RMSNorm uses groups of intermediate_size / n_groups = P channels, our
per-head groups (transformers >= 5.23; older releases normalise over the whole width, see docs/export.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mamballama_cli.errors import MamballamaError

FORMAT = "granite-hybrid"
ARCHITECTURE = "GraniteMoeHybridForCausalLM"
# Granite's own checkpoints and vLLM's in-tree model spell the layer kinds this way; transformers maps them
# to "linear_attention" / "full_attention" when it loads the config (every 5.x release).
LAYER_NAMES = {"attention": "attention", "mamba": "mamba"}
GRANITE_CHUNK_SIZE = 256  # what Granite 4.0 ships; the chunk size changes no result, only the scan's blocking
EXACT_TRANSFORMERS = "5.23.0"  # first release whose GraniteMoeHybridRMSNormGated normalises per group
UNIT_GATE = 1.2784645427610737  # c with silu(c) = c * sigmoid(c) = 1: the bias of a gate-free hybrid's z rows


class ExportRefused(MamballamaError):
    """The hybrid cannot be represented exactly in the target architecture."""


def refusal_reasons(cfg) -> list[str]:
    """Every reason the hybrid config cannot become a GraniteMoeHybrid checkpoint exactly (empty: it can)."""
    reasons: list[str] = []
    if getattr(cfg, "model_type", None) != "mamballama":
        return [
            f"model_type={getattr(cfg, 'model_type', None)!r} is not a mamballama hybrid; export converts "
            "the output of `mamballama convert` / `distill`"
        ]
    H, n_h, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    has_attn = bool(cfg.attn_layers)
    has_mamba = bool(cfg.mamba_layers)
    if n_h * d != H:
        reasons.append(
            f"num_attention_heads * head_dim = {n_h} * {d} = {n_h * d} != hidden_size {H}: GraniteMoeHybrid "
            "derives the attention head size as hidden_size / num_attention_heads and needs mamba_n_heads * "
            "head_dim to be a multiple of hidden_size"
        )
    if has_mamba:
        if cfg.mixer != "mamba2":
            reasons.append(
                f"mixer={cfg.mixer!r}: GraniteMoeHybrid holds Mamba-2 layers only (Mamba-1's selective "
                "scan has per-channel dt and a different state layout)"
            )
        else:
            inner = cfg.mamba_n_heads * cfg.mamba_headdim
            if inner % H:
                reasons.append(
                    f"mamba_n_heads * mamba_headdim = {inner} is not a multiple of hidden_size {H}, "
                    "so no integer mamba_expand describes it"
                )
            if not cfg.mamba_gated_norm:
                reasons.append("mamba_gated_norm=False: GraniteMoeHybrid always applies the gated RMSNorm")
            if cfg.mamba_activation != "silu":
                reasons.append(
                    f"mamba_activation={cfg.mamba_activation!r}: GraniteMoeHybrid applies hidden_act "
                    "(silu) after the conv"
                )
    if cfg.hidden_act not in ("silu", "swish"):
        reasons.append(f"hidden_act={cfg.hidden_act!r}: only silu is supported")
    if cfg.mlp_bias:
        reasons.append("mlp_bias=True: GraniteMoeHybrid's shared_mlp has no biases")
    if has_attn and cfg.sliding_window is not None:
        reasons.append(
            f"sliding_window={cfg.sliding_window}: GraniteMoeHybrid attention is full causal "
            "attention, so attention layers would see more context than they were trained on"
        )
    rope = dict(cfg.rope_parameters or {})
    if has_attn:
        if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
            reasons.append(f"rope_type={rope.get('rope_type')!r} is not one the export maps")
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            reasons.append(
                f"partial_rotary_factor={rope['partial_rotary_factor']}: GraniteMoeHybrid rotates "
                "the whole head"
            )
    return reasons


def check_exportable(cfg) -> None:
    reasons = refusal_reasons(cfg)
    if reasons:
        raise ExportRefused("cannot export to granite-hybrid exactly: " + "; ".join(reasons))


def granite_config(cfg, dtype: torch.dtype) -> dict:
    """The config.json of the exported model (keys every transformers 5.x release and vLLM understand)."""
    check_exportable(cfg)
    has_attn = bool(cfg.attn_layers)
    attn_bias = has_attn and bool(cfg.attention_qkv_bias or cfg.attention_out_bias)
    rope = {k: v for k, v in dict(cfg.rope_parameters).items()}
    out = {
        "architectures": [ARCHITECTURE],
        "model_type": "granitemoehybrid",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "position_embedding_type": "rope",
        "rope_parameters": rope,
        "attention_bias": attn_bias,
        "attention_dropout": 0.0,
        "attention_multiplier": float(cfg.head_dim) ** -0.5,
        "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0,
        "logits_scaling": 1.0,
        # Dense: no routed experts; the teacher's MLP is the "shared" MLP of every layer.
        "num_local_experts": 0,
        "num_experts_per_tok": 0,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,
        "intermediate_size": cfg.intermediate_size,
        "shared_intermediate_size": cfg.intermediate_size,
        "layer_types": [LAYER_NAMES[k] for k in cfg.layer_kinds],
        "mamba_n_heads": cfg.mamba_n_heads,
        "mamba_n_groups": cfg.mamba_n_heads,
        "mamba_d_state": cfg.mamba_d_state,
        "mamba_d_head": cfg.mamba_headdim,
        "mamba_d_conv": cfg.mamba_d_conv,
        "mamba_expand": (cfg.mamba_n_heads * cfg.mamba_headdim) // cfg.hidden_size,
        "mamba_chunk_size": GRANITE_CHUNK_SIZE,
        "mamba_conv_bias": bool(cfg.mamba_conv_bias),
        "mamba_proj_bias": _proj_bias(cfg),
        "normalization_function": "rmsnorm",
        "dtype": str(dtype).replace("torch.", ""),
    }
    return out


def _repeat_groups(t: Tensor, n_groups: int, r: int) -> Tensor:
    """(n_groups * w, ...) -> (n_groups * r * w, ...): each group's block of rows repeated r times in place,
    so that Granite's head i (one group per head) reads what our head i read from group i // r."""
    if r == 1:
        return t
    w = t.shape[0] // n_groups
    return (
        t.reshape(n_groups, w, *t.shape[1:])
        .repeat_interleave(r, dim=0)
        .reshape(n_groups * r * w, *t.shape[1:])
    )


def _expand_xbc_rows(t: Tensor, cfg) -> Tensor:
    """Rows [x (n_kv*P), B (n_kv*N), C (n_h*N)] -> [x (n_h*P), B (n_h*N), C] (conv, in_proj's xBC part)."""
    g, P, N = cfg.mamba_n_groups, cfg.mamba_headdim, cfg.mamba_d_state
    r = cfg.mamba_n_heads // g
    x, B, C = torch.split(t, [g * P, g * N, cfg.mamba_n_heads * N], dim=0)
    return torch.cat([_repeat_groups(x, g, r), _repeat_groups(B, g, r), C], dim=0)


def _gated(cfg) -> bool:
    return bool(getattr(cfg, "mamba_gate", True))


def _proj_bias(cfg) -> bool:
    """Granite's projections take biases where the hybrid's do, and where the hybrid has no gate (its constant)."""
    return bool(cfg.mamba_proj_bias) or not _gated(cfg)


def _expand_in_proj(t: Tensor, cfg, bias: bool = False) -> Tensor:
    """in_proj rows [z, x, B, C, dt] (no z without a gate) with x, B at n_kv groups -> [z, x, B, C, dt] with x, B
    at n_h groups; a gate-free hybrid's z rows are zero, their bias ``UNIT_GATE``."""
    d_inner = cfg.mamba_n_heads * cfg.mamba_headdim
    d_z = d_inner if _gated(cfg) else 0
    z, xbc, dt = torch.split(t, [d_z, cfg.mamba_conv_dim, cfg.mamba_n_heads], dim=0)
    if not d_z:
        z = t.new_full((d_inner,), UNIT_GATE) if bias else t.new_zeros(d_inner, *t.shape[1:])
    return torch.cat([z, _expand_xbc_rows(xbc, cfg), dt], dim=0)


# Per-layer renames (student key suffix -> Granite key suffix); MLP and x/B expansion handled in code.
_NORMS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
}
_ATTN = [f"self_attn.{p}_proj" for p in "qkvo"]
_MAMBA_PLAIN = [
    "mamba.dt_bias",
    "mamba.A_log",
    "mamba.D",
    "mamba.norm.weight",
    "mamba.out_proj.weight",
]


def granite_state_dict(sd: dict[str, Tensor], cfg, dtype: torch.dtype) -> dict[str, Tensor]:
    """Map the hybrid's state dict onto GraniteMoeHybrid names. Every source tensor must be used exactly once
    (tied lm_head excepted); leftovers are a bug and raise."""
    check_exportable(cfg)
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in sd:
            raise MamballamaError(f"export: the hybrid checkpoint lacks {key}")
        used.add(key)
        return sd[key]

    out["model.embed_tokens.weight"] = take("model.embed_tokens.weight")
    out["model.norm.weight"] = take("model.norm.weight")
    if cfg.tie_word_embeddings:
        used.add("lm_head.weight")  # the same tensor as the embeddings; Granite ties it back on load
    else:
        out["lm_head.weight"] = take("lm_head.weight")

    attn_bias = bool(cfg.attn_layers) and bool(cfg.attention_qkv_bias or cfg.attention_out_bias)
    for i, kind in enumerate(cfg.layer_kinds):
        pre = f"model.layers.{i}."
        for src, dst in _NORMS.items():
            out[pre + dst] = take(pre + src)
        out[pre + "shared_mlp.input_linear.weight"] = torch.cat(
            [take(pre + "mlp.gate_proj.weight"), take(pre + "mlp.up_proj.weight")], dim=0
        )
        out[pre + "shared_mlp.output_linear.weight"] = take(pre + "mlp.down_proj.weight")
        if kind == "attention":
            for proj in _ATTN:
                w = take(pre + proj + ".weight")
                out[pre + proj + ".weight"] = w
                if attn_bias:
                    # Granite has one attention_bias flag for q, k, v and o; a bias the hybrid lacks
                    # (Qwen2 has none on o_proj) is written as zeros, which is exact.
                    key = pre + proj + ".bias"
                    out[key] = take(key) if key in sd else torch.zeros(w.shape[0], dtype=w.dtype)
            continue
        m = pre + "mamba."
        w = take(m + "in_proj.weight")
        out[m + "in_proj.weight"] = _expand_in_proj(w, cfg)
        if _proj_bias(cfg):  # Granite's one bias flag covers in_proj and out_proj: zeros where the hybrid has none
            bias = take(m + "in_proj.bias") if cfg.mamba_proj_bias else w.new_zeros(w.shape[0])
            out[m + "in_proj.bias"] = _expand_in_proj(bias, cfg, bias=True)
            key = m + "out_proj.bias"
            out[key] = take(key) if cfg.mamba_proj_bias else w.new_zeros(cfg.hidden_size)
        out[m + "conv1d.weight"] = _expand_xbc_rows(take(m + "conv1d.weight"), cfg)
        if cfg.mamba_conv_bias:
            out[m + "conv1d.bias"] = _expand_xbc_rows(take(m + "conv1d.bias"), cfg)
        for name in _MAMBA_PLAIN:
            out[pre + name] = take(pre + name)

    leftovers = sorted(set(sd) - used)
    if leftovers:
        raise MamballamaError(
            f"export: {len(leftovers)} hybrid tensor(s) have no GraniteMoeHybrid counterpart: "
            f"{', '.join(leftovers[:8])}"
        )
    # Contiguous tensors in the export dtype; no two share storage (safetensors refuses that), since every
    # source tensor is used once and the tied head is left out.
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def granite_modeling():
    """transformers' GraniteMoeHybrid modeling module (the target architecture of the installed release)."""
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid

    return modeling_granitemoehybrid


def check_against_transformers(config_dict: dict, tensors: dict[str, Tensor]) -> None:
    """Build the installed transformers' target model on the meta device; compare tensor names and shapes."""
    from transformers import GraniteMoeHybridConfig

    GraniteMoeHybridForCausalLM = granite_modeling().GraniteMoeHybridForCausalLM

    gcfg = GraniteMoeHybridConfig(
        **{k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")}
    )
    with torch.device("meta"):
        model = GraniteMoeHybridForCausalLM(gcfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if gcfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}")
        if wrong:
            parts.append("shape " + ", ".join(f"{k} {got[k]} != {expected[k]}" for k in wrong[:4]))
        raise MamballamaError(
            "export: the tensors do not match transformers' GraniteMoeHybrid: " + "; ".join(parts)
        )


def transformers_norm_is_grouped() -> bool:
    """Whether the installed transformers normalises Granite's gated RMSNorm per group (>= 5.23)."""
    import inspect

    norm = granite_modeling().GraniteMoeHybridRMSNormGated
    return "group_size" in inspect.signature(norm.__init__).parameters
