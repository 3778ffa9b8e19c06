"""Times every candidate tile of the Mamba-2 replay kernel (mamballama_cli/ops/replay_tiles.py) at a verify window
of the 8B head (32 heads of 128 x 128, 8 groups, K = 4), plain and gated, slotted and not, as the op's first call
does (CUDA graphs over copies of the state that pass the L2 cache), and prints each shape's timings and the time
its compiling and timing took. What it is for: pruning REPLAY_FORMS to the tiles that win, so that a verify call's
first use compiles less (docs/gpu.md, the seventeenth session).

    python benchmarks/replay_tiles.py [--batch 1] [--k 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/replay_tiles.py times CUDA kernels; this machine has no CUDA device")
    from mamballama_cli.ops import replay_tiles as tiles
    from mamballama_cli.ops import triton_replay as tr

    b, h, g, p, n, W = a.batch, 32, 8, 128, 128, a.k + 1
    gen = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape, dt=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device="cuda").to(dt)

    state = r(b, h, p, n, dt=torch.float32)
    old = [r(b, W, g, p), r(b, W, h) * 2 - 3, r(b, W, g, n)]
    new = [r(b, W, g, p), r(b, W, h) * 2 - 3, r(b, W, g, n), r(b, W, h, n)]
    A, dt_bias, D = -torch.rand(h, device="cuda") * 4 - 0.05, r(h, dt=torch.float32), r(h, dt=torch.float32)
    z, nw = r(b, W, h * p), r(h * p)
    counts = torch.full((b,), 3, device="cuda", dtype=torch.long)
    spent = {}
    for gated in (False, True):
        for slotted in (False, True):
            kw = {}
            olds = old
            if slotted:
                olds = [torch.stack([t, torch.zeros_like(t)]) for t in old]
                kw = {"slot": torch.ones(1, dtype=torch.long, device="cuda"), "offset": 0, "read_old": True}
            live = torch.empty_like(state)
            t0 = time.perf_counter()
            if gated:
                tr.ssm_replay_gated_triton(state, *olds, counts, *new, A, dt_bias, D, z, nw, 1e-5, state_out=state,
                                           final_out=live, **kw)
            else:
                tr.ssm_replay_triton(state, *olds, counts, *new, A, dt_bias, D, state_out=state, final_out=live,
                                     **kw)
            torch.cuda.synchronize()
            spent[f"{'gated' if gated else 'plain'}{' slotted' if slotted else ''}"] = round(time.perf_counter() - t0, 1)
            print(f"{'gated' if gated else 'plain'}, slotted {slotted}: compiled and timed in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
    rep = tiles.choices_report()
    for shape, t in rep["replay_timings"].items():
        timed = {k: v for k, v in t.items() if isinstance(v, float)}  # else "disagrees" or why it was untimed
        print(f"{shape}: chose {rep['replay_tiles'].get(shape)}; " +
              ", ".join(f"{k} {v:.2f}" for k, v in sorted(timed.items(), key=lambda kv: kv[1])) + " (us)" +
              "".join(f"; {k}: {v}" for k, v in t.items() if k not in timed))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "batch": b, "k": a.k, "seconds": spent, **rep}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
