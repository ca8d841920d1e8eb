"""GEMM for dense layers: C = alpha * op(A) @ op(B) + beta * C (+ bias broadcast over rows).

op(X) is X or Xᵀ. A transpose is never a copy: the kernels read the stored array with swapped
indices (``trans_a``/``trans_b`` are int flags read inside the kernel), so the three products of a
linear layer run on the arrays as they are:

    forward   y  = x · wᵀ + b      gemm(x,  w, y,  trans_b=True, bias=b)     (N, in) x (out, in)ᵀ
    backward  dx = dy · w          gemm(dy, w, dx)                           (N, out) x (out, in)
              dw = dyᵀ · x         gemm(dy, x, dw, trans_a=True)             (N, out)ᵀ x (N, in)
              db = Σ_rows dy       bias_grad(dy, db), or dw's extra column   (split_k_ticket: rowsum=db)

``linear_forward``/``linear_backward`` run those; on split_k_ticket (the default for the dense layers'
shapes) a layer is one launch forward (bias, and ReLU for a fused Linear -> ReLU, in the epilogue) and
two backward (dx; dw with db), dy read through the ReLU's stored output (``mask=``) when it follows one.

Versions (rising in complexity, falling in run time):

    naive           one thread per output element, every operand read from global memory
    tiled           TILE x TILE shared-memory tiles of op(A) and op(B); each element loaded once per tile
    blocktiled      128 x 128 block tile, each thread computes an 8 x 8 micro-tile from registers
                    (the classic SGEMM "2-D blocktiling"); 155 registers: one block per SM
    register_tiled  blocktiled double-buffered: the next K-slice is loaded into registers while the
                    current one is computed, one barrier a step; each thread's 8 x 8 rows and columns
                    are two groups of 4 consecutive words, so the fragments load as LDS.128 (0.06 shared
                    loads per FFMA); launch bounds hold it at 128 registers (two 256-thread blocks per
                    SM). Global loads stay scalar: Numba has no float4 and cannot promise the 16-byte
                    alignment of a row, but each thread loads 4 consecutive addresses
    split_k         for small M x N with a long K (dense layers: batch 128 x 400 -> 120 and the weight
                    gradients): 64 x 64 tiles, K cut into slices over blockIdx.z, each block writing a
                    partial tile; a second kernel sums the slices in a fixed order (bit-identical runs)
    split_k_ticket  split_k in one launch: each block fences its partial tile and takes a ticket from
                    its tile's counter (an atomic); the last to arrive sums the slices in slice order
                    (split_k's bits, every run) and resets the counter (no clearing launch, so a CUDA
                    graph replays it). Its epilogue also takes ReLU, op(A) through a mask and op(A)'s
                    row sums (a linear layer's db) as an extra column of ones in op(B)

``version=None`` (the default) picks split_k_ticket or register_tiled by shape (``pick_version``). The
static figures of each (registers, occupancy, FFMA share of the hottest loop): ``gpu-cnn kernels
--only gemm``; the timings: ``python -m benchmarks.kernels --only gemm,linear``.

Run the checks: ``python -m pytest tests/test_gemm.py`` (simulator); build for real GPUs:
``python -m gpu_cnn.compile_check``.
"""

import numpy as np
from numba import config, cuda, float32, int32, uint32

from ._common import TPB_1D, check_device_array, ceil_div, grid_1d, kernel

VERSIONS = ("naive", "tiled", "blocktiled", "register_tiled", "split_k", "split_k_ticket")
# version=None picks register_tiled or split_k by shape (pick_version); a GPU with ~132 SMs wants at
# least this many 128 x 128 tiles before register_tiled alone fills it. Under the simulator split_k
# aims for fewer blocks (each simulated block costs 256 Python threads; the code path is the same).
SPLIT_K_BELOW_TILES = 32

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


@kernel(GEMM_SIGNATURE, block=(TILE, TILE))
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


@kernel(GEMM_SIGNATURE, block=(TILE, TILE))
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


@kernel(GEMM_SIGNATURE, block=RT_THREADS)
def gemm_blocktiled_kernel(a, b, c, bias, trans_a, trans_b, has_bias, alpha, beta):
    """blocktiled: RT_BM x RT_BN block tile, each thread an RT_TM x RT_TN micro-tile kept in registers."""
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


# register_tiled: the blocktiled tile shape (RT_BM x RT_BN x RT_BK, 8 x 8 per thread) with two shared
# buffers per operand and 4-wide fragments; see the kernel's comments.
RT_HALF_M = RT_BM // 2  # a thread's rows are trow*4 + {0..3} and RT_HALF_M + trow*4 + {0..3}
RT_HALF_N = RT_BN // 2
RT_BUF_A = RT_BK * RT_LDA  # one buffer of the k-major op(A) tile; the shared array holds two
RT_BUF_B = RT_BK * RT_LDB
RT_SMEM_A = 2 * RT_BUF_A  # (a shared array's shape must be a plain constant)
RT_SMEM_B = 2 * RT_BUF_B
RT_MIN_BLOCKS = 2  # launch bound: ptxas keeps <= 65536 / (2 * 256) = 128 registers
assert RT_TM == 8 and RT_TN == 8 and RT_BM * RT_BK == 4 * RT_THREADS and RT_BN * RT_BK == 4 * RT_THREADS

# split_k: a 64 x 64 tile of c per block of 256 threads, 4 x 4 per thread, K cut into SK_SPLITS
# slices (blockIdx.z) whose partial tiles a second kernel sums in a fixed order (deterministic).
SK_BM = 64
SK_BN = 64
SK_BK = 16
SK_TM = 4
SK_TN = 4
SK_ROW_THREADS = SK_BM // SK_TM  # 16
SK_COL_THREADS = SK_BN // SK_TN  # 16
SK_THREADS = SK_ROW_THREADS * SK_COL_THREADS  # 256
SK_PAD = 4  # keeps every row of the k-major tiles 16-byte aligned, and the transposing stores conflict-free
SK_LDA = SK_BM + SK_PAD
SK_LDB = SK_BN + SK_PAD
SK_BUF_A = SK_BK * SK_LDA
SK_BUF_B = SK_BK * SK_LDB
SK_SMEM_A = 2 * SK_BUF_A
SK_SMEM_B = 2 * SK_BUF_B
# How many blocks split_k aims for (about one per SM of an H100/H200: 132), and the fewest K-steps a
# slice keeps so the partial tiles stay worth their round trip.
SK_TARGET_BLOCKS = 4 if config.ENABLE_CUDASIM else 128
SK_MIN_STEPS = 2
assert SK_BM * SK_BK == 4 * SK_THREADS and SK_BN * SK_BK == 4 * SK_THREADS


@kernel(GEMM_SIGNATURE, block=RT_THREADS, launch_bounds=(RT_THREADS, RT_MIN_BLOCKS))
def gemm_register_tiled_kernel(a, b, c, bias, trans_a, trans_b, has_bias, alpha, beta):
    """register_tiled: blocktiled double-buffered (next K-slice prefetched into registers while this one computes), 4-wide fragments, <= 128 registers."""
    # a: (M, K), or (K, M) when trans_a; b: (K, N), or (N, K) when trans_b; c: (M, N); bias: (N,)
    # Shared, k-major, two buffers each: sa[buf * RT_BUF_A + k * RT_LDA + i] = op(A)[m0 + i, k0 + k].
    sa = cuda.shared.array(RT_SMEM_A, float32)
    sb = cuda.shared.array(RT_SMEM_B, float32)
    acc = cuda.local.array((RT_TM, RT_TN), float32)  # constant indices after unrolling: registers
    a_frag = cuda.local.array(RT_TM, float32)
    b_frag = cuda.local.array(RT_TN, float32)
    a_next = cuda.local.array(4, float32)  # this thread's 4 elements of the next op(A) tile
    b_next = cuda.local.array(4, float32)
    tid = cuda.threadIdx.x
    trow = tid // RT_COL_THREADS
    tcol = tid % RT_COL_THREADS
    m0 = cuda.blockIdx.y * RT_BM
    n0 = cuda.blockIdx.x * RT_BN
    M = c.shape[0]
    N = c.shape[1]
    K = a.shape[0] if trans_a else a.shape[1]

    # Which 4 elements of each operand tile this thread loads: 4 consecutive addresses of the array as
    # stored (consecutive threads continue them, so a warp reads whole rows).
    if trans_a:  # a (K, M): 4 consecutive m of one k
        a_k = tid // (RT_BM // 4)
        a_i = (tid % (RT_BM // 4)) * 4
    else:  # a (M, K): 4 consecutive k of one row
        a_i = tid // (RT_BK // 4)
        a_k = (tid % (RT_BK // 4)) * 4
    if trans_b:  # b (N, K): 4 consecutive k of one column of op(B)
        b_j = tid // (RT_BK // 4)
        b_k = (tid % (RT_BK // 4)) * 4
    else:  # b (K, N): 4 consecutive n of one k
        b_k = tid // (RT_BN // 4)
        b_j = (tid % (RT_BN // 4)) * 4

    for i in range(RT_TM):
        for j in range(RT_TN):
            acc[i, j] = float32(0.0)

    steps = (K + RT_BK - 1) // RT_BK  # ceil_div(K, RT_BK)
    for t in range(steps + 1):
        # 1. global -> registers: tile t (t == steps: nothing left to load)
        if t < steps:
            k0 = t * RT_BK
            for q in range(4):
                v = float32(0.0)  # zero-fill outside the matrix
                if trans_a:
                    if k0 + a_k < K and m0 + a_i + q < M:
                        v = a[k0 + a_k, m0 + a_i + q]
                else:
                    if m0 + a_i < M and k0 + a_k + q < K:
                        v = a[m0 + a_i, k0 + a_k + q]
                a_next[q] = v
                w = float32(0.0)
                if trans_b:
                    if n0 + b_j < N and k0 + b_k + q < K:
                        w = b[n0 + b_j, k0 + b_k + q]
                else:
                    if k0 + b_k < K and n0 + b_j + q < N:
                        w = b[k0 + b_k, n0 + b_j + q]
                b_next[q] = w
        # 2. compute on tile t - 1 (in buffer (t - 1) % 2) while the loads above are in flight
        if t > 0:
            a_base = uint32(((t - 1) % 2) * RT_BUF_A + trow * 4)
            b_base = uint32(((t - 1) % 2) * RT_BUF_B + tcol * 4)
            for kk in range(RT_BK):
                # unsigned offsets: no negative-index fix-up, so the loads are base + constant
                # (4 consecutive words each, 16-byte aligned: LDS.128 where the compiler merges them)
                ao = a_base + uint32(kk * RT_LDA)
                bo = b_base + uint32(kk * RT_LDB)
                for q in range(4):
                    a_frag[q] = sa[ao + uint32(q)]
                    a_frag[4 + q] = sa[ao + uint32(RT_HALF_M + q)]
                    b_frag[q] = sb[bo + uint32(q)]
                    b_frag[4 + q] = sb[bo + uint32(RT_HALF_N + q)]
                for i in range(RT_TM):
                    for j in range(RT_TN):
                        acc[i, j] += a_frag[i] * b_frag[j]
        # 3. registers -> the other buffer. Safe with one barrier a step: that buffer was last read in
        # step t - 1's compute, which every thread finished before step t - 1's barrier.
        if t < steps:
            a_st = uint32((t % 2) * RT_BUF_A)
            b_st = uint32((t % 2) * RT_BUF_B)
            for q in range(4):
                if trans_a:
                    sa[a_st + uint32(a_k * RT_LDA + a_i + q)] = a_next[q]
                else:
                    sa[a_st + uint32((a_k + q) * RT_LDA + a_i)] = a_next[q]
                if trans_b:
                    sb[b_st + uint32((b_k + q) * RT_LDB + b_j)] = b_next[q]
                else:
                    sb[b_st + uint32(b_k * RT_LDB + b_j + q)] = b_next[q]
        cuda.syncthreads()

    for i in range(RT_TM):
        m = m0 + trow * 4 + (i % 4) + (i // 4) * RT_HALF_M
        for j in range(RT_TN):
            n = n0 + tcol * 4 + (j % 4) + (j // 4) * RT_HALF_N
            if m < M and n < N:
                v = alpha * acc[i, j]
                if beta != float32(0.0):
                    v += beta * c[m, n]
                if has_bias:
                    v += bias[n]
                c[m, n] = v


@kernel("void(float32[:, ::1], float32[:, ::1], float32[:, :, ::1], int64, int64, int64)", block=SK_THREADS,
        launch_bounds=(SK_THREADS, 2))
def gemm_split_k_partial_kernel(a, b, part, trans_a, trans_b, k_slice):
    """split_k: register_tiled's double buffering on a 64 x 64 tile, K cut into slices (blockIdx.z), each block writing a partial tile."""
    # a: (M, K), or (K, M) when trans_a; b: (K, N), or (N, K) when trans_b
    # part: (S, M, N) float32, part[z] = op(A)[:, Kz] @ op(B)[Kz, :] over slice Kz = [z*k_slice, (z+1)*k_slice)
    sa = cuda.shared.array(SK_SMEM_A, float32)
    sb = cuda.shared.array(SK_SMEM_B, float32)
    acc = cuda.local.array((SK_TM, SK_TN), float32)
    a_frag = cuda.local.array(SK_TM, float32)
    b_frag = cuda.local.array(SK_TN, float32)
    a_next = cuda.local.array(4, float32)
    b_next = cuda.local.array(4, float32)
    tid = cuda.threadIdx.x
    trow = tid // SK_COL_THREADS
    tcol = tid % SK_COL_THREADS
    m0 = cuda.blockIdx.y * SK_BM
    n0 = cuda.blockIdx.x * SK_BN
    z = cuda.blockIdx.z
    M = part.shape[1]
    N = part.shape[2]
    K = a.shape[0] if trans_a else a.shape[1]
    k_begin = z * k_slice
    k_end = min(K, k_begin + k_slice)

    if trans_a:
        a_k = tid // (SK_BM // 4)
        a_i = (tid % (SK_BM // 4)) * 4
    else:
        a_i = tid // (SK_BK // 4)
        a_k = (tid % (SK_BK // 4)) * 4
    if trans_b:
        b_j = tid // (SK_BK // 4)
        b_k = (tid % (SK_BK // 4)) * 4
    else:
        b_k = tid // (SK_BN // 4)
        b_j = (tid % (SK_BN // 4)) * 4

    for i in range(SK_TM):
        for j in range(SK_TN):
            acc[i, j] = float32(0.0)

    steps = max(0, (k_end - k_begin + SK_BK - 1) // SK_BK)  # the same for every thread of the block
    for t in range(steps + 1):
        if t < steps:
            k0 = k_begin + t * SK_BK
            for q in range(4):
                v = float32(0.0)
                if trans_a:
                    if k0 + a_k < k_end and m0 + a_i + q < M:
                        v = a[k0 + a_k, m0 + a_i + q]
                else:
                    if m0 + a_i < M and k0 + a_k + q < k_end:
                        v = a[m0 + a_i, k0 + a_k + q]
                a_next[q] = v
                w = float32(0.0)
                if trans_b:
                    if n0 + b_j < N and k0 + b_k + q < k_end:
                        w = b[n0 + b_j, k0 + b_k + q]
                else:
                    if k0 + b_k < k_end and n0 + b_j + q < N:
                        w = b[k0 + b_k, n0 + b_j + q]
                b_next[q] = w
        if t > 0:
            a_base = uint32(((t - 1) % 2) * SK_BUF_A + trow * 4)
            b_base = uint32(((t - 1) % 2) * SK_BUF_B + tcol * 4)
            for kk in range(SK_BK):
                ao = a_base + uint32(kk * SK_LDA)
                bo = b_base + uint32(kk * SK_LDB)
                for q in range(4):
                    a_frag[q] = sa[ao + uint32(q)]
                    b_frag[q] = sb[bo + uint32(q)]
                for i in range(SK_TM):
                    for j in range(SK_TN):
                        acc[i, j] += a_frag[i] * b_frag[j]
        if t < steps:
            a_st = uint32((t % 2) * SK_BUF_A)
            b_st = uint32((t % 2) * SK_BUF_B)
            for q in range(4):
                if trans_a:
                    sa[a_st + uint32(a_k * SK_LDA + a_i + q)] = a_next[q]
                else:
                    sa[a_st + uint32((a_k + q) * SK_LDA + a_i)] = a_next[q]
                if trans_b:
                    sb[b_st + uint32((b_k + q) * SK_LDB + b_j)] = b_next[q]
                else:
                    sb[b_st + uint32(b_k * SK_LDB + b_j + q)] = b_next[q]
        cuda.syncthreads()

    for i in range(SK_TM):
        m = m0 + trow * 4 + i
        for j in range(SK_TN):
            n = n0 + tcol * 4 + j
            if m < M and n < N:
                part[z, m, n] = acc[i, j]


# split_k_ticket: split_k's tiles and slices in ONE launch. Each block writes its partial tile, fences
# it, and takes a ticket from its tile's counter (an atomic); the block that draws the last ticket sums
# the slices' partial tiles in slice order (the same bits every run, whichever block arrives last),
# applies the epilogue and resets the counter to 0 (the kernel is reusable, and replayable in a CUDA
# graph, without a clearing launch). Epilogue flags (TK_*): bias, ReLU; and two for a layer's backward:
# op(A) read through a mask (an element counts only where mask > 0: the ReLU's gradient, from its
# stored output), and op(A)'s row sums as an extra column of op(B) made of ones (db of a linear layer).
TK_BIAS, TK_RELU, TK_MASK, TK_ROWSUM = 1, 2, 4, 8

TICKET_SIGNATURE = ("void(float32[:, ::1], float32[:, ::1], float32[:, ::1], float32[::1], float32[:, ::1], "
                    "float32[::1], float32[::1], int32[::1], int64, int64, int64, int64, float32, float32)")


@kernel(TICKET_SIGNATURE, block=SK_THREADS, launch_bounds=(SK_THREADS, 2))
def gemm_split_k_ticket_kernel(a, b, c, bias, mask, rowsum, part, tickets, trans_a, trans_b, flags, k_slice,
                               alpha, beta):
    """split_k_ticket: split_k in one launch, the last block of each tile to arrive (an atomic ticket) summing the slices in order."""
    # a: (M, K), or (K, M) when trans_a; b: (K, N), or (N, K) when trans_b; c: (M, N); bias: (N,)
    # mask: a's shape (read when TK_MASK); rowsum: (M,) (written when TK_ROWSUM); part: (S * M * NG,) flat,
    # NG = N (+1 with TK_ROWSUM), read and written only when S > 1; tickets: one int32 per (x, y) tile, 0
    sa = cuda.shared.array(SK_SMEM_A, float32)
    sb = cuda.shared.array(SK_SMEM_B, float32)
    last = cuda.shared.array(1, int32)
    acc = cuda.local.array((SK_TM, SK_TN), float32)
    a_frag = cuda.local.array(SK_TM, float32)
    b_frag = cuda.local.array(SK_TN, float32)
    a_next = cuda.local.array(4, float32)
    b_next = cuda.local.array(4, float32)
    tid = cuda.threadIdx.x
    trow = tid // SK_COL_THREADS
    tcol = tid % SK_COL_THREADS
    m0 = cuda.blockIdx.y * SK_BM
    n0 = cuda.blockIdx.x * SK_BN
    z = cuda.blockIdx.z
    M = c.shape[0]
    N = c.shape[1]
    K = a.shape[0] if trans_a else a.shape[1]
    has_mask = (flags & TK_MASK) != 0
    has_rowsum = (flags & TK_ROWSUM) != 0
    NG = N + 1 if has_rowsum else N  # column N of the product is op(A) times ones: the row sums
    S = max(1, (K + k_slice - 1) // k_slice)  # slices, from the problem (= gridDim.z)
    k_begin = z * k_slice
    k_end = min(K, k_begin + k_slice)

    if trans_a:
        a_k = tid // (SK_BM // 4)
        a_i = (tid % (SK_BM // 4)) * 4
    else:
        a_i = tid // (SK_BK // 4)
        a_k = (tid % (SK_BK // 4)) * 4
    if trans_b:
        b_j = tid // (SK_BK // 4)
        b_k = (tid % (SK_BK // 4)) * 4
    else:
        b_k = tid // (SK_BN // 4)
        b_j = (tid % (SK_BN // 4)) * 4

    for i in range(SK_TM):
        for j in range(SK_TN):
            acc[i, j] = float32(0.0)

    steps = max(0, (k_end - k_begin + SK_BK - 1) // SK_BK)  # the same for every thread of the block
    for t in range(steps + 1):
        if t < steps:
            k0 = k_begin + t * SK_BK
            for q in range(4):
                v = float32(0.0)
                if trans_a:
                    if k0 + a_k < k_end and m0 + a_i + q < M:
                        v = a[k0 + a_k, m0 + a_i + q]
                        if has_mask and not mask[k0 + a_k, m0 + a_i + q] > float32(0.0):
                            v = float32(0.0)
                else:
                    if m0 + a_i < M and k0 + a_k + q < k_end:
                        v = a[m0 + a_i, k0 + a_k + q]
                        if has_mask and not mask[m0 + a_i, k0 + a_k + q] > float32(0.0):
                            v = float32(0.0)
                a_next[q] = v
                w = float32(0.0)
                if trans_b:
                    if k0 + b_k + q < k_end:
                        if n0 + b_j < N:
                            w = b[n0 + b_j, k0 + b_k + q]
                        elif n0 + b_j < NG:  # the column of ones
                            w = float32(1.0)
                else:
                    if k0 + b_k < k_end:
                        if n0 + b_j + q < N:
                            w = b[k0 + b_k, n0 + b_j + q]
                        elif n0 + b_j + q < NG:
                            w = float32(1.0)
                b_next[q] = w
        if t > 0:
            a_base = uint32(((t - 1) % 2) * SK_BUF_A + trow * 4)
            b_base = uint32(((t - 1) % 2) * SK_BUF_B + tcol * 4)
            for kk in range(SK_BK):
                ao = a_base + uint32(kk * SK_LDA)
                bo = b_base + uint32(kk * SK_LDB)
                for q in range(4):
                    a_frag[q] = sa[ao + uint32(q)]
                    b_frag[q] = sb[bo + uint32(q)]
                for i in range(SK_TM):
                    for j in range(SK_TN):
                        acc[i, j] += a_frag[i] * b_frag[j]
        if t < steps:
            a_st = uint32((t % 2) * SK_BUF_A)
            b_st = uint32((t % 2) * SK_BUF_B)
            for q in range(4):
                if trans_a:
                    sa[a_st + uint32(a_k * SK_LDA + a_i + q)] = a_next[q]
                else:
                    sa[a_st + uint32((a_k + q) * SK_LDA + a_i)] = a_next[q]
                if trans_b:
                    sb[b_st + uint32((b_k + q) * SK_LDB + b_j)] = b_next[q]
                else:
                    sb[b_st + uint32(b_k * SK_LDB + b_j + q)] = b_next[q]
        cuda.syncthreads()

    if S > 1:  # uniform: every block of the launch takes this branch or none does
        for i in range(SK_TM):
            m = m0 + trow * 4 + i
            for j in range(SK_TN):
                n = n0 + tcol * 4 + j
                if m < M and n < NG:
                    part[(z * M + m) * NG + n] = acc[i, j]
        cuda.threadfence()  # this thread's partials are visible to the block that reduces them
        cuda.syncthreads()
        if tid == 0:
            tile = cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x
            ticket = cuda.atomic.add(tickets, tile, 1)
            last[0] = 1 if ticket == S - 1 else 0
            if ticket == S - 1:
                cuda.atomic.exch(tickets, tile, 0)  # every slice has arrived: ready for the next launch
        cuda.syncthreads()
        if last[0] != 0:  # uniform within the block
            cuda.threadfence()
            for i in range(SK_TM):
                m = m0 + trow * 4 + i
                for j in range(SK_TN):
                    n = n0 + tcol * 4 + j
                    if m < M and n < NG:
                        total = float32(0.0)
                        for s in range(S):  # slice order: the same bits every run
                            total += part[(s * M + m) * NG + n]
                        acc[i, j] = total

    if S == 1 or last[0] != 0:
        for i in range(SK_TM):
            m = m0 + trow * 4 + i
            for j in range(SK_TN):
                n = n0 + tcol * 4 + j
                if m < M and n < NG:
                    v = alpha * acc[i, j]
                    if n < N:
                        if beta != float32(0.0):
                            v += beta * c[m, n]
                        if (flags & TK_BIAS) != 0:
                            v += bias[n]
                        if (flags & TK_RELU) != 0 and v < float32(0.0):  # NaN is not < 0: it propagates
                            v = float32(0.0)
                        c[m, n] = v
                    else:
                        if beta != float32(0.0):
                            v += beta * rowsum[m]
                        rowsum[m] = v


@kernel("void(float32[:, :, ::1], float32[:, ::1], float32[::1], int64, float32, float32)", block=TPB_1D)
def gemm_split_k_reduce_kernel(part, c, bias, has_bias, alpha, beta):
    """split_k, second pass: c = alpha * Σ_z part[z] (z = 0, 1, ... in order: the same bits every run) + beta * c + bias."""
    # part: (S, M, N) float32; c: (M, N); bias: (N,)
    i = cuda.grid(1)
    S = part.shape[0]
    M = part.shape[1]
    N = part.shape[2]
    if i < M * N:
        m = i // N
        n = i - m * N
        total = float32(0.0)
        for z in range(S):
            total += part[z, m, n]
        v = alpha * total
        if beta != float32(0.0):
            v += beta * c[m, n]
        if has_bias:
            v += bias[n]
        c[m, n] = v


@kernel("void(float32[:, ::1], float32[::1], float32, float32)", block=(DB_COLS, DB_ROWS))
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


def gemm_blocktiled(a, b, c, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, bias=None):
    """blocktiled: RT_BM x RT_BN of c per block of RT_THREADS, a register tile per thread."""
    return _launch(gemm_blocktiled_kernel, RT_BM, RT_BN, RT_THREADS, a, b, c, trans_a, trans_b, alpha, beta, bias)


def gemm_register_tiled(a, b, c, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, bias=None):
    """register_tiled: blocktiled's tiles, double-buffered, two blocks per SM."""
    return _launch(gemm_register_tiled_kernel, RT_BM, RT_BN, RT_THREADS, a, b, c, trans_a, trans_b, alpha, beta, bias)


def split_k_slices(M, N, K):
    """(number of K-slices S, K-elements per slice) split_k uses for an M x N x K product: enough
    slices that tiles x S reaches about SK_TARGET_BLOCKS blocks, each slice at least SK_MIN_STEPS
    K-steps of SK_BK (a multiple of SK_BK, so slices start on a step). Depends only on the shape."""
    tiles = ceil_div(max(M, 1), SK_BM) * ceil_div(max(N, 1), SK_BN)
    max_slices = max(1, ceil_div(K, SK_MIN_STEPS * SK_BK))
    want = max(1, min(max_slices, SK_TARGET_BLOCKS // tiles))
    k_slice = ceil_div(ceil_div(max(K, 1), want), SK_BK) * SK_BK
    return ceil_div(max(K, 1), k_slice), k_slice


def split_k_workspace_size(M, N, K):
    """float32 elements of scratch split_k needs for an M x N x K product (S partial M x N tiles)."""
    return split_k_slices(M, N, K)[0] * M * N


_workspace = {"buf": None}  # split_k's own scratch when the caller passes none (grown, then reused)


def gemm_split_k(a, b, c, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, bias=None, workspace=None):
    """split_k: S = split_k_slices(M, N, K) blocks along K per 64 x 64 tile write partial tiles into
    `workspace` (float32, >= split_k_workspace_size elements; None: a buffer kept here, allocated on
    first use and when a larger one is needed), then one thread per element of c sums them in order."""
    M, N, K = _check_gemm(a, b, c, trans_a, trans_b, bias)
    if M == 0 or N == 0:
        return c
    S, k_slice = split_k_slices(M, N, K)
    need = S * M * N
    if workspace is None:
        ws = _workspace["buf"]
        if ws is None or ws.shape[0] < need:
            ws = cuda.device_array(need, np.float32)
            _workspace["buf"] = ws
        workspace = ws
    else:
        check_device_array("workspace", workspace)
        if len(workspace.shape) != 1 or workspace.shape[0] < need:
            raise ValueError(f"workspace: expected a 1-D float32 array of at least {need} elements "
                             f"({S} K-slices of {M}x{N}), got shape {tuple(workspace.shape)}")
    part = workspace[:need].reshape(S, M, N)
    bias_arg, has_bias, alpha, beta = _scalars(alpha, beta, bias, c)
    blocks = (ceil_div(N, SK_BN), ceil_div(M, SK_BM), S)
    if blocks[1] > MAX_GRID_Y:
        raise ValueError(f"c: {M} rows need {blocks[1]} row blocks of {SK_BM}; a GPU allows at most "
                         f"{MAX_GRID_Y} (split the product into row chunks)")
    gemm_split_k_partial_kernel[blocks, SK_THREADS](a, b, part, int(bool(trans_a)), int(bool(trans_b)), k_slice)
    grid, threads = grid_1d(M * N)
    gemm_split_k_reduce_kernel[grid, threads](part, c, bias_arg, has_bias, alpha, beta)
    return c


# split_k_ticket's tile counters: zeros (each launch leaves them so), grown when a launch has more tiles.
# A buffer once handed out is never freed (kept in "retired"): a captured CUDA graph may still use it.
_tickets = {"buf": None, "retired": []}
TICKETS_MIN = 4096  # counters allocated at least: every grid up to 4096 tiles of 64 x 64 shares one buffer


def _ticket_counters(tiles):
    buf = _tickets["buf"]
    if buf is None or buf.shape[0] < tiles:
        if buf is not None:
            _tickets["retired"].append(buf)
        buf = cuda.to_device(np.zeros(max(tiles, TICKETS_MIN), np.int32))  # zeros: every ticket starts at 0
        _tickets["buf"] = buf
    return buf


def ticket_workspace_size(M, N, K, rowsum=False):
    """float32 elements of scratch split_k_ticket needs for an M x N x K product (0 when it runs as one
    slice); ``rowsum`` adds op(A)'s row-sum column."""
    S = split_k_slices(M, N + int(rowsum), K)[0]
    return 0 if S == 1 else S * M * (N + int(rowsum))


def _scratch(workspace, need, what):
    """`workspace` checked to hold `need` float32 elements, or the module's own buffer (grown, reused)."""
    if workspace is None:
        ws = _workspace["buf"]
        if ws is None or ws.shape[0] < need:
            ws = cuda.device_array(max(need, 1), np.float32)
            _workspace["buf"] = ws
        return ws
    check_device_array("workspace", workspace)
    if len(workspace.shape) != 1 or workspace.shape[0] < need:
        raise ValueError(f"workspace: expected a 1-D float32 array of at least {need} elements "
                         f"({what}), got shape {tuple(workspace.shape)}")
    return workspace


def gemm_split_k_ticket(a, b, c, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, bias=None, workspace=None,
                        relu=False, mask=None, rowsum=None):
    """split_k_ticket: split_k's slices (split_k_slices) in one launch; the last block of each tile sums
    the partial tiles in slice order. Scratch: ``workspace`` as for split_k (>= ticket_workspace_size
    elements; none needed when the product runs as one slice). Epilogue: ``bias``, ``relu`` (max(., 0)
    last); ``mask`` (a's shape): op(A) is read as a * (mask > 0); ``rowsum`` (M,): written with
    alpha * Σ_k op(A)[m, k] (+ beta * rowsum), the db of a linear layer's dW = dyᵀ · x."""
    M, N, K = _check_gemm(a, b, c, trans_a, trans_b, bias)
    if mask is not None:
        check_device_array("mask", mask, shape=tuple(a.shape))
    if rowsum is not None:
        check_device_array("rowsum", rowsum, shape=(M,))
    if M == 0 or (N == 0 and rowsum is None):
        return c
    NG = N + int(rowsum is not None)
    S, k_slice = split_k_slices(M, NG, K)
    need = 0 if S == 1 else S * M * NG
    part = _scratch(workspace, need, f"{S} K-slices of {M}x{NG}")
    blocks = (ceil_div(NG, SK_BN), ceil_div(M, SK_BM), S)
    if blocks[1] > MAX_GRID_Y:
        raise ValueError(f"c: {M} rows need {blocks[1]} row blocks of {SK_BM}; a GPU allows at most "
                         f"{MAX_GRID_Y} (split the product into row chunks)")
    tickets = _ticket_counters(blocks[0] * blocks[1])
    flags = ((TK_BIAS if bias is not None else 0) | (TK_RELU if relu else 0) | (TK_MASK if mask is not None else 0)
             | (TK_ROWSUM if rowsum is not None else 0))
    # arrays a flag leaves unread get stand-ins of the right type (views, no allocation)
    gemm_split_k_ticket_kernel[blocks, SK_THREADS](
        a, b, c, part[:1] if bias is None else bias, a if mask is None else mask,
        part[:1] if rowsum is None else rowsum, part, tickets, int(bool(trans_a)), int(bool(trans_b)), flags,
        k_slice, np.float32(alpha), np.float32(beta))
    return c


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


_LAUNCHERS = {"naive": gemm_naive, "tiled": gemm_tiled, "blocktiled": gemm_blocktiled,
              "register_tiled": gemm_register_tiled, "split_k": gemm_split_k, "split_k_ticket": gemm_split_k_ticket}


# --- dispatcher --------------------------------------------------------------------------------------


def pick_version(M, N, K):
    """The version ``version=None`` runs for an M x N x K product: ``split_k_ticket`` (one launch) when
    register_tiled's 128 x 128 tiles would occupy fewer than SPLIT_K_BELOW_TILES blocks (the dense layers
    of LeNet-5 at batch 128: one to four tiles on a 132-SM GPU), else ``register_tiled``."""
    tiles = ceil_div(max(M, 1), RT_BM) * ceil_div(max(N, 1), RT_BN)
    return "split_k_ticket" if tiles < SPLIT_K_BELOW_TILES else "register_tiled"


def _run(version, a, b, c, trans_a, trans_b, alpha, beta, bias, workspace, relu=False, mask=None, rowsum=None):
    """One product by `version` (None: by shape). The epilogue extras (relu, mask, rowsum) are
    split_k_ticket's: with version None they make it run; with another version relu is a second launch
    (kernels.activation) and mask or rowsum a clear error."""
    if version is not None and version not in _LAUNCHERS:
        raise ValueError(f"version: unknown GEMM version {version!r}; expected one of {', '.join(VERSIONS)}")
    fused = relu or mask is not None or rowsum is not None
    if version is None:
        M, N, K = _check_gemm(a, b, c, trans_a, trans_b, bias)  # checked before the shapes are trusted
        version = "split_k_ticket" if fused else pick_version(M, N, K)
    if version == "split_k_ticket":
        return gemm_split_k_ticket(a, b, c, trans_a, trans_b, alpha, beta, bias, workspace=workspace, relu=relu,
                                   mask=mask, rowsum=rowsum)
    for name, extra in (("mask", mask), ("rowsum", rowsum)):
        if extra is not None:
            raise ValueError(f"{name}: only version 'split_k_ticket' (or None) applies it, got version {version!r}")
    if version == "split_k":
        gemm_split_k(a, b, c, trans_a, trans_b, alpha, beta, bias, workspace=workspace)
    else:
        _LAUNCHERS[version](a, b, c, trans_a, trans_b, alpha, beta, bias)
    if relu:
        from .activation import relu_forward

        relu_forward(c, c)
    return c


def gemm(a, b, c, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, bias=None, version=None, workspace=None):
    """c = alpha * op(a) @ op(b) + beta * c (+ bias over rows), on device arrays.

    op(x) is x.T when the trans flag is set (read in place, not copied). beta == 0 never reads c.
    ``version=None`` picks one by shape (:func:`pick_version`). Only split_k and split_k_ticket need
    scratch: `workspace` (see :func:`gemm_split_k`); without it they keep their own. FLOPs: 2 * M * N * K.
    """
    return _run(version, a, b, c, trans_a, trans_b, alpha, beta, bias, workspace)


def linear_forward(x, w, b, y, version=None, workspace=None, relu=False):
    """y = x · wᵀ (+ b) (then max(., 0) when ``relu``). x: (N, in), w: (out, in), b: (out,) or None,
    y: (N, out); device arrays. By default one launch, bias and ReLU in split_k_ticket's epilogue
    (large products without ReLU: register_tiled with the bias in its epilogue)."""
    return _run(version, x, w, y, False, True, 1.0, 0.0, b, workspace, relu=relu)


def linear_backward(dy, x, w, dx, dw, db, version=None, workspace=None, mask=None):
    """dx = dy' · w, dw = dy'ᵀ · x, db = Σ_rows dy' (each written, not accumulated; dx/db None to skip),
    where dy' = dy, or dy * (mask > 0) with ``mask`` (dy's shape: a fused ReLU's stored output, so
    dy' is the gradient before the ReLU). On split_k_ticket (the default for the dense layers' shapes,
    and whenever a mask is given) that is two launches: dx, and dw with db as its extra column; else
    dx, dw and a bias_grad launch. The products run one after the other on the same stream, so one
    workspace serves both."""
    n, fout, fin = dy.shape[0], w.shape[0], w.shape[1]  # (shapes checked by the products below)
    ticket = version == "split_k_ticket" or (version is None and (
        mask is not None or pick_version(fout, fin, n) == "split_k_ticket"))
    if dx is not None:
        _run(version, dy, w, dx, False, False, 1.0, 0.0, None, workspace, mask=mask)
    if ticket:
        _run("split_k_ticket", dy, x, dw, True, False, 1.0, 0.0, None, workspace, mask=mask, rowsum=db)
        return dx, dw, db
    _run(version, dy, x, dw, True, False, 1.0, 0.0, None, workspace, mask=mask)
    if db is not None:
        bias_grad(dy, db)
    return dx, dw, db


def linear_workspace_size(n, fin, fout, version=None, fused=False):
    """float32 elements of scratch that covers the products of a (n, fin) -> (n, fout) linear layer
    (forward, dx, dw with db) that run as split_k or split_k_ticket under `version` (None: as the
    dispatcher picks; ``fused``: a ReLU epilogue or mask, which runs split_k_ticket); 0 if none."""
    sizes = [0]
    for M, N, K, extra in ((n, fout, fin, False), (n, fin, fout, False), (fout, fin, n, True)):
        v = version or ("split_k_ticket" if fused else pick_version(M, N, K))
        if v == "split_k":
            sizes.append(split_k_workspace_size(M, N, K))
        elif v == "split_k_ticket":
            sizes.append(ticket_workspace_size(M, N, K, rowsum=extra))
    return max(sizes)


__all__ = [
    "VERSIONS", "gemm", "linear_forward", "linear_backward", "bias_grad", "pick_version",
    "split_k_slices", "split_k_workspace_size", "linear_workspace_size",
    "gemm_naive", "gemm_tiled", "gemm_blocktiled", "gemm_register_tiled", "gemm_split_k", "gemm_split_k_ticket",
    "ticket_workspace_size", "gemm_reference",
    "linear_forward_reference", "linear_backward_reference",
]
