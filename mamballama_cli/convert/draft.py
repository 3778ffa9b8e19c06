"""Shrunk Transformer drafts cut from teacher layers (`convert TEACHER --draft-layers 0,10,20,29`).

The draft keeps the teacher's embeddings, final norm and head, and the listed decoder layers in order
(renumbered 0..n-1); it is saved as a normal transformers checkpoint of the teacher's own architecture
(a LlamaForCausalLM with fewer layers, say) plus the teacher's tokenizer, so it loads anywhere and can be
fine-tuned with `sft` or `distill` before serving as the draft of `generate --speculative`.
Design.md section 4: the paper's hybrid drafts were 2- or 4-layer Transformers cut this way.
"""

from __future__ import annotations

import re

from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.output import log

PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder layer
_LAYER_KEY = re.compile(r"^(?P<pre>(?:.*\.)?layers\.)(?P<idx>\d+)(?P<rest>\..+)$")


def draft_config(teacher_config, layers: list[int]):
    """The teacher's config with ``num_hidden_layers`` = len(layers) (per-layer lists cut to match)."""
    import copy

    cfg = copy.deepcopy(teacher_config)
    n = teacher_config.num_hidden_layers
    cfg.num_hidden_layers = len(layers)
    for name in PER_LAYER_FIELDS:
        # Per-layer settings (e.g. layer_types of sliding-window models) follow their layers.
        value = getattr(cfg, name, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(cfg, name, type(value)(value[i] for i in layers))
    return cfg


def cut_state_dict(teacher_sd: dict, layers: list[int]) -> tuple[dict, list[str]]:
    """Keep non-layer tensors and the listed layers, renumbered. Returns (state dict, dropped keys)."""
    new_index = {old: new for new, old in enumerate(layers)}
    out, dropped = {}, []
    for key, tensor in teacher_sd.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            out[key] = tensor
            continue
        old = int(m["idx"])
        if old in new_index:
            out[f"{m['pre']}{new_index[old]}{m['rest']}"] = tensor
        else:
            dropped.append(key)
    return out, dropped


def build_draft(teacher, layers: list[int], dtype=None):
    """An in-memory draft model (same class as ``teacher``) holding copies of the kept tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = draft_config(teacher.config, layers)
    with torch.device("meta"):
        draft = AutoModelForCausalLM.from_config(cfg)
    sd, _ = cut_state_dict(teacher.state_dict(), layers)
    wanted = dict(draft.state_dict())
    missing = [k for k in wanted if k not in sd]
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    unexpected = [k for k in sd if k not in wanted]
    if missing or unexpected:
        raise MamballamaError(
            f"cutting a draft from {type(teacher).__name__} left draft tensors unset ({', '.join(missing[:5])}) or "
            f"teacher tensors unplaced ({', '.join(unexpected[:5])}); this architecture does not keep its layers "
            "under '...layers.{i}.'"
        )
    dtype = dtype or next(teacher.parameters()).dtype
    draft.load_state_dict({k: v.detach().to(dtype).clone() for k, v in sd.items() if k in wanted},
                          strict=False, assign=True)
    if tied:
        draft.tie_weights()
    # Non-persistent buffers (rotary inverse frequencies) were built on the meta device: rebuild them.
    for name, module in draft.named_modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            owner = teacher.get_submodule(name) if _has_submodule(teacher, name) else None
            if owner is not None and hasattr(owner, "inv_freq"):
                module.register_buffer("inv_freq", owner.inv_freq.detach().clone(), persistent=False)
                if hasattr(owner, "original_inv_freq"):
                    module.original_inv_freq = owner.original_inv_freq.detach().clone()
    leftovers = [n for n, t in list(draft.named_parameters()) + list(draft.named_buffers()) if t.is_meta]
    if leftovers:
        raise MamballamaError(f"draft tensors left uninitialised: {', '.join(leftovers[:5])}")
    if getattr(teacher, "generation_config", None) is not None:
        draft.generation_config = teacher.generation_config
    return draft.eval()


def _has_submodule(model, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_draft_convert(cfg, out_dir):
    """`convert TEACHER --draft-layers ...`: cut, save atomically, return a summary."""
    from mamballama_cli.convert import save_conversion, torch_dtype
    from mamballama_cli.convert.placement import parse_layer_list
    from mamballama_cli.convert.teacher import load_teacher, peek_teacher_config

    if cfg.attn_layers is not None:
        raise UsageError("--draft-layers builds a Transformer draft; drop --attn-layers (it applies to hybrids)")
    tconfig, _ = peek_teacher_config(cfg.teacher)
    n_layers = tconfig.num_hidden_layers
    layers = parse_layer_list(cfg.draft_layers, n_layers, flag="--draft-layers")
    if not layers:
        raise UsageError("--draft-layers: list at least one teacher layer, e.g. 0,10,20,29 "
                         f"(the teacher has layers 0..{n_layers - 1})")
    if layers != sorted(layers):  # parse_layer_list sorts; keep the rule explicit for readers
        layers = sorted(layers)
    teacher, tokenizer, source = load_teacher(cfg.teacher, dtype=torch_dtype(cfg.dtype))
    dtype = torch_dtype(cfg.dtype) or next(teacher.parameters()).dtype
    log(f"cutting a {len(layers)}-layer draft from {source.name} ({n_layers} layers): layers {layers}, "
        "embeddings, final norm and head kept")
    draft = build_draft(teacher, layers, dtype=dtype)

    elt = next(draft.parameters()).element_size()
    kv_layer = 2 * getattr(tconfig, "num_key_value_heads", tconfig.num_attention_heads) * (
        getattr(tconfig, "head_dim", None) or tconfig.hidden_size // tconfig.num_attention_heads) * elt
    summary = draft_summary("draft", source, tconfig, teacher, draft, dtype, kv_layer, n_layers, len(layers),
                            "none (Transformer draft)", draft_layers=layers)
    return save_conversion(out_dir, draft, tokenizer, summary, cfg)


def draft_summary(kind: str, source, tconfig, teacher, draft, dtype, kv_layer: int, teacher_attn: int,
                  draft_attn: int, mixer: str, **specific) -> dict:
    """The JSON summary of a draft conversion (a cut draft, a feature draft): what it came from, its size and its
    K/V bytes beside the teacher's, in the shape of the hybrid summary so that `convert` prints one kind of table.
    ``kv_layer``: K/V bytes per token of one attention layer; ``specific``: the kind's own fields."""
    from mamballama_cli import __version__

    return {
        "kind": kind,
        "teacher": {"name_or_path": source.name, "kind": source.kind, "model_type": tconfig.model_type},
        "architecture": type(draft).__name__,
        **specific,
        "num_layers": draft.config.num_hidden_layers,
        "teacher_num_layers": tconfig.num_hidden_layers,
        "mixer": mixer,
        "attn_layers": list(range(draft_attn)),
        "mamba_layers": [],
        "dtype": str(dtype).replace("torch.", ""),
        "parameters": {"teacher": parameter_count(teacher), "hybrid": parameter_count(draft),
                       "draft": parameter_count(draft)},
        "state_memory": {
            "teacher_kv_bytes_per_token": teacher_attn * kv_layer,
            "hybrid_kv_bytes_per_token": draft_attn * kv_layer,
            "hybrid_fixed_state_bytes_per_sequence": 0,
            "at_context": {str(n): {"teacher_bytes": n * teacher_attn * kv_layer,
                                    "hybrid_bytes": n * draft_attn * kv_layer} for n in (4096, 32768)},
        },
        "mamballama_version": __version__,
    }
