"""Distillation throughput: teacher forward + student forward and backward + optimizer step, in tokens/s.

Runs the trainer's own micro-step (mamballama_cli.training.trainer.micro_step: teacher logits under no_grad,
student logits, KL over response tokens, backward through accelerate) on synthetic token ids, bf16 autocast
with fp32 master weights, AdamW, gradient clipping: everything of a training step except reading data.

    python benchmarks/distill_throughput.py --teacher default --ratio 0.5          # the embedded teacher
    python benchmarks/distill_throughput.py --teacher /path/to/SmolLM2-135M-Instruct
    python benchmarks/distill_throughput.py --random                               # random weights, same shape

Prints one line and writes JSON (--json-out, default benchmarks/results/distill_throughput.json). No network.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from types import SimpleNamespace

import torch

from bench_common import run_facts, write_profile, write_result


def smollm2_shaped_teacher():
    """SmolLM2-135M-Instruct's architecture (design.md section 8) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 100000.0})
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="default", help="teacher checkpoint dir, .gguf, or 'default'")
    ap.add_argument("--random", action="store_true", help="random weights of the SmolLM2-135M shape")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of layers keeping attention")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1,
                    help="time this many windows of --steps steps; the result is their median (all are reported)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--teacher-impl", choices=("hf", "mamballama"), default="hf",
                    help="run the teacher as loaded (transformers' Llama), or as mamballama's own model with every "
                         "layer attention (a --ratio 1.0 conversion: the same function, through mamballama's kernels)")
    ap.add_argument("--json-out", default="benchmarks/results/distill_throughput.json")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="also profile one optimizer step (torch.profiler) and write its kernel table here")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("warning: no CUDA device; this measures the CPU reference path", file=sys.stderr)
    import mamballama_cli  # noqa: F401
    from mamballama_cli import ops
    from mamballama_cli.convert.converter import convert_model
    from mamballama_cli.convert.placement import attention_layers_for_ratio
    from mamballama_cli.training.config import ResolvedStage
    from mamballama_cli.training.data import Item
    from mamballama_cli.training.engine import build_optimizer, make_accelerator
    from mamballama_cli.training.recipes import Job, recipe_for
    from mamballama_cli.training.trainer import micro_step

    acc = make_accelerator(SimpleNamespace(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                                           gradient_accumulation_steps=args.accumulation))
    device = acc.device
    if args.random:
        teacher, name = smollm2_shaped_teacher(), "random SmolLM2-135M shape"
    else:
        from mamballama_cli.convert.teacher import load_teacher

        teacher, _, source = load_teacher(args.teacher, dtype=torch.float32)
        name = source.name
    teacher = teacher.float().eval()
    attn = attention_layers_for_ratio(teacher.config.num_hidden_layers, args.ratio)
    student, _ = convert_model(teacher, attn, dtype=torch.float32, seed=0)
    if args.teacher_impl == "mamballama":
        teacher, _ = convert_model(teacher, list(range(teacher.config.num_hidden_layers)), dtype=torch.float32, seed=0)
        teacher.config.use_cache = False
        teacher.eval()
    student.config.use_cache = False
    student.train()
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = teacher.to(device=device, dtype=frozen_dtype)
    teacher.requires_grad_(False)
    stage = ResolvedStage(0, "bench", None, 1.0, None, None, "all", 2e-5, (0.9, 0.98), 0.0, 1.0, 0.0, "constant",
                          0.0, w_kl=1.0, w_rkl=0.0, w_ce=0.0, temperature=1.0)
    optimizer = build_optimizer(student, stage, 1e-8)
    student, optimizer = acc.prepare(student, optimizer)

    vocab, L, mb = teacher.config.vocab_size, args.seq_len, args.micro_batch_size
    g = torch.Generator().manual_seed(0)
    items = [Item(torch.randint(0, vocab, (L,), generator=g).tolist(), [False] + [True] * (L - 1))
             for _ in range(mb)]
    job = Job(recipe_for("distill"), frozen=teacher, items=items, pad_id=0)
    cfg = SimpleNamespace(beta=0.0, label_smoothing=0.0)
    n_targets = sum(it.n_targets for it in items) * args.accumulation

    def step():
        for _ in range(args.accumulation):
            with acc.accumulate(student):
                total, _ = micro_step(job, acc, student, items, stage, cfg)
                acc.backward(total * (args.accumulation / n_targets))
        acc.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup_steps):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    windows = []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        windows.append(time.perf_counter() - t0)
    dt = sorted(windows)[len(windows) // 2]  # the median window (the upper one of an even count)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if args.profile:
        write_profile(step, sync, args.profile)
    tokens = args.steps * args.accumulation * mb * L
    result = {
        "tokens_per_s": round(tokens / dt, 1),
        "seconds_per_step": round(dt / args.steps, 4),
        "tokens_per_s_windows": [round(tokens / w, 1) for w in windows],
        "tokens_per_step": args.accumulation * mb * L,
        "teacher": name,
        "attn_layers": attn,
        "ratio": args.ratio,
        "seq_len": L,
        "micro_batch_size": mb,
        "accumulation": args.accumulation,
        "teacher_impl": args.teacher_impl,
        "gradient_checkpointing": args.gradient_checkpointing,
        "precision": "bf16 autocast, fp32 master weights; teacher bf16" if device.type == "cuda" else "fp32",
        "peak_memory_gib": round(peak, 2) if peak is not None else None,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "kernels": {r["op"]: r["backend"] for r in ops.backend_report(device.type)},
        **run_facts(argv),
    }
    print(f"distill throughput: {result['tokens_per_s']:,.0f} tokens/s (teacher fwd + student fwd/bwd + AdamW, "
          f"{result['tokens_per_step']} tokens/step of {mb}x{args.accumulation}x{L}, {result['precision']}, "
          f"{result['device']}, peak {result['peak_memory_gib']} GiB)")
    write_result(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
