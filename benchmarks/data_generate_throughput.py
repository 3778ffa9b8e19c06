"""`data generate` throughput: tokens written per second by the teacher on the static batched decoder.

Runs `mamballama data generate`'s own core (mamballama_cli.training.generate_data.run_generate: prompt rows,
batches of unequal prompt lengths with forced tokens, the CUDA-graph step, stop tokens, shards and manifest
written to a temporary folder) for a fixed number of tokens, after one warm-up batch (graph capture, Triton
compilation). Model loading and prompt tokenisation are not timed.

    python benchmarks/data_generate_throughput.py                              # the embedded default teacher
    python benchmarks/data_generate_throughput.py --random --tokenizer DIR     # random weights, SmolLM2-135M shape
    python benchmarks/data_generate_throughput.py --random tiny --device cpu   # a tiny random model: checks the script

--random keeps the default teacher's tokenizer (--tokenizer, default: its cached copy) so the prompts are the
same; random weights rarely sample the stop token, so their rows run to --max-new-tokens (the teacher's stop
earlier and leave batch rows idle: compare "row_utilisation"). Prints one line and writes JSON (--json-out).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_common import char_tokenizer, run_facts, write_result


def smollm2_shaped_teacher():
    """SmolLM2-135M-Instruct's architecture (design.md section 8) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def tiny_teacher_and_tokenizer():
    """A 4-layer random Llama and a character-level ChatML tokenizer (as the tests build them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, vocab_size = char_tokenizer([chr(c) for c in range(32, 123)])
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tok


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="default", help="teacher checkpoint dir, .gguf, or 'default'")
    ap.add_argument("--random", nargs="?", const="smollm2", choices=("smollm2", "tiny"), default=None,
                    help="random weights: of the SmolLM2-135M shape (default), or a tiny model")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for --random smollm2 (default: the cached "
                    "default teacher's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=4_000_000, help="tokens to write in the timed run")
    ap.add_argument("--batch-size", type=int, default=None, help="default: data generate's (on CUDA as many rows as "
                    "fit, up to 1024; 8 on CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--continuation-fraction", type=float, default=0.5)
    ap.add_argument("--sync-every", type=int, default=None)
    ap.add_argument("--prompts", default="builtin")
    ap.add_argument("--json-out", default="benchmarks/results/data_generate_throughput.json")
    args = ap.parse_args(argv)

    import mamballama_cli  # noqa: F401
    from mamballama_cli.convert.converter import convert_model
    from mamballama_cli.generation.result import stop_token_ids
    from mamballama_cli.generation.sampling import SamplingConfig
    from mamballama_cli.loading import resolve_device, resolve_dtype
    from mamballama_cli.training.generate_data import (BatchSampler, GenerateDataConfig, auto_batch_size, build_pool,
                                                       load_generator, run_generate, shard_batches)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type != "cuda":
        print("warning: no CUDA device; this measures the CPU reference path", file=sys.stderr)
    t_load = time.perf_counter()
    if args.random:
        from transformers import AutoTokenizer

        if args.random == "tiny":
            teacher, tok = tiny_teacher_and_tokenizer()
            name = "random tiny Llama (4 layers, hidden 64)"
        else:
            from mamballama_cli.convert.teacher import default_teacher_dir

            tok = AutoTokenizer.from_pretrained(args.tokenizer or str(default_teacher_dir()))
            teacher, name = smollm2_shaped_teacher(), "random SmolLM2-135M shape"
        stops = stop_token_ids(teacher, tok)
        model, _ = convert_model(teacher, list(range(teacher.config.num_hidden_layers)), dtype=dtype)
        model = model.to(device).eval()
        model.requires_grad_(False)
        generator = (model, tok, name, stops)
    else:
        generator = load_generator(args.teacher, device, dtype)
        model, tok, name, stops = generator
    load_s = time.perf_counter() - t_load

    cfg = GenerateDataConfig(teacher=name, prompts=args.prompts, tokens=args.tokens, output="-",
                             continuation_fraction=args.continuation_fraction, temperature=args.temperature,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             shard_tokens=max(args.tokens // 4, 1), device=str(device), dtype=args.dtype,
                             sync_every=args.sync_every, force=True)
    cfg.batch_size = cfg.batch_size or auto_batch_size(model, cfg.max_prompt_tokens + cfg.max_new_tokens, device)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    sampler = BatchSampler(model, stops, sampling, cfg.batch_size, cfg.max_prompt_tokens, cfg.sync_every)
    t_warm = time.perf_counter()
    with torch.no_grad():  # one batch: captures the step's graph, compiles the kernels
        sampler.run(next(shard_batches(build_pool(cfg, tok), cfg, 10**6, cfg.batch_size)))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t_warm
    sampler.steps = sampler.row_steps_used = 0

    with tempfile.TemporaryDirectory() as tmp:
        cfg.output = str(Path(tmp) / "shards")
        summary = run_generate(cfg, generator=generator, sampler=sampler)
        manifest = json.loads((Path(cfg.output) / "manifest.json").read_text())
    dt = summary["seconds"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    result = {
        "tokens_per_s": summary["tokens_per_s"],
        "sampled_tokens_per_s": round(summary["sampled_tokens"] / dt, 1) if dt > 0 else None,
        "tokens": summary["tokens"],
        "sampled_tokens": summary["sampled_tokens"],
        "sequences": summary["sequences"],
        "mean_sampled_per_sequence": round(summary["sampled_tokens"] / max(summary["sequences"], 1), 1),
        "seconds": dt,
        "decode_steps": sampler.steps,
        "row_utilisation": round(sampler.row_steps_used / max(sampler.steps * cfg.batch_size, 1), 3),
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "continuation_fraction": cfg.continuation_fraction,
        "sync_every": sampler.sync_every,
        "engine": sampler.engine,
        "teacher": name,
        "prompts": manifest["prompts"],
        "dtype": str(dtype).replace("torch.", ""),
        "peak_memory_gib": round(peak, 2) if peak is not None else None,
        "load_s": round(load_s, 1),
        "warmup_s": round(warm_s, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        **run_facts(argv),
    }
    print(f"data generate: {result['tokens_per_s']:,.0f} tokens/s written ({result['sampled_tokens_per_s']:,.0f} "
          f"sampled/s; {summary['tokens']:,} tokens, {summary['sequences']:,} sequences) at batch {cfg.batch_size}, "
          f"max {cfg.max_new_tokens} new, {result['engine']}, row utilisation {result['row_utilisation']}, "
          f"{result['device']} {result['dtype']}")
    write_result(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
