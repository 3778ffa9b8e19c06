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
import torch.nn.functional as F
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


def chain_mask(T: int, k: int, device) -> Tensor:
    """(T, (k + 1) T) bool, True = attend: what the query at position j of pass k sees among the keys of passes
    0..k laid side by side: pass 0's keys at positions <= j - k, and pass m's key at position j - k + m for
    m = 1..k (so at least its own). That is the context of the draft's (k+1)-th drafting step at j: the pairs the
    verify call confirmed up to j - k, then its own k steps after them."""
    j = torch.arange(T, device=device)[:, None]
    i = torch.arange(T, device=device)[None, :]
    blocks = [i <= j - k] + [i == j - k + m for m in range(1, k + 1)]
    return torch.cat(blocks, dim=1)


@contextlib.contextmanager
def chained_passes(model):
    """Inside, every forward of the draft ``model`` over the same rows is one more pass of its drafting chain
    (a training-time test, as EAGLE-3 trains): pass k's attention at position j sees the keys of pass 0 up to
    j - k and of passes 1..k at j - k + m (:func:`chain_mask`), exactly what its (k+1)-th drafting step at j
    sees after a verify call, where the previous passes were run with the features the pass before predicted.
    Outputs of pass k at positions j < k have no such step (the chain would start before the row); leave them
    out of the loss. The keys and values of every pass are kept until the context exits (one batch)."""
    from mamballama_cli.models.modeling import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    kept: dict[int, tuple[list, list]] = {id(m): ([], []) for m in layers}

    def chained(attn, q, k, v, padding_mask):
        keys, values = kept[id(attn)]
        keys.append(k)
        values.append(v)
        b, _, T, _ = q.shape
        passes = len(keys)
        mask = chain_mask(T, passes - 1, q.device)[None, None]  # (1, 1, T, passes * T)
        if padding_mask is not None:  # no key of a padding position, in any pass; each query still sees its own
            valid = padding_mask[:, :T].bool().repeat(1, passes)  # (b, passes * T)
            own = torch.zeros(T, passes * T, dtype=torch.bool, device=q.device)
            own[:, -T:] = torch.eye(T, dtype=torch.bool, device=q.device)
            mask = (mask & valid[:, None, None, :]) | own
        out = F.scaled_dot_product_attention(
            q, torch.cat(keys, dim=2).to(q.dtype), torch.cat(values, dim=2).to(q.dtype), attn_mask=mask,
            scale=attn.scaling, enable_gqa=attn.n_kv != attn.n_heads)
        return out.transpose(1, 2).reshape(b, T, attn.n_heads * attn.head_dim)

    for m in layers:
        m.chained = chained
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("chained", None)
