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

Backward, one kernel per gradient, none needs atomics:

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

Run the checks: ``python -m pytest tests/test_conv2d.py`` (simulator); build for real GPUs:
``python -m gpu_cnn.compile_check``.
"""
import numpy as np
from numba import config, cuda, float32

from ._common import block_sum, ceil_div, check_device_array, fill, grid_1d, kernel, unravel4

VERSIONS = ("naive", "tiled")  # forward versions
DEFAULT_VERSION = "tiled"  # where it applies (see tiled_supported), else naive

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


# --- kernels -----------------------------------------------------------------------------------------

# (x, w, b, y, has_bias, sh, sw, ph, pw)
FORWARD_SIGNATURE = (
    "void(float32[:, :, :, ::1], float32[:, :, :, ::1], float32[::1], float32[:, :, :, ::1], "
    "int64, int64, int64, int64, int64)"
)


@kernel(FORWARD_SIGNATURE)
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


@kernel(FORWARD_SIGNATURE)
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


@kernel("void(float32[:, :, :, ::1], float32[:, :, :, ::1], float32[:, :, :, ::1], int64, int64, int64, int64)")
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


@kernel("void(float32[:, :, :, ::1], float32[:, :, :, ::1], float32[:, :, :, ::1], int64, int64, int64, int64)")
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


@kernel("void(float32[:, :, :, ::1], float32[::1])")
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


_FORWARD = {"naive": conv2d_forward_naive, "tiled": conv2d_forward_tiled}


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


@kernel(GENERAL_FORWARD_SIGNATURE)
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
        "int64, int64, int64, int64, int64, int64, int64)")
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
        "int64, int64, int64, int64, int64, int64, int64)")
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


def conv2d_forward(x, w, b, y, stride, padding, version=None):
    """Device arrays in and out, no allocation: y (N, O, Ho, Wo) is written. b may be None.

    stride, padding: (int, int) pairs. version: one of VERSIONS; None picks ``tiled`` where its shared
    arrays hold the filter and stride (kH, kW <= MAX_K, strides <= MAX_STRIDE) on a GPU, else ``naive``
    (always ``naive`` under the simulator).
    """
    _params(stride, padding)
    if version is None:
        # The simulator runs a block's 256 threads as Python threads meeting at every barrier: the tiled
        # kernel is tested there by name, but as a default it would make whole-model runs crawl.
        tiled_ok = tiled_supported(tuple(w.shape), stride) and not config.ENABLE_CUDASIM
        version = DEFAULT_VERSION if tiled_ok else "naive"
    if version not in _FORWARD:
        raise ValueError(f"version: unknown conv2d forward version {version!r}; expected one of {', '.join(VERSIONS)}")
    return _FORWARD[version](x, w, b, y, stride, padding)


def conv2d_backward_input(dy, w, dx, stride, padding):
    """Device arrays, no allocation: dx (N, C, H, W) is written in full."""
    return conv2d_backward_input_gather(dy, w, dx, stride, padding)


def conv2d_backward_weight(dy, x, dw, stride, padding):
    """Device arrays, no allocation: dw (O, C, kH, kW) is written in full."""
    return conv2d_backward_weight_blocks(dy, x, dw, stride, padding)


def conv2d_backward_bias(dy, db):
    """Device arrays, no allocation: db (O,) is written in full."""
    return conv2d_backward_bias_blocks(dy, db)


__all__ = [
    "VERSIONS", "DEFAULT_VERSION", "TILE_H", "TILE_W", "MAX_K", "MAX_STRIDE", "RED_THREADS",
    "output_size", "tiled_supported", "conv2d_reference", "conv2d_backward_reference",
    "conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight", "conv2d_backward_bias",
    "general_output_shape", "conv2d_forward_general", "conv2d_backward_input_general",
    "conv2d_backward_weight_general", "conv2d_general_reference",
]
