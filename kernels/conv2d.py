"""2-D convolution (cross-correlation, as in PyTorch), NCHW float32, forward and backward.

    x: (N, C_in, H, W)   w: (C_out, C_in, kH, kW)   b: (C_out,) or none   y: (N, C_out, Ho, Wo)
    Ho = (H + 2*ph - kH) // sh + 1,   Wo = (W + 2*pw - kW) // sw + 1      (stride and zero padding per axis)

    y[n, o, ho, wo] = b[o] + Σ_{c, i, j} x[n, c, ho*sh - ph + i, wo*sw - pw + j] * w[o, c, i, j]
                      (x read as 0 outside the image: zero padding)

Forward versions (``VERSIONS``), rising in complexity:

    naive   one thread per output element; every input and weight read straight from global memory
            (each input is read by up to kH*kW*C_out threads, from L1/L2 after the first).
    tiled   a TILE_H x TILE_W block computes a tile of one output plane (n, o). For every input channel
            the block stages the input patch the tile needs -- (TILE-1)*stride + k per axis, the tile
            plus its halo, zero-filled where it falls in the padding -- and the filter slice w[o, c]
            in shared memory: zero-fill/guarded load, syncthreads, compute, syncthreads. Each input
            element is then read from global memory once per block instead of kH*kW times.
            Supports kH, kW <= MAX_K and sh, sw <= MAX_STRIDE (the shared arrays are sized for that);
            beyond, ``conv2d_forward_tiled`` raises ValueError, and the dispatcher's default
            (version=None) falls back to ``naive``.
    implicit_gemm  the convolution as a register-tiled GEMM, M = N*Ho*Wo, N = C_out, K = C_in*kH*kW,
            whose A operand (the im2col matrix) is gathered tile by tile and never written: a 128 x 64
            block tile over K in steps of 8, A and B tiles in shared memory, each thread an 8 x 8 tile of
            registers by outer products, the next K-slice loaded into registers while this one is
            computed; bias (and ReLU, for the fused epilogue) before the single store. One kernel per
            (kH, kW, stride), so the index math folds into multiplies and shifts. The default on a GPU.
    fused   (its own op, ``conv2d_relu_maxpool_fused``) implicit_gemm whose rows hold the 4 cells of
            a 2x2 window in one thread: conv + bias + ReLU + 2x2 max-pool (stride 2) in one kernel,
            writing the pooled y and the argmax idx (kernels/pool.py's format), never the conv output.

Backward versions (``BACKWARD_VERSIONS``): ``implicit_gemm`` (the default where it applies) --
dX as the transposed implicit GEMM (M = N*H*W, N = C_in, K = C_out*kH*kW; an output row exists for
input row h and tap i where h + ph - i is on the stride grid), dW as a GEMM with K = N*Ho*Wo split
across blocks into partial tiles that the last block of each tile to arrive (an atomic ticket) adds in
split order, in the same launch (the same bits every run), db as that GEMM's extra column of ones; both
can read dy through a ReLU's mask, or route a ReLU -> 2x2 max pool's gradient through its argmax, in
their gather (``mask=``, ``pool_idx=``: a fused run's backward with no ReLU- or pool-backward launch)
-- and ``direct``, the kernels below, one per gradient, none needs atomics:

    dX   gather: one thread per INPUT element (n, c, h, w) sums dy[n, o, ho, wo] * w[o, c, i, j] over
         the taps (i, j) and outputs (ho, wo) that read it: h + ph - i = ho*sh with 0 <= ho < Ho, i.e.
         (h + ph - i) >= 0, divisible by sh, and (h + ph - i) // sh < Ho (likewise for columns).
         Each dx element is written once, in full.
    dW   one BLOCK per weight element (o, c, i, j): its RED_THREADS threads stride over the
         N*Ho*Wo products dy[n, o, ho, wo] * x[n, c, ho*sh - ph + i, wo*sw - pw + j], then add their
         partial sums in a shared-memory tree. Each dw element is written by one thread.
    db   one BLOCK per output channel: the same strided sum + shared-memory tree over dy[:, o, :, :].

Bias: the forward kernels take a float32[::1] bias and an int64 flag ``has_bias``. Without a bias the
launcher passes a 1-D view of y (no allocation) that the kernel never reads (has_bias = 0).

Gradients are WRITTEN (not accumulated): dx, dw and db are overwritten in full.

Static figures on sm_90 (ptxas + nvdisasm, no GPU; innermost loop of the kernel; 2026-12-01):

    kernel                              regs  spills  FFMA share  shared loads / FFMA
    naive forward                         48       0        2.0%   -
    tiled forward                         52       0        2.9%   2.0
    direct dX (gather)                    50       0        1.2%   -
    direct dW (block per weight)          48       0        5.3%   -
    implicit_gemm forward (3x3 s1)       127       0       71.1%   0.25
    implicit_gemm dX (3x3 s1)            124       0       70.3%   0.25
    implicit_gemm dW (3x3 s1, 64x64)     126       0       70.3%   0.25   (one launch: the ticket epilogue)
    fused conv+ReLU+pool (5x5 s1)        116       0       71.1%   0.25
    dX through ReLU + pool (5x5 s1)      113       0       71.1%   0.25   (2026-12-02)
    dW through ReLU + pool (5x5, BK 4)   124       0       71.1%   0.25
    (every implicit-GEMM kernel is built with launch bounds that hold it to 128 registers)

    The innermost loop of the implicit-GEMM kernels is the BK = 8 step of outer products (64 FFMA,
    16 shared loads, ~90 instructions). Counted per K-slice -- the gather of the next slice once (~440
    instructions for 12 loads: the k -> (c, i, j) math, the guards, the stores) plus 8 inner steps -- the
    FFMA share is ~44%: the gather's index math is what the next rung would cut (a per-block tap table,
    wider loads).

Run the checks: ``python -m pytest tests/test_conv2d.py tests/test_conv2d_igemm.py`` (simulator);
build for real GPUs: ``python -m gpu_cnn.compile_check``; time every version against cuDNN:
``python -m benchmarks.kernels --backend cuda --only conv2d,conv2d_relu_pool``.
"""
import numpy as np
from numba import config, cuda, float32, int32, uint32, uint64

from ._common import (DISK_CACHE, KERNEL_BLOCKS, KERNELS, TPB_1D, block_sum, ceil_div, check_device_array, fill,
                      grid_1d, kernel, unravel4)

VERSIONS = ("naive", "tiled", "implicit_gemm")  # forward versions (the fused conv+ReLU+pool is its own op)
DEFAULT_VERSION = "implicit_gemm"  # where it applies (implicit_gemm_supported), else tiled, else naive
BACKWARD_VERSIONS = ("direct", "implicit_gemm")  # dX and dW (db: the block reduction, or in dW's GEMM)
BACKWARD_INPUT_VERSIONS = BACKWARD_WEIGHT_VERSIONS = BACKWARD_VERSIONS
# The forward default is implicit_gemm on a GPU. Under the simulator it stays naive: a block's threads
# meet at two barriers per K-slice there, and a LeNet-5 conv ran ~12x slower than naive (the backward
# versions cost the simulator about the same, so implicit_gemm is their default everywhere). Tests set
# it to True to run the GPU's defaults under the simulator.
IG_FORWARD_DEFAULT = not config.ENABLE_CUDASIM

# tiled: a TILE_H x TILE_W thread block computes a TILE_H x TILE_W tile of one output plane.
TILE_H = 16
TILE_W = 16
TILE_THREADS = TILE_H * TILE_W
# The largest filter and stride the tiled kernel's shared arrays hold (per axis).
MAX_K = 7
MAX_STRIDE = 2
# Input patch a tile reads: (TILE - 1) * stride + k per axis (tile plus halo), at most:
IN_TILE_H = (TILE_H - 1) * MAX_STRIDE + MAX_K  # 37
IN_TILE_W = (TILE_W - 1) * MAX_STRIDE + MAX_K  # 37

# dW / db: threads of the block that reduces one weight element / one output channel (a power of two
# for the tree). Under the simulator every thread is a Python thread and every barrier a rendezvous of
# all of them, so it shrinks to 8 (same code: the strided sums and the tree still run several rounds).
RED_THREADS = 8 if config.ENABLE_CUDASIM else 256
assert RED_THREADS & (RED_THREADS - 1) == 0


# --- reference ---------------------------------------------------------------------------------------


def _pairs(stride, padding):
    s = (stride, stride) if np.isscalar(stride) else tuple(stride)
    p = (padding, padding) if np.isscalar(padding) else tuple(padding)
    return (int(s[0]), int(s[1])), (int(p[0]), int(p[1]))


def output_size(size, k, s, p):
    """Output length of one axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * p - k) // s + 1


def conv2d_reference(x, w, b=None, stride=1, padding=0):
    """float64 y of the cross-correlation, by an explicit loop over the kH*kW filter taps.

    stride, padding: an int or an (int, int) pair. Tap (i, j) contributes
    xp[:, :, i + ho*sh, j + wo*sw] * w[:, :, i, j] summed over input channels (xp: zero-padded x).
    """
    (sh, sw), (ph, pw) = _pairs(stride, padding)
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    co, _, kh, kw = w.shape
    ho, wo = output_size(h, kh, sh, ph), output_size(wd, kw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.zeros((n, co, ho, wo))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw]  # (N, C, Ho, Wo)
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


def conv2d_backward_reference(dy, x, w, stride=1, padding=0):
    """float64 (dx, dw, db) of :func:`conv2d_reference`, tap by tap (the transpose of the forward loop)."""
    (sh, sw), (ph, pw) = _pairs(stride, padding)
    dy = np.asarray(dy, np.float64)
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    _, _, kh, kw = w.shape
    ho, wo = dy.shape[2], dy.shape[3]
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + (ho - 1) * sh + 1, sh)
            cols = slice(j, j + (wo - 1) * sw + 1, sw)
            dw[:, :, i, j] = np.einsum("nohw,nchw->oc", dy, xp[:, :, rows, cols])
            dxp[:, :, rows, cols] += np.einsum("nohw,oc->nchw", dy, w[:, :, i, j])
    dx = dxp[:, :, ph:ph + h, pw:pw + wd]
    return dx, dw, dy.sum(axis=(0, 2, 3))


def conv2d_relu_maxpool_reference(x, w, b=None, stride=1, padding=0):
    """float64 (y, idx) of max_pool2d(relu(conv2d(x, w, b)), 2, stride 2): idx = ho*Wo + wo of the first
    maximum (row-major) of each 2x2 window of the conv output plane (Ho, Wo), as kernels/pool.py writes."""
    a = np.maximum(conv2d_reference(x, w, b, stride, padding), 0.0)
    n, o, ho, wo = a.shape
    hp, wp = ho // 2, wo // 2
    win = a[:, :, :2 * hp, :2 * wp].reshape(n, o, hp, 2, wp, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, o, hp, wp, 4)
    q = np.argmax(win, axis=-1)
    rows = 2 * np.arange(hp)[:, None] + q // 2
    cols = 2 * np.arange(wp)[None, :] + q % 2
    return win.max(axis=-1), (rows * wo + cols).astype(np.int32)


# --- kernels -----------------------------------------------------------------------------------------

# (x, w, b, y, has_bias, sh, sw, ph, pw)
FORWARD_SIGNATURE = (
    "void(float32[:, :, :, ::1], float32[:, :, :, ::1], float32[::1], float32[:, :, :, ::1], "
    "int64, int64, int64, int64, int64)"
)


@kernel(FORWARD_SIGNATURE, block=TPB_1D)
def conv2d_forward_naive_kernel(x, w, b, y, has_bias, sh, sw, ph, pw):
    """naive: one thread per output element, the C_in*kH*kW dot product read from global memory."""
    # x: (N, C, H, W) float32; w: (O, C, kH, kW); b: (O,) (read only when has_bias); y: (N, O, Ho, Wo)
    N, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    O, KH, KW = w.shape[0], w.shape[2], w.shape[3]
    Ho, Wo = y.shape[2], y.shape[3]
    t = cuda.grid(1)
    n, o, ho, wo = unravel4(t, O, Ho, Wo)  # consecutive threads: consecutive wo, so the stores coalesce
    if t < N * O * Ho * Wo:
        h0 = ho * sh - ph
        w0 = wo * sw - pw
        acc = float32(0.0)
        for c in range(C):
            for i in range(KH):
                hi = h0 + i
                if hi >= 0 and hi < H:  # rows in the padding contribute 0
                    for j in range(KW):
                        wi = w0 + j
                        if wi >= 0 and wi < W:
                            acc += x[n, c, hi, wi] * w[o, c, i, j]
        if has_bias:
            acc += b[o]
        y[n, o, ho, wo] = acc


@kernel(FORWARD_SIGNATURE, block=(TILE_W, TILE_H))
def conv2d_forward_tiled_kernel(x, w, b, y, has_bias, sh, sw, ph, pw):
    """tiled: per input channel, the tile's input patch (with halo, zero-padded) and w[o, c] in shared memory."""
    # x: (N, C, H, W) float32; w: (O, C, kH, kW), kH, kW <= MAX_K; b: (O,); y: (N, O, Ho, Wo)
    # sx[a, bb] = x[n, c, h0 + a, w0 + bb] (0 outside the image), h0/w0 the patch origin;
    # sw_[i, j] = w[o, c, i, j]
    sx = cuda.shared.array((IN_TILE_H, IN_TILE_W), float32)
    sw_ = cuda.shared.array((MAX_K, MAX_K), float32)
    N, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    O, KH, KW = w.shape[0], w.shape[2], w.shape[3]
    Ho, Wo = y.shape[2], y.shape[3]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * TILE_W + tx
    # one block per (n, o, tile row, tile column); the tile column runs fastest
    tiles_w = (Wo + TILE_W - 1) // TILE_W
    tiles_h = (Ho + TILE_H - 1) // TILE_H
    n, o, tile_y, tile_x = unravel4(cuda.blockIdx.x, O, tiles_h, tiles_w)
    ho = tile_y * TILE_H + ty
    wo = tile_x * TILE_W + tx
    h0 = tile_y * TILE_H * sh - ph  # input row of the patch's first row (may be in the padding)
    w0 = tile_x * TILE_W * sw - pw
    ext_h = (TILE_H - 1) * sh + KH  # patch extent actually used: <= IN_TILE_H (the launcher checks)
    ext_w = (TILE_W - 1) * sw + KW
    ext = ext_h * ext_w
    taps = KH * KW

    acc = float32(0.0)
    for c in range(C):
        # load the patch: TILE_THREADS threads stride over its ext elements; zero where it is padding
        for e0 in range(0, ext, TILE_THREADS):
            e = e0 + tid
            if e < ext:
                a = e // ext_w
                bb = e - a * ext_w
                hi = h0 + a
                wi = w0 + bb
                v = float32(0.0)
                if hi >= 0 and hi < H and wi >= 0 and wi < W and n < N:
                    v = x[n, c, hi, wi]
                sx[a, bb] = v
        if tid < taps:
            i = tid // KW
            sw_[i, tid - i * KW] = w[o, c, i, tid - i * KW]
        cuda.syncthreads()
        for i in range(KH):
            for j in range(KW):
                acc += sx[ty * sh + i, tx * sw + j] * sw_[i, j]
        cuda.syncthreads()  # nobody reloads the patch while others still read it

    if n < N and ho < Ho and wo < Wo:
        if has_bias:
            acc += b[o]
        y[n, o, ho, wo] = acc


@kernel("void(float32[:, :, :, ::1], float32[:, :, :, ::1], float32[:, :, :, ::1], int64, int64, int64, int64)",
        block=TPB_1D)
def conv2d_backward_input_kernel(dy, w, dx, sh, sw, ph, pw):
    """gather: one thread per input element sums dy * w over the (output, tap) pairs that read it."""
    # dy: (N, O, Ho, Wo) float32; w: (O, C, kH, kW); dx: (N, C, H, W)
    N, C, H, W = dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]
    O, KH, KW = w.shape[0], w.shape[2], w.shape[3]
    Ho, Wo = dy.shape[2], dy.shape[3]
    t = cuda.grid(1)
    n, c, hx, wx = unravel4(t, C, H, W)
    if t < N * C * H * W:
        acc = float32(0.0)
        for i in range(KH):
            # tap i reads row hx for the output row ho with ho*sh = hx + ph - i: it must exist
            # (>= 0: tested before %, so no negative operand), fall on the stride grid, and be < Ho
            th = hx + ph - i
            if th >= 0 and th % sh == 0 and th // sh < Ho:
                a = th // sh
                for j in range(KW):
                    tw = wx + pw - j
                    if tw >= 0 and tw % sw == 0 and tw // sw < Wo:
                        bb = tw // sw
                        for o in range(O):
                            acc += dy[n, o, a, bb] * w[o, c, i, j]
        dx[n, c, hx, wx] = acc


@kernel("void(float32[:, :, :, ::1], float32[:, :, :, ::1], float32[:, :, :, ::1], int64, int64, int64, int64)",
        block=RED_THREADS)
def conv2d_backward_weight_kernel(dy, x, dw, sh, sw, ph, pw):
    """one block per weight element: strided partial sums over N*Ho*Wo, then a shared-memory tree."""
    # dy: (N, O, Ho, Wo) float32; x: (N, C, H, W); dw: (O, C, kH, kW), one block per element
    part = cuda.shared.array(RED_THREADS, float32)
    N, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    O, KH, KW = dw.shape[0], dw.shape[2], dw.shape[3]
    Ho, Wo = dy.shape[2], dy.shape[3]
    tid = cuda.threadIdx.x
    blk = cuda.blockIdx.x
    o, c, i, j = unravel4(blk, C, KH, KW)
    valid = blk < O * C * KH * KW  # uniform over the block: every thread still reaches the barriers
    total = N * Ho * Wo

    acc = float32(0.0)
    if valid:
        for e0 in range(0, total, RED_THREADS):
            e = e0 + tid
            if e < total:
                n, _, ho, wo = unravel4(e, 1, Ho, Wo)
                hi = ho * sh - ph + i
                wi = wo * sw - pw + j
                if hi >= 0 and hi < H and wi >= 0 and wi < W:
                    acc += dy[n, o, ho, wo] * x[n, c, hi, wi]
    part[tid] = acc
    block_sum(part, tid)
    if valid and tid == 0:
        dw[o, c, i, j] = part[0]


@kernel("void(float32[:, :, :, ::1], float32[::1])", block=RED_THREADS)
def conv2d_backward_bias_kernel(dy, db):
    """one block per output channel: strided partial sums over N*Ho*Wo, then a shared-memory tree."""
    # dy: (N, O, Ho, Wo) float32; db: (O,), one block per element
    part = cuda.shared.array(RED_THREADS, float32)
    N, O, Ho, Wo = dy.shape[0], dy.shape[1], dy.shape[2], dy.shape[3]
    tid = cuda.threadIdx.x
    o = cuda.blockIdx.x
    valid = o < O
    total = N * Ho * Wo

    acc = float32(0.0)
    if valid:
        for e0 in range(0, total, RED_THREADS):
            e = e0 + tid
            if e < total:
                n, _, ho, wo = unravel4(e, 1, Ho, Wo)
                acc += dy[n, o, ho, wo]
    part[tid] = acc
    block_sum(part, tid)
    if valid and tid == 0:
        db[o] = part[0]


# --- implicit GEMM: versions implicit_gemm (forward, dX, dW) and fused (conv + bias + ReLU + 2x2 pool) ---
#
# One GEMM, C[M, NG] = A[M, K] · B[K, NG], whose operands are gathered from the tensors on the fly (the
# im2col matrix is never written): the CUTLASS "implicit GEMM" view of a convolution, with dgrad and
# wgrad the same GEMM with the operands swapped. Per mode:
#
#   mode     M (rows)            NG (columns)           K (reduction)     A[m, k]             B[k, col]
#   forward  N*Ho*Wo (n,ho,wo)   C_out                  C_in*kH*kW (c,i,j) x patch (0 in pad)  w[o, c, i, j]
#   fused    N*Hp*Wp*4 (window   C_out                  C_in*kH*kW         x patch             w[o, c, i, j]
#            cell q innermost in each thread's rows: the 4 cells of a 2x2 window land in one thread)
#   dgrad    N*H*W (n, h, w)     C_in                   C_out*kH*kW (o,i,j) dy[n,o,(h+ph-i)/sh,(w+pw-j)/sw]
#                                                                            (0 off the stride grid) w[o, c, i, j]
#   wgrad    C_out               C_in*kH*kW (+1: a      N*Ho*Wo (n,ho,wo) dy[n, o, ho, wo]    x patch (1 in the
#                                column of ones = db)                                          bias column)
#
# A block computes a BM x BN tile of C with THREADS = (BM/TM)*(BN/TN) threads, each an interleaved TM x TN
# register tile (rows trow + i*BM/TM, columns tcol + j*BN/TN: a warp reads consecutive shared words and
# stores consecutive addresses) by outer products of a TM column of the A tile and a TN row of the B tile.
# K goes in steps of BK: the gather of slice t+1 is issued into registers before slice t is computed from
# shared memory (double buffering through registers: the global loads are in flight during the FMAs).
# Filter size and stride are compile-time constants of each kernel (a factory builds and caches one per
# (mode, kH, kW, sh, sw, tile)), so the k -> (c, i, j) index math is multiplies and shifts; all offsets
# are 32-bit (every tensor must hold < 2**31 elements: the launchers refuse larger ones clearly and the
# dispatcher's default falls back to the direct kernels). dW splits K across blocks (grid.z): each split
# writes its own partial tile, fences it and takes a ticket; the block that draws its tile's last ticket
# adds the partials in split order (the same bits every run) and resets the ticket: one launch.

# (BM, BN, BK, TM, TN) per mode on a GPU: 8x8 registers per thread; 128 threads (dW: 64, which keeps it
# at 128 registers: its gather state is larger). Under the simulator the same code runs on a 16-thread tile.
IG_GPU_TILE = (128, 64, 8, 8, 8)
IG_GPU_TILES = {0: IG_GPU_TILE, 1: IG_GPU_TILE, 2: IG_GPU_TILE, 3: (64, 64, 8, 8, 8)}
# dW reading dy through a mask (and an argmax) holds two more loads per element in flight: BK = 4 halves
# the registers of the next slice's gather, so it keeps to 128 registers without spilling
IG_GPU_WGRAD_MASKED_TILE = (64, 64, 4, 8, 8)
IG_SIM_TILE = (16, 8, 4, 4, 2)
IG_PAD = 4  # shared rows padded by 4 words: the k-major stores of 8 consecutive k hit 32 distinct banks
IG_MAX_ELEMENTS = 2**31 - 1  # 32-bit offsets
IG_MAX_REGISTERS = 128  # per thread, held by launch bounds (dW's one-launch epilogue would take ~158)
IG_WGRAD_TARGET_BLOCKS = 512  # dW: split K until about this many blocks run (a few waves on an H100)
IG_WGRAD_MIN_TILES = 8  # dW: at least this many K-slices per split (the partial tiles cost memory traffic)
_FWD, _FUSED, _DGRAD, _WGRAD = 0, 1, 2, 3
_IG_NAMES = {_FWD: "conv2d_forward_implicit_gemm_kernel", _FUSED: "conv2d_relu_maxpool_fused_kernel",
             _DGRAD: "conv2d_backward_data_implicit_gemm_kernel",
             _WGRAD: "conv2d_backward_weight_implicit_gemm_kernel"}
# (src0, src1, bias, out, idx, aux, part, tickets, N, C, H, W, O, Ho, Wo, ph, pw, flags, tiles_per_split,
#  magic_mul(Ho*Wo), magic_shift(Ho*Wo), magic_mul(Wo), magic_shift(Wo)); flags: 1 = bias, 2 = ReLU
IG_SIGNATURE = ("void(float32[::1], float32[::1], float32[::1], float32[::1], int32[::1], float32[::1], "
                "float32[::1], int32[::1], " + "int32, " * 11 + "uint32, int32, uint32, int32)")
# How dgrad and wgrad read dy (a compile-time part of each kernel): as it is; through a ReLU's mask (aux,
# the ReLU's stored output, dy's shape: dy counts where aux > 0); or as the gradient of a ReLU -> 2x2
# max pool (stride 2) run: src0 and aux are the pooled gradient and the pooled output (N, O, Ho//2,
# Wo//2), idx its argmax (kernels/pool.py's format), and the conv output's gradient at (ho, wo) is
# src0 at (ho//2, wo//2) where the argmax is (ho, wo) and the pooled output is > 0, else 0.
DY_PLAIN, DY_RELU, DY_RELU_POOL = 0, 1, 2
_DY_SUFFIX = {DY_PLAIN: "", DY_RELU: "_relu", DY_RELU_POOL: "_relupool"}
# dW's split-K in one launch: the last block of each tile to arrive (an atomic ticket) sums the splits'
# partial tiles in split order; a cap on the splits keeps that block's sum short
IG_WGRAD_MAX_SPLITS = 256
_IG_CACHE = {}


def _magic(d):
    """(mul, shift) with floor(n / d) == (umulhi(n, mul) + n) >> shift for 0 <= n < 2**31 (as CUTLASS's
    FastDivmod): dW divides its K index by Ho*Wo and Wo once per K-slice, three instructions each."""
    shift = (d - 1).bit_length()
    return ((2**32 * (2**shift - d)) // d + 1) & 0xFFFFFFFF, shift


def _ig_build(mode, kh, kw, sh, sw, tile, dyop=DY_PLAIN):
    """One implicit-GEMM kernel for (mode, filter, stride, tile, how dy is read), the sizes closed over as constants."""
    BM, BN, BK, TM, TN = tile
    ROW_T, COL_T = BM // TM, BN // TN
    THREADS = ROW_T * COL_T
    LDA, LDB = BM + IG_PAD, BN + IG_PAD
    SA_SIZE, SB_SIZE = BK * LDA, BK * LDB
    KHW = kh * kw
    A_ALONG_M = mode != _WGRAD  # the A gather runs along m (coalesced over wo / w) or along k (wgrad)
    A_STEP = THREADS // BM if A_ALONG_M else THREADS // BK
    A_LOADS = BM * BK // THREADS
    B_STEP = THREADS // BK  # the B gather runs along k in every mode
    B_LOADS = BN * BK // THREADS
    assert THREADS % BK == 0 and (not A_ALONG_M or THREADS % BM == 0) and A_LOADS >= 1 and B_LOADS >= 1
    assert mode != _FUSED or TM % 4 == 0
    MODE, KH, KW, SH, SW = mode, kh, kw, sh, sw
    assert dyop == DY_PLAIN or mode in (_DGRAD, _WGRAD)
    RELU_DY, POOL_DY = dyop != DY_PLAIN, dyop == DY_RELU_POOL

    def igemm(src0, src1, bias, out, idx, aux, part, tickets, N, C, H, W, O, Ho, Wo, ph, pw, flags, tps, mul_hw,
              shr_hw, mul_w, shr_w):
        # forward/fused: src0 = x (N*C*H*W), src1 = w (O*C*kH*kW), bias (O), out = y (or pooled y; idx its
        # argmax); dgrad: src0 = dy, src1 = w, out = dx; wgrad: src0 = dy, src1 = x, out = dw (O*C*kH*kW),
        # bias = db (O, written when has_bias), part = partial tiles (splits, O, C*kH*kW + has_bias),
        # tickets (one int32 per tile, 0 between launches). dgrad and wgrad read dy as DY_* says (aux, idx).
        # All flat, C-contiguous; sizes int32.
        sa = cuda.shared.array(SA_SIZE, float32)  # sa[k * LDA + m] = A[m0 + m, k0 + k]
        sb = cuda.shared.array(SB_SIZE, float32)  # sb[k * LDB + n] = B[k0 + k, n0 + n]
        last = cuda.shared.array(1, int32)  # wgrad: whether this block drew its tile's last ticket
        acc = cuda.local.array((TM, TN), float32)
        ra = cuda.local.array(A_LOADS, float32)  # the next slice, in flight while this one is computed
        rb = cuda.local.array(B_LOADS, float32)
        af = cuda.local.array(TM, float32)
        bf = cuda.local.array(TN, float32)
        tid = uint32(cuda.threadIdx.x)
        trow = uint32(tid % uint32(ROW_T))
        tcol = uint32(tid // uint32(ROW_T))
        m0 = uint32(cuda.blockIdx.x) * uint32(BM)
        n0 = uint32(cuda.blockIdx.y) * uint32(BN)
        has_bias = (flags & 1) != 0
        HW = uint32(H * W)
        HoWo = uint32(Ho * Wo)
        Hp = Ho // 2
        Wp = Wo // 2
        HpWp = uint32(Hp * Wp)
        if MODE == _FWD:
            M = uint32(N * Ho * Wo)
            NG = uint32(O)
            K = uint32(C * KHW)
        elif MODE == _FUSED:
            M = uint32(N * Hp * Wp * 4)
            NG = uint32(O)
            K = uint32(C * KHW)
        elif MODE == _DGRAD:
            M = uint32(N * H * W)
            NG = uint32(C)
            K = uint32(O * KHW)
        else:
            M = uint32(O)
            NG = uint32(C * KHW + (flags & 1))
            K = uint32(N * Ho * Wo)
        ktiles = uint32((K + uint32(BK - 1)) // uint32(BK))
        t_begin = uint32(0)
        t_end = ktiles
        if MODE == _WGRAD:  # this block's split of K
            t_begin = uint32(uint32(cuda.blockIdx.z) * uint32(tps))
            t_end = uint32(min(uint32(t_begin + uint32(tps)), ktiles))

        # per-thread gather setup: the A row this thread loads (forward, fused, dgrad) or its k lane
        a_kk = uint32(tid // uint32(BM)) if A_ALONG_M else uint32(tid % uint32(BK))
        am = uint32(m0 + tid % uint32(BM))
        a_ok = am < M
        h0 = int32(0)
        w0 = int32(0)
        a_base = uint32(0)
        if MODE == _FWD or MODE == _FUSED:
            if MODE == _FWD:
                nn_ = uint32(am // HoWo)
                pq = uint32(am - nn_ * HoWo)
                ho = uint32(pq // uint32(Wo))
                wo = uint32(pq - ho * uint32(Wo))
            else:  # local row r = tr + i*ROW_T holds cell q = i % 4 of window tr + (i // 4)*ROW_T
                r_loc = uint32(tid % uint32(BM))
                i_a = uint32(r_loc // uint32(ROW_T))
                win = uint32(m0 // uint32(4) + r_loc % uint32(ROW_T) + (i_a // uint32(4)) * uint32(ROW_T))
                q = uint32(i_a % uint32(4))
                a_ok = win < uint32(N * Hp * Wp)
                nn_ = uint32(win // uint32(Hp * Wp))
                pq = uint32(win - nn_ * uint32(Hp * Wp))
                hp = uint32(pq // uint32(Wp))
                ho = uint32(uint32(2) * hp + q // uint32(2))
                wo = uint32(uint32(2) * (pq - hp * uint32(Wp)) + q % uint32(2))
            h0 = int32(ho) * int32(SH) - int32(ph)
            w0 = int32(wo) * int32(SW) - int32(pw)
            a_base = uint32(nn_ * uint32(C) * HW)
        elif MODE == _DGRAD:
            nn_ = uint32(am // HW)
            pq = uint32(am - nn_ * HW)
            hh = uint32(pq // uint32(W))
            h0 = int32(hh) + int32(ph)
            w0 = int32(pq - hh * uint32(W)) + int32(pw)
            a_base = uint32(nn_ * uint32(O) * (HpWp if POOL_DY else HoWo))
        b_kk = uint32(tid % uint32(BK))
        b_n = uint32(n0 + tid // uint32(BK))

        for i in range(TM):
            for j in range(TN):
                acc[i, j] = float32(0.0)

        for t in range(t_begin, uint32(t_end + uint32(1))):  # one extra trip: the last slice is only computed
            if t < t_end:  # gather slice t into registers (uniform branch)
                k0 = uint32(t * uint32(BK))
                if MODE == _WGRAD:  # one k per thread: k -> (n, ho, wo) by multiply-shift divisions
                    k = uint32(k0 + a_kk)
                    k_ok = k < K
                    nn_ = uint32(uint32(uint32((uint64(k) * uint64(mul_hw)) >> uint64(32)) + k) >> uint32(shr_hw))
                    pq = uint32(k - nn_ * HoWo)
                    ho = uint32(uint32(uint32((uint64(pq) * uint64(mul_w)) >> uint64(32)) + pq) >> uint32(shr_w))
                    wo = uint32(pq - ho * uint32(Wo))
                    hi0 = int32(ho) * int32(SH) - int32(ph)
                    wi0 = int32(wo) * int32(SW) - int32(pw)
                    x_base = uint32(nn_ * uint32(C) * HW)
                    if POOL_DY:  # dy at (ho, wo): the pooled gradient at (ho//2, wo//2) where the argmax is here
                        hp = ho >> uint32(1)
                        wp = wo >> uint32(1)
                        k_ok = k_ok and hp < uint32(Hp) and wp < uint32(Wp)
                        dy_base = uint32(nn_ * uint32(O) * HpWp + hp * uint32(Wp) + wp)
                        dy_step = HpWp
                    else:
                        dy_base = uint32(nn_ * uint32(O) * HoWo + pq)
                        dy_step = HoWo
                    for r in range(A_LOADS):
                        o = uint32(m0 + tid // uint32(BK) + uint32(r * A_STEP))
                        v = float32(0.0)
                        if k_ok and o < M:
                            off = uint32(dy_base + o * dy_step)
                            if POOL_DY:
                                if idx[off] == int32(pq) and aux[off] > float32(0.0):
                                    v = src0[off]
                            elif RELU_DY:
                                if aux[off] > float32(0.0):
                                    v = src0[off]
                            else:
                                v = src0[off]
                        ra[r] = v
                    for r in range(B_LOADS):
                        col = uint32(b_n + uint32(r * B_STEP))
                        c = uint32(col // uint32(KHW))
                        ij = uint32(col - c * uint32(KHW))
                        ii = uint32(ij // uint32(KW))
                        hi = hi0 + int32(ii)
                        wi = wi0 + int32(ij - ii * uint32(KW))
                        v = float32(0.0)
                        if k_ok and c < uint32(C) and hi >= 0 and hi < H and wi >= 0 and wi < W:
                            v = src1[uint32(x_base + c * HW + uint32(hi) * uint32(W) + uint32(wi))]
                        elif k_ok and has_bias and col == uint32(C * KHW):  # the column of ones: db
                            v = float32(1.0)
                        rb[r] = v
                else:
                    for r in range(A_LOADS):
                        k = uint32(k0 + a_kk + uint32(r * A_STEP))
                        c = uint32(k // uint32(KHW))  # c, or o for dgrad
                        ij = uint32(k - c * uint32(KHW))
                        ii = uint32(ij // uint32(KW))
                        jj = uint32(ij - ii * uint32(KW))
                        v = float32(0.0)
                        if MODE == _DGRAD:  # output row (h + ph - i) / sh must exist on the stride grid
                            th = h0 - int32(ii)
                            tw = w0 - int32(jj)
                            ok = False
                            if SH == 1 and SW == 1:
                                ok = a_ok and k < K and th >= 0 and th < Ho and tw >= 0 and tw < Wo
                            else:
                                ok = (a_ok and k < K and th >= 0 and tw >= 0 and th % SH == 0 and tw % SW == 0
                                      and th // SH < Ho and tw // SW < Wo)
                                th = th // SH
                                tw = tw // SW
                            if POOL_DY:  # the pooled gradient routed through its argmax (c is o here)
                                hp = uint32(th) >> uint32(1)
                                wp = uint32(tw) >> uint32(1)
                                if ok and hp < uint32(Hp) and wp < uint32(Wp):
                                    off = uint32(a_base + c * HpWp + hp * uint32(Wp) + wp)
                                    if idx[off] == th * int32(Wo) + tw and aux[off] > float32(0.0):
                                        v = src0[off]
                            elif ok:
                                off = uint32(a_base + c * HoWo + uint32(th) * uint32(Wo) + uint32(tw))
                                if RELU_DY:
                                    if aux[off] > float32(0.0):
                                        v = src0[off]
                                else:
                                    v = src0[off]
                        else:
                            hi = h0 + int32(ii)
                            wi = w0 + int32(jj)
                            if a_ok and k < K and hi >= 0 and hi < H and wi >= 0 and wi < W:
                                v = src0[uint32(a_base + c * HW + uint32(hi) * uint32(W) + uint32(wi))]
                        ra[r] = v
                    k = uint32(k0 + b_kk)
                    for r in range(B_LOADS):
                        col = uint32(b_n + uint32(r * B_STEP))
                        v = float32(0.0)
                        if k < K and col < NG:
                            if MODE == _DGRAD:  # B[k, c] = w[o, c, ij] with k = o*KHW + ij
                                o = uint32(k // uint32(KHW))
                                v = src1[uint32((o * uint32(C) + col) * uint32(KHW) + (k - o * uint32(KHW)))]
                            else:  # B[k, o] = w[o, k]
                                v = src1[uint32(col * K + k)]
                        rb[r] = v
            if t > t_begin:  # compute slice t - 1 from shared memory
                # unsigned offsets: Numba's wraparound fix-up for signed indices would cost ~4 integer
                # instructions per shared load (see gemm.py's register_tiled)
                a_off = uint32(trow)
                b_off = uint32(tcol)
                for kk in range(BK):
                    for i in range(TM):
                        af[i] = sa[uint32(a_off + uint32(i * ROW_T))]
                    for j in range(TN):
                        bf[j] = sb[uint32(b_off + uint32(j * COL_T))]
                    for i in range(TM):
                        for j in range(TN):
                            acc[i, j] += af[i] * bf[j]
                    a_off = uint32(a_off + uint32(LDA))
                    b_off = uint32(b_off + uint32(LDB))
            cuda.syncthreads()
            if t < t_end:
                for r in range(A_LOADS):
                    if A_ALONG_M:
                        sa[uint32((a_kk + uint32(r * A_STEP)) * uint32(LDA) + tid % uint32(BM))] = ra[r]
                    else:
                        sa[uint32(a_kk * uint32(LDA) + tid // uint32(BK) + uint32(r * A_STEP))] = ra[r]
                for r in range(B_LOADS):
                    sb[uint32(b_kk * uint32(LDB) + tid // uint32(BK) + uint32(r * B_STEP))] = rb[r]
            cuda.syncthreads()

        # epilogue: one store per element (+ bias, ReLU; the fused mode pools the 4 cells first)
        if MODE == _FUSED:
            HpWp = uint32(Hp * Wp)
            for g in range(TM // 4):
                win = uint32(m0 // uint32(4) + trow + uint32(g * ROW_T))
                if win < uint32(N * Hp * Wp):
                    nn_ = uint32(win // HpWp)
                    pq = uint32(win - nn_ * HpWp)
                    hp = uint32(pq // uint32(Wp))
                    wp = uint32(pq - hp * uint32(Wp))
                    for j in range(TN):
                        o = uint32(n0 + tcol + uint32(j * COL_T))
                        if o < NG:
                            best = float32(0.0)
                            arg = int32(-1)
                            for q in range(4):  # row-major window order: the first strict maximum wins
                                v = acc[g * 4 + q, j]
                                if has_bias:
                                    v += bias[o]
                                if v < float32(0.0):  # ReLU as relu_kernel: NaN is not < 0, it propagates
                                    v = float32(0.0)
                                if arg < 0 or v > best or (v != v and best == best):
                                    best = v
                                    arg = int32((2 * hp + q // 2) * uint32(Wo) + 2 * wp + q % 2)
                            dst = uint32((nn_ * NG + o) * HpWp + pq)
                            out[dst] = best
                            idx[dst] = arg
        elif MODE == _WGRAD:  # dw (and db, the column of ones) from this block, or from the splits' sum
            CKK = uint32(C * KHW)
            nsplit = uint32((ktiles + uint32(tps) - uint32(1)) // uint32(tps))  # = gridDim.z
            if nsplit == uint32(1):
                for i in range(TM):
                    m = uint32(m0 + trow + uint32(i * ROW_T))
                    for j in range(TN):
                        col = uint32(n0 + tcol + uint32(j * COL_T))
                        if m < M and col < CKK:
                            out[uint32(m * CKK + col)] = acc[i, j]
                        elif m < M and col < NG:
                            bias[m] = acc[i, j]
            else:  # uniform: every block of the launch takes this branch
                z = uint32(cuda.blockIdx.z)
                for i in range(TM):
                    m = uint32(m0 + trow + uint32(i * ROW_T))
                    for j in range(TN):
                        col = uint32(n0 + tcol + uint32(j * COL_T))
                        if m < M and col < NG:
                            part[uint32((z * M + m) * NG + col)] = acc[i, j]
                cuda.threadfence()  # this thread's partials are visible to the block that sums them
                cuda.syncthreads()
                if tid == uint32(0):
                    tile = cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x
                    ticket = cuda.atomic.add(tickets, tile, 1)
                    last[0] = 1 if ticket == int32(nsplit) - 1 else 0
                    if ticket == int32(nsplit) - 1:
                        cuda.atomic.exch(tickets, tile, 0)  # every split has arrived: ready for the next launch
                cuda.syncthreads()
                if last[0] != 0:  # uniform within the block: its threads share the tile's sums
                    cuda.threadfence()
                    for e in range(tid, uint32(BM * BN), uint32(THREADS)):
                        m = uint32(m0 + e // uint32(BN))
                        col = uint32(n0 + e % uint32(BN))
                        if m < M and col < NG:
                            total = float32(0.0)
                            for q in range(nsplit):  # split order: the same bits every run
                                total += part[uint32((q * M + m) * NG + col)]
                            if col < CKK:
                                out[uint32(m * CKK + col)] = total
                            else:
                                bias[m] = total
        else:
            for i in range(TM):
                m = uint32(m0 + trow + uint32(i * ROW_T))
                if m < M:
                    if MODE == _FWD:
                        nn_ = uint32(m // HoWo)
                        dst = uint32(nn_ * NG * HoWo + (m - nn_ * HoWo))
                        step = HoWo
                    else:
                        nn_ = uint32(m // HW)
                        dst = uint32(nn_ * NG * HW + (m - nn_ * HW))
                        step = HW
                    for j in range(TN):
                        col = uint32(n0 + tcol + uint32(j * COL_T))
                        if col < NG:
                            v = acc[i, j]
                            if MODE == _FWD:
                                if has_bias:
                                    v += bias[col]
                                if (flags & 2) != 0 and v < float32(0.0):
                                    v = float32(0.0)
                            out[uint32(dst + col * step)] = v

    name = f"{_IG_NAMES[mode]}{_DY_SUFFIX[dyop]}_k{kh}x{kw}_s{sh}x{sw}"
    if tile != _ig_gpu_tile(mode, dyop):
        name += "_t" + "x".join(map(str, tile))
    igemm.__name__ = igemm.__qualname__ = name
    return igemm


def _ig_gpu_tile(mode, dyop=DY_PLAIN):
    return IG_GPU_WGRAD_MASKED_TILE if mode == _WGRAD and dyop != DY_PLAIN else IG_GPU_TILES[mode]


def _ig_tile(mode, dyop=DY_PLAIN):
    return IG_SIM_TILE if config.ENABLE_CUDASIM else _ig_gpu_tile(mode, dyop)


def _ig_kernel(mode, kh, kw, sh, sw, tile=None, dyop=DY_PLAIN):
    """The cached kernel for (mode, filter, stride, tile, dy's reading), built on first use."""
    key = (mode, kh, kw, sh, sw, _ig_tile(mode, dyop) if tile is None else tuple(tile), dyop)
    disp = _IG_CACHE.get(key)
    if disp is None:
        bounds = {} if config.ENABLE_CUDASIM else {"launch_bounds": _ig_bounds(key[5])}
        disp = _IG_CACHE[key] = cuda.jit(_ig_build(*key), cache=DISK_CACHE, **bounds)
    return disp


def _ig_threads(tile):
    return (tile[0] // tile[3]) * (tile[1] // tile[4])


def _ig_bounds(tile):
    """Launch bounds that hold a kernel to IG_MAX_REGISTERS (ptxas then fits 65536 / 128 threads per SM)."""
    threads = _ig_threads(tile)
    return threads, max(1, 65536 // (IG_MAX_REGISTERS * threads))


def _ig_register(mode, kh, kw, sh, sw, dyop=DY_PLAIN):
    """Put one specialisation in the kernel registry, so the compile check builds it for sm_80/sm_90."""
    disp = _ig_kernel(mode, kh, kw, sh, sw, dyop=dyop)
    KERNELS[f"conv2d.{disp.py_func.__name__}"] = (disp, IG_SIGNATURE, __name__)
    KERNEL_BLOCKS[f"conv2d.{disp.py_func.__name__}"] = _ig_threads(_ig_tile(mode, dyop))


# representative specialisations (each costs the compile check ~3 s per arch): 3x3 stride 1 (VGG/ResNet)
# in every mode, 1x1 stride 2 (a ResNet shortcut), dX's stride-grid path (3x3 s2), LeNet's fused 5x5 and
# its backward through the ReLU and the pool, a Conv -> ReLU's backward (3x3)
for _spec in ((_FWD, 3, 3, 1, 1), (_FWD, 1, 1, 2, 2), (_FUSED, 5, 5, 1, 1), (_DGRAD, 3, 3, 1, 1),
              (_DGRAD, 3, 3, 2, 2), (_WGRAD, 3, 3, 1, 1), (_DGRAD, 5, 5, 1, 1, DY_RELU_POOL),
              (_WGRAD, 5, 5, 1, 1, DY_RELU_POOL), (_DGRAD, 3, 3, 1, 1, DY_RELU), (_WGRAD, 3, 3, 1, 1, DY_RELU)):
    _ig_register(*_spec)
del _spec


# --- launchers ---------------------------------------------------------------------------------------


def _params(stride, padding):
    """Validate (sh, sw) and (ph, pw) int pairs -> (sh, sw, ph, pw) as Python ints."""
    for name, value, lo in (("stride", stride, 1), ("padding", padding, 0)):
        if not (isinstance(value, (tuple, list)) and len(value) == 2
                and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
            raise TypeError(f"{name}: expected a pair of ints, got {value!r}")
        if value[0] < lo or value[1] < lo:
            raise ValueError(f"{name}: expected values >= {lo}, got {tuple(value)}")
    return int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1])


def _check4(name, a):
    check_device_array(name, a)
    if len(a.shape) != 4:
        raise ValueError(f"{name}: expected a 4-D array, got shape {tuple(a.shape)}")
    return tuple(int(v) for v in a.shape)


def _out_shape(x_shape, w_shape, stride, padding):
    """(N, O, Ho, Wo) after checking that x and w fit together."""
    n, c, h, wd = x_shape
    o, cw, kh, kw = w_shape
    sh, sw, ph, pw = _params(stride, padding)
    if cw != c:
        raise ValueError(f"w: has {cw} input channels but x has {c} (x {x_shape}, w {w_shape})")
    if h + 2 * ph < kh or wd + 2 * pw < kw:
        raise ValueError(f"w: filter {(kh, kw)} is larger than the padded input {(h + 2 * ph, wd + 2 * pw)}")
    return (n, o, output_size(h, kh, sh, ph), output_size(wd, kw, sw, pw))


def tiled_supported(w_shape, stride):
    """True when the tiled kernel's shared arrays hold this filter and stride."""
    return (len(w_shape) == 4 and w_shape[2] <= MAX_K and w_shape[3] <= MAX_K
            and stride[0] <= MAX_STRIDE and stride[1] <= MAX_STRIDE)


def _check_forward(x, w, b, y, stride, padding):
    out_shape = _out_shape(_check4("x", x), _check4("w", w), stride, padding)
    check_device_array("y", y, shape=out_shape)
    if b is not None:
        check_device_array("b", b, shape=(out_shape[1],))
    if 0 in out_shape:  # no y[0, 0, 0] to stand in for a missing bias; the launchers return at once
        return out_shape, b, int(b is not None)
    # no bias: a 1-D view of y (no allocation) stands in for it; the kernel never reads it
    bias_arg = b if b is not None else y[0, 0, 0]
    return out_shape, bias_arg, int(b is not None)


def conv2d_forward_naive(x, w, b, y, stride, padding):
    """y = conv(x, w) + b, one thread per output element. b may be None."""
    out_shape, bias_arg, has_bias = _check_forward(x, w, b, y, stride, padding)
    if 0 in out_shape:  # nothing to compute (and a GPU refuses a grid of 0 blocks)
        return y
    blocks, threads = grid_1d(int(np.prod(out_shape)))
    conv2d_forward_naive_kernel[blocks, threads](x, w, bias_arg, y, has_bias, *_params(stride, padding))
    return y


def conv2d_forward_tiled(x, w, b, y, stride, padding):
    """y = conv(x, w) + b with shared-memory input patches; kH, kW <= MAX_K and strides <= MAX_STRIDE."""
    out_shape, bias_arg, has_bias = _check_forward(x, w, b, y, stride, padding)
    if w.shape[2] > MAX_K or w.shape[3] > MAX_K:
        raise ValueError(f"w: the tiled kernel supports filters up to {MAX_K}x{MAX_K}, got "
                         f"{tuple(w.shape[2:])}; use version='naive'")
    if stride[0] > MAX_STRIDE or stride[1] > MAX_STRIDE:
        raise ValueError(f"stride: the tiled kernel supports strides up to {MAX_STRIDE}, got "
                         f"{tuple(stride)}; use version='naive'")
    if 0 in out_shape:  # nothing to compute (and a GPU refuses a grid of 0 blocks)
        return y
    n, o, ho, wo = out_shape
    blocks = n * o * ceil_div(ho, TILE_H) * ceil_div(wo, TILE_W)
    conv2d_forward_tiled_kernel[blocks, (TILE_W, TILE_H)](x, w, bias_arg, y, has_bias, *_params(stride, padding))
    return y


def conv2d_backward_input_gather(dy, w, dx, stride, padding):
    """dx = gradient wrt x, one thread per input element (no atomics; dx written in full)."""
    out_shape = _out_shape(_check4("dx", dx), _check4("w", w), stride, padding)
    check_device_array("dy", dy, shape=out_shape)
    if 0 in dx.shape:
        return dx
    blocks, threads = grid_1d(int(np.prod(dx.shape)))
    conv2d_backward_input_kernel[blocks, threads](dy, w, dx, *_params(stride, padding))
    return dx


def conv2d_backward_weight_blocks(dy, x, dw, stride, padding):
    """dw = gradient wrt w, one block per weight element with a shared-memory reduction."""
    out_shape = _out_shape(_check4("x", x), _check4("dw", dw), stride, padding)
    check_device_array("dy", dy, shape=out_shape)
    if 0 in dw.shape:
        return dw
    conv2d_backward_weight_kernel[int(np.prod(dw.shape)), RED_THREADS](dy, x, dw, *_params(stride, padding))
    return dw


def conv2d_backward_bias_blocks(dy, db):
    """db = Σ dy over (N, Ho, Wo), one block per output channel with a shared-memory reduction."""
    shape = _check4("dy", dy)
    check_device_array("db", db, shape=(shape[1],))
    if shape[1] == 0:
        return db
    conv2d_backward_bias_kernel[shape[1], RED_THREADS](dy, db)
    return db


# implicit GEMM launchers (the kernels above; flat views of the arrays, no copies)

_IG_SCRATCH = {}  # dW's partial tiles, its tickets and 1-element stand-ins: allocated once, grown when needed


def _ig_scratch(name, size, dtype=np.float32):
    buf = _IG_SCRATCH.get(name)
    if buf is None or buf.shape[0] < size:
        if name == "tickets":  # zeros: every ticket starts at 0 (and the last block resets it); an old
            # buffer is kept alive, as a captured CUDA graph may still use it
            if buf is not None:
                _IG_SCRATCH.setdefault("retired", []).append(buf)
            buf = _IG_SCRATCH[name] = cuda.to_device(np.zeros(max(size, 1024), dtype))
        else:
            buf = _IG_SCRATCH[name] = cuda.device_array(max(size, 1), dtype)
    return buf


def _stand_ins():
    """(idx, aux, part, tickets) for a launch that reads none of them: 1-element arrays of the types."""
    return (_ig_scratch("idx", 1, np.int32), _ig_scratch("aux", 1), _ig_scratch("aux", 1),
            _ig_scratch("tickets", 1, np.int32))


def _dy_reading(dy_shape, conv_shape, mask, pool_idx):
    """(DY_* mode, idx, aux) for dgrad/wgrad after checking `mask` (and `pool_idx`) against dy: dy is the
    conv output's gradient (read through mask > 0), or with pool_idx the 2x2 max pool's (N, O, Ho//2, Wo//2)."""
    n, o, ho, wo = conv_shape
    if pool_idx is None:
        if tuple(dy_shape) != tuple(conv_shape):
            raise ValueError(f"dy: expected shape {tuple(conv_shape)}, got {tuple(dy_shape)}")
        if mask is None:
            return DY_PLAIN, None, None
        check_device_array("mask", mask, shape=conv_shape)
        return DY_RELU, None, _flat(mask)
    pooled = (n, o, ho // 2, wo // 2)
    if tuple(dy_shape) != pooled:
        raise ValueError(f"dy: expected the pooled gradient's shape {pooled} (conv output {tuple(conv_shape)}), "
                         f"got {tuple(dy_shape)}")
    if mask is None:
        raise ValueError("mask: pool_idx needs mask, the pooled ReLU output (the gradient passes where it is > 0)")
    check_device_array("pool_idx", pool_idx, shape=pooled, dtype=np.int32)
    check_device_array("mask", mask, shape=pooled)
    return DY_RELU_POOL, _flat(pool_idx), _flat(mask)


def _flat(a):
    return a.reshape(int(np.prod(a.shape)))


def _ig_check_elements(**shapes):
    """ValueError unless every tensor fits the kernels' 32-bit offsets."""
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        if size > IG_MAX_ELEMENTS:
            raise ValueError(f"{name}: {size} elements is more than the 2**31 - 1 that the implicit-GEMM "
                             "kernels address with 32-bit offsets; use version='naive' (forward) or 'direct'")


def implicit_gemm_supported(x_shape, w_shape, stride, padding, dilation=(1, 1), groups=1):
    """True when the implicit-GEMM kernels apply: dilation 1, groups 1, every tensor < 2**31 elements."""
    if tuple(dilation) != (1, 1) or groups != 1 or len(x_shape) != 4 or len(w_shape) != 4:
        return False
    try:
        y_shape = _out_shape(tuple(x_shape), tuple(w_shape), stride, padding)
        _ig_check_elements(x=x_shape, w=w_shape, y=y_shape)
    except ValueError:
        return False
    return True


def _ig_launch(mode, grid, w_shape, stride, args, tile, dyop=DY_PLAIN):
    kh, kw = int(w_shape[2]), int(w_shape[3])
    tile = _ig_tile(mode, dyop) if tile is None else tuple(tile)
    if grid[1] > 65535:
        raise ValueError(f"w: {w_shape} needs {grid[1]} column tiles, more than a launch's grid.y holds")
    threads = _ig_threads(tile)
    k = _ig_kernel(mode, kh, kw, int(stride[0]), int(stride[1]), tile, dyop)
    k[grid, threads](*args)


def _ig_sizes(*values):
    return tuple(np.int32(v) for v in values)


def conv2d_forward_implicit_gemm(x, w, b, y, stride, padding, relu=False, tile=None):
    """y = conv(x, w) + b (then max(., 0) when ``relu``) as an implicit GEMM; b may be None."""
    out_shape, bias_arg, has_bias = _check_forward(x, w, b, y, stride, padding)
    _ig_check_elements(x=x.shape, w=w.shape, y=out_shape)
    if 0 in out_shape:
        return y
    n, c, h, wd = (int(v) for v in x.shape)
    o, ho, wo = out_shape[1:]
    sh, sw, ph, pw = _params(stride, padding)
    tile = _ig_tile(_FWD) if tile is None else tile
    grid = (ceil_div(n * ho * wo, tile[0]), ceil_div(o, tile[1]), 1)
    flags = has_bias | (2 if relu else 0)
    args = (_flat(x), _flat(w), _flat(bias_arg), _flat(y), *_stand_ins(),
            *_ig_sizes(n, c, h, wd, o, ho, wo, ph, pw, flags, 1), np.uint32(0), np.int32(0), np.uint32(0),
            np.int32(0))
    _ig_launch(_FWD, grid, w.shape, (sh, sw), args, tile)
    return y


def fused_output_shape(x_shape, w_shape, stride, padding):
    """(N, O, Ho // 2, Wo // 2): the 2x2 stride-2 max pool of the convolution's output."""
    n, o, ho, wo = _out_shape(tuple(x_shape), tuple(w_shape), stride, padding)
    if ho < 2 or wo < 2:
        raise ValueError(f"w: the convolution's output {(ho, wo)} is smaller than the 2x2 pooling window")
    return (n, o, ho // 2, wo // 2)


def conv2d_relu_maxpool_fused(x, w, b, y, idx, stride, padding, tile=None):
    """fused: y, idx = max_pool2d(relu(conv(x, w) + b), 2) in one kernel; the conv output is never stored.

    idx (int32) is in kernels/pool.py's format: ho*Wo + wo of the maximum within its (n, o) plane of
    the conv output (Ho, Wo), the first strict maximum of the row-major window winning.
    """
    _check4("x", x)
    _check4("w", w)
    pooled = fused_output_shape(x.shape, w.shape, stride, padding)
    check_device_array("y", y, shape=pooled)
    check_device_array("idx", idx, shape=pooled, dtype=np.int32)
    if b is not None:
        check_device_array("b", b, shape=(pooled[1],))
    conv_shape = _out_shape(tuple(x.shape), tuple(w.shape), stride, padding)
    _ig_check_elements(x=x.shape, w=w.shape, y=conv_shape)
    if 0 in pooled:
        return y, idx
    n, c, h, wd = (int(v) for v in x.shape)
    o, ho, wo = conv_shape[1:]
    sh, sw, ph, pw = _params(stride, padding)
    tile = _ig_tile(_FUSED) if tile is None else tile
    grid = (ceil_div(n * (ho // 2) * (wo // 2) * 4, tile[0]), ceil_div(o, tile[1]), 1)
    bias_arg = b if b is not None else _flat(y)
    args = (_flat(x), _flat(w), _flat(bias_arg), _flat(y), _flat(idx), *_stand_ins()[1:],
            *_ig_sizes(n, c, h, wd, o, ho, wo, ph, pw, int(b is not None) | 2, 1), np.uint32(0), np.int32(0),
            np.uint32(0), np.int32(0))
    _ig_launch(_FUSED, grid, w.shape, (sh, sw), args, tile)
    return y, idx


def conv2d_backward_input_implicit_gemm(dy, w, dx, stride, padding, tile=None, mask=None, pool_idx=None):
    """dx as the transposed implicit GEMM (M = N*H*W, N = C_in, K = C_out*kH*kW); dx written in full.

    ``mask`` (dy's shape): dy counts only where mask > 0 (a ReLU's stored output: the gradient through
    it); with ``pool_idx`` (int32) dy and mask are the 2x2 max pool's gradient and output, routed to
    the conv output through the argmax inside the gather (a Conv -> ReLU -> MaxPool(2) run's backward)."""
    out_shape = _out_shape(_check4("dx", dx), _check4("w", w), stride, padding)
    check_device_array("dy", dy)
    dyop, idx_arg, aux = _dy_reading(dy.shape, out_shape, mask, pool_idx)
    _ig_check_elements(dx=dx.shape, w=w.shape, dy=out_shape)
    if 0 in dx.shape:
        return dx
    n, c, h, wd = (int(v) for v in dx.shape)
    o, ho, wo = out_shape[1:]
    sh, sw, ph, pw = _params(stride, padding)
    tile = _ig_tile(_DGRAD) if tile is None else tile
    grid = (ceil_div(n * h * wd, tile[0]), ceil_div(c, tile[1]), 1)
    stand = _stand_ins()
    args = (_flat(dy), _flat(w), _flat(dx), _flat(dx), stand[0] if idx_arg is None else idx_arg,
            stand[1] if aux is None else aux, *stand[2:],
            *_ig_sizes(n, c, h, wd, o, ho, wo, ph, pw, 0, 1), np.uint32(0), np.int32(0), np.uint32(0),
            np.int32(0))
    _ig_launch(_DGRAD, grid, w.shape, (sh, sw), args, tile, dyop)
    return dx


def wgrad_splits(w_shape, dy_shape, has_bias, splits=None, tile=None, dyop=DY_PLAIN):
    """(splits, K-slices per split) of dW's split-K GEMM: enough blocks to fill the GPU
    (IG_WGRAD_TARGET_BLOCKS), at least IG_WGRAD_MIN_TILES slices each, at most IG_WGRAD_MAX_SPLITS (the
    last block of a tile sums them all); ``splits`` overrides the count."""
    o, c, kh, kw = w_shape
    n, _, ho, wo = dy_shape
    bm, bn, bk = (_ig_tile(_WGRAD, dyop) if tile is None else tile)[:3]
    ktiles = ceil_div(n * ho * wo, bk)
    if splits is None:
        blocks = ceil_div(o, bm) * ceil_div(c * kh * kw + has_bias, bn)
        splits = max(1, min(ceil_div(IG_WGRAD_TARGET_BLOCKS, blocks), ceil_div(ktiles, IG_WGRAD_MIN_TILES),
                            IG_WGRAD_MAX_SPLITS))
    elif isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits: expected a positive int, got {splits!r}")
    per = ceil_div(ktiles, min(int(splits), max(ktiles, 1)))
    return max(1, ceil_div(ktiles, max(per, 1))), max(per, 1)


def conv2d_backward_weight_implicit_gemm(dy, x, dw, stride, padding, db=None, splits=None, tile=None, mask=None,
                                         pool_idx=None):
    """dw (and db when given) as a split-K GEMM with K = N*Ho*Wo; db is the GEMM's extra column of ones.

    One launch: each of the ``splits`` (None: see :func:`wgrad_splits`) writes its partial tile and takes
    a ticket; the last of a tile's splits to arrive adds them in split order (the same bits every run,
    whichever arrives last) and writes dw and db in full. ``mask``, ``pool_idx``: dy read through a ReLU
    (and a 2x2 max pool) as for :func:`conv2d_backward_input_implicit_gemm`.
    """
    out_shape = _out_shape(_check4("x", x), _check4("dw", dw), stride, padding)
    check_device_array("dy", dy)
    dyop, idx_arg, aux = _dy_reading(dy.shape, out_shape, mask, pool_idx)
    if db is not None:
        check_device_array("db", db, shape=(out_shape[1],))
    _ig_check_elements(x=x.shape, dw=dw.shape, dy=out_shape)
    if 0 in dw.shape:
        return dw
    n, c, h, wd = (int(v) for v in x.shape)
    o, ho, wo = out_shape[1:]
    sh, sw, ph, pw = _params(stride, padding)
    if n * ho * wo == 0:  # an empty batch: zero gradients
        fill(dw, 0.0)
        if db is not None:
            fill(db, 0.0)
        return dw
    has_bias = int(db is not None)
    tile = _ig_tile(_WGRAD, dyop) if tile is None else tuple(tile)
    nsplit, per = wgrad_splits(dw.shape, out_shape, has_bias, splits, tile)
    cols = c * dw.shape[2] * dw.shape[3] + has_bias
    _ig_check_elements(partial_tiles=(nsplit, o, cols))
    part = _ig_scratch("wgrad", nsplit * o * cols if nsplit > 1 else 1)
    grid = (ceil_div(o, tile[0]), ceil_div(cols, tile[1]), nsplit)
    tickets = _ig_scratch("tickets", grid[0] * grid[1], np.int32)
    mul_hw, shr_hw = _magic(ho * wo)
    mul_w, shr_w = _magic(wo)
    stand = _stand_ins()
    args = (_flat(dy), _flat(x), db if db is not None else part[:1], _flat(dw),
            stand[0] if idx_arg is None else idx_arg, stand[1] if aux is None else aux, part, tickets,
            *_ig_sizes(n, c, h, wd, o, ho, wo, ph, pw, has_bias, per), np.uint32(mul_hw), np.int32(shr_hw),
            np.uint32(mul_w), np.int32(shr_w))
    _ig_launch(_WGRAD, grid, dw.shape, (sh, sw), args, tile, dyop)
    return dw


_FORWARD = {"naive": conv2d_forward_naive, "tiled": conv2d_forward_tiled,
            "implicit_gemm": conv2d_forward_implicit_gemm}


# --- general: dilation, groups, asymmetric padding (naive kernels, one thread or block per element) ------
#
#   x: (N, C, H, W)   w: (O, C/groups, kH, kW)   y: (N, O, Ho, Wo)
#   y[n, o, ho, wo] = b[o] + Σ_{cl, i, j} x[n, g*Cg + cl, ho*sh - pt + i*dh, wo*sw - pl + j*dw] * w[o, cl, i, j]
#   with Cg = C / groups, Og = O / groups, g = o // Og (the output channel's group).
#
# Only the top/left padding (pt, pl) enters the index math; the bottom/right padding only sets Ho, Wo
# (the y the launcher is given), so PyTorch's asymmetric padding='same' needs nothing more.

# (x, w, b, y, has_bias, sh, sw, pt, pl, dh, dw, groups)
GENERAL_FORWARD_SIGNATURE = (
    "void(float32[:, :, :, ::1], float32[:, :, :, ::1], float32[::1], float32[:, :, :, ::1], "
    "int64, int64, int64, int64, int64, int64, int64, int64)"
)


@kernel(GENERAL_FORWARD_SIGNATURE, block=TPB_1D)
def conv2d_forward_general_kernel(x, w, b, y, has_bias, sh, sw, pt, pl, dh, dw, groups):
    """general: naive forward with dilation and groups (depthwise: groups = C), one thread per output."""
    # x: (N, C, H, W) float32; w: (O, C/groups, kH, kW); b: (O,) (read only when has_bias); y: (N, O, Ho, Wo)
    N, H, W = x.shape[0], x.shape[2], x.shape[3]
    O, CG, KH, KW = w.shape[0], w.shape[1], w.shape[2], w.shape[3]
    Ho, Wo = y.shape[2], y.shape[3]
    OG = O // groups
    t = cuda.grid(1)
    n, o, ho, wo = unravel4(t, O, Ho, Wo)
    if t < N * O * Ho * Wo:
        c0 = (o // OG) * CG  # first input channel of this output channel's group
        h0 = ho * sh - pt
        w0 = wo * sw - pl
        acc = float32(0.0)
        for cl in range(CG):
            for i in range(KH):
                hi = h0 + i * dh
                if hi >= 0 and hi < H:
                    for j in range(KW):
                        wi = w0 + j * dw
                        if wi >= 0 and wi < W:
                            acc += x[n, c0 + cl, hi, wi] * w[o, cl, i, j]
        if has_bias:
            acc += b[o]
        y[n, o, ho, wo] = acc


@kernel("void(float32[:, :, :, ::1], float32[:, :, :, ::1], float32[:, :, :, ::1], "
        "int64, int64, int64, int64, int64, int64, int64)", block=TPB_1D)
def conv2d_backward_input_general_kernel(dy, w, dx, sh, sw, pt, pl, dh, dw, groups):
    """general gather: one thread per input element; taps i*dh apart, only its group's output channels."""
    # dy: (N, O, Ho, Wo) float32; w: (O, C/groups, kH, kW); dx: (N, C, H, W)
    N, C, H, W = dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]
    O, CG, KH, KW = w.shape[0], w.shape[1], w.shape[2], w.shape[3]
    Ho, Wo = dy.shape[2], dy.shape[3]
    OG = O // groups
    t = cuda.grid(1)
    n, c, hx, wx = unravel4(t, C, H, W)
    if t < N * C * H * W:
        g = c // CG
        cl = c - g * CG
        acc = float32(0.0)
        for i in range(KH):
            th = hx + pt - i * dh  # = ho*sh for the output row whose tap i reads row hx
            if th >= 0 and th % sh == 0 and th // sh < Ho:
                a = th // sh
                for j in range(KW):
                    tw = wx + pl - j * dw
                    if tw >= 0 and tw % sw == 0 and tw // sw < Wo:
                        bb = tw // sw
                        for m in range(OG):
                            o = g * OG + m
                            acc += dy[n, o, a, bb] * w[o, cl, i, j]
        dx[n, c, hx, wx] = acc


@kernel("void(float32[:, :, :, ::1], float32[:, :, :, ::1], float32[:, :, :, ::1], "
        "int64, int64, int64, int64, int64, int64, int64)", block=RED_THREADS)
def conv2d_backward_weight_general_kernel(dy, x, dwt, sh, sw, pt, pl, dh, dw, groups):
    """general dW: one block per weight element (o, cl, i, j), strided partial sums, shared-memory tree."""
    # dy: (N, O, Ho, Wo) float32; x: (N, C, H, W); dwt: (O, C/groups, kH, kW), one block per element
    part = cuda.shared.array(RED_THREADS, float32)
    N, H, W = x.shape[0], x.shape[2], x.shape[3]
    O, CG, KH, KW = dwt.shape[0], dwt.shape[1], dwt.shape[2], dwt.shape[3]
    Ho, Wo = dy.shape[2], dy.shape[3]
    OG = O // groups
    tid = cuda.threadIdx.x
    blk = cuda.blockIdx.x
    o, cl, i, j = unravel4(blk, CG, KH, KW)
    valid = blk < O * CG * KH * KW  # uniform over the block: every thread still reaches the barriers
    c = (o // OG) * CG + cl
    total = N * Ho * Wo

    acc = float32(0.0)
    if valid:
        for e0 in range(0, total, RED_THREADS):
            e = e0 + tid
            if e < total:
                n, _, ho, wo = unravel4(e, 1, Ho, Wo)
                hi = ho * sh - pt + i * dh
                wi = wo * sw - pl + j * dw
                if hi >= 0 and hi < H and wi >= 0 and wi < W:
                    acc += dy[n, o, ho, wo] * x[n, c, hi, wi]
    part[tid] = acc
    block_sum(part, tid)
    if valid and tid == 0:
        dwt[o, cl, i, j] = part[0]


def _general_params(stride, pads, dilation, groups):
    """(sh, sw, pt, pl, dh, dw, groups) as Python ints from validated arguments; pads = (top, bottom,
    left, right)."""
    sh, sw, _, _ = _params(stride, (0, 0))
    if not (isinstance(pads, (tuple, list)) and len(pads) == 4 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in pads)):
        raise TypeError(f"padding: expected (top, bottom, left, right) ints >= 0, got {pads!r}")
    dh, dw, _, _ = _params(dilation, (0, 0))
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    return sh, sw, int(pads[0]), int(pads[2]), dh, dw, int(groups)


def general_output_shape(x_shape, w_shape, stride, pads, dilation, groups):
    """(N, O, Ho, Wo) of the general convolution, after checking that x and w fit together."""
    n, c, h, wd = x_shape
    o, cg, kh, kw = w_shape
    sh, sw, _, _, dh, dw, g = _general_params(stride, pads, dilation, groups)
    if c % g or o % g or cg != c // g:
        raise ValueError(f"w: expected (C_out, C_in/groups, kH, kW) with C_in = {c} and C_out divisible by "
                         f"groups = {g}, got w {tuple(w_shape)}")
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    hp, wp = h + pads[0] + pads[1], wd + pads[2] + pads[3]
    if hp < eh or wp < ew:
        raise ValueError(f"w: dilated filter {(eh, ew)} is larger than the padded input {(hp, wp)}")
    return (n, o, (hp - eh) // sh + 1, (wp - ew) // sw + 1)


def conv2d_forward_general(x, w, b, y, stride, pads, dilation, groups):
    """y = conv(x, w) + b with dilation, groups and (top, bottom, left, right) padding; naive, one thread
    per output. b may be None."""
    out_shape = general_output_shape(_check4("x", x), _check4("w", w), stride, pads, dilation, groups)
    check_device_array("y", y, shape=out_shape)
    if b is not None:
        check_device_array("b", b, shape=(out_shape[1],))
    if 0 in out_shape:
        return y
    bias_arg = b if b is not None else y[0, 0, 0]  # never read without a bias
    blocks, threads = grid_1d(int(np.prod(out_shape)))
    conv2d_forward_general_kernel[blocks, threads](x, w, bias_arg, y, int(b is not None),
                                                   *_general_params(stride, pads, dilation, groups))
    return y


def conv2d_backward_input_general(dy, w, dx, stride, pads, dilation, groups):
    """dx of the general convolution, one thread per input element (written in full, no atomics)."""
    out_shape = general_output_shape(_check4("dx", dx), _check4("w", w), stride, pads, dilation, groups)
    check_device_array("dy", dy, shape=out_shape)
    if 0 in dx.shape:
        return dx
    blocks, threads = grid_1d(int(np.prod(dx.shape)))
    conv2d_backward_input_general_kernel[blocks, threads](dy, w, dx, *_general_params(stride, pads, dilation, groups))
    return dx


def conv2d_backward_weight_general(dy, x, dw, stride, pads, dilation, groups):
    """dw of the general convolution, one block per weight element (written in full)."""
    out_shape = general_output_shape(_check4("x", x), _check4("dw", dw), stride, pads, dilation, groups)
    check_device_array("dy", dy, shape=out_shape)
    if 0 in dw.shape:
        return dw
    if out_shape[0] == 0:
        fill(dw, 0.0)
        return dw
    conv2d_backward_weight_general_kernel[int(np.prod(dw.shape)), RED_THREADS](
        dy, x, dw, *_general_params(stride, pads, dilation, groups))
    return dw


def conv2d_general_reference(x, w, b=None, stride=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """float64 y of the general convolution, tap by tap, one group at a time."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    (sh, sw), (dh, dw) = stride, dilation
    n, o, ho, wo = general_output_shape(x.shape, w.shape, stride, pads, dilation, groups)
    cg, kh, kw = w.shape[1:]
    og = o // groups
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[1]), (pads[2], pads[3])))
    y = np.zeros((n, o, ho, wo))
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, i * dh:i * dh + (ho - 1) * sh + 1:sh,
                           j * dw:j * dw + (wo - 1) * sw + 1:sw]
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


# --- dispatcher --------------------------------------------------------------------------------------


def _pick_backward(version, x_shape, w_shape, stride, padding):
    if version is None:
        return "implicit_gemm" if implicit_gemm_supported(x_shape, w_shape, stride, padding) else "direct"
    if version not in BACKWARD_VERSIONS:
        raise ValueError(f"version: unknown conv2d backward version {version!r}; expected one of "
                         f"{', '.join(BACKWARD_VERSIONS)}")
    return version


def conv2d_forward(x, w, b, y, stride, padding, version=None):
    """Device arrays in and out, no allocation: y (N, O, Ho, Wo) is written. b may be None.

    stride, padding: (int, int) pairs. version: one of VERSIONS; None picks ``implicit_gemm`` where it
    applies (see implicit_gemm_supported; on a GPU: IG_FORWARD_DEFAULT), else ``tiled`` where its shared arrays hold the filter and
    stride (kH, kW <= MAX_K, strides <= MAX_STRIDE) on a GPU, else ``naive``.
    """
    _params(stride, padding)
    if version is None:
        if IG_FORWARD_DEFAULT and implicit_gemm_supported(tuple(x.shape), tuple(w.shape), stride, padding):
            version = DEFAULT_VERSION
        else:
            # The simulator runs a block's 256 threads as Python threads meeting at every barrier: the tiled
            # kernel is tested there by name, but as a default it would make whole-model runs crawl.
            tiled_ok = tiled_supported(tuple(w.shape), stride) and not config.ENABLE_CUDASIM
            version = "tiled" if tiled_ok else "naive"
    if version not in _FORWARD:
        raise ValueError(f"version: unknown conv2d forward version {version!r}; expected one of {', '.join(VERSIONS)}")
    return _FORWARD[version](x, w, b, y, stride, padding)


def conv2d_backward_input(dy, w, dx, stride, padding, version=None):
    """Device arrays, no allocation: dx (N, C, H, W) is written in full. version: BACKWARD_VERSIONS
    (None: ``implicit_gemm`` where it applies, else ``direct``, the gather kernel)."""
    if _pick_backward(version, tuple(dx.shape), tuple(w.shape), stride, padding) == "implicit_gemm":
        return conv2d_backward_input_implicit_gemm(dy, w, dx, stride, padding)
    return conv2d_backward_input_gather(dy, w, dx, stride, padding)


def conv2d_backward_weight(dy, x, dw, stride, padding, version=None):
    """Device arrays, no allocation: dw (O, C, kH, kW) is written in full. version: as for dx
    (``direct``: one block per weight element)."""
    if _pick_backward(version, tuple(x.shape), tuple(dw.shape), stride, padding) == "implicit_gemm":
        return conv2d_backward_weight_implicit_gemm(dy, x, dw, stride, padding)
    return conv2d_backward_weight_blocks(dy, x, dw, stride, padding)


def conv2d_backward_bias(dy, db):
    """Device arrays, no allocation: db (O,) is written in full."""
    return conv2d_backward_bias_blocks(dy, db)


def conv2d_backward(dy, x, w, dx, dw, db, stride, padding, version=None):
    """All three gradients, device arrays, no allocation; dx and db may be None (not wanted).

    ``implicit_gemm`` (the default where it applies) computes db in dW's GEMM (its column of ones);
    ``direct`` runs the gather dX, and the block reductions for dW and db.
    """
    version = _pick_backward(version, tuple(x.shape), tuple(w.shape), stride, padding)
    if version == "implicit_gemm":
        if dx is not None:
            conv2d_backward_input_implicit_gemm(dy, w, dx, stride, padding)
        conv2d_backward_weight_implicit_gemm(dy, x, dw, stride, padding, db=db)
        return dx, dw, db
    if dx is not None:
        conv2d_backward_input_gather(dy, w, dx, stride, padding)
    conv2d_backward_weight_blocks(dy, x, dw, stride, padding)
    if db is not None:
        conv2d_backward_bias_blocks(dy, db)
    return dx, dw, db


__all__ = [
    "VERSIONS", "DEFAULT_VERSION", "BACKWARD_VERSIONS", "BACKWARD_INPUT_VERSIONS", "BACKWARD_WEIGHT_VERSIONS",
    "TILE_H", "TILE_W", "MAX_K", "MAX_STRIDE", "RED_THREADS", "IG_GPU_TILES", "IG_SIM_TILE",
    "output_size", "tiled_supported", "implicit_gemm_supported", "fused_output_shape", "wgrad_splits",
    "conv2d_reference", "conv2d_backward_reference", "conv2d_relu_maxpool_reference",
    "conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight", "conv2d_backward_bias",
    "general_output_shape", "conv2d_forward_general", "conv2d_backward_input_general",
    "conv2d_backward_weight_general", "conv2d_general_reference",
    "conv2d_backward", "conv2d_relu_maxpool_fused",
]
