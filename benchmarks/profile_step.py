"""Where does one decode step's time go? Kernel times of the hybrid's static decode step (torch.profiler).

Usage:  python benchmarks/profile_step.py [--shape llama3-8b] [--ratio 0.25] [--batch 1] [--steps 5]
Prints the step's wall time with and without a CUDA graph and the kernels by total GPU time.
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


if __name__ == "__main__":
    main()
