"""GEMM for dense layers: C = alpha * op(A) @ op(B) + beta * C (+ bias broadcast over rows).

op(X) is X or Xᵀ. A transpose is never a copy: the kernels read the stored array with swapped
indices (``trans_a``/``trans_b`` are int flags read inside the kernel), so the three products of a
linear layer run on the arrays as they are:

    forward   y  = x · wᵀ + b      gemm(x,  w, y,  trans_b=True, bias=b)     (N, in) x (out, in)ᵀ
    backward  dx = dy · w          gemm(dy, w, dx)                           (N, out) x (out, in)
              dw = dyᵀ · x         gemm(dy, x, dw, trans_a=True)             (N, out)ᵀ x (N, in)
              db = Σ_rows dy       bias_grad(dy, db)                         its own column reduction

Versions (rising in complexity, falling in run time):

    naive           one thread per output element, every operand read from global memory
    tiled           TILE x TILE shared-memory tiles of op(A) and op(B); each element loaded once per tile
    register_tiled  128 x 128 block tile, each thread computes an 8 x 8 micro-tile from registers
                    (the classic SGEMM "2-D blocktiling"); the kernel for the big benchmarks

Run the checks: ``python -m pytest tests/test_gemm.py`` (simulator); build for real GPUs:
``python -m gpu_cnn.compile_check``.
"""

import numpy as np
from numba import cuda, float32, uint32

from ._common import check_device_array, ceil_div, kernel

VERSIONS = ("naive", "tiled", "register_tiled")
DEFAULT_VERSION = "tiled"

# tiled: a TILE x TILE thread block computes a TILE x TILE tile of C.
TILE = 16
# Shared tiles get one column of padding: the transposed loads store down a column (address
# tx * TILE_LD + ty); without the pad the 16 tx of a half-warp would share 2 banks (8-way conflict).
TILE_PAD = 1
TILE_LD = TILE + TILE_PAD  # leading dimension of the shared tiles (a shape must be a constant)

# register_tiled: a block of RT_THREADS threads computes an RT_BM x RT_BN tile of C; each thread an
# RT_TM x RT_TN micro-tile whose rows/columns are interleaved with stride RT_BM // RT_TM (so a warp
# reads consecutive shared-memory words and writes consecutive global addresses).
RT_BM = 128
RT_BN = 128
RT_BK = 8
RT_TM = 8
RT_TN = 8
RT_ROW_THREADS = RT_BM // RT_TM  # 16 thread rows
RT_COL_THREADS = RT_BN // RT_TN  # 16 thread columns
RT_THREADS = RT_ROW_THREADS * RT_COL_THREADS  # 256
RT_A_LOADS = RT_BM * RT_BK // RT_THREADS  # elements of the op(A) tile each thread loads (4)
RT_B_LOADS = RT_BN * RT_BK // RT_THREADS  # elements of the op(B) tile each thread loads (4)
# Pad of the k-major shared tiles: row-major (non-transposed) loads put 8 consecutive k of a row in
# 8 consecutive threads, stored 132 words apart -> banks 4*k + m: all 32 distinct.
RT_PAD = 4
RT_LDA = RT_BM + RT_PAD  # leading dimensions of the (flat, k-major) shared tiles
RT_LDB = RT_BN + RT_PAD
RT_SA_SIZE = RT_BK * RT_LDA
RT_SB_SIZE = RT_BK * RT_LDB
assert RT_BM * RT_BK % RT_THREADS == 0 and RT_BN * RT_BK % RT_THREADS == 0
assert RT_THREADS % RT_BM == 0 and RT_THREADS % RT_BN == 0 and RT_THREADS % RT_BK == 0

# Largest grid.y of a launch (CUDA's limit; grid.x allows 2^31 - 1). The GEMMs put the rows of C there.
MAX_GRID_Y = 65535

# bias_grad: a block of DB_COLS x DB_ROWS threads sums DB_COLS columns; each thread row takes every
# DB_ROWS-th row of dy, then the DB_ROWS partial sums are added in shared memory (no atomics).
DB_COLS = 32
DB_ROWS = 8


# --- reference ---------------------------------------------------------------------------------------


def gemm_reference(a, b, c=None, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, bias=None):
    """float64 alpha * op(A) @ op(B) + beta * C (+ bias)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    opa = a.T if trans_a else a
    opb = b.T if trans_b else b
    out = alpha * (opa @ opb)
    if beta != 0.0:
        out = out + beta * np.asarray(c, np.float64)
    if bias is not None:
        out = out + np.asarray(bias, np.float64)[None, :]
    return out


def linear_forward_reference(x, w, b=None):
    """float64 y = x · wᵀ (+ b). x: (N, in), w: (out, in), b: (out,)."""
    return gemm_reference(x, w, trans_b=True, bias=b)


def linear_backward_reference(dy, x, w):
    """float64 (dx, dw, db) of y = x · wᵀ + b."""
    dy = np.asarray(dy, np.float64)
    return dy @ np.asarray(w, np.float64), dy.T @ np.asarray(x, np.float64), dy.sum(axis=0)


# --- kernels -----------------------------------------------------------------------------------------

# (a, b, c, bias, trans_a, trans_b, has_bias, alpha, beta)
GEMM_SIGNATURE = (
    "void(float32[:, ::1], float32[:, ::1], float32[:, ::1], float32[::1], int64, int64, int64, float32, float32)"
)


@kernel(GEMM_SIGNATURE)
def gemm_naive_kernel(a, b, c, bias, trans_a, trans_b, has_bias, alpha, beta):
    """naive: one thread per element of C, the K-long dot product read straight from global memory."""
    # a: (M, K), or (K, M) when trans_a; b: (K, N), or (N, K) when trans_b; c: (M, N); bias: (N,)
    n, m = cuda.grid(2)  # x runs along a row of C: consecutive threads store consecutive addresses
    M = c.shape[0]
    N = c.shape[1]
    K = a.shape[0] if trans_a else a.shape[1]
    if m < M and n < N:
        acc = float32(0.0)
        for k in range(K):
            av = a[k, m] if trans_a else a[m, k]
            bv = b[n, k] if trans_b else b[k, n]
            acc += av * bv
        v = alpha * acc
        if beta != float32(0.0):  # beta == 0: C is write-only (it may hold garbage, even NaN)
            v += beta * c[m, n]
        if has_bias:
            v += bias[n]
        c[m, n] = v


@kernel(GEMM_SIGNATURE)
def gemm_tiled_kernel(a, b, c, bias, trans_a, trans_b, has_bias, alpha, beta):
    """tiled: op(A) and op(B) staged through TILE x TILE shared tiles, each global element read once per tile."""
    # a: (M, K), or (K, M) when trans_a; b: (K, N), or (N, K) when trans_b; c: (M, N); bias: (N,)
    # sa[i, k] = op(A)[m0 + i, k0 + k];  sb[k, j] = op(B)[k0 + k, n0 + j]
    sa = cuda.shared.array((TILE, TILE_LD), float32)
    sb = cuda.shared.array((TILE, TILE_LD), float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    m0 = cuda.blockIdx.y * TILE
    n0 = cuda.blockIdx.x * TILE
    m = m0 + ty
    n = n0 + tx
    M = c.shape[0]
    N = c.shape[1]
    K = a.shape[0] if trans_a else a.shape[1]

    acc = float32(0.0)
    for t in range((K + TILE - 1) // TILE):  # ceil_div(K, TILE)
        k0 = t * TILE
        # Loads: consecutive tx always read consecutive addresses of the stored array, so a
        # transposed operand is loaded "sideways" (thread (tx, ty) fills sa[tx, ty]).
        av = float32(0.0)  # zero-fill: out-of-range elements add nothing
        if trans_a:  # a stored (K, M): read a[k0 + ty, m0 + tx] = op(A)[m0 + tx, k0 + ty]
            if k0 + ty < K and m0 + tx < M:
                av = a[k0 + ty, m0 + tx]
            sa[tx, ty] = av
        else:  # a stored (M, K): read a[m0 + ty, k0 + tx] = op(A)[m0 + ty, k0 + tx]
            if m0 + ty < M and k0 + tx < K:
                av = a[m0 + ty, k0 + tx]
            sa[ty, tx] = av
        bv = float32(0.0)
        if trans_b:  # b stored (N, K): read b[n0 + ty, k0 + tx] = op(B)[k0 + tx, n0 + ty]
            if n0 + ty < N and k0 + tx < K:
                bv = b[n0 + ty, k0 + tx]
            sb[tx, ty] = bv
        else:  # b stored (K, N): read b[k0 + ty, n0 + tx] = op(B)[k0 + ty, n0 + tx]
            if k0 + ty < K and n0 + tx < N:
                bv = b[k0 + ty, n0 + tx]
            sb[ty, tx] = bv
        cuda.syncthreads()
        for kk in range(TILE):
            acc += sa[ty, kk] * sb[kk, tx]
        cuda.syncthreads()  # nobody overwrites the tiles while others still read them

    if m < M and n < N:
        v = alpha * acc
        if beta != float32(0.0):
            v += beta * c[m, n]
        if has_bias:
            v += bias[n]
        c[m, n] = v


@kernel(GEMM_SIGNATURE)
def gemm_register_tiled_kernel(a, b, c, bias, trans_a, trans_b, has_bias, alpha, beta):
    """register_tiled: RT_BM x RT_BN block tile, each thread an RT_TM x RT_TN micro-tile kept in registers."""
    # a: (M, K), or (K, M) when trans_a; b: (K, N), or (N, K) when trans_b; c: (M, N); bias: (N,)
    # Shared tiles, k-major and flat: sa[k * RT_LDA + i] = op(A)[m0 + i, k0 + k],
    # sb[k * RT_LDB + j] = op(B)[k0 + k, n0 + j], so step kk reads a column of op(A) and a row of op(B).
    sa = cuda.shared.array(RT_SA_SIZE, float32)
    sb = cuda.shared.array(RT_SB_SIZE, float32)
    acc = cuda.local.array((RT_TM, RT_TN), float32)  # constant indices after unrolling: registers
    a_frag = cuda.local.array(RT_TM, float32)
    b_frag = cuda.local.array(RT_TN, float32)
    tid = cuda.threadIdx.x
    trow = tid // RT_COL_THREADS
    tcol = tid % RT_COL_THREADS
    m0 = cuda.blockIdx.y * RT_BM
    n0 = cuda.blockIdx.x * RT_BN
    M = c.shape[0]
    N = c.shape[1]
    K = a.shape[0] if trans_a else a.shape[1]

    for i in range(RT_TM):
        for j in range(RT_TN):
            acc[i, j] = float32(0.0)

    for t in range((K + RT_BK - 1) // RT_BK):  # ceil_div(K, RT_BK)
        k0 = t * RT_BK
        # Each thread loads RT_A_LOADS elements of the op(A) tile; element e -> (kk, ii) is chosen so
        # that consecutive threads read consecutive addresses of the array as stored.
        for r in range(RT_A_LOADS):
            e = tid + r * RT_THREADS
            v = float32(0.0)  # zero-fill outside the matrix
            if trans_a:  # a stored (K, M): contiguous along m
                kk = e // RT_BM
                ii = e % RT_BM
                if k0 + kk < K and m0 + ii < M:
                    v = a[k0 + kk, m0 + ii]
            else:  # a stored (M, K): contiguous along k
                kk = e % RT_BK
                ii = e // RT_BK
                if m0 + ii < M and k0 + kk < K:
                    v = a[m0 + ii, k0 + kk]
            sa[kk * RT_LDA + ii] = v
        for r in range(RT_B_LOADS):
            e = tid + r * RT_THREADS
            v = float32(0.0)
            if trans_b:  # b stored (N, K): contiguous along k
                kk = e % RT_BK
                jj = e // RT_BK
                if n0 + jj < N and k0 + kk < K:
                    v = b[n0 + jj, k0 + kk]
            else:  # b stored (K, N): contiguous along n
                kk = e // RT_BN
                jj = e % RT_BN
                if k0 + kk < K and n0 + jj < N:
                    v = b[k0 + kk, n0 + jj]
            sb[kk * RT_LDB + jj] = v
        cuda.syncthreads()

        # Unsigned running offsets: Numba wraps every *signed* index (x < 0 -> x + size), and with
        # that fix-up in the way the 16 shared loads per step cost ~4 integer ops each; with uint32
        # offsets they compile to base + constant-offset loads (about 92 instructions for 64 FMAs).
        a_off = uint32(trow)
        b_off = uint32(tcol)
        for kk in range(RT_BK):
            for i in range(RT_TM):
                a_frag[i] = sa[a_off + uint32(i * RT_ROW_THREADS)]
            for j in range(RT_TN):
                b_frag[j] = sb[b_off + uint32(j * RT_COL_THREADS)]
            for i in range(RT_TM):
                for j in range(RT_TN):
                    acc[i, j] += a_frag[i] * b_frag[j]
            a_off += uint32(RT_LDA)
            b_off += uint32(RT_LDB)
        cuda.syncthreads()

    for i in range(RT_TM):
        m = m0 + trow + i * RT_ROW_THREADS
        for j in range(RT_TN):
            n = n0 + tcol + j * RT_COL_THREADS
            if m < M and n < N:
                v = alpha * acc[i, j]
                if beta != float32(0.0):
                    v += beta * c[m, n]
                if has_bias:
                    v += bias[n]
                c[m, n] = v


@kernel("void(float32[:, ::1], float32[::1], float32, float32)")
def bias_grad_kernel(dy, db, alpha, beta):
    """db = alpha * (sum over the rows of dy) + beta * db: DB_ROWS strided partial sums per column, added in shared memory."""
    # dy: (N, F) float32; db: (F,) float32
    partial = cuda.shared.array((DB_ROWS, DB_COLS), float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    f = cuda.blockIdx.x * DB_COLS + tx
    N = dy.shape[0]
    F = dy.shape[1]
    acc = float32(0.0)
    if f < F:
        for r in range(ty, N, DB_ROWS):  # consecutive tx read consecutive columns of a row
            acc += dy[r, f]
    partial[ty, tx] = acc
    cuda.syncthreads()
    if ty == 0 and f < F:
        total = float32(0.0)
        for s in range(DB_ROWS):
            total += partial[s, tx]
        v = alpha * total
        if beta != float32(0.0):
            v += beta * db[f]
        db[f] = v


# --- launchers ---------------------------------------------------------------------------------------


def _check_gemm(a, b, c, trans_a, trans_b, bias):
    check_device_array("a", a)
    check_device_array("b", b)
    check_device_array("c", c)
    for name, arr in (("a", a), ("b", b), ("c", c)):
        if len(arr.shape) != 2:
            raise ValueError(f"{name}: expected a 2-D array, got shape {tuple(arr.shape)}")
    M, K = (a.shape[1], a.shape[0]) if trans_a else (a.shape[0], a.shape[1])
    Kb, N = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
    if Kb != K:
        raise ValueError(
            f"b: inner dimensions differ: op(a) is {M}x{K} (trans_a={bool(trans_a)}) but op(b) is {Kb}x{N} "
            f"(trans_b={bool(trans_b)})"
        )
    if tuple(c.shape) != (M, N):
        raise ValueError(f"c: expected shape {(M, N)} for op(a) {M}x{K} times op(b) {K}x{N}, got {tuple(c.shape)}")
    if bias is not None:
        check_device_array("bias", bias, shape=(N,))
    return M, N, K


def _scalars(alpha, beta, bias, c):
    # With no bias the kernel still needs a float32[::1] argument: a row of c is a view (no
    # allocation) that the kernel never reads (has_bias = 0).
    bias_arg = bias if bias is not None else c[0]
    return bias_arg, int(bias is not None), np.float32(alpha), np.float32(beta)


def _launch(kern, block_m, block_n, threads, a, b, c, trans_a, trans_b, alpha, beta, bias):
    """Check the operands, then launch `kern` with one block per block_m x block_n tile of c."""
    M, N, _ = _check_gemm(a, b, c, trans_a, trans_b, bias)
    if M == 0 or N == 0:
        return c
    bias_arg, has_bias, alpha, beta = _scalars(alpha, beta, bias, c)
    blocks = (ceil_div(N, block_n), ceil_div(M, block_m))
    if blocks[1] > MAX_GRID_Y:  # rows of c run along grid.y, which a GPU caps
        raise ValueError(f"c: {M} rows need {blocks[1]} row blocks of {block_m}; a GPU allows at most "
                         f"{MAX_GRID_Y} (split the product into row chunks)")
    kern[blocks, threads](a, b, c, bias_arg, int(bool(trans_a)), int(bool(trans_b)), has_bias, alpha, beta)
    return c


def gemm_naive(a, b, c, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, bias=None):
    """naive: one thread per element of c, TILE x TILE threads per block."""
    return _launch(gemm_naive_kernel, TILE, TILE, (TILE, TILE), a, b, c, trans_a, trans_b, alpha, beta, bias)


def gemm_tiled(a, b, c, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, bias=None):
    """tiled: one thread per element of c, TILE x TILE operand tiles staged in shared memory."""
    return _launch(gemm_tiled_kernel, TILE, TILE, (TILE, TILE), a, b, c, trans_a, trans_b, alpha, beta, bias)


def gemm_register_tiled(a, b, c, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, bias=None):
    """register_tiled: RT_BM x RT_BN of c per block of RT_THREADS, a register tile per thread."""
    return _launch(gemm_register_tiled_kernel, RT_BM, RT_BN, RT_THREADS, a, b, c, trans_a, trans_b, alpha, beta, bias)


def bias_grad(dy, db, alpha=1.0, beta=0.0):
    """db = alpha * dy.sum(axis=0) + beta * db, on the device, without allocating."""
    check_device_array("dy", dy)
    if len(dy.shape) != 2:
        raise ValueError(f"dy: expected a 2-D array (N, features), got shape {tuple(dy.shape)}")
    check_device_array("db", db, shape=(dy.shape[1],))
    if dy.shape[1] == 0:
        return db
    blocks = ceil_div(dy.shape[1], DB_COLS)
    bias_grad_kernel[blocks, (DB_COLS, DB_ROWS)](dy, db, np.float32(alpha), np.float32(beta))
    return db


_LAUNCHERS = {"naive": gemm_naive, "tiled": gemm_tiled, "register_tiled": gemm_register_tiled}


# --- dispatcher --------------------------------------------------------------------------------------


def _launcher(version):
    version = DEFAULT_VERSION if version is None else version
    if version not in _LAUNCHERS:
        raise ValueError(f"version: unknown GEMM version {version!r}; expected one of {', '.join(VERSIONS)}")
    return _LAUNCHERS[version]


def gemm(a, b, c, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, bias=None, version=None):
    """c = alpha * op(a) @ op(b) + beta * c (+ bias over rows), on device arrays, without allocating.

    op(x) is x.T when the trans flag is set (read in place, not copied). beta == 0 never reads c.
    FLOPs: 2 * M * N * K.
    """
    return _launcher(version)(a, b, c, trans_a, trans_b, alpha, beta, bias)


def linear_forward(x, w, b, y, version=None):
    """y = x · wᵀ (+ b). x: (N, in), w: (out, in), b: (out,) or None, y: (N, out); device arrays."""
    return _launcher(version)(x, w, y, False, True, 1.0, 0.0, b)


def linear_backward(dy, x, w, dx, dw, db, version=None):
    """dx = dy · w, dw = dyᵀ · x, db = Σ_rows dy (each written, not accumulated); dx/db None to skip."""
    launch = _launcher(version)
    if dx is not None:
        launch(dy, w, dx, False, False, 1.0, 0.0, None)
    launch(dy, x, dw, True, False, 1.0, 0.0, None)
    if db is not None:
        bias_grad(dy, db)
    return dx, dw, db


__all__ = [
    "VERSIONS", "DEFAULT_VERSION", "gemm", "linear_forward", "linear_backward", "bias_grad",
    "gemm_naive", "gemm_tiled", "gemm_register_tiled", "gemm_reference",
    "linear_forward_reference", "linear_backward_reference",
]
