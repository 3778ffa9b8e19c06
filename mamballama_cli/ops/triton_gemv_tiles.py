"""The GEMV kernels' small Triton helpers (ops/triton_gemv.py and the kernels built on it): loading a K tile of
the rows and of the weight, one tensor-core step of the dot modes, the pdl form's first tiles, and the SwiGLU
epilogue in the roundings of the ops apart. Jit functions only; the kernels that call them hold the docs."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  # pragma: no cover - depends on the machine; the probe says why (ops/common.py)
    triton = tl = None

if triton is not None:
    from mamballama_cli.ops.common import _grid_wait

    @triton.jit
    def _glu(g, u, Y):
        # silu(gate) * up in the roundings of the ops apart: each projection, silu, the product, to Y's dtype
        g = g.to(Y.dtype.element_ty).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(Y.dtype.element_ty).to(tl.float32)
        return act * u.to(Y.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _x_tile(x_ptrs, k0, cols, K, live_m, EVEN_K: tl.constexpr):
        # rows' x tile at k0, masked past M and (unless K is a multiple of the tile) past K
        if EVEN_K:
            x = tl.load(x_ptrs + k0, mask=live_m[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs + k0, mask=live_m[:, None] & (k0 + cols < K)[None, :], other=0.0)
        return x

    @triton.jit
    def _w_tile(w_ptrs, k0, cols, K, EVEN_K: tl.constexpr):
        # the weight tile at k0, masked past K unless K is a multiple of the tile
        if EVEN_K:
            return tl.load(w_ptrs + k0)
        return tl.load(w_ptrs + k0, mask=(k0 + cols < K)[None, :], other=0.0)

    @triton.jit
    def _tiles(x_ptrs, w_ptrs, k0, cols, K, live_m, EVEN_K: tl.constexpr):
        # the rows' x tile and the weight tile at k0
        return _x_tile(x_ptrs, k0, cols, K, live_m, EVEN_K), _w_tile(w_ptrs, k0, cols, K, EVEN_K)

    @triton.jit
    def _first_tiles(x_ptrs, w_ptrs, u_ptrs, cols, K, live_m, EVEN_K: tl.constexpr, GLU: tl.constexpr):
        # The pdl form's first tiles: the weight tile (and GLU's up tile) loaded before waiting on the kernel before
        # this one (no kernel writes weights, so they may be in flight while it finishes), x once it is done
        w = _w_tile(w_ptrs, 0, cols, K, EVEN_K)
        u = w
        if GLU:
            u = _w_tile(u_ptrs, 0, cols, K, EVEN_K)
        _grid_wait()
        return _x_tile(x_ptrs, 0, cols, K, live_m, EVEN_K), w, u

    @triton.jit
    def _dot_step(acc, acc_u, x, w, u, u_ptrs, k0, cols, K, EVEN_K: tl.constexpr, OUTPUTS_FIRST: tl.constexpr,
                  GLU: tl.constexpr, LOAD_U: tl.constexpr):
        # One K tile of the dot modes into the float32 accumulators, (rows x outputs), or (outputs x rows) with w as
        # tl.dot's first operand; GLU: the up tile too, u or (LOAD_U) u_ptrs' at k0, loaded after the first product
        if OUTPUTS_FIRST:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        if GLU:
            if LOAD_U:
                u = _w_tile(u_ptrs, k0, cols, K, EVEN_K)
            if OUTPUTS_FIRST:
                acc_u = tl.dot(u, tl.trans(x), acc_u)
            else:
                acc_u = tl.dot(x, tl.trans(u), acc_u)
        return acc, acc_u
