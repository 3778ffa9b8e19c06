"""The hybrid decoder: the teacher's Llama-style stack with Mamba mixers in place of most attention layers.

Parameter names follow transformers' Llama (``model.layers.{i}.self_attn.q_proj.weight``, ``mlp.gate_proj``,
``input_layernorm``...) and, for Mamba layers, GraniteMoeHybrid's ``model.layers.{i}.mamba.*`` so that
export is a renaming rather than a rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from mamballama_cli import ops
from mamballama_cli.models.attention_masks import LOWER_RIGHT, attention_mask_4d, lower_right_attention
from mamballama_cli.models.cache import HybridCache
from mamballama_cli.models.configuration import MamballamaConfig
from mamballama_cli.models.mixers import Mamba2Mixer
from mamballama_cli.models.rope import RotaryEmbedding, apply_rotary, rope_inv_freq
from mamballama_cli.models.step import Step, fuse_linears, project_in
from mamballama_cli.ops.decode import write_positions

try:  # transformers >= 5: guarded init functions that respect already-loaded weights
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init


def build_mixer(config, layer_idx: int) -> nn.Module:
    if config.mixer == "mamba2":
        return Mamba2Mixer(config, layer_idx)
    if config.mixer == "mamba1":
        from mamballama_cli.models.mamba1 import Mamba1Mixer

        return Mamba1Mixer(config, layer_idx)
    raise ValueError(f"unknown mixer {config.mixer!r}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        # Under autocast the residual stream is float32 and every consumer of a norm is a projection that
        # autocast casts to its own dtype: emit that dtype here (fused into the kernel on CUDA) rather than cast
        # once per projection (q, k, v; gate, up). The forward is unchanged; in backward the projections' input
        # gradients add up in that dtype.
        device = x.device.type
        out_dtype = None
        if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
            out_dtype = torch.get_autocast_dtype(device)
        return ops.rmsnorm(x, self.weight, self.variance_epsilon, out_dtype)  # reference on CPU, a kernel on CUDA


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported; use 'silu'")

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    chained = None  # set by models/feature_draft.py's chained_passes while a feature draft trains

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=config.attention_qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=config.attention_qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=config.attention_qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=config.attention_out_bias)

    def forward(self, hidden: Tensor, cos: Tensor, sin: Tensor, padding_mask: Tensor | None,
                cache: HybridCache | None) -> Tensor:
        b, q_len, _ = hidden.shape
        q = self.q_proj(hidden).view(b, q_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, q_len, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, q_len, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = ops.rotary(q, k, cos, sin)  # reference on CPU, one kernel each way on CUDA
        if self.chained is not None:  # a feature draft's training-time test (models/feature_draft.py)
            return self.o_proj(self.chained(self, q, k, v, padding_mask))
        if cache is not None:
            k, v = cache.kv_update(self.layer_idx, k, v)
        kv_len = k.shape[2]
        mask = attention_mask_4d(q_len, kv_len, padding_mask, self.sliding_window, hidden.device)
        if mask is LOWER_RIGHT:
            out = lower_right_attention(q, k.to(q.dtype), v.to(q.dtype), self.scaling, self.n_kv != self.n_heads)
        else:
            out = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype),
                attn_mask=mask,
                is_causal=mask is None and q_len > 1,
                scale=self.scaling,
                enable_gqa=self.n_kv != self.n_heads,
            )
        out = out.transpose(1, 2).reshape(b, q_len, self.n_heads * self.head_dim)
        return self.o_proj(out)

    # --- inference (models/step.py) ----------------------------------------------------------------------
    def inference_state(self, cache: HybridCache, window: int = 0, keep_live: bool = False) -> AttentionState:
        """This layer's K/V buffers in the cache (decode and windows alike: rollback is by length) and the fused
        [q; k; v] projection (:func:`fuse_linears`)."""
        qkv_w, qkv_b = fuse_linears(self, ["q_proj", "k_proj", "v_proj"], cache.device.type == "cpu")
        return AttentionState(cache.key[self.layer_idx], cache.value[self.layer_idx], qkv_w, qkv_b)

    def step(self, x: Tensor, state: AttentionState, step: Step) -> Tensor:
        """New tokens' attention over the static K/V buffers, their own K/V written at their positions."""
        fns = step.fns
        qkv = project_in(x, state.qkv_w, state.qkv_b, fns)  # (..., (n_heads + 2 n_kv) * head_dim)
        kb, vb = state.key, state.value
        if not (step.window or step.piece):  # one token per row, x (batch, hidden), at step.pos
            q = fns["rope_kv_write"](qkv, step.cos, step.sin, kb, vb, step.pos, self.n_heads, self.n_kv)
            o = fns["decode_attention"](q, kb, vb, step.length, self.scaling)  # (batch, n_heads, head_dim)
            return fns["gemv"](o.reshape(x.shape[0], -1), self.o_proj.weight, self.o_proj.bias)
        b, T, _ = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        if self.sliding_window is None and not step.piece:
            # RoPE + K/V write at pos + t, then causal attention over [0, pos + t]
            q = fns["rope_kv_write_window"](qkv, step.cos, step.sin, kb, vb, step.pos, nh, nkv)  # (b, T, nh, hd)
            out = fns["window_attention"](q, kb, vb, step.pos, self.scaling)
            return fns["gemv"](out.reshape(b, T, nh * hd), self.o_proj.weight, self.o_proj.bias)
        # Sliding-window layers and prompt pieces: the masked SDPA over the buffer (the window ops have no sliding
        # window, and their tile holds a verify window's queries, not a prompt piece's hundreds).
        idx = step.pos.reshape(-1, 1) + torch.arange(T, device=x.device)  # (1 or batch, T): a position per row
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(b, T, nh, hd).transpose(1, 2)
        k = k.view(b, T, nkv, hd).transpose(1, 2)
        v = v.view(b, T, nkv, hd).transpose(1, 2)
        q, k = apply_rotary(q, k, step.cos[idx].expand(b, T, -1), step.sin[idx].expand(b, T, -1))
        write_positions(kb, idx, k)
        write_positions(vb, idx, v)
        L = kb.shape[2] if step.kv_len is None else step.kv_len  # graphs attend over the whole buffer, masked
        kj = torch.arange(L, device=x.device)
        mask = kj <= idx[..., None]
        if self.sliding_window is not None:
            mask &= kj > idx[..., None] - self.sliding_window  # a token sees its window
        out = F.scaled_dot_product_attention(
            q, kb[:, :, :L].to(q.dtype), vb[:, :, :L].to(q.dtype), attn_mask=mask[:, None],
            scale=self.scaling, enable_gqa=nkv != nh,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, T, nh * hd))


@dataclass
class AttentionState:
    """What an attention layer's ``step`` reads: the cache's K/V buffers (batch, n_kv, capacity, head_dim)
    and the fused [q; k; v] weight and bias."""

    key: Tensor
    value: Tensor
    qkv_w: Tensor
    qkv_b: Tensor | None


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_attention = config.is_attention_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_attention:
            self.self_attn = Attention(config, layer_idx)
        else:
            self.mamba = build_mixer(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden: Tensor, cos: Tensor, sin: Tensor, padding_mask: Tensor | None = None,
                cache: HybridCache | None = None, new_token_mask: Tensor | None = None) -> Tensor:
        """padding_mask (batch, kv_len) covers cached + new tokens (attention); new_token_mask (batch, q_len)
        is None unless some new token is padding (Mamba layers zero those positions)."""
        residual = hidden
        h = self.input_layernorm(hidden)
        if self.is_attention:
            h = self.self_attn(h, cos, sin, padding_mask, cache)
        else:
            state = cache.mamba_state(self.layer_idx) if cache is not None else None
            continuing = cache is not None and cache.seqlen > 0
            h = self.mamba(h, state, new_token_mask, continuing)
        hidden = residual + h
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


# transformers renamed the cache field of model outputs from ``past_key_values`` (5.17) to ``cache`` (later
# releases, where ModelOutput rewrites the old name). Declare whichever this release expects.
CACHE_FIELD = "cache" if hasattr(ModelOutput, "_replace_old_cache_name") else "past_key_values"

if CACHE_FIELD == "cache":

    @dataclass
    class HybridModelOutput(ModelOutput):
        last_hidden_state: Tensor | None = None
        cache: HybridCache | None = None
        hidden_states: tuple[Tensor, ...] | None = None

    @dataclass
    class HybridCausalLMOutput(ModelOutput):
        loss: Tensor | None = None
        logits: Tensor | None = None
        cache: HybridCache | None = None
        hidden_states: tuple[Tensor, ...] | None = None

else:

    @dataclass
    class HybridModelOutput(ModelOutput):
        last_hidden_state: Tensor | None = None
        past_key_values: HybridCache | None = None
        hidden_states: tuple[Tensor, ...] | None = None

    @dataclass
    class HybridCausalLMOutput(ModelOutput):
        loss: Tensor | None = None
        logits: Tensor | None = None
        past_key_values: HybridCache | None = None
        hidden_states: tuple[Tensor, ...] | None = None


def output_cache(output) -> HybridCache | None:
    """The cache carried by a model output, whatever this transformers release calls the field."""
    return output[CACHE_FIELD] if CACHE_FIELD in output.keys() else None


class MamballamaPreTrainedModel(PreTrainedModel):
    config_class = MamballamaConfig
    config: MamballamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True  # transformers then refuses assisted decoding; ours is in generation.speculative

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            # Non-persistent buffer: from_pretrained builds it on the meta device, so recompute it here.
            inv_freq, _ = rope_inv_freq(self.config.rope_parameters, self.config.head_dim)
            init.copy_(module.inv_freq, inv_freq)
        if hasattr(module, "init_ssm_parameters"):  # Mamba mixers: dt_bias, A_log, D, norm
            module.init_ssm_parameters(init)


class MamballamaModel(MamballamaPreTrainedModel):
    def __init__(self, config: MamballamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope_parameters, config.head_dim)
        h = config.hidden_size  # a feature draft's input layer (models/feature_draft.py)
        self.fc = nn.Linear(2 * h, h, bias=False) if getattr(config, "feature_draft", False) else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HybridModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, q_len, _ = inputs_embeds.shape
        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        use_cache = use_cache if use_cache is not None else (cache is not None)
        if use_cache and cache is None:
            cache = HybridCache(self, b, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        past = cache.seqlen if cache is not None else 0

        padding_mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            padding_mask = attention_mask
        if position_ids is None:
            if padding_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past, past + q_len, device=inputs_embeds.device)[None].expand(b, -1)
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)
        new_token_mask = None
        if padding_mask is not None and not bool(padding_mask[:, -q_len:].all()):
            new_token_mask = padding_mask[:, -q_len:]

        hidden = inputs_embeds
        all_hidden = (hidden,) if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, padding_mask, cache, new_token_mask)
            if output_hidden_states:
                all_hidden += (hidden,)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden,)
        if cache is not None:
            cache.advance(q_len)
        return HybridModelOutput(
            last_hidden_state=hidden, hidden_states=all_hidden, **{CACHE_FIELD: cache if use_cache else None}
        )


class MamballamaForCausalLM(MamballamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MamballamaConfig):
        super().__init__(config)
        self.model = MamballamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs,
    ) -> HybridCausalLMOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values if past_key_values is not None else kwargs.pop("cache", None),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
            )
        return HybridCausalLMOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_FIELD: output_cache(out)}
        )

    # --- transformers.generate integration -------------------------------------------------------------
    # The cache travels under our own key so the code does not depend on how a given transformers release
    # names it ("past_key_values" in 5.17, "cache" in later releases).
    _CACHE_KEY = "hybrid_cache"

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        cache = kwargs.get(self._CACHE_KEY)
        use_cache = kwargs.get("use_cache", True)
        model_inputs = {"attention_mask": attention_mask, "use_cache": use_cache}
        if cache is not None and cache.seqlen > 0:
            model_inputs["input_ids"] = input_ids[:, cache.seqlen:]
        elif inputs_embeds is not None:
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            model_inputs["input_ids"] = input_ids
        if use_cache:
            if cache is None:
                ref = input_ids if input_ids is not None and input_ids.numel() else inputs_embeds
                cache = HybridCache(self, ref.shape[0])
            model_inputs["past_key_values"] = cache
        if "logits_to_keep" in kwargs:
            model_inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        cache = output_cache(outputs)
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        model_kwargs.pop("past_key_values", None)
        model_kwargs.pop("cache", None)
        model_kwargs[self._CACHE_KEY] = cache
        return model_kwargs

