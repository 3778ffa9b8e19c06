"""Where does one decode step's time go? Kernel times of the hybrid's static decode step (torch.profiler).

Usage:  python benchmarks/profile_step.py [--shape llama3-8b] [--ratio 0.25] [--batch 1] [--steps 5] [--verify K]
Prints the step's wall time with and without a CUDA graph and the kernels by total GPU time. With --verify K, the
same for a speculative verify call of K + 1 tokens (the runner's eager walk, as a captured round records it), so
the two tables show which kernels a verify call adds: at the default teacher's shape
(`--shape smollm2-135m --ratio 0.5 --verify 4`) a verify call of 5 tokens cost 1.07-1.10 ms on the H200
(2026-12-04), against 0.93 ms for 1 token through the same runner and 0.91 ms for the plain step.
"""

import argparse
import time

import torch

from mamballama_cli.evaluation.shapes import hybrid_config, random_model, teacher_config
from mamballama_cli.convert.placement import attention_layers_for_ratio
from mamballama_cli.generation.fast import StaticDecoder
from mamballama_cli.models.modeling import MamballamaForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--verify", type=int, default=0, help="also profile a verify call of K + 1 tokens")
    args = ap.parse_args()
    dev = torch.device("cuda")
    tc = teacher_config(args.shape)
    hc = hybrid_config(tc, attention_layers_for_ratio(tc.num_hidden_layers, args.ratio))
    model = random_model(MamballamaForCausalLM, hc, torch.bfloat16, dev)
    ids = torch.randint(3, tc.vocab_size, (args.batch, args.prompt), device=dev)
    with torch.no_grad():
        for capture in (True, False):
            dec = StaticDecoder(model, args.batch, args.prompt + 300, capture=capture)
            dec.prefill(ids)
            dec.decode(3, sync_every=1 << 30)
            torch.cuda.synchronize()
            t = time.perf_counter()
            n = dec.decode(100, sync_every=1 << 30)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t) / n * 1e3
            print(f"{'graph' if capture else 'eager'}: {ms:.3f} ms/step = {1e3 / ms:.1f} tok/s per sequence")
        dec = StaticDecoder(model, args.batch, args.prompt + 300, capture=False)
        dec.prefill(ids)
        dec.decode(2)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                dec._step()
            torch.cuda.synchronize()
    print(f"kernels over {args.steps} eager steps (GPU time):")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=25, max_name_column_width=70))
    if args.verify:
        profile_verify(model, ids, args.verify, args.steps)


def profile_verify(model, ids, k: int, calls: int) -> None:
    """A verify call of k + 1 tokens: its time eagerly and the kernels of ``calls`` such calls."""
    from mamballama_cli.generation.runners import HybridRunner

    window = torch.randint(3, model.config.vocab_size, (ids.shape[0], k + 1), device=ids.device)
    runner = HybridRunner(model, ids.shape[0], ids.shape[1] + 64 * (k + 1), window=2 * (k + 1), static=True)
    with torch.no_grad():
        runner.prefill(ids)
        for _ in range(3):  # warm: compile and autotune
            runner.extend(window, rebase=True)
        for ids in (window[:, :1], window):  # one token through the same runner, then the verify window
            runner.extend(ids, rebase=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                runner.extend(ids, rebase=True)
            torch.cuda.synchronize()
            print(f"runner call of {ids.shape[1]} token(s), eager: {(time.perf_counter() - t) / 20 * 1e3:.3f} ms")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                runner.extend(window, rebase=True)
            torch.cuda.synchronize()
    print(f"kernels over {calls} eager verify calls of {k + 1} tokens (GPU time):")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=40, max_name_column_width=70))


if __name__ == "__main__":
    main()
