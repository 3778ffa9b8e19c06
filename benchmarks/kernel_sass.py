"""The project's Triton kernels compiled for Hopper (sm90) without a GPU: for the gemv tiles, what each inner loop
issues per weight element, its barriers and shared-memory round trips, registers and spills; for every kernel a run
can compile, whether it compiles at all.

Triton compiles for a named target without a device (ptxas and cuobjdump ship with triton), so a session without a
GPU can still see what a kernel change does to the loop that streams the weights: a decode GEMV reads each weight
once, and at 4 TB/s an SM has about 16 instruction slots a thread per weight element (7.6 elements a clock, 4 warp
instructions a clock), fewer once latency is counted. ``tests/test_kernel_codegen.py`` pins the properties the
fast tiles rely on.

``--check`` compiles everything a run can ask for (the gemv and fused tiles, the small decode kernels, the Mamba-2
step tiles, the replay and attention kernels of every verify window), each in a worker process, so that a compiler
abort (triton 3.6's LLVM aborted on the fused kernel's 2-row code, 2026-12-05) is found here, not on the GPU.
``make check-kernels`` runs it under the H200's triton.

    python3 benchmarks/kernel_sass.py                          # every candidate and EXTRA tile, 5 rows and 1 row
    python3 benchmarks/kernel_sass.py --rows 5 --tiles 16,256,4,4,dot 4,256,4,1,acc --show
    python3 benchmarks/kernel_sass.py --fused --rows 5 1              # the fused norm + GEMV candidates, K = 576
    make check-kernels                                         # --check under triton 3.6.0, in a venv of its own
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROW = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)")
BRANCH = re.compile(r"BRA\s.*?0x([0-9a-f]+)")


def _tools() -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin")


def available() -> bool:
    """Whether triton's CUDA backend and its cuobjdump are here (they ship with the triton wheel)."""
    try:
        return os.path.exists(os.path.join(_tools(), "cuobjdump"))
    except Exception:  # noqa: BLE001 - no triton, or a build without the CUDA backend
        return False


def compile_kernel(fn, args: dict, const: dict, warps: int, stages: int = 1, arch: int = 90, unaligned=()):
    """``fn`` (a ``@triton.jit`` function) compiled for ``sm<arch>``: ``args`` its runtime arguments (name ->
    triton type, in order), ``const`` its constexprs (name -> value, in order after them); every pointer and integer
    but those in ``unaligned`` taken as a multiple of 16, as triton specialises them at run time on such sizes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)  # positions as in the kernel's signature (a constant may bind any argument: a
    # stride of 1, which triton specialises at run time, is given as a constant)
    assert set(names) == set(args) | set(const), set(names) ^ (set(args) | set(const))
    sig = {n: "constexpr" if n in const else args[n] for n in names}
    aligned = [n for n, t in args.items()
               if n not in unaligned and n not in const and t.startswith(("*", "i"))]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def compile_fused(kind: int, rows: int, tile: tuple, k: int = 4096, arch: int = 90):
    """One tile of the fused norm + GEMV kernel (ops/triton_gemv_fused.py; ``kind`` 0 add_rmsnorm_gemv, 1 with
    SwiGLU) compiled for ``sm<arch>`` on bf16 rows of width ``k``, with a residual and no bias."""
    from mamballama_cli.ops import triton_gemv_fused as f

    bn, bk, warps, *stages = tile  # an entry of CONFIGS (CUDA cores) or of DOT_CONFIGS (tensor cores, + stages)
    args = {**dict.fromkeys(("X", "R", "LNW", "W", "BIAS", "Y", "HOUT"), "*bf16"),
            **dict.fromkeys(("M", "N", "K"), "i32"), "eps": "fp32",
            **dict.fromkeys(("stride_xm", "stride_rm", "stride_hm", "stride_wn", "stride_ym"), "i32")}
    const = {"KIND": kind, "HAS_RES": True, "HAS_BIAS": False, "BLOCK_N": bn, "BLOCK_K": bk,
             "ROWS": f.rows_of(tuple(tile), rows), "EVEN_K": k % bk == 0, "DOT": bool(stages)}
    return compile_kernel(f._fused_kernel, args, const, warps, stages[0] if stages else 3, arch, unaligned=("M",))


def compile_tile(rows: int, tile: tuple, k: int = 4096, pdl: bool = False, arch: int = 90, glu: bool = False):
    """One gemv tile compiled for ``sm<arch>`` as it would be at run time on a bf16 (rows, K) x (N, K)^T call with
    the sizes multiples of 16 (the divisibility triton specialises on); ``glu``: the kernel with the SwiGLU
    epilogue (ops/triton_gemv_swiglu.py; at several rows, the dot modes' tiles and the paired ones)."""
    from mamballama_cli.ops import triton_gemv as g

    if rows == 1:
        bn, bk, warps = tile
        stages, fn = 1, g._gemv_kernel
        args = {**dict.fromkeys(("X", "W", "BIAS", "Y"), "*bf16"), **dict.fromkeys(("N", "K", "stride_wn"), "i32")}
        const = {"HAS_BIAS": False, "BLOCK_N": bn, "BLOCK_K": bk, "EVEN_K": k % bk == 0, "PDL": pdl, "GLU": glu}
    else:
        bn, bk, warps, stages, mode = tile
        fn = g._skinny_kernel
        args = {**dict.fromkeys(("X", "W", "BIAS", "Y"), "*bf16"),
                **dict.fromkeys(("M", "N", "K", "stride_xm", "stride_wn", "stride_ym"), "i32")}
        const = {"HAS_BIAS": False, "BLOCK_N": bn, "BLOCK_K": bk, "EVEN_K": k % bk == 0, "MODE": g.MODES[mode],
                 **g.row_groups(rows, g.MODES[mode]), "PDL": pdl, "GLU": glu}
    return compile_kernel(fn, args, const, warps, stages, arch, unaligned=("M",))  # M (the rows) is small, odd


def compile_conv_tile(tile: tuple, k: int = 4096, pdl: bool = False, arch: int = 90):
    """One tile of the one-row GEMV with the conv step in its epilogue (ops/triton_gemv_conv.py), compiled for
    ``sm<arch>`` as at run time on a bf16 in_proj of width ``k`` with a bf16 width-4 window and SiLU."""
    from mamballama_cli.ops import triton_gemv_conv as g

    bn, bk, warps = tile
    args = {**dict.fromkeys(("X", "W", "BIAS", "Y", "S", "CW", "CB"), "*bf16"),
            **dict.fromkeys(("N", "K", "stride_wn", "C0", "C", "stride_sd", "stride_cwd"), "i32")}
    const = {"stride_sw": 1, "stride_cww": 1, "HAS_BIAS": False, "BLOCK_N": bn, "BLOCK_K": bk,
             "EVEN_K": k % bk == 0, "PDL": pdl, "WIDTH": 4, "HAS_CB": True, "SILU": True, "BLOCK_W": 4}
    return compile_kernel(g._gemv_conv_kernel, args, const, warps, 1, arch, unaligned=("C0", "C"))


def compile_spec_conv_tile(tile: tuple, k: int = 4096, rows: int = 5, pdl: bool = False, arch: int = 90):
    """One tile of the several-row GEMV with a verify window's conv in its epilogue (ops/triton_gemv_conv.py),
    compiled for ``sm<arch>`` as at run time on a bf16 in_proj of width ``k`` over ``rows`` rows, a bf16 width-4
    conv buffer and SiLU."""
    from mamballama_cli.ops import triton_gemv_conv as g

    bn, bk, warps, stages, mode = tile
    args = {**dict.fromkeys(("X", "W", "BIAS", "Y", "BUF", "CW", "CB", "POST"), "*bf16"), "SHIFT": "*i64",
            **dict.fromkeys(("M", "N", "K", "stride_xm", "stride_wn", "stride_ym", "C0", "C", "offset", "b_sd",
                             "stride_cwd", "p_st"), "i32")}
    const = {"b_st": 1, "stride_cww": 1, "p_sd": 1, "HAS_BIAS": False, "BLOCK_N": bn, "BLOCK_K": bk,
             "EVEN_K": k % bk == 0, "MODE": g.MODES[mode], "PDL": pdl, "WIDTH": 4, "HAS_CB": True, "SILU": True,
             "BLOCK_T": 1 << (rows - 1).bit_length(), "BLOCK_S": 1 << (rows + 2).bit_length()}
    return compile_kernel(g._gemv_spec_conv_kernel, args, const, warps, stages, arch,
                          unaligned=("M", "C0", "C", "offset"))


def report_spec_conv(tile: tuple, k: int = 4096, pdl: bool = False) -> dict:
    """:func:`report` for a window tile with the conv epilogue (:func:`compile_spec_conv_tile`), five rows."""
    return loop_report(compile_spec_conv_tile(tile, k, 5, pdl), 5, tile, tile[0] * tile[1] / (32 * tile[2]))


def report_conv(tile: tuple, k: int = 4096, pdl: bool = False) -> dict:
    """:func:`report` for the one-row tile with the conv epilogue (:func:`compile_conv_tile`)."""
    return loop_report(compile_conv_tile(tile, k, pdl), 1, tile, tile[0] * tile[1] / (32 * tile[2]))


def _objdump(kernel, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([os.path.join(_tools(), "cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def loop_body(sass: str) -> list[str]:
    """The instructions of the largest loop (the span of the longest backward branch): the weight-streaming loop."""
    rows = [(int(m.group(1), 16), line) for line in sass.splitlines() if (m := ROW.match(line))]
    best: list[str] = []
    for at, line in rows:
        m = BRANCH.search(line)
        if m and int(m.group(1), 16) < at:
            body = [text for a, text in rows if int(m.group(1), 16) <= a <= at]
            best = body if len(body) > len(best) else best
    return best


def opcode_counts(lines) -> collections.Counter:
    """Opcode (without modifiers) -> how many times it is in ``lines``."""
    return collections.Counter(m.group(3).split(".")[0] for line in lines if (m := ROW.match(line)))


def report(rows: int, tile: tuple, k: int = 4096, pdl: bool = False, glu: bool = False) -> dict:
    """The loop of one tile: instructions, instructions per weight element a thread holds, its opcode counts, and
    the kernel's registers, local memory (spills) and whether 16-byte weight loads are used (``glu``: the one-row
    kernel with the SwiGLU epilogue, two weight tiles an iteration)."""
    per_thread = (2 if glu else 1) * tile[0] * tile[1] / (32 * tile[2])
    return loop_report(compile_tile(rows, tile, k, pdl, glu=glu), rows, tile, per_thread)


def report_fused(kind: int, rows: int, tile: tuple, k: int = 576) -> dict:
    """:func:`report` for a tile of the fused norm + GEMV kernel (:func:`compile_fused`): the SwiGLU kind reads two
    weight tiles an iteration."""
    per_thread = (2 if kind == 1 else 1) * tile[0] * tile[1] / (32 * tile[2])
    return loop_report(compile_fused(kind, rows, tile, k), rows, tile, per_thread)


def loop_report(kernel, rows: int, tile: tuple, per_thread: float) -> dict:
    """The weight-streaming loop of a compiled kernel whose threads each hold ``per_thread`` weight elements an
    iteration."""
    sass = _objdump(kernel, "-sass")
    body = loop_body(sass)
    ops = opcode_counts(body)
    res = _objdump(kernel, "-res-usage")
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    return {"rows": rows, "tile": ",".join(map(str, tile)), "loop_instructions": len(body),
            "per_weight_element": round(len(body) / per_thread, 2), "registers": regs, "local_bytes": local,
            "barriers": ops["BAR"], "shared_round_trips": ops["STS"] + ops["STSM"],
            "wide_loads": sum(".128" in line for line in body if "LDG" in line or "LDGSTS" in line),
            "pdl_wait": "griddepcontrol.wait" in kernel.asm["ptx"], "ops": dict(ops.most_common(10)),
            "body": body}


def compile_decode(name: str, trigger: bool = True, tile: tuple = (32, 4), arch: int = 90):
    """One of the small decode kernels that run before a projection, in the form sm90 launches (``trigger``: it
    lets a programmatic-dependent-launch successor start early): ``add_rmsnorm`` (a 4,096 row), ``swiglu``,
    ``ssm_step_gated`` (float32 state, 128 x 128 a head, at ``tile``: an entry of STEP_TILES, (BLOCK_N, num_warps,
    SPLIT)), ``attn_combine``;
    bf16 activations."""
    from mamballama_cli.ops import triton_attention as a
    from mamballama_cli.ops import triton_decode as d

    i32 = "i32"
    if name == "add_rmsnorm":
        args = {**dict.fromkeys(("X", "R", "W", "OUT", "ROUT"), "*bf16"), "n_cols": i32, "eps": "fp32",
                **dict.fromkeys(("stride_x", "stride_r", "stride_o", "stride_ro"), i32)}
        return compile_kernel(d._add_rmsnorm_kernel, args, {"HAS_RES": True, "BLOCK": 4096, "TRIGGER": trigger},
                              8, 1, arch)
    if name == "swiglu":
        args = {"GU": "*bf16", "OUT": "*bf16", "n_cols": i32, "stride_gu": i32, "stride_o": i32}
        return compile_kernel(d._swiglu_kernel, args, {"BLOCK": 1024, "TRIGGER": trigger}, 4, 1, arch)
    if name == "ssm_step_gated":
        ptrs = {"STATE": "*fp32", **dict.fromkeys(("X", "B", "C", "DT"), "*bf16"),
                **dict.fromkeys(("DT_BIAS", "A_LOG", "D"), "*fp32"), "Z": "*bf16", "NW": "*bf16", "OUT": "*bf16",
                "Y32": "*fp32", "CNT": "*i32"}
        ints = ("heads_per_group", "headdim", "dstate")
        strides = ("s_sb", "s_sh", "s_sp", "s_sn", "x_sb", "x_sg", "x_sp", "b_sb", "b_sg", "b_sn", "c_sb", "c_sh",
                   "c_sn", "dt_sb", "dt_sh", "z_sb", "z_sh", "z_sp", "o_sb")
        args = {**ptrs, **dict.fromkeys(ints, i32), "eps": "fp32", **dict.fromkeys(strides, i32)}
        ones = dict.fromkeys(("s_sn", "x_sp", "b_sn", "c_sn", "z_sp", "dt_sh"), 1)  # unit strides
        const = {**ones, "HAS_D": True, "HAS_Z": True, "HAS_NORM": True, "BLOCK_P": 128, "BLOCK_N": tile[0],
                 "TRIGGER": trigger, "SPLIT": tile[2] if len(tile) > 2 else 1}
        return compile_kernel(d._ssm_step_gated_kernel, args, const, tile[1], 1, arch)
    if name == "attn_combine":
        args = {"OP": "*fp32", "LSE": "*fp32", "OUT": "*bf16", "n_splits": i32, "headdim": i32,
                **dict.fromkeys(("op_sb", "op_sh", "op_ss", "lse_sb", "lse_sh", "o_sb", "o_sh"), i32)}
        return compile_kernel(a._attn_combine_kernel, args, {"BLOCK_S": 32, "BLOCK_D": 128, "TRIGGER": trigger},
                              4, 1, arch, unaligned=("n_splits", "lse_sh"))
    raise ValueError(f"unknown decode kernel {name!r}: add_rmsnorm, swiglu, ssm_step_gated or attn_combine")


DECODE_KERNELS = ("add_rmsnorm", "swiglu", "ssm_step_gated", "attn_combine")


def compile_replay(W: int, T: int, p: int = 64, n: int = 64, gated: bool = True, slotted: bool = True,
                   arch: int = 90, tile=None):
    """The Mamba-2 replay kernel of a verify window (ops/triton_replay.py) as a run compiles it: W old steps and
    T new ones unrolled, a ``p`` x ``n`` head (64 x 64: the default teacher's, one program a head when ``gated``;
    128 x 128: the 8B shape's, in 32-row tiles, gated only by a split-norm tile), bf16 activations, float32 state,
    unit strides; ``tile`` (BLOCK_P, num_warps, FORM[, split norm]), one of the op's replay_tiles or gated_tiles
    (default: the first); in its sm90 form, which lets the projection after it start early (TRIGGER)."""
    from mamballama_cli.ops import triton_replay as r

    f32, bf16, i32 = "*fp32", "*bf16", "i32"
    ptrs = {"state_ptr": f32, "x_old_ptr": bf16, "dt_old_ptr": bf16, "B_old_ptr": bf16, "n_ptr": "*i64",
            "x_ptr": bf16, "dt_ptr": bf16, "B_ptr": bf16, "C_ptr": bf16, "A_ptr": f32, "dt_bias_ptr": f32,
            "D_ptr": f32, "y_ptr": bf16, "state_out_ptr": f32, "final_ptr": f32, "z_ptr": bf16, "nw_ptr": bf16,
            "eps": "fp32", "slot_ptr": "*i64", "y32_ptr": "*fp32", "cnt_ptr": "*i32"}
    names = [a for a in r._replay_kernel.arg_names if a not in ptrs]
    unit = {"s_sn", "xo_sp", "dto_sh", "Bo_sn", "x_sp", "dt_sh", "B_sn", "C_sn", "y_sp", "so_sn", "f_sn", "z_sp"}
    tile = tuple(tile) if tile else r.replay_tiles(p, n, gated)[0]
    block_p, warps, form = tile[:3]
    whole, split = r.norm_in_kernel(tile, p, gated)
    wp, tp = r.window_rows(W, T, int(form))
    consts = {"W": W, "T": T, "HAS_D": True, "RETURN_FINAL": True, "GATED": whole, "HAS_Z": whole or split,
              "SLOTTED": slotted, "BLOCK_N": r.replay_tile(p, n, whole)[1], "BLOCK_P": block_p, "FORM": int(form),
              "WP": wp, "TP": tp, "SPLIT_NORM": split, "HEAD_P": r._next_pow2(p), "TRIGGER": True}
    args = {**ptrs, **{a: i32 for a in names if a not in consts and a not in unit}}
    const = {**dict.fromkeys(unit, 1), **consts}
    return compile_kernel(r._replay_kernel, args, const, warps, 1, arch,
                          unaligned=("nheads", "heads_per_group", "heads_per_cgroup", "save_off"))


REPLAY_SHAPES = ((64, 64, True), (64, 64, False), (128, 128, False))  # (headdim, dstate, gated)


def compile_window_attention(rows: int, headdim: int, arch: int = 90):
    """The split-K attention kernel of a decode step or verify window (ops/triton_attention.py) at ``rows`` tile
    rows (query heads of a KV group x window queries, padded to a power of two, at least 16) and ``headdim``."""
    from mamballama_cli.ops import triton_attention as a

    args = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "POS": "*i64", "OP": "*fp32", "LSE": "*fp32", "scale": "fp32",
            **{n: "i32" for n in a._attn_split_kernel.arg_names
               if n not in ("Q", "K", "V", "POS", "OP", "LSE", "scale", "BLOCK_R", "BLOCK_T", "BLOCK_D", "IEEE")}}
    const = {"BLOCK_R": rows, "BLOCK_T": a.BLOCK_T, "BLOCK_D": headdim, "IEEE": False}
    return compile_kernel(a._attn_split_kernel, args, const, 4, 1, arch,
                          unaligned=("pos_sb", "pos_off", "T", "n_kv", "group", "split_len"))


def attention_rows(heads: int, kv_heads: int) -> set[int]:
    """The split kernel's tile rows over decode (one query) and verify windows of K = 1..7 for a model with these
    heads, as ops/triton_attention.py pads them."""
    from mamballama_cli.ops.triton_attention import tile_rows

    return {tile_rows(heads // kv_heads, t) for t in range(1, 9)}


def check_jobs(ks=(576, 4096)) -> list[list]:
    """Every compilation a run can ask for, as ``["gemv", rows, tile, K, pdl]`` or ``["fused", kind, rows, tile, K]``:
    the one-row tiles with and without pdl, and so again with the SwiGLU epilogue (``["glu", tile, K, pdl]``) and
    with the conv epilogue (``["gemvconv", tile, K, pdl]``), the window tiles with theirs (``["specconv", tile, K,
    pdl]``); the
    multi-row ones at each distinct row split of the acc mode (the dot modes pad every count alike, so once); the
    fused kernel's candidates at each distinct padded row count (the tensor-core ones once: 8 rows at any count)
    and each K."""
    from mamballama_cli.ops import triton_gemv as g
    from mamballama_cli.ops import triton_gemv_fused as f

    jobs = []
    for k in ks:
        jobs += [["gemv", 1, list(t), k, pdl] for t in g.CONFIGS for pdl in (False, True)]
        jobs += [["glu", list(t), k, pdl] for t in g.CONFIGS for pdl in (False, True)]
        jobs += [["gemvconv", list(t), k, pdl] for t in g.CONFIGS for pdl in (False, True)]
        # five rows: every count alike; the pdl form too (the dot modes take their first K tile apart from the loop)
        jobs += [["glu", list(t), k, pdl] for t in g.GLU_TILES for pdl in (False, True)]
        jobs += [["specconv", list(t), k, pdl] for t in g.SKINNY if t[-1] in g.DOT_MODES for pdl in (False, True)]
        splits = {g._row_split(m): m for m in range(2, g.MAX_ROWS + 1)}
        for t in g.SKINNY + g.EXTRA:
            jobs += [["gemv", m, list(t), k, False] for m in (splits.values() if t[-1] == "acc" else (5,))]
            jobs += [["gemv", 5, list(t), k, True]]
        fused = {}  # one job per distinct compilation: the tensor-core tiles are one code at any row count
        for kind in (f.NORM, f.NORM_SWIGLU):
            for m in range(1, g.MAX_ROWS + 1):
                for t in f.candidates(kind, m, k):
                    fused.setdefault((kind, f.rows_of(t, m), t), ["fused", kind, m, list(t), k])
        jobs += list(fused.values())
    from mamballama_cli.ops import triton_decode as d

    jobs += [["decode", name, trigger, [32, 4, 1]] for name in DECODE_KERNELS for trigger in (False, True)]
    jobs += [["decode", "ssm_step_gated", True, list(t)] for t in d.step_tiles(128, 128)[1:]]
    # verify windows of K = 1..7 (T = K + 1 new steps), replaying nothing (W = 0) or a whole window (W = T),
    # with the slotted buffers of a captured round and without
    jobs += [["replay", w, t, p, n, gated, slotted] for t in range(2, g.MAX_ROWS + 1) for w in (0, t)
             for p, n, gated in REPLAY_SHAPES for slotted in (False, True)]
    # the other tiles the op times (ops/triton_replay.py: the preloaded form, more programs a head) at K = 4
    from mamballama_cli.ops import triton_replay as r

    jobs += [["replay", w, 5, p, n, gated, slotted, 90, list(tile)] for w in (0, 5) for p, n, gated in REPLAY_SHAPES
             for slotted in (False, True) for tile in r.replay_tiles(p, n, gated)[1:]]
    # and the gated op's split-norm tiles at the 8B head (the norm by the last of a head's programs)
    jobs += [["replay", w, 5, 128, 128, True, slotted, 90, list(tile)] for w in (0, 5) for slotted in (False, True)
             for tile in r.gated_tiles(128, 128) if r.splits_norm(tile)]
    # the default teacher's 9 heads over 3 KV heads of 64, the 8B model's 32 over 8 of 128
    # the lookup draft's proposal (ops/triton_lookup.py) at the n-gram lengths and windows a run may ask for
    jobs += [["lookup", n, 1, kb] for n in (1, 2, 3, 4) for kb in (1, 4, 8)] + [["lookup", 4, 2, 8]]
    jobs += [["lookup", n, 1, kb, True] for n in (3, 4) for kb in (4, 8)]  # with an n-gram table
    jobs += [["lookup", 3, 1, kb, table, True] for kb in (4, 8) for table in (False, True)]  # writing match lengths
    return jobs + [["attention", r, hd] for heads, kv, hd in ((9, 3, 64), (32, 8, 128))
                   for r in sorted(attention_rows(heads, kv))]


def compile_lookup(max_n: int, min_n: int, block_k: int, table: bool = False, match: bool = False, arch: int = 90):
    """The lookup draft's kernel (one program per row, int64 tokens, blocks of 1,024 end positions), with or without
    an n-gram table's chain, with or without writing each row's match length (a gated draft's)."""
    from mamballama_cli.ops import triton_lookup as lk

    args = {"prompt": "*i64", "plen_ptr": "*i64", "hist": "*i64", "hist_len": "*i64", "out": "*i64", "L": "i32",
            "K": "i32", "s_pr": "i32", "s_hr": "i32", "s_hl": "i32", "s_or": "i32", "keys": "*i64", "nexts": "*i64",
            "single": "*i64", "vocab": "i32", "size": "i32", "below": "i32", "match_ptr": "*i64", "s_m": "i32"}
    const = {"MAX_N": max_n, "MIN_N": min_n, "BLOCK": 1024, "BLOCK_K": block_k, "TABLE": table,
             "PROBES": lk.PROBES if table else 1, "HASH": lk.HASH_MUL, "MATCH": match}
    return compile_kernel(lk._lookup_draft_kernel, args, const, 4, 1, arch,
                          unaligned=("K", "s_hl", "s_or", "vocab", "below", "s_m"))


def _compile_job(job) -> None:
    if job[0] == "gemv":
        _, rows, tile, k, pdl = job
        compile_tile(rows, tuple(tile), k, pdl)
    elif job[0] == "glu":
        _, tile, k, pdl = job
        compile_tile(1 if len(tile) == 3 else 5, tuple(tile), k, pdl, glu=True)
    elif job[0] == "gemvconv":
        _, tile, k, pdl = job
        compile_conv_tile(tuple(tile), k, pdl)
    elif job[0] == "specconv":
        _, tile, k, pdl = job
        compile_spec_conv_tile(tuple(tile), k, 5, pdl)
    elif job[0] == "replay":
        compile_replay(*job[1:])
    elif job[0] == "attention":
        compile_window_attention(*job[1:])
    elif job[0] == "lookup":
        compile_lookup(*job[1:])
    elif job[0] == "decode":
        _, name, trigger, tile = job
        report_trigger(compile_decode(name, trigger, tuple(tile)), trigger, name)
    else:
        _, kind, rows, tile, k = job
        compile_fused(kind, rows, tuple(tile), k)


def report_trigger(kernel, trigger: bool, name: str) -> None:
    """A decode kernel compiled in its sm90 form must let its successor start (``griddepcontrol.launch_dependents``
    in its PTX), and must not in its plain form."""
    if ("griddepcontrol.launch_dependents" in kernel.asm["ptx"]) != trigger:
        raise AssertionError(f"{name}: launch_dependents {'missing' if trigger else 'present'} in its PTX")


def _worker(jobs_json: str) -> int:
    """Compile the jobs in order, printing ``ok N`` after each: a compiler that aborts the process (LLVM assertions
    do) leaves the parent the index of the job it died on."""
    import json

    for i, job in enumerate(json.loads(jobs_json)):
        try:
            _compile_job(job)
            print(f"ok {i}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a tile that fails to compile is reported, the rest go on
            print(f"error {i} {type(exc).__name__}: {str(exc)[:200]}".replace("\n", " "), flush=True)
    return 0


def check(ks=(576, 4096), jobs: int = 2, todo: list | None = None) -> list[tuple]:
    """Compile every job of :func:`check_jobs` (or ``todo``) in worker processes (``jobs`` at a time), restarting a
    worker after one that aborts; returns ``(job, what happened)`` for each that did not compile."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    todo = check_jobs(ks) if todo is None else todo
    chunks = [todo[i::jobs] for i in range(jobs)]

    def run(chunk):
        bad, start = [], 0
        while start < len(chunk):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(chunk[start:])],
                                  capture_output=True, text=True, check=False)
            done = [line.split(" ", 2) for line in proc.stdout.splitlines() if line.startswith(("ok ", "error "))]
            bad += [(chunk[start + int(d[1])], d[2]) for d in done if d[0] == "error"]
            start += len(done)
            if proc.returncode != 0 and start < len(chunk):  # the job after the last one reported killed it
                tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
                bad.append((chunk[start], f"process aborted (exit {proc.returncode}): {tail[0][:200]}"))
                start += 1
        return bad

    with ThreadPoolExecutor(jobs) as pool:
        return [b for part in pool.map(run, chunks) for b in part]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[5, 1], help="rows of the call (default: 5 1)")
    ap.add_argument("--k", type=int, default=None, help="the reduction length K (default: 4096; 576 with --fused)")
    ap.add_argument("--fused", action="store_true", help="the fused norm + GEMV kernel's candidates (both kinds) "
                    "instead of the gemv tiles")
    ap.add_argument("--tiles", nargs="*", default=None, help="tiles as benchmarks/gemv_tiles.py reads them "
                    "(default: every candidate for the rows)")
    ap.add_argument("--pdl", action="store_true", help="the programmatic-dependent-launch form")
    ap.add_argument("--show", action="store_true", help="print each loop's instructions")
    ap.add_argument("--check", action="store_true", help="compile every gemv and fused tile a run can ask for, "
                    "the small decode kernels in both launch forms, the replay and attention kernels of every verify "
                    "window, "
                    "each compiler abort contained; exit 1 if any fails (run it under the GPU machine's triton)")
    ap.add_argument("--check-k", type=int, nargs="+", default=[576, 4096], help="K values of --check")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="worker processes of --check")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not available():
        print("error: no triton CUDA backend with cuobjdump here; pip install triton", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package
    if args.worker is not None:
        return _worker(args.worker)
    if args.check:
        import triton

        n = len(check_jobs(args.check_k))
        bad = check(args.check_k, max(1, args.jobs))
        for job, what in bad:
            print(f"FAILED {job}: {what}")
        print(f"triton {triton.__version__}: {n - len(bad)} of {n} compilations for sm90 succeeded")
        return 1 if bad else 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gemv_tiles import parse_tile

    from mamballama_cli.ops import triton_gemv as g
    from mamballama_cli.ops import triton_gemv_fused as f

    k = args.k or (576 if args.fused else 4096)
    for rows in args.rows:
        if args.fused:
            jobs = [(f"{('norm', 'swiglu')[kind]} ", lambda kind=kind, t=t, rows=rows: report_fused(kind, rows, t, k))
                    for kind in (f.NORM, f.NORM_SWIGLU) for t in f.candidates(kind, rows, k)]
        else:
            tiles = [parse_tile(t) for t in args.tiles] if args.tiles else list(
                g.CONFIGS if rows == 1 else g.SKINNY + g.EXTRA)
            jobs = [("", lambda t=t, rows=rows: report(rows, t, k, args.pdl))
                    for t in tiles if (len(t) == 3) == (rows == 1)]
        for name, job in jobs:
            try:
                r = job()
            except Exception as exc:  # noqa: BLE001 - a tile that does not compile is a line of the table
                print(f"rows {rows} {name}: error {type(exc).__name__}: {str(exc)[:200]}")
                continue
            print(f"rows {rows} {name}{r['tile']:>18}: {r['per_weight_element']:6.2f} instr/weight element, "
                  f"{r['loop_instructions']:4d} in loop, {r['registers']:3d} regs, spill {r['local_bytes']} B, "
                  f"{r['barriers']} BAR, {r['shared_round_trips']} STS, {r['wide_loads']} 16-B loads  {r['ops']}",
                  flush=True)
            if args.show:
                print("\n".join("    " + line.split(";")[0].strip() for line in r["body"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
