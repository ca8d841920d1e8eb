"""2-D max pooling, NCHW, forward (with the argmax of every output) and backward.

Forward, one thread per output (n, c, ho, wo):

    window  rows  ho*sh - ph ... ho*sh - ph + kh - 1,   cols  wo*sw - pw ... wo*sw - pw + kw - 1
    y[n, c, ho, wo]   = max over the window's real cells
    idx[n, c, ho, wo] = h*W + w of that cell, within the unpadded (n, c) plane (int32)

Padding cells are skipped, never treated as 0: an all-negative window with padding returns its largest
real (negative) value. Padding is at most kernel_size // 2 per axis (as in PyTorch), which guarantees
every window holds at least one real cell. Ties: the FIRST maximum in row-major window order wins
(cells are visited row by row, left to right, and only a strictly larger value replaces the best), as
with NumPy's ``argmax`` over the flattened window. NaN wins over any number (it propagates, as in
PyTorch and ``np.argmax``); the first NaN of a window wins.

Backward routes dy through idx: dx[n, c, h, w] = Σ dy[n, c, ho, wo] over the outputs with
idx[n, c, ho, wo] == h*W + w. With stride < kernel the windows overlap and one input can receive from
several outputs, so the scheme must be race-free. Versions (``VERSIONS``, backward):

    gather  (default) one thread per INPUT element: it visits the few outputs whose window contains it
            (at most ceil(kh/sh) * ceil(kw/sw)) and sums dy where idx matches. Each dx element is written
            exactly once, in full (0 where nothing routes): no zero-fill pass, no atomics, and the sum
            has a fixed order, so the result is deterministic, bit for bit, run after run.
    atomic  one thread per OUTPUT element: a fill kernel zeroes dx, then each thread atomically adds its
            dy at idx. Simple, but two launches, atomics that contend where windows overlap, and a
            floating-point sum whose order (hence last bits) varies from run to run.

The forward has one version, ``direct`` (one thread per output, the window read from global memory:
each input is read by ceil(kh/sh) * ceil(kw/sw) threads, from L1/L2 after the first).

Run the checks: ``python -m pytest tests/test_pool.py`` (simulator); build for real GPUs:
``python -m gpu_cnn.compile_check``.
"""
import numpy as np
from numba import cuda, float32, int32

from ._common import check_device_array, fill, grid_1d, kernel, unravel4

VERSIONS = ("gather", "atomic")  # backward versions
DEFAULT_VERSION = "gather"
FORWARD_VERSIONS = ("direct",)

NEG_INF = np.float32(-np.inf)


# --- reference ---------------------------------------------------------------------------------------


def output_size(size, k, s, p):
    """Pooled length of one axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * p - k) // s + 1


def max_pool2d_reference(x, kernel_size, stride, padding):
    """float64 (y, idx) by explicit loops over the windows (padding skipped, first max wins).

    kernel_size, stride, padding: (int, int) pairs. Small shapes only (Python loops).
    """
    x = np.asarray(x, np.float64)
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    n, c, h, w = x.shape
    ho, wo = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    y = np.empty((n, c, ho, wo))
    idx = np.empty((n, c, ho, wo), np.int32)
    for i in range(ho):
        for j in range(wo):
            best, arg = None, None
            for a in range(i * sh - ph, i * sh - ph + kh):
                for b in range(j * sw - pw, j * sw - pw + kw):
                    if 0 <= a < h and 0 <= b < w:
                        v = x[:, :, a, b]
                        if best is None:
                            best, arg = v.copy(), np.full(v.shape, a * w + b)
                        else:
                            win = (v > best) | (np.isnan(v) & ~np.isnan(best))
                            best = np.where(win, v, best)
                            arg = np.where(win, a * w + b, arg)
            y[:, :, i, j] = best
            idx[:, :, i, j] = arg
    return y, idx


def max_pool2d_backward_reference(dy, idx, x_shape):
    """float64 dx: every dy[n, c, i, j] added at its argmax idx[n, c, i, j] (np.add.at handles repeats)."""
    dy = np.asarray(dy, np.float64)
    n, c, h, w = x_shape
    dx = np.zeros((n * c, h * w))
    rows = np.repeat(np.arange(n * c), dy.shape[2] * dy.shape[3])
    np.add.at(dx, (rows, np.asarray(idx).reshape(-1)), dy.reshape(-1))
    return dx.reshape(x_shape)


# --- kernels -----------------------------------------------------------------------------------------


@kernel("void(float32[:, :, :, ::1], float32[:, :, :, ::1], int32[:, :, :, ::1], "
        "int64, int64, int64, int64, int64, int64)")
def maxpool_forward_kernel(x, y, idx, kh, kw, sh, sw, ph, pw):
    """direct: one thread per output; the window clipped to the image, first strict maximum wins."""
    # x: (N, C, H, W) float32; y: (N, C, Ho, Wo) float32; idx: (N, C, Ho, Wo) int32
    N, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    Ho, Wo = y.shape[2], y.shape[3]
    i = cuda.grid(1)
    n, c, ho, wo = unravel4(i, C, Ho, Wo)
    if i < N * C * Ho * Wo:
        # clip the window to the real cells: padding is skipped, never compared
        h0 = ho * sh - ph
        w0 = wo * sw - pw
        hs = max(h0, 0)
        he = min(h0 + kh, H)
        ws = max(w0, 0)
        we = min(w0 + kw, W)
        best = NEG_INF
        arg = int32(-1)  # stays -1 only for a window without real cells (excluded by the launcher)
        for a in range(hs, he):
            for b in range(ws, we):
                v = x[n, c, a, b]
                # strictly greater: the first maximum in row-major order keeps its place;
                # NaN beats a number (v != v is the NaN test) but not an earlier NaN
                if arg < 0 or v > best or (v != v and best == best):
                    best = v
                    arg = int32(a * W + b)
        y[n, c, ho, wo] = best
        idx[n, c, ho, wo] = arg


@kernel("void(float32[:, :, :, ::1], int32[:, :, :, ::1], float32[:, :, :, ::1], "
        "int64, int64, int64, int64, int64, int64)")
def maxpool_backward_gather_kernel(dy, idx, dx, kh, kw, sh, sw, ph, pw):
    """gather: one thread per input; sum dy over the outputs whose window holds it and whose idx names it."""
    # dy, idx: (N, C, Ho, Wo) float32 / int32; dx: (N, C, H, W) float32
    N, C, H, W = dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]
    Ho, Wo = dy.shape[2], dy.shape[3]
    i = cuda.grid(1)
    n, c, h, w = unravel4(i, C, H, W)
    if i < N * C * H * W:
        # outputs whose window holds row h: ho*sh - ph <= h <= ho*sh - ph + kh - 1.
        # The lower bound is written without negative operands (// of a negative is easy to get wrong).
        ho_s = 0
        if h + ph >= kh:
            ho_s = (h + ph - kh) // sh + 1
        ho_e = min((h + ph) // sh + 1, Ho)
        wo_s = 0
        if w + pw >= kw:
            wo_s = (w + pw - kw) // sw + 1
        wo_e = min((w + pw) // sw + 1, Wo)
        me = int32(h * W + w)
        acc = float32(0.0)
        for a in range(ho_s, ho_e):
            for b in range(wo_s, wo_e):
                if idx[n, c, a, b] == me:
                    acc += dy[n, c, a, b]
        dx[n, c, h, w] = acc


@kernel("void(float32[:, :, :, ::1], int32[:, :, :, ::1], float32[:, :, :, ::1])")
def maxpool_backward_atomic_kernel(dy, idx, dx):
    """atomic: one thread per output; atomically add dy at its argmax into a zeroed dx."""
    # dy, idx: (N, C, Ho, Wo) float32 / int32; dx: (N, C, H, W) float32, zeroed by the launcher
    N, C, H, W = dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]
    Ho, Wo = dy.shape[2], dy.shape[3]
    i = cuda.grid(1)
    n, c, ho, wo = unravel4(i, C, Ho, Wo)
    if i < N * C * Ho * Wo:
        k = idx[n, c, ho, wo]
        if k >= 0 and k < H * W:  # a bad index is dropped, never written out of bounds
            a = k // W
            b = k - a * W
            cuda.atomic.add(dx, (n, c, a, b), dy[n, c, ho, wo])


# --- launchers ---------------------------------------------------------------------------------------


def _params(kernel_size, stride, padding):
    """Validate (kh, kw), (sh, sw), (ph, pw) int pairs; the launchers take them already normalised."""
    for name, value, lo in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value)):
            raise TypeError(f"{name}: expected a pair of ints, got {value!r}")
        if value[0] < lo or value[1] < lo:
            raise ValueError(f"{name}: expected values >= {lo}, got {value}")
    (kh, kw), (ph, pw) = kernel_size, padding
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"padding: must be at most kernel_size // 2 = {(kh // 2, kw // 2)}, got {padding}")
    return tuple(int(v) for v in (*kernel_size, *stride, *padding))


def _out_shape(x_shape, kernel_size, stride, padding):
    n, c, h, w = x_shape
    kh, kw, sh, sw, ph, pw = _params(kernel_size, stride, padding)
    if h + 2 * ph < kh or w + 2 * pw < kw:
        raise ValueError(f"kernel_size: window {(kh, kw)} is larger than the padded input {(h + 2 * ph, w + 2 * pw)}")
    return (n, c, output_size(h, kh, sh, ph), output_size(w, kw, sw, pw))


def _check_x(name, a):
    check_device_array(name, a)
    if len(a.shape) != 4:
        raise ValueError(f"{name}: expected a 4-D array (N, C, H, W), got shape {tuple(a.shape)}")
    return tuple(a.shape)


def maxpool2d_forward_direct(x, y, idx, kernel_size, stride, padding):
    """y, idx = max pool of x; device arrays, y float32 and idx int32 of the pooled shape."""
    out_shape = _out_shape(_check_x("x", x), kernel_size, stride, padding)
    check_device_array("y", y, shape=out_shape)
    check_device_array("idx", idx, shape=out_shape, dtype=np.int32)
    blocks, threads = grid_1d(int(np.prod(out_shape)))
    maxpool_forward_kernel[blocks, threads](x, y, idx, *(np.int64(v) for v in _params(kernel_size, stride, padding)))
    return y, idx


def _check_backward(dy, idx, dx, kernel_size, stride, padding):
    out_shape = _out_shape(_check_x("dx", dx), kernel_size, stride, padding)
    check_device_array("dy", dy, shape=out_shape)
    check_device_array("idx", idx, shape=out_shape, dtype=np.int32)
    return out_shape


def maxpool2d_backward_gather(dy, idx, dx, kernel_size, stride, padding):
    """dx = dy routed through idx, one thread per input (deterministic, dx fully written)."""
    _check_backward(dy, idx, dx, kernel_size, stride, padding)
    blocks, threads = grid_1d(int(np.prod(dx.shape)))
    maxpool_backward_gather_kernel[blocks, threads](
        dy, idx, dx, *(np.int64(v) for v in _params(kernel_size, stride, padding)))
    return dx


def maxpool2d_backward_atomic(dy, idx, dx, kernel_size, stride, padding):
    """dx = dy routed through idx: zero dx, then one thread per output adds atomically."""
    out_shape = _check_backward(dy, idx, dx, kernel_size, stride, padding)
    fill(dx, 0.0)
    blocks, threads = grid_1d(int(np.prod(out_shape)))
    maxpool_backward_atomic_kernel[blocks, threads](dy, idx, dx)
    return dx


_BACKWARD = {"gather": maxpool2d_backward_gather, "atomic": maxpool2d_backward_atomic}


# --- dispatcher --------------------------------------------------------------------------------------


def max_pool2d_forward(x, y, idx, kernel_size, stride, padding):
    """Device arrays in and out, no allocation: y (pooled) and idx (int32 argmax, h*W + w) are written.

    kernel_size, stride, padding: (int, int) pairs.
    """
    return maxpool2d_forward_direct(x, y, idx, kernel_size, stride, padding)


def max_pool2d_backward(dy, idx, dx, kernel_size, stride, padding, version=None):
    """Device arrays in and out, no allocation: dx (N, C, H, W) is written in full."""
    version = DEFAULT_VERSION if version is None else version
    if version not in _BACKWARD:
        raise ValueError(f"version: unknown max-pool backward version {version!r}; expected one of {', '.join(VERSIONS)}")
    return _BACKWARD[version](dy, idx, dx, kernel_size, stride, padding)


__all__ = [
    "VERSIONS", "DEFAULT_VERSION", "FORWARD_VERSIONS", "output_size", "max_pool2d_forward", "max_pool2d_backward",
    "max_pool2d_reference", "max_pool2d_backward_reference",
]
