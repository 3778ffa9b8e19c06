"""Built-in teacher families beyond Llama: Mistral and Qwen2 / Qwen2.5.

Registered through :data:`mamballama_cli.plugins.teachers` exactly like a third-party plugin would.

Qwen2's q/k/v projections carry biases (o_proj does not). Attention layers that the hybrid keeps hold them
unchanged (``attention_qkv_bias=True, attention_out_bias=False``). Mamba layers drop them: the mixer's
in_proj stays bias-free, like every other family's, and the table lists the biases of converted layers as
deliberately dropped. Why drop rather than carry them into the x/B/C rows of in_proj:

* softmax makes attention blind to most of what the biases do: q . b_k is the same for every key, so the
  softmax cancels it, and b_v only shifts the output by a constant because the weights sum to one. A Mamba
  layer has no softmax: carried over, b_k would add the input-independent term (C_t . b_k) * sum_s dt_s x_s
  and b_v a term proportional to the accumulated C . B, both growing with the context. The larger the biases,
  the further carrying them would start the Mamba layers from the teacher, not closer;
* a bias-free in_proj exports to GraniteMoeHybrid with ``mamba_proj_bias=False``, the configuration
  Granite 4.0 itself ships and the one vLLM's kernels are exercised with.

Distillation re-learns whatever constant offsets the Mamba layers need.
"""

from __future__ import annotations

from mamballama_cli import plugins
from mamballama_cli.convert.families import _check_llama, llama_style_config, llama_style_family

# q/k/v biases of layers that become Mamba; those of attention layers are consumed before this applies.
QKV_BIAS_OF_MAMBA_LAYERS = r"(^|\.)self_attn\.[qkv]_proj\.bias$"


# --- Mistral ------------------------------------------------------------------------------------------------
def mistral_config(tc) -> dict:
    kwargs = llama_style_config(tc)
    # Mistral 7B v0.1 attends within a sliding window (4096); later releases set it to null. The hybrid's
    # attention layers apply the same window; Mamba layers carry state over the whole context regardless.
    kwargs["sliding_window"] = getattr(tc, "sliding_window", None)
    return kwargs


MISTRAL = llama_style_family(
    "mistral", "Mistral 7B (v0.1-v0.3) and other MistralForCausalLM checkpoints",
    [
        "sliding_window is kept: attention layers of the hybrid attend within the same window as the teacher",
        "Mamba layers see the whole context whatever the window (their state is not windowed)",
        "export to granite-hybrid refuses a sliding window (GraniteMoeHybrid attention is full causal)",
    ],
    hybrid_config=mistral_config,
)


# --- Qwen2 / Qwen2.5 ----------------------------------------------------------------------------------------
def _qwen2_sliding_window(tc) -> int | None:
    """The single window the hybrid can apply, or a clear error for Qwen2's per-layer mixes."""
    from mamballama_cli.errors import MamballamaError

    if not getattr(tc, "use_sliding_window", False):
        return None
    kinds = list(getattr(tc, "layer_types", None) or [])
    sliding = [i for i, k in enumerate(kinds) if k == "sliding_attention"]
    if not sliding:
        return None
    if len(sliding) != len(kinds):
        raise MamballamaError(
            f"teacher uses sliding-window attention in layers {sliding[0]}..{sliding[-1]} only "
            f"(use_sliding_window=True, max_window_layers={getattr(tc, 'max_window_layers', None)}); "
            "the hybrid applies one window to all attention layers. Set use_sliding_window=false in the "
            "teacher's config.json if it was trained without it"
        )
    return tc.sliding_window


def _check_qwen2(tc) -> None:
    _check_llama(tc)
    _qwen2_sliding_window(tc)


def qwen2_config(tc) -> dict:
    kwargs = llama_style_config(tc)
    kwargs.update(attention_qkv_bias=True, attention_out_bias=False, sliding_window=_qwen2_sliding_window(tc))
    return kwargs


QWEN2 = llama_style_family(
    "qwen2", "Qwen2 and Qwen2.5 (base, instruct, coder, math) Qwen2ForCausalLM checkpoints",
    [
        "q/k/v biases are kept in attention layers (o_proj has none)",
        "Mamba layers drop the q/k/v biases (softmax cancels most of their effect; a Mamba layer would not): "
        "see mamballama_cli/convert/families_more.py",
        "export to granite-hybrid sets attention_bias=true with a zero o_proj bias (exact)",
        "per-layer sliding windows (use_sliding_window with max_window_layers) are refused",
    ],
    hybrid_config=qwen2_config, check=_check_qwen2, dropped=(QKV_BIAS_OF_MAMBA_LAYERS,),
)

plugins.teachers.register(MISTRAL)
plugins.teachers.register(QWEN2)
