"""Feature drafts cut from a target (`convert TARGET --feature-draft --output DIR`; docs/speculative.md, issue 18).

A feature draft is a one-layer :class:`~mamballama_cli.models.modeling.MamballamaForCausalLM` with
``feature_draft: true``: it reads ``fc([embed(x_t); f_{t-1}])``, where f is the target's last hidden state after
its final norm (:mod:`mamballama_cli.models.feature_draft`). It starts from the target's own weights:

- the embedding, the head (untied: the head is a copy even where the target ties it) and the final norm;
- its one decoder layer: the target's last layer with attention (a Llama-family target's last layer, a hybrid's
  last attention layer): q/k/v/o, the MLP and both norms;
- ``fc`` = ``[I | I] / 2``: the input is the mean of ``embed(x_t)`` and ``f_{t-1}``, the token and the target's
  feature of the position before (:data:`FC_INIT` says why).

It is untrained: `distill DRAFT --teacher TARGET --template distill-feature-draft` trains it.
"""

from __future__ import annotations

import torch

from mamballama_cli.errors import MamballamaError, UsageError
from mamballama_cli.output import log

# How fc starts. No start is good untrained: the copied layer never saw this input, and every start below agrees
# with the target's next token on under 1% of held-out positions of the default teacher (SmolLM2-135M-Instruct).
# What differs is how fast it trains. Teacher-forced on 32 x 128 tokens of built-in text (AdamW, lr 3e-4, 4 rows
# a step, KL + smooth L1 to the features, embedding and head frozen), then measured on 8 x 128 held-out tokens
# (top-1 agreement with the target / KL per token):
#   after 200 steps (data order 1): [I | I] / 2 0.244 / 2.80, [I | 0] 0.228 / 2.90, [I | I] 0.210 / 2.98,
#                                    N(0, 0.02) 0.189 / 3.20
#   after 100 steps (data order 0): [I | I] / 2 0.204 / 3.07, [I | I] 0.179 / 3.25, [0 | I] 0.162 / 3.28,
#                                    N(0, 0.02) 0.137 / 3.36
# [I | I] / 2 led both runs. It is a small CPU measurement on one target, not a tuned result.
FC_INIT = "identity-mean"

# Config fields a feature draft takes from a hybrid target as they are (a transformers target goes through its
# family's hybrid_config, as `convert` does).
HYBRID_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                 "rope_parameters", "attention_qkv_bias", "attention_out_bias", "sliding_window", "mlp_bias",
                 "bos_token_id", "eos_token_id", "pad_token_id")


def fc_init_weight(hidden: int, how: str = FC_INIT, std: float = 0.02, generator=None) -> torch.Tensor:
    """The (hidden, 2 hidden) weight of ``fc`` to start from: ``identity-mean`` ([I | I] / 2: the mean of
    embed(x_t) and f_{t-1}), ``identity-sum`` ([I | I]), ``token`` ([I | 0]), ``feature`` ([0 | I]) or ``normal``
    (N(0, std)).

    ``identity-mean`` (the default) hands the layer both inputs unmixed: the feature carries the context, the
    token what was actually drawn. It trained fastest of these (the numbers are in :data:`FC_INIT`'s comment)."""
    eye = torch.eye(hidden)
    zero = torch.zeros(hidden, hidden)
    if how == "identity-sum":
        return torch.cat([eye, eye], 1)
    if how == "identity-mean":
        return torch.cat([eye, eye], 1) / 2
    if how == "token":
        return torch.cat([eye, zero], 1)
    if how == "feature":
        return torch.cat([zero, eye], 1)
    if how == "normal":
        return torch.randn(hidden, 2 * hidden, generator=generator) * std
    raise ValueError(f"unknown fc init {how!r}")


def attention_layer_of(target) -> int:
    """The target layer the draft's layer starts from: its last layer with attention."""
    cfg = target.config
    if getattr(cfg, "model_type", None) == "mamballama":
        if not cfg.attn_layers:
            raise UsageError("--feature-draft: the target hybrid has no attention layer to start the draft's layer "
                             "from (its attn_layers is empty); cut the draft from its teacher instead")
        return max(cfg.attn_layers)
    return cfg.num_hidden_layers - 1


def draft_config_kwargs(tconfig) -> dict:
    """The target's dimensions as MamballamaConfig keyword arguments (a hybrid's own, a family's mapping else)."""
    if getattr(tconfig, "model_type", None) == "mamballama":
        return {k: getattr(tconfig, k) for k in HYBRID_FIELDS if hasattr(tconfig, k)}
    from mamballama_cli.convert.families import family_for

    family = family_for(tconfig)
    if family.check is not None:
        family.check(tconfig)
    kwargs = family.hybrid_config(tconfig)
    for key in ("num_hidden_layers", "attn_layers", "tie_word_embeddings", "mixer"):
        kwargs.pop(key, None)
    return kwargs


def layer_key_map(target, src: int) -> dict[str, str]:
    """Draft key of layer 0 -> target key of layer ``src`` (the family's table for a transformers target)."""
    if getattr(target.config, "model_type", None) == "mamballama":
        pre = f"model.layers.{src}."
        return {f"model.layers.0.{k[len(pre):]}": k for k in target.state_dict() if k.startswith(pre)}
    from mamballama_cli.convert.families import family_for

    table = family_for(target.config).mapping
    return {f"model.layers.0.{s}": f"model.layers.{src}.{t}" for s, t in {**table.per_layer,
                                                                        **table.attention}.items()}


@torch.no_grad()
def build_feature_draft(target, target_info: dict, dtype=None, seed: int = 0, fc_init: str = FC_INIT):
    """An untrained feature draft of ``target`` (a hybrid or a transformers causal LM), in ``dtype`` (default:
    the target's). ``target_info`` ({"name_or_path", "kind"}) is recorded as the draft's teacher."""
    from mamballama_cli.models.configuration import MamballamaConfig
    from mamballama_cli.models.modeling import MamballamaForCausalLM

    tconfig = target.config
    src = attention_layer_of(target)
    info = {**target_info, "model_type": tconfig.model_type}
    if tconfig.model_type != "mamballama":
        from mamballama_cli.convert.families import family_for

        info["family"] = family_for(tconfig).name
    cfg = MamballamaConfig(**draft_config_kwargs(tconfig), num_hidden_layers=1, attn_layers=[0],
                           feature_draft=True, tie_word_embeddings=False, teacher=info,
                           draft_of={**info, "kind": "feature", "source": target_info.get("kind"),
                                     "num_hidden_layers": tconfig.num_hidden_layers, "layer": src,
                                     "fc_init": fc_init})
    torch.manual_seed(seed)
    draft = MamballamaForCausalLM(cfg).float()
    tsd = target.state_dict()
    wanted = {"model.embed_tokens.weight": target.get_input_embeddings().weight,
              "lm_head.weight": target.get_output_embeddings().weight}
    if "model.norm.weight" not in tsd:
        raise MamballamaError(f"--feature-draft: {type(target).__name__} keeps no final norm under "
                              "'model.norm.weight'; this architecture is not supported")
    wanted["model.norm.weight"] = tsd["model.norm.weight"]
    for dkey, tkey in layer_key_map(target, src).items():
        if tkey in tsd:
            wanted[dkey] = tsd[tkey]
    dsd = draft.state_dict()
    unset = [k for k in dsd if k not in wanted and k != "model.fc.weight"]
    unplaced = [k for k in wanted if k not in dsd]
    if unset or unplaced:
        raise MamballamaError(f"--feature-draft: the target's layer {src} left draft tensors unset "
                              f"({', '.join(unset[:5])}) or target tensors unplaced ({', '.join(unplaced[:5])})")
    for key, tensor in wanted.items():
        if dsd[key].shape != tensor.shape:
            raise MamballamaError(f"--feature-draft: {key} is {tuple(tensor.shape)} in the target but "
                                  f"{tuple(dsd[key].shape)} in the draft")
        dsd[key].copy_(tensor.detach().float())
    g = torch.Generator().manual_seed(seed)
    draft.model.fc.weight.copy_(fc_init_weight(cfg.hidden_size, fc_init, cfg.initializer_range, g))
    if getattr(target, "generation_config", None) is not None:
        draft.generation_config = target.generation_config
    dtype = dtype or next(target.parameters()).dtype
    return draft.to(dtype).eval(), src


def run_feature_draft_convert(cfg, out_dir):
    """`convert TARGET --feature-draft`: build, save atomically, return a summary."""
    from mamballama_cli.convert import save_conversion, torch_dtype
    from mamballama_cli.convert.draft import draft_summary
    from mamballama_cli.convert.teacher import load_teacher, peek_teacher_config

    tconfig, _ = peek_teacher_config(cfg.teacher)
    draft_config_kwargs(tconfig)  # an unsupported architecture fails here, before the weights load
    target, tokenizer, source = load_teacher(cfg.teacher, dtype=torch_dtype(cfg.dtype))
    dtype = torch_dtype(cfg.dtype) or next(target.parameters()).dtype
    n_layers = tconfig.num_hidden_layers
    draft, src = build_feature_draft(target, {"name_or_path": source.name, "kind": source.kind}, dtype=dtype,
                                     seed=cfg.seed)
    log(f"feature draft of {source.name} ({n_layers} layers): one layer from its layer {src}, embeddings, final "
        "norm and head copied, fc = [I | I] / 2")
    c = draft.config
    kv_layer = 2 * c.num_key_value_heads * c.head_dim * next(draft.parameters()).element_size()
    t_attn = len(tconfig.attn_layers) if tconfig.model_type == "mamballama" else n_layers
    summary = draft_summary("feature-draft", source, tconfig, target, draft, dtype, kv_layer, t_attn, 1,
                            "none (feature draft)", source_layer=src, fc_init=FC_INIT)
    return save_conversion(out_dir, draft, tokenizer, summary, cfg)
