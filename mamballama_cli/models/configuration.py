"""Configuration of the hybrid: a Llama-style decoder where some layers' attention became a Mamba mixer."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

MIXERS = ("mamba2", "mamba1")


class MamballamaConfig(PretrainedConfig):
    r"""Hybrid attention / Mamba decoder.

    Everything but the token mixer follows the teacher (Llama naming: ``hidden_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``rope_parameters``...). Layers listed in
    ``attn_layers`` keep the teacher's attention; all others hold a ``mixer`` ("mamba2" or "mamba1").

    Mamba-2 mixer dimensions (defaults derive from the teacher's attention, design.md section 2):
        mamba_n_heads   SSM heads (= query heads n_h); C has one group per head
        mamba_n_groups  heads of x and B (= KV heads n_kv); SSM head i reads group i // (n_h / n_kv)
        mamba_headdim   P (= head_dim), mamba_d_state  N (= head_dim)
        mamba_d_conv    causal conv width over [x, B, C]
        mamba_gated_norm  the grouped RMSNorm before out_proj (False: neither norm nor gate)
        mamba_gate      the z projection and its silu(z) gate on that norm (False: in_proj has no z rows and the
                        norm is a plain grouped RMSNorm; n_h * P fewer rows to read a token, 0.81 GB at the 8B
                        shape's 24 Mamba layers; docs/method.md, "The gate")

    Mamba-1 mixer (``mixer="mamba1"``): ``mamba1_d_state`` (16), ``mamba1_dt_rank`` (ceil(hidden / 16)),
    x over n_kv * head_dim channels, B/C per group of 16 channels.

    ``teacher`` records where the hybrid came from ({"name_or_path", "model_type", "family"}).

    ``feature_draft``: a speculative draft that reads its target's features (docs/speculative.md). The model then
    holds ``model.fc`` (2 hidden -> hidden), and its input at position t is ``fc([embed(x_t); f_{t-1}])``, where
    f is the target's last hidden state (what its lm_head reads) one position back
    (:mod:`mamballama_cli.models.feature_draft`).
    """

    model_type = "mamballama"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        intermediate_size: int = 1376,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_qkv_bias: bool | None = None,
        attention_out_bias: bool | None = None,
        attention_dropout: float = 0.0,
        sliding_window: int | None = None,
        mlp_bias: bool = False,
        tie_word_embeddings: bool = False,
        attn_layers: list[int] | None = None,
        mixer: str = "mamba2",
        mamba_n_heads: int | None = None,
        mamba_n_groups: int | None = None,
        mamba_headdim: int | None = None,
        mamba_d_state: int | None = None,
        mamba_d_conv: int = 4,
        mamba_conv_bias: bool = True,
        mamba_proj_bias: bool = False,
        mamba_chunk_size: int = 128,
        mamba_dt_min: float = 1e-3,
        mamba_dt_max: float = 1e-1,
        mamba_dt_init_floor: float = 1e-4,
        mamba_A_init_range: tuple[float, float] | list[float] = (1.0, 16.0),
        mamba_activation: str = "silu",
        mamba_gated_norm: bool = True,
        mamba_gate: bool = True,
        mamba1_d_state: int = 16,
        mamba1_dt_rank: int | None = None,
        mamba1_group_size: int = 16,
        teacher: dict | None = None,
        distill_max_length: int | None = None,
        feature_draft: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs: Any,
    ):
        # Older configs spell RoPE as rope_theta + rope_scaling; normalise to transformers 5's rope_parameters.
        rope_theta = kwargs.pop("rope_theta", None)
        rope_scaling = kwargs.pop("rope_scaling", None)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = normalise_rope_parameters(rope_parameters, rope_theta, rope_scaling)
        self.attention_bias = attention_bias
        self.attention_qkv_bias = attention_bias if attention_qkv_bias is None else attention_qkv_bias
        self.attention_out_bias = attention_bias if attention_out_bias is None else attention_out_bias
        self.attention_dropout = attention_dropout
        self.sliding_window = sliding_window
        self.mlp_bias = mlp_bias
        self.tie_word_embeddings = tie_word_embeddings

        if mixer not in MIXERS:
            raise ValueError(f"mixer={mixer!r} is not supported; use one of {MIXERS}")
        self.mixer = mixer
        layers = list(range(num_hidden_layers)) if attn_layers is None else sorted(int(i) for i in attn_layers)
        self.attn_layers = layers
        self.mamba_n_heads = mamba_n_heads or self.num_attention_heads
        self.mamba_n_groups = mamba_n_groups or self.num_key_value_heads
        self.mamba_headdim = mamba_headdim or self.head_dim
        self.mamba_d_state = mamba_d_state or self.head_dim
        self.mamba_d_conv = mamba_d_conv
        self.mamba_conv_bias = mamba_conv_bias
        self.mamba_proj_bias = mamba_proj_bias
        self.mamba_chunk_size = mamba_chunk_size
        self.mamba_dt_min = mamba_dt_min
        self.mamba_dt_max = mamba_dt_max
        self.mamba_dt_init_floor = mamba_dt_init_floor
        self.mamba_A_init_range = list(mamba_A_init_range)
        self.mamba_activation = mamba_activation
        self.mamba_gated_norm = mamba_gated_norm
        self.mamba_gate = bool(mamba_gate)
        self.mamba1_d_state = mamba1_d_state
        self.mamba1_dt_rank = mamba1_dt_rank or -(-hidden_size // 16)
        self.mamba1_group_size = mamba1_group_size
        self.teacher = teacher or {}
        self.distill_max_length = distill_max_length
        self.feature_draft = bool(feature_draft)
        if not self.mamba_gate and mixer != "mamba2":
            raise ValueError(f"mamba_gate=False (no z projection) is a Mamba-2 option; mixer={mixer!r} keeps its gate")
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ValueError(
                f"mamba_n_heads={self.mamba_n_heads} must be a multiple of mamba_n_groups={self.mamba_n_groups}"
            )

    @property
    def mamba_layers(self) -> list[int]:
        attn = set(self.attn_layers)
        return [i for i in range(self.num_hidden_layers) if i not in attn]

    @property
    def mamba_d_inner(self) -> int:
        """Width of the SSM output (n_h * P), what out_proj reads."""
        return self.mamba_n_heads * self.mamba_headdim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the Mamba-2 conv: x and B at n_kv groups, C at n_h groups."""
        return 2 * self.mamba_n_groups * self.mamba_headdim + self.mamba_n_heads * self.mamba_d_state

    @property
    def layer_kinds(self) -> list[str]:
        """"attention" or "mamba" per layer (derived from attn_layers, not saved)."""
        attn = set(self.attn_layers)
        return ["attention" if i in attn else "mamba" for i in range(self.num_hidden_layers)]

    def is_attention_layer(self, idx: int) -> bool:
        return idx in set(self.attn_layers)


def normalise_rope_parameters(rope_parameters, rope_theta=None, rope_scaling=None) -> dict:
    """Return a plain dict {"rope_type", "rope_theta", ...} from either spelling of a RoPE config."""
    params: dict = {}
    if rope_scaling:
        params.update(dict(rope_scaling))
    if rope_parameters:
        params.update(dict(rope_parameters))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if rope_theta is not None:
        params.setdefault("rope_theta", float(rope_theta))
    params.setdefault("rope_theta", 10000.0)
    return params

