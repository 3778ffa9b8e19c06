"""Times every candidate tile of the Mamba-2 replay kernel (mamballama_cli/ops/replay_tiles.py) at a verify window
of the 8B head (32 heads of 128 x 128, 8 groups, K = 4), plain and gated, slotted and not, as the op's first call
does (CUDA graphs over copies of the state that pass the L2 cache), and prints each shape's timings and the time
its compiling and timing took. What it is for: pruning REPLAY_FORMS to the tiles that win, so that a verify call's
first use compiles less (docs/device-sessions.md, the seventeenth session).

``--shape student`` times the default teacher's 50% hybrid's head instead (9 heads of 64 x 64, 3 groups), where a
head fits one program and the chunked form (FORM 3) is a candidate; ``--k 4,6`` times several windows;
``--no-final`` leaves out the state after the window, as the target's verify call does (a hybrid draft keeps it).

    python benchmarks/replay_tiles.py [--batch 1] [--k 4] [--json out.json]
    python benchmarks/replay_tiles.py --shape student --k 4,6 --no-final --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", default="4", help="draft lengths K, comma-separated: windows of K + 1 steps")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="the head (default: 8b)")
    ap.add_argument("--no-final", action="store_true", help="no state after the window (the target's verify call)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    ks = [int(k) for k in a.k.split(",") if k.strip().isdigit()]
    if len(ks) != len(a.k.split(",")) or min(ks) < 1:
        raise SystemExit(f"error: --k {a.k!r}: give draft lengths of at least 1, e.g. --k 4,6")
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/replay_tiles.py times CUDA kernels; this machine has no CUDA device")
    from mamballama_cli.ops import replay_tiles as tiles
    from mamballama_cli.ops import triton_replay as tr

    spent = {}
    for k in ks:
        spent.update(time_window(tr, a.batch, *SHAPES[a.shape], k + 1, not a.no_final))
    rep = tiles.choices_report()
    for shape, t in rep["replay_timings"].items():
        timed = {k: v for k, v in t.items() if isinstance(v, float)}  # else "disagrees" or why it was untimed
        print(f"{shape}: chose {rep['replay_tiles'].get(shape)}; " +
              ", ".join(f"{k} {v:.2f}" for k, v in sorted(timed.items(), key=lambda kv: kv[1])) + " (us)" +
              "".join(f"; {k}: {v}" for k, v in t.items() if k not in timed))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "batch": a.batch, "k": ks, "shape": a.shape,
                       "final": not a.no_final, "seconds": spent, **rep}, f, indent=1)
    return 0


SHAPES = {"8b": (32, 8, 128, 128), "student": (9, 3, 64, 64)}  # (heads, x/B groups, headdim, dstate)


def time_window(tr, b: int, h: int, g: int, p: int, n: int, W: int, final: bool) -> dict:
    """The first call of each op (plain, gated; slotted and not) at a window of W old and W new steps: it compiles and
    times the candidates. Returns the seconds each took."""
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
            kw["final_out"] = torch.empty_like(state) if final else None
            t0 = time.perf_counter()
            if gated:
                tr.ssm_replay_gated_triton(state, *olds, counts, *new, A, dt_bias, D, z, nw, 1e-5, state_out=state,
                                           **kw)
            else:
                tr.ssm_replay_triton(state, *olds, counts, *new, A, dt_bias, D, state_out=state, **kw)
            torch.cuda.synchronize()
            name = f"W{W} {'gated' if gated else 'plain'}{' slotted' if slotted else ''}"
            spent[name] = round(time.perf_counter() - t0, 1)
            print(f"{name}: compiled and timed in {spent[name]:.1f} s", flush=True)
    return spent


if __name__ == "__main__":
    raise SystemExit(main())
