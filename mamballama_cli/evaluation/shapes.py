"""Named model shapes for benchmarks on random weights (``mamballama eval speed --shape llama3-8b``).

A shape is a Llama configuration; the hybrid at that shape is what ``convert`` would build from it
(same embeddings, MLPs and attention layers it keeps, Mamba-2 mixers elsewhere). Weights are random:
decoding speed and memory do not depend on their values.
"""

from __future__ import annotations

from mamballama_cli.errors import UsageError

def _llama(vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
           num_attention_heads: int, num_key_value_heads: int, head_dim: int, rope_theta: float,
           tie_word_embeddings: bool) -> dict:
    """A Llama configuration by its sizes; every shape here has the same norm epsilon and context length."""
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                num_key_value_heads=num_key_value_heads, head_dim=head_dim, rope_theta=rope_theta,
                rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings, max_position_embeddings=131072)


# Columns: vocabulary, hidden, MLP, layers, attention heads, KV heads, head dim, RoPE theta, tied embeddings.
SHAPES: dict[str, dict] = {
    # Meta-Llama-3-8B(-Instruct): 8.03B parameters, 16.06 GB in bf16.
    "llama3-8b": _llama(128256, 4096, 14336, 32, 32, 8, 128, 500000.0, False),
    # Llama-3.2-1B(-Instruct)
    "llama3.2-1b": _llama(128256, 2048, 8192, 16, 32, 8, 64, 500000.0, True),
    # SmolLM2-135M-Instruct, the embedded default teacher
    "smollm2-135m": _llama(49152, 576, 1536, 30, 9, 3, 64, 100000.0, True),
    # For tests and CPU smoke runs
    "tiny": _llama(512, 64, 128, 4, 4, 2, 16, 10000.0, False),
}


def shape_kwargs(name: str) -> dict:
    if name not in SHAPES:
        import difflib

        hint = difflib.get_close_matches(name, list(SHAPES), n=1)
        raise UsageError(f"--shape {name!r} is not a known shape" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f" Known: {', '.join(SHAPES)}")
    return dict(SHAPES[name])


def teacher_config(name: str):
    """transformers LlamaConfig of a named shape."""
    from transformers import LlamaConfig

    kw = shape_kwargs(name)
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    return LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.02, **kw)


def hybrid_config(teacher_cfg, attn_layers: list[int], **overrides):
    """The MamballamaConfig convert would build from ``teacher_cfg`` keeping attention in ``attn_layers``
    (``overrides``: config fields convert's options set, e.g. ``mamba_gate=False``)."""
    from mamballama_cli.convert.converter import hybrid_config_for
    from mamballama_cli.convert.families import family_for

    return hybrid_config_for(teacher_cfg, family_for(teacher_cfg), list(attn_layers),
                             teacher_info={"name_or_path": "random", "model_type": teacher_cfg.model_type},
                             **overrides)


def random_model(cls, config, dtype, device, seed: int = 0):
    """``cls(config)`` built directly on ``device`` in ``dtype`` (no float32 copy on the host)."""
    import torch

    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(old)
    # No .to(dtype): that would also round the float32 RoPE frequency buffers.
    return model.eval()
