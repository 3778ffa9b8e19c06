"""Named model shapes for benchmarks on random weights (``mamballama eval speed --shape llama3-8b``).

A shape is a Llama configuration; the hybrid at that shape is what ``convert`` would build from it
(same embeddings, MLPs and attention layers it keeps, Mamba-2 mixers elsewhere). Weights are random:
decoding speed and memory do not depend on their values.
"""

from __future__ import annotations

from mamballama_cli.errors import UsageError

SHAPES: dict[str, dict] = {
    # Meta-Llama-3-8B(-Instruct): 8.03B parameters, 16.06 GB in bf16.
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=131072),
    # Llama-3.2-1B(-Instruct)
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                        rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072),
    # SmolLM2-135M-Instruct, the embedded default teacher
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072),
    # For tests and CPU smoke runs
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=131072),
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


def hybrid_config(teacher_cfg, attn_layers: list[int]):
    """The MamballamaConfig convert would build from ``teacher_cfg`` keeping attention in ``attn_layers``."""
    from mamballama_cli.convert.converter import hybrid_config_for
    from mamballama_cli.convert.families import family_for

    return hybrid_config_for(teacher_cfg, family_for(teacher_cfg), list(attn_layers),
                             teacher_info={"name_or_path": "random", "model_type": teacher_cfg.model_type})


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
