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

from ._common import TPB_1D, check_device_array, device_function, fill, grid_1d, kernel, unravel4

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
        "int64, int64, int64, int64, int64, int64, int64, int64)", block=TPB_1D)
def maxpool_forward_kernel(x, y, idx, kh, kw, sh, sw, ph, pw, dh, dw):
    """direct: one thread per output; cells dh, dw apart, padding skipped, first strict maximum wins."""
    # x: (N, C, H, W) float32; y: (N, C, Ho, Wo) float32; idx: (N, C, Ho, Wo) int32
    N, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    Ho, Wo = y.shape[2], y.shape[3]
    i = cuda.grid(1)
    n, c, ho, wo = unravel4(i, C, Ho, Wo)
    if i < N * C * Ho * Wo:
        h0 = ho * sh - ph
        w0 = wo * sw - pw
        best = NEG_INF
        arg = int32(-1)  # stays -1 only for a window without real cells (excluded by the launcher)
        for ta in range(kh):
            a = h0 + ta * dh
            for tb in range(kw):
                b = w0 + tb * dw
                if a < 0 or a >= H or b < 0 or b >= W:  # padding (or past the edge in ceil_mode): skipped
                    continue
                v = x[n, c, a, b]
                # strictly greater: the first maximum in row-major order keeps its place;
                # NaN beats a number (v != v is the NaN test) but not an earlier NaN
                if arg < 0 or v > best or (v != v and best == best):
                    best = v
                    arg = int32(a * W + b)
        y[n, c, ho, wo] = best
        idx[n, c, ho, wo] = arg


@kernel("void(float32[:, :, :, ::1], int32[:, :, :, ::1], float32[:, :, :, ::1], "
        "int64, int64, int64, int64, int64, int64, int64, int64)", block=TPB_1D)
def maxpool_backward_gather_kernel(dy, idx, dx, kh, kw, sh, sw, ph, pw, dh, dw):
    """gather: one thread per input; sum dy over the outputs whose window holds it and whose idx names it."""
    # dy, idx: (N, C, Ho, Wo) float32 / int32; dx: (N, C, H, W) float32
    N, C, H, W = dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]
    Ho, Wo = dy.shape[2], dy.shape[3]
    i = cuda.grid(1)
    n, c, h, w = unravel4(i, C, H, W)
    if i < N * C * H * W:
        # cell ta of output row a's window is row a*sh - ph + ta*dh: for each tap, the output row whose
        # tap lands on h (t = a*sh >= 0, tested before %, so no negative operand; a < Ho)
        me = int32(h * W + w)
        acc = float32(0.0)
        for ta in range(kh):
            th = h + ph - ta * dh
            if th >= 0 and th % sh == 0 and th // sh < Ho:
                a = th // sh
                for tb in range(kw):
                    tw = w + pw - tb * dw
                    if tw >= 0 and tw % sw == 0 and tw // sw < Wo:
                        b = tw // sw
                        if idx[n, c, a, b] == me:
                            acc += dy[n, c, a, b]
        dx[n, c, h, w] = acc


@kernel("void(float32[:, :, :, ::1], int32[:, :, :, ::1], float32[:, :, :, ::1])", block=TPB_1D)
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


def _params(kernel_size, stride, padding, dilation=(1, 1)):
    """Validate (kh, kw), (sh, sw), (ph, pw), (dh, dw) int pairs; the launchers take them already normalised."""
    for name, value, lo in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                            ("dilation", dilation, 1)):
        if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value)):
            raise TypeError(f"{name}: expected a pair of ints, got {value!r}")
        if value[0] < lo or value[1] < lo:
            raise ValueError(f"{name}: expected values >= {lo}, got {value}")
    (kh, kw), (ph, pw) = kernel_size, padding
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"padding: must be at most kernel_size // 2 = {(kh // 2, kw // 2)}, got {padding}")
    return tuple(int(v) for v in (*kernel_size, *stride, *padding, *dilation))


def pool_output_size(size, k, s, p, d=1, ceil_mode=False):
    """PyTorch's pooled length: floor (or ceil) of (size + 2p - d*(k-1) - 1) / s, plus 1; in ceil mode
    the last window must start inside the input or its left padding, else it is dropped."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _out_shape(x_shape, kernel_size, stride, padding, dilation=(1, 1), ceil_mode=False):
    n, c, h, w = x_shape
    kh, kw, sh, sw, ph, pw, dh, dw = _params(kernel_size, stride, padding, dilation)
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if h + 2 * ph < eh or w + 2 * pw < ew:
        raise ValueError(f"kernel_size: window {(eh, ew)} is larger than the padded input {(h + 2 * ph, w + 2 * pw)}")
    return (n, c, pool_output_size(h, kh, sh, ph, dh, ceil_mode), pool_output_size(w, kw, sw, pw, dw, ceil_mode))


def _check_x(name, a):
    check_device_array(name, a)
    if len(a.shape) != 4:
        raise ValueError(f"{name}: expected a 4-D array (N, C, H, W), got shape {tuple(a.shape)}")
    return tuple(a.shape)


def maxpool2d_forward_direct(x, y, idx, kernel_size, stride, padding, dilation=(1, 1), ceil_mode=False):
    """y, idx = max pool of x; device arrays, y float32 and idx int32 of the pooled shape."""
    out_shape = _out_shape(_check_x("x", x), kernel_size, stride, padding, dilation, ceil_mode)
    check_device_array("y", y, shape=out_shape)
    check_device_array("idx", idx, shape=out_shape, dtype=np.int32)
    if 0 in out_shape:
        return y, idx
    blocks, threads = grid_1d(int(np.prod(out_shape)))
    maxpool_forward_kernel[blocks, threads](
        x, y, idx, *(np.int64(v) for v in _params(kernel_size, stride, padding, dilation)))
    return y, idx


def _check_backward(dy, idx, dx, kernel_size, stride, padding, dilation, ceil_mode):
    out_shape = _out_shape(_check_x("dx", dx), kernel_size, stride, padding, dilation, ceil_mode)
    check_device_array("dy", dy, shape=out_shape)
    check_device_array("idx", idx, shape=out_shape, dtype=np.int32)
    return out_shape


def maxpool2d_backward_gather(dy, idx, dx, kernel_size, stride, padding, dilation=(1, 1), ceil_mode=False):
    """dx = dy routed through idx, one thread per input (deterministic, dx fully written)."""
    _check_backward(dy, idx, dx, kernel_size, stride, padding, dilation, ceil_mode)
    if 0 in dx.shape:
        return dx
    blocks, threads = grid_1d(int(np.prod(dx.shape)))
    maxpool_backward_gather_kernel[blocks, threads](
        dy, idx, dx, *(np.int64(v) for v in _params(kernel_size, stride, padding, dilation)))
    return dx


def maxpool2d_backward_atomic(dy, idx, dx, kernel_size, stride, padding, dilation=(1, 1), ceil_mode=False):
    """dx = dy routed through idx: zero dx, then one thread per output adds atomically."""
    out_shape = _check_backward(dy, idx, dx, kernel_size, stride, padding, dilation, ceil_mode)
    if 0 in dx.shape:
        return dx
    fill(dx, 0.0)
    blocks, threads = grid_1d(int(np.prod(out_shape)))
    maxpool_backward_atomic_kernel[blocks, threads](dy, idx, dx)
    return dx


_BACKWARD = {"gather": maxpool2d_backward_gather, "atomic": maxpool2d_backward_atomic}


# --- dispatcher --------------------------------------------------------------------------------------


def max_pool2d_forward(x, y, idx, kernel_size, stride, padding, dilation=(1, 1), ceil_mode=False):
    """Device arrays in and out, no allocation: y (pooled) and idx (int32 argmax, h*W + w) are written.

    kernel_size, stride, padding, dilation: (int, int) pairs.
    """
    return maxpool2d_forward_direct(x, y, idx, kernel_size, stride, padding, dilation, ceil_mode)


def max_pool2d_backward(dy, idx, dx, kernel_size, stride, padding, version=None, dilation=(1, 1),
                        ceil_mode=False):
    """Device arrays in and out, no allocation: dx (N, C, H, W) is written in full."""
    version = DEFAULT_VERSION if version is None else version
    if version not in _BACKWARD:
        raise ValueError(f"version: unknown max-pool backward version {version!r}; expected one of {', '.join(VERSIONS)}")
    return _BACKWARD[version](dy, idx, dx, kernel_size, stride, padding, dilation, ceil_mode)


# --- average pooling ----------------------------------------------------------------------------------
#
# avg_pool2d (PyTorch's rule): window rows hs = ho*sh - ph .. he = min(hs + kh, H + ph); with
# count_include_pad the divisor is (he - hs) * (we - ws) (padding counted, but not the cells past the
# padded input that ceil_mode windows reach), else the number of real cells. Backward ``gather``: one
# thread per input sums dy / divisor over the outputs whose window holds it (deterministic, no atomics).
#
# adaptive_avg_pool2d: output row i averages input rows floor(i*H/Ho) .. ceil((i+1)*H/Ho) - 1.


@device_function("UniTuple(int64, 5)(int64, int64, int64, int64, int64, int64, int64, int64, int64, int64, int64)")
def _avg_window(ho, wo, H, W, kh, kw, sh, sw, ph, pw, count_include_pad):
    """(hs, he, ws, we, divisor) of output (ho, wo): the window clipped to the input, and its divisor."""
    hs = ho * sh - ph
    ws = wo * sw - pw
    he = min(hs + kh, H + ph)
    we = min(ws + kw, W + pw)
    size = (he - hs) * (we - ws)
    hs = max(hs, 0)
    ws = max(ws, 0)
    he = min(he, H)
    we = min(we, W)
    if not count_include_pad:
        size = (he - hs) * (we - ws)
    return hs, he, ws, we, size


@kernel("void(float32[:, :, :, ::1], float32[:, :, :, ::1], int64, int64, int64, int64, int64, int64, int64)",
        block=TPB_1D)
def avgpool_forward_kernel(x, y, kh, kw, sh, sw, ph, pw, count_include_pad):
    """direct: one thread per output sums its window's real cells and divides by PyTorch's divisor."""
    # x: (N, C, H, W) float32; y: (N, C, Ho, Wo) float32
    N, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    Ho, Wo = y.shape[2], y.shape[3]
    i = cuda.grid(1)
    n, c, ho, wo = unravel4(i, C, Ho, Wo)
    if i < N * C * Ho * Wo:
        hs, he, ws, we, size = _avg_window(ho, wo, H, W, kh, kw, sh, sw, ph, pw, count_include_pad)
        acc = float32(0.0)
        for a in range(hs, he):
            for b in range(ws, we):
                acc += x[n, c, a, b]
        y[n, c, ho, wo] = acc / float32(size)


@kernel("void(float32[:, :, :, ::1], float32[:, :, :, ::1], int64, int64, int64, int64, int64, int64, int64)",
        block=TPB_1D)
def avgpool_backward_gather_kernel(dy, dx, kh, kw, sh, sw, ph, pw, count_include_pad):
    """gather: one thread per input sums dy / divisor over the outputs whose window holds it."""
    # dy: (N, C, Ho, Wo) float32; dx: (N, C, H, W) float32
    N, C, H, W = dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]
    Ho, Wo = dy.shape[2], dy.shape[3]
    i = cuda.grid(1)
    n, c, h, w = unravel4(i, C, H, W)
    if i < N * C * H * W:
        # outputs whose window holds row h: ho*sh - ph <= h <= ho*sh - ph + kh - 1 (no negative operands)
        ho_s = 0
        if h + ph >= kh:
            ho_s = (h + ph - kh) // sh + 1
        ho_e = min((h + ph) // sh + 1, Ho)
        wo_s = 0
        if w + pw >= kw:
            wo_s = (w + pw - kw) // sw + 1
        wo_e = min((w + pw) // sw + 1, Wo)
        acc = float32(0.0)
        for a in range(ho_s, ho_e):
            for b in range(wo_s, wo_e):
                hs, he, ws, we, size = _avg_window(a, b, H, W, kh, kw, sh, sw, ph, pw, count_include_pad)
                acc += dy[n, c, a, b] / float32(size)
        dx[n, c, h, w] = acc


@kernel("void(float32[:, :, :, ::1], float32[:, :, :, ::1])", block=TPB_1D)
def adaptive_avgpool_forward_kernel(x, y):
    """direct: one thread per output averages its adaptive window floor(i*H/Ho) .. ceil((i+1)*H/Ho)."""
    # x: (N, C, H, W) float32; y: (N, C, Ho, Wo) float32
    N, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    Ho, Wo = y.shape[2], y.shape[3]
    i = cuda.grid(1)
    n, c, ho, wo = unravel4(i, C, Ho, Wo)
    if i < N * C * Ho * Wo:
        hs = (ho * H) // Ho
        he = ((ho + 1) * H + Ho - 1) // Ho
        ws = (wo * W) // Wo
        we = ((wo + 1) * W + Wo - 1) // Wo
        acc = float32(0.0)
        for a in range(hs, he):
            for b in range(ws, we):
                acc += x[n, c, a, b]
        y[n, c, ho, wo] = acc / float32((he - hs) * (we - ws))


@kernel("void(float32[:, :, :, ::1], float32[:, :, :, ::1])", block=TPB_1D)
def adaptive_avgpool_backward_gather_kernel(dy, dx):
    """gather: one thread per input sums dy / window size over the (few) outputs whose window holds it."""
    # dy: (N, C, Ho, Wo) float32; dx: (N, C, H, W) float32
    N, C, H, W = dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]
    Ho, Wo = dy.shape[2], dy.shape[3]
    i = cuda.grid(1)
    n, c, h, w = unravel4(i, C, H, W)
    if i < N * C * H * W:
        acc = float32(0.0)
        # output row a holds h iff floor(a*H/Ho) <= h < ceil((a+1)*H/Ho), i.e. floor(h*Ho/H) <= a <
        # ceil((h+1)*Ho/H) (several outputs when Ho > H); the bounds test below re-checks each
        a0 = (h * Ho) // H
        a1 = min(((h + 1) * Ho + H - 1) // H, Ho)
        b0 = (w * Wo) // W
        b1 = min(((w + 1) * Wo + W - 1) // W, Wo)
        for a in range(a0, a1):
            hs = (a * H) // Ho
            he = ((a + 1) * H + Ho - 1) // Ho
            if h >= hs and h < he:
                for b in range(b0, b1):
                    ws = (b * W) // Wo
                    we = ((b + 1) * W + Wo - 1) // Wo
                    if w >= ws and w < we:
                        acc += dy[n, c, a, b] / float32((he - hs) * (we - ws))
        dx[n, c, h, w] = acc


def _avg_params(kernel_size, stride, padding, count_include_pad):
    kh, kw, sh, sw, ph, pw, _, _ = _params(kernel_size, stride, padding)
    return tuple(np.int64(v) for v in (kh, kw, sh, sw, ph, pw, int(bool(count_include_pad))))


def avg_pool2d_forward(x, y, kernel_size, stride, padding, ceil_mode=False, count_include_pad=True):
    """Device arrays, no allocation: y (N, C, Ho, Wo) = average pool of x."""
    out_shape = _out_shape(_check_x("x", x), kernel_size, stride, padding, (1, 1), ceil_mode)
    check_device_array("y", y, shape=out_shape)
    if 0 in out_shape:
        return y
    blocks, threads = grid_1d(int(np.prod(out_shape)))
    avgpool_forward_kernel[blocks, threads](x, y, *_avg_params(kernel_size, stride, padding, count_include_pad))
    return y


def avg_pool2d_backward(dy, dx, kernel_size, stride, padding, ceil_mode=False, count_include_pad=True):
    """Device arrays, no allocation: dx (N, C, H, W) written in full, one thread per input."""
    out_shape = _out_shape(_check_x("dx", dx), kernel_size, stride, padding, (1, 1), ceil_mode)
    check_device_array("dy", dy, shape=out_shape)
    if 0 in dx.shape:
        return dx
    blocks, threads = grid_1d(int(np.prod(dx.shape)))
    avgpool_backward_gather_kernel[blocks, threads](dy, dx, *_avg_params(kernel_size, stride, padding,
                                                                        count_include_pad))
    return dx


def adaptive_avg_pool2d_forward(x, y):
    """Device arrays, no allocation: y (N, C, Ho, Wo) = adaptive average pool of x to y's size."""
    shape = _check_x("x", x)
    check_device_array("y", y)
    if len(y.shape) != 4 or tuple(y.shape[:2]) != shape[:2]:
        raise ValueError(f"y: expected shape (N, C, Ho, Wo) = {shape[:2]} + (Ho, Wo), got {tuple(y.shape)}")
    if 0 in y.shape:
        return y
    blocks, threads = grid_1d(int(np.prod(y.shape)))
    adaptive_avgpool_forward_kernel[blocks, threads](x, y)
    return y


def adaptive_avg_pool2d_backward(dy, dx):
    """Device arrays, no allocation: dx (N, C, H, W) written in full."""
    shape = _check_x("dx", dx)
    check_device_array("dy", dy)
    if len(dy.shape) != 4 or tuple(dy.shape[:2]) != shape[:2]:
        raise ValueError(f"dy: expected shape {shape[:2]} + (Ho, Wo), got {tuple(dy.shape)}")
    if 0 in dx.shape:
        return dx
    blocks, threads = grid_1d(int(np.prod(dx.shape)))
    adaptive_avgpool_backward_gather_kernel[blocks, threads](dy, dx)
    return dx


__all__ = [
    "VERSIONS", "DEFAULT_VERSION", "FORWARD_VERSIONS", "output_size", "pool_output_size", "max_pool2d_forward",
    "max_pool2d_backward", "max_pool2d_reference", "max_pool2d_backward_reference", "avg_pool2d_forward",
    "avg_pool2d_backward", "adaptive_avg_pool2d_forward", "adaptive_avg_pool2d_backward",
]
