"""What the decode GEMV tiles compile to on Hopper (sm90), checked here without a GPU (benchmarks/kernel_sass.py:
triton compiles for a named target, and its wheel ships ptxas and cuobjdump).

A decode GEMV is a race to read each weight byte once; the tiles are chosen for loops that issue few instructions
per weight element, load 16 bytes at a time and keep everything in registers. These tests catch a kernel edit that
quietly breaks that (a layout conversion through shared memory in the hot loop, narrow loads, spills), which the
interpreter tests, checking only values, cannot see."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "kernel_sass", Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_sass.py")
kernel_sass = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel_sass)

pytestmark = pytest.mark.skipif(not kernel_sass.available(), reason="no triton CUDA backend (ptxas, cuobjdump)")


@pytest.fixture(scope="module")
def gemv():
    from mamballama_cli.ops import triton_gemv

    return triton_gemv


def test_every_one_row_tile_streams_the_weights_from_registers_with_wide_loads(gemv):
    """The one-row kernel at the 8B width: every candidate's loop loads 16 bytes at a time, spills nothing, does at
    most two shared-memory stores (the narrower tiles' x layout, never the weights), and issues under 4 instructions per weight
    element (about one to widen it to float32, one multiply-add)."""
    for tile in gemv.CONFIGS:
        r = kernel_sass.report(1, tile, k=4096)
        assert r["local_bytes"] == 0, r
        assert r["wide_loads"] >= 1 and r["ops"].get("FFMA", 0) >= 1, r
        assert r["shared_round_trips"] <= 2 and r["per_weight_element"] < 4.0, r


def test_the_one_row_pdl_form_waits_on_the_grid_and_keeps_its_loop_lean(gemv):
    """The programmatic-dependent-launch form (a successor started early) waits for its predecessor
    (``griddepcontrol.wait``) and its loop, which keeps the next weight tile in flight, stays within about one
    instruction per weight element of the plain one."""
    tile = gemv.CONFIGS[0]
    plain, pdl = kernel_sass.report(1, tile), kernel_sass.report(1, tile, pdl=True)
    assert pdl["pdl_wait"] and not plain["pdl_wait"]
    assert pdl["local_bytes"] == 0 and pdl["per_weight_element"] < plain["per_weight_element"] + 1.0, (plain, pdl)


def test_the_swiglu_epilogue_keeps_the_one_row_loop_lean(gemv):
    """The one-row kernel with ``GLU`` (ops/triton_gemv_swiglu.py) streams the gate and up tiles side by side: in
    both launch forms its loop spills nothing, loads the up tile 16 bytes at a time too, and issues no more
    instructions per weight element than the plain kernel, within 0.1 (x is loaded once for both tiles). Compiled for sm90 on 2026-12-05
    under triton 3.6 (the H200's): 2.9-3.9 against 3.0-4.4."""
    for tile in gemv.CONFIGS:
        for pdl in (False, True):
            plain, glu = kernel_sass.report(1, tile, pdl=pdl), kernel_sass.report(1, tile, pdl=pdl, glu=True)
            assert glu["local_bytes"] == 0 and glu["wide_loads"] > plain["wide_loads"], (tile, pdl, plain, glu)
            assert glu["per_weight_element"] <= plain["per_weight_element"] + 0.1, (tile, pdl, plain, glu)
            assert glu["pdl_wait"] == pdl and plain["pdl_wait"] == pdl


def test_the_verify_window_pdl_form_keeps_the_tensor_core_loop(gemv):
    """Five rows in the programmatic-dependent-launch form: the dot and dotw tiles take their first K tile before
    the loop, its weights loaded before ``griddepcontrol.wait``; the loop still multiplies on tensor cores from a
    cp.async pipeline at under 4 instructions a weight element, nothing spills, and the wait is there. Compiled
    for sm90 on 2026-12-05 under triton 3.9: 0.99-3.38 instructions a weight element against 1.0-3.42 before."""
    for tile in [t for t in gemv.SKINNY + gemv.EXTRA if t[-1] in ("dot", "dotw")]:
        r = kernel_sass.report(5, tile, k=4096, pdl=True)
        assert r["pdl_wait"] and r["local_bytes"] == 0, r
        assert r["ops"].get("HMMA", 0) + r["ops"].get("HGMMA", 0) > 0 and r["ops"].get("LDGSTS", 0) > 0, r
        assert r["per_weight_element"] < 4.0, r


def test_the_conv_epilogue_leaves_the_one_row_loop_as_it_was(gemv):
    """The one-row kernel with the conv step in its epilogue (ops/triton_gemv_conv.py; a Mamba-2 in_proj): in both
    launch forms its weight loop issues what the plain kernel's does, within 0.1 instructions a weight element, with
    as many 16-byte loads, and nothing spills (the epilogue's window and conv weights take registers only after the
    loop). Compiled for sm90 on 2026-12-05 under triton 3.9: equal for six of the seven tiles, 2,048-wide +0.03-0.07."""
    for tile in gemv.CONFIGS:
        for pdl in (False, True):
            plain, conv = kernel_sass.report(1, tile, pdl=pdl), kernel_sass.report_conv(tile, pdl=pdl)
            assert conv["local_bytes"] == 0 and conv["wide_loads"] == plain["wide_loads"], (tile, pdl, plain, conv)
            assert conv["per_weight_element"] <= plain["per_weight_element"] + 0.1, (tile, pdl, plain, conv)
            assert conv["pdl_wait"] == pdl


def test_the_window_conv_epilogue_leaves_the_five_row_loop_as_it_was(gemv):
    """The several-row kernel with a verify window's conv in its epilogue (ops/triton_gemv_conv.py): at five rows,
    in both launch forms, every window tile's weight loop issues what the plain tile's does, within 0.1
    instructions a weight element, with the same tensor-core products, and nothing spills."""
    from mamballama_cli.ops.triton_gemv_conv import WINDOW_TILES

    for tile in WINDOW_TILES:
        for pdl in (False, True):
            plain, conv = kernel_sass.report(5, tile, pdl=pdl), kernel_sass.report_spec_conv(tile, pdl=pdl)
            assert conv["local_bytes"] == 0 and conv["pdl_wait"] == pdl, (tile, pdl, conv)
            assert conv["per_weight_element"] <= plain["per_weight_element"] + 0.1, (tile, pdl, plain, conv)
            mma = lambda r: r["ops"].get("HMMA", 0) + r["ops"].get("HGMMA", 0)
            assert mma(conv) == mma(plain) > 0, (tile, pdl, plain, conv)


def test_the_verify_window_tiles_use_tensor_cores_or_register_accumulators(gemv):
    """Five rows (a K = 4 verify window), the candidates and the tiles ``gemvtiles`` times besides them
    (``EXTRA``): the dot and dotw tiles' loop multiplies on tensor cores (HMMA, or Hopper's wgmma) from a cp.async
    pipeline (LDGSTS) at under 4 instructions a weight element; the acc tiles accumulate with multiply-adds, five
    per weight element; nothing spills."""
    for tile in gemv.SKINNY + gemv.EXTRA:
        r = kernel_sass.report(5, tile, k=4096)
        assert r["local_bytes"] == 0, r
        if tile[-1] in ("dot", "dotw"):
            assert r["ops"].get("HMMA", 0) + r["ops"].get("HGMMA", 0) > 0 and r["ops"].get("LDGSTS", 0) > 0, r
            assert r["per_weight_element"] < 4.0, r
        else:
            held = tile[0] * tile[1] // (32 * tile[2])  # weight elements a thread holds each iteration
            assert r["ops"].get("FFMA", 0) == 5 * held, r



def test_the_swiglu_epilogue_at_a_verify_window_keeps_the_tensor_core_loop(gemv):
    """Five rows with ``GLU`` (the several-row SwiGLU GEMV, ops/triton_gemv_swiglu.py): every dot and dotw tile
    multiplies the gate and up tiles on tensor cores from a cp.async pipeline, spills nothing, and issues no more
    instructions per weight element than the same tile without the epilogue, within 0.5. A paired tile (dotp,
    dotwp: gate and up rows in one weight tile) runs the loop of the plain tile twice as wide, within 0.3 an
    element (compiled under triton 3.6 on 2026-12-06: within 0.14)."""
    for tile in gemv.GLU_TILES:
        paired = tile[-1] in ("dotp", "dotwp")
        plain = kernel_sass.report(5, (2 * tile[0], *tile[1:4], tile[4][:-1]) if paired else tile, k=4096)
        glu = kernel_sass.report(5, tile, k=4096, glu=True)
        assert glu["local_bytes"] == 0, (tile, glu)
        assert glu["ops"].get("HMMA", 0) + glu["ops"].get("HGMMA", 0) > 0 and glu["ops"].get("LDGSTS", 0) > 0, glu
        assert glu["per_weight_element"] <= plain["per_weight_element"] + (0.3 if paired else 0.5), (tile, plain, glu)


def test_the_fused_kernel_multiplies_a_verify_window_on_tensor_cores():
    """The fused norm + GEMV kernel at five rows and the default teacher's K = 576: its tensor-core tiles
    (``DOT_CONFIGS``, both kinds) multiply with HMMA or wgmma from a cp.async pipeline, spill nothing and issue under
    8 instructions a weight element (the 16-output ones amortise the rows' norm over fewest outputs); the CUDA-core
    tiles at those rows, eight float32 products a weight element, issue at least twice as many as the slowest
    of them."""
    from mamballama_cli.ops import triton_gemv_fused as fused

    worst = 0.0
    for kind in (fused.NORM, fused.NORM_SWIGLU):
        for tile in fused.DOT_CONFIGS:
            r = kernel_sass.report_fused(kind, 5, tile)
            assert r["local_bytes"] == 0, r
            ops = kernel_sass.opcode_counts(r["body"])
            assert ops["HMMA"] + ops["HGMMA"] > 0 and ops["LDGSTS"] > 0, r
            assert r["per_weight_element"] < 8.0, r
            worst = max(worst, r["per_weight_element"])
        cuda_core = [t for t in fused.candidates(kind, 5) if len(t) == 3]
        assert min(kernel_sass.report_fused(kind, 5, t)["per_weight_element"] for t in cuda_core) > 2 * worst

def test_the_compile_check_covers_every_tile_and_reports_a_failing_one_without_stopping(gemv):
    """``kernel_sass.py --check`` (``make check-kernels``, under the H200's triton): its job list holds every
    one-row tile in both launch forms, every multi-row tile at every row split of the acc mode, the fused kernel's
    candidates at each padded row count, the decode kernels in both forms and the replay and attention kernels of
    every verify window; a job that fails is reported, in a worker process, and the jobs after it still compile."""
    from mamballama_cli.ops import triton_gemv_fused as fused

    jobs = kernel_sass.check_jobs(ks=(576,))
    assert sum(j[0] == "gemv" and j[1] == 1 for j in jobs) == 2 * len(gemv.CONFIGS)
    assert sorted((tuple(j[1]), j[3]) for j in jobs if j[0] == "glu") == sorted(
        [(t, pdl) for t in gemv.CONFIGS for pdl in (False, True)]  # the SwiGLU epilogue, both launch forms
        + [(t, pdl) for t in gemv.GLU_TILES for pdl in (False, True)])  # and at 5 rows, the paired tiles too
    assert {t[-1] for t in gemv.GLU_TILES} == {"dot", "dotw", "dotp", "dotwp"}
    assert sorted((tuple(j[1]), j[3]) for j in jobs if j[0] == "gemvconv") == sorted(
        (t, pdl) for t in gemv.CONFIGS for pdl in (False, True))  # the conv epilogue, both launch forms
    acc = [t for t in gemv.SKINNY if t[-1] == "acc"]
    several = [j for j in jobs if j[0] == "gemv" and j[1] > 1]
    assert sum(not j[4] for j in several) == 7 * len(acc) + len(gemv.SKINNY + gemv.EXTRA) - len(acc)
    assert sorted(tuple(j[2]) for j in several if j[4]) == sorted(gemv.SKINNY + gemv.EXTRA)  # pdl: 5 rows
    # the fused kernel: each distinct compilation once (kind, ROWS 1 or 8, tile; the tensor-core tiles are 8 rows'
    # code at any row count), every candidate at every row count among them
    compiled = {(j[1], fused.rows_of(tuple(j[3]), j[2]), tuple(j[3])) for j in jobs if j[0] == "fused"}
    assert sum(j[0] == "fused" for j in jobs) == len(compiled)
    assert compiled == {(k, fused.rows_of(t, m), t) for k in (0, 1) for m in range(1, 9)
                        for t in fused.candidates(k, m, 576)}
    assert {(k, r) for k, r, _ in compiled} == {(k, r) for k in (0, 1) for r in (1, 8)}
    assert {j[1] for j in jobs if j[0] == "decode"} == set(kernel_sass.DECODE_KERNELS)
    from mamballama_cli.ops import triton_decode

    assert {tuple(j[3]) for j in jobs if j[1] == "ssm_step_gated"} == set(triton_decode.STEP_TILES)
    replays = {tuple(j[1:7]) for j in jobs if j[0] == "replay" and len(j) == 7}  # the first tile: every window
    assert {(w, t) for w, t, *_ in replays} == {(w, t) for t in range(2, 9) for w in (0, t)}
    assert {r[2:] for r in replays} == {(*shape, slotted) for shape in kernel_sass.REPLAY_SHAPES
                                        for slotted in (False, True)}
    from mamballama_cli.ops import triton_replay

    # and every tile the replay op times, at K = 4 (the first tile above, at every K)
    tiles = {(*j[1:7], tuple(j[8])) for j in jobs if j[0] == "replay" and len(j) > 7}
    split = [(32, 4, 0, 1), (32, 4, 2, 1), (32, 8, 2, 1)]  # the gated op's split-norm tiles at the 8B head
    assert tiles == {(w, 5, p, n, gated, slotted, t) for w in (0, 5) for p, n, gated in kernel_sass.REPLAY_SHAPES
                     for slotted in (False, True) for t in triton_replay.replay_tiles(p, n, gated)[1:]} | {
        (w, 5, 128, 128, True, slotted, t) for w in (0, 5) for slotted in (False, True) for t in split}
    # the window attention's tile rows (query heads of a group x window queries, at least 16): 16 and 32 at both
    # sizes, head dims 64 (the default teacher) and 128 (8B)
    assert kernel_sass.attention_rows(9, 3) == {16, 32} and kernel_sass.attention_rows(32, 8) == {16, 32}
    assert {tuple(j[1:]) for j in jobs if j[0] == "attention"} == {(r, d) for r in (16, 32) for d in (64, 128)}
    bad = kernel_sass.check(todo=[["gemv", 5, [16, 256, 4, 4, "nosuchmode"], 576, False],
                                  ["gemv", 1, list(gemv.CONFIGS[0]), 576, True],
                                  ["decode", "swiglu", True, [32, 4]], ["replay", 3, 3, 64, 64, True, True]],
                                 jobs=1)
    assert len(bad) == 1 and bad[0][0][2][-1] == "nosuchmode" and "KeyError" in bad[0][1], bad


def _resources(kernel) -> tuple[int, int]:
    import re

    res = kernel_sass._objdump(kernel, "-res-usage")
    return int(re.search(r"REG:(\d+)", res).group(1)), int(re.search(r"LOCAL:(\d+)", res).group(1))


def _loads_before_a_store(ptx: str) -> int:
    """How many global loads a kernel's PTX issues before its first global store."""
    lines = ptx.splitlines()
    first_store = next(i for i, line in enumerate(lines) if "st.global" in line)
    return sum("ld.global" in line for line in lines[:first_store])


def test_every_replay_tile_keeps_its_state_in_registers_and_the_window_form_loads_it_first():
    """The Mamba-2 replay kernel's candidates (ops/replay_tiles.py) at a K = 4 verify window, for the 8B head (128 x
    128, tiled; gated: also with the norm split over a head's programs) and the default teacher's (64 x 64, one
    program a head): none spills; the form that loads the new steps ahead (FORM 2, at 4 and 8 warps) issues a larger
    share of its loads before its first store (the first two new steps') than the first tile, and at 8 warps fewer
    instructions a thread than at 4 (a tile's state over twice the threads); the chunked form (FORM 3, one program a head) issues
    every load before its first store; the split-norm tiles count themselves with one acq_rel atomic and read the
    rows back past L1; every tile, in its sm90 form, lets its successor launch early."""
    from mamballama_cli.ops.replay_tiles import gated_tiles, replay_tiles

    for p, n, gated in ((128, 128, False), (64, 64, True), (128, 128, True)):
        tiles = gated_tiles(p, n) if gated else replay_tiles(p, n, False)
        ptx, issued = {}, {}
        for tile in tiles:
            kernel = kernel_sass.compile_replay(5, 5, p, n, gated, True, 90, tile)
            assert _resources(kernel)[1] == 0, (p, n, tile)
            ptx[tile] = kernel.asm["ptx"]
            issued[tile] = sum(1 for line in kernel_sass._objdump(kernel, "-sass").splitlines()
                               if kernel_sass.ROW.match(line))
            # sm90: the projection after the op may start loading its weights while the replay runs (TRIGGER)
            assert "griddepcontrol.launch_dependents" in ptx[tile], (p, n, tile)
        first = ptx[tiles[0]]
        assert tiles[0][2] == 0 and len(tiles) >= 1 + (p == 128), tiles
        assert any(t[2] == 3 for t in tiles) == (gated and p == 64), tiles  # chunked where a head fits a program
        for tile in tiles[1:]:
            if tile[2] == 2:  # the new steps' loads ahead: the first two steps' go out before the first store (a
                # share of the thread's loads: at 8 warps a thread has fewer)
                ahead, whole = _loads_before_a_store(ptx[tile]), ptx[tile].count("ld.global")
                assert ahead * first.count("ld.global") > _loads_before_a_store(first) * whole, tile
                if tile[1] == 8:  # the same tile at 4 warps issues more a thread
                    assert issued[tile] < issued[(tile[0], 4, *tile[2:])], (p, n, tile, issued)
            if tile[2] == 3:  # the chunked form: every load of the window before its first store, no chain of steps
                assert _loads_before_a_store(ptx[tile]) == ptx[tile].count("ld.global") > 0, tile
            if len(tile) > 3:  # the split norm: one acq_rel count after a barrier, the rows read back past L1
                assert "atom.global.gpu.acq_rel.add" in ptx[tile] and "ld.global.cg" in ptx[tile], tile


def test_the_split_mamba2_step_tiles_count_their_rows_in_with_one_release():
    """The Mamba-2 step kernel's SPLIT tiles (ops/triton_decode.py): no spills; each program takes one acq_rel count
    after a barrier (every thread's rows of y stored first), and reads the row back past L1 (``.cg``); the one-program
    tiles take no count. And at a head's whole width the kernel loads D, the gate and the norm's weight before it
    stores the state, not after."""
    from mamballama_cli.ops.triton_decode import STEP_TILES

    for tile in STEP_TILES:
        kernel = kernel_sass.compile_decode("ssm_step_gated", True, tile)
        assert _resources(kernel)[1] == 0, tile
        ptx = kernel.asm["ptx"]
        atoms = [i for i, line in enumerate(ptx.splitlines()) if "atom." in line]
        if tile[2] == 1:
            assert not atoms and "ld.global.cg" not in ptx, tile
            continue
        lines = ptx.splitlines()
        assert "atom.global.gpu.acq_rel.add" in lines[atoms[0]], tile
        stores = [i for i, line in enumerate(lines[: atoms[0]]) if "st.global" in line]
        assert any("bar.sync" in line for line in lines[stores[-1] : atoms[0]]), tile  # the rows of y, then a barrier
        assert "ld.global.cg" in ptx, tile
    # a head's whole width at once: every input loaded before the state's store (but the split tiles' row, read
    # back after the count)
    for tile in ((128, 8, 1), (128, 4, 4)):
        lines = kernel_sass.compile_decode("ssm_step_gated", True, tile).asm["ptx"].splitlines()
        loads = [i for i, line in enumerate(lines) if "ld.global" in line and ".cg" not in line]
        assert max(loads) < min(i for i, line in enumerate(lines) if "st.global" in line), tile


def test_the_small_step_kernels_issue_every_load_before_their_first_store():
    """A load after a store waits a round trip of its own (the compiler cannot move it ahead: the two might alias).
    The add + RMSNorm, the one-token and window convs and the RoPE + K/V write issue every global load before their
    first global store (2026-12-05: the norm's weight, the conv's slid window and the value head came after)."""
    from mamballama_cli.ops import triton_attention, triton_conv, triton_decode

    bf = "*bf16"
    kernels = [
        (triton_decode._add_rmsnorm_kernel, {"HAS_RES": True, "BLOCK": 4096, "TRIGGER": True},
         ("X", "R", "W", "OUT", "ROUT"), 8),
        (triton_decode._conv_update_kernel, {"WIDTH": 4, "HAS_BIAS": True, "SILU": True, "BLOCK_D": 256, "BLOCK_W": 4},
         ("X", "S", "SO", "W", "BIAS", "Y"), 4),
        (triton_conv._spec_conv_kernel, {"WIDTH": 4, "HAS_BIAS": True, "SILU": True, "BLOCK_D": 64, "BLOCK_T": 8,
                                         "BLOCK_S": 16}, ("X", "BUF", "W", "BIAS", "OUT"), 4),
        (triton_attention._rope_kv_kernel, {"BLOCK_D": 128}, ("QKV", "COS", "SIN", "QOUT", "KC", "VC"), 4),
    ]
    for fn, const, bf16_ptrs, warps in kernels:
        types = {**dict.fromkeys(bf16_ptrs, bf), "SHIFT": "*i64", "POS": "*i64", "eps": "fp32"}
        args = {n: types.get(n, "i32") for n in fn.arg_names if n not in const}
        lines = kernel_sass.compile_kernel(fn, args, const, warps, 1, 90).asm["ptx"].splitlines()
        loads = [i for i, line in enumerate(lines) if "ld.global" in line]
        stores = [i for i, line in enumerate(lines) if "st.global" in line]
        assert loads and stores and max(loads) < min(stores), (getattr(fn, "fn", fn), loads, stores)
