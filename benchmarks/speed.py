"""Decode speed and memory benchmark of design.md section 5 (a thin wrapper around `mamballama eval speed`).

Usage:  python benchmarks/speed.py [--no-pdl] [--no-glu] [--no-gemv-conv] [eval-speed options]
With no options it runs the reference case: Llama-3-8B shape, 25% attention, random bf16 weights, batch
1/8/32 with a 128-token prompt and 256 new tokens, and the 1K..64K context sweep, teacher beside hybrid.
Run `mamballama eval speed --help` for the options; results go to stdout (table) and --output (JSON).
``--no-pdl``: the gemv kernels never take their programmatic-dependent-launch form (ops/triton_gemv.py), the A/B of
that launch over a whole step (benchmarks/gpu_session.sh b1nopdl). ``--no-glu``: [gate; up] never takes the SwiGLU
GEMV kernel (ops/triton_gemv_swiglu.py) but runs gemv and swiglu apart, each on its own fast kernel: that kernel's
A/B over a whole step (gpu_session.sh b1noglu). ``--no-gemv-conv``: a Mamba-2 layer's in_proj never takes the GEMV
kernel with the conv step in its epilogue (ops/triton_gemv_conv.py) but runs the GEMV and the conv apart: that
kernel's A/B over a whole step (gpu_session.sh b1noconv). ``--tuning FILE``: the kernels' tiles and per-shape
choices from a tuning table and back to it (the CLI's global option; ops/tuning.py).
"""

import sys

from mamballama_cli.cli.main import main

DEFAULT = ["--shape", "llama3-8b", "--ratio", "0.25", "--prompt-tokens", "128", "--new-tokens", "256"]

if __name__ == "__main__":
    args = sys.argv[1:]
    ab = [a for a in ("--no-pdl", "--no-glu", "--no-gemv-conv") if a in args]
    if "--tuning" in args and ab:
        sys.exit(f"error: {ab[0]} with --tuning: a kernel A/B times the choices afresh, which the table would hand "
                 f"both sides; leave --tuning out")
    if "--no-pdl" in args:
        args.remove("--no-pdl")
        from mamballama_cli.ops import triton_gemv

        triton_gemv.PDL = False
    if "--no-glu" in args:
        args.remove("--no-glu")
        from mamballama_cli.ops import triton_gemv_swiglu

        triton_gemv_swiglu.GLU = False
    if "--no-gemv-conv" in args:
        args.remove("--no-gemv-conv")
        from mamballama_cli.ops import triton_gemv_conv

        triton_gemv_conv.CONV = False
    front = []  # --tuning FILE: the CLI's global option (ops/tuning.py), before the command
    if "--tuning" in args:
        at = args.index("--tuning")
        front = args[at:at + 2]
        del args[at:at + 2]
    sys.argv = ["mamballama", *front, "eval", "speed", *(args or DEFAULT)]
    main()
