"""A speculative draft that reads its target's features (EAGLE-style; docs/speculative.md, issue 18).

Such a draft is a :class:`~mamballama_cli.models.modeling.MamballamaForCausalLM` whose config says
``feature_draft: true``: usually one attention layer, the target's vocabulary, and ``model.fc`` (2 hidden ->
hidden). Its input at position t is ``fc([embed(x_t); f_{t-1}])``, where ``f`` is the target's feature: its last
hidden state after the final norm, what its ``lm_head`` reads. Its own last hidden state is a predicted feature
(trained towards the target's at t) and its logits predict x_{t+1}, as the target's would. The checkpoint is an
ordinary one (safetensors, Auto classes): ``fc`` is one more weight.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def is_feature_draft(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "feature_draft", False))


def _fc(base, emb: Tensor, features: Tensor) -> Tensor:
    """``fc([emb; features])``, the features checked against the embeddings' shape."""
    if features.shape != emb.shape:
        raise ValueError(f"features of shape {tuple(features.shape)} for embeddings of shape {tuple(emb.shape)}: "
                         f"give one {emb.shape[-1]}-wide feature per token")
    return base.fc(torch.cat([emb, features.to(emb.dtype)], dim=-1))


def feature_inputs(model, ids: Tensor, features: Tensor) -> Tensor:
    """The draft's input embeddings: ``fc([embed(ids); features])``; ids (..., T), features (..., T, hidden),
    features[..., t, :] the target's feature one position before ids[..., t]."""
    return _fc(model.model, model.model.embed_tokens(ids), features)


def draft_forward(model, ids: Tensor, features: Tensor, **kw) -> tuple[Tensor, Tensor]:
    """(logits, predicted features) of a feature draft over ids (batch, T) with the target's features shifted one
    position back (batch, T, hidden). ``kw`` goes to the base model (``past_key_values``, ``use_cache``...)."""
    out = model.model(inputs_embeds=feature_inputs(model, ids, features), **kw)
    hidden = out.last_hidden_state
    return model.lm_head(hidden), hidden


@contextlib.contextmanager
def features_in(model, features: Tensor):
    """Inside, the draft's own forward (``model(input_ids=ids)``) computes what :func:`draft_forward` does: a hook
    on its embedding hands on ``fc([embed(ids); features])``. ``model`` is the draft itself; the forward may go
    through a wrapper of it (DDP, FSDP, DeepSpeed), which then sees the call it needs to see."""
    base = model.model

    def hook(module, args, output):
        return _fc(base, output, features)

    handle = base.embed_tokens.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def target_features(model, ids: Tensor, **kw) -> tuple[Tensor, Tensor]:
    """(logits, features) of a target (a mamballama hybrid or a transformers causal LM) over ids: the features are
    its last hidden state after the final norm, the input of its lm_head."""
    out = model(input_ids=ids, output_hidden_states=True, **kw)
    return out.logits, out.hidden_states[-1]
