"""2-D max pooling (NCHW) with the argmax of every output, and its backward.

``idx`` holds, for every output, the flat position ``h*W + w`` of its maximum inside the unpadded
(n, c) input plane, as int32. Padding cells are skipped, never treated as 0 (an all-negative window
returns its largest real value); padding may be at most kernel_size // 2 per axis (as in PyTorch), so
every window holds a real cell. Ties: the first maximum in row-major window order wins. NaN wins over
numbers (the first NaN of a window), as in PyTorch and ``np.argmax``.

cpu: vectorized NumPy.
  forward   the windows as a (kh, kw, N, C, Ho, Wo) array: in the common non-overlapping unpadded case
            (kernel == stride) a reshape of the input to (N, C, Ho, kh, Wo, kw), made contiguous in
            that order (one copy of x); otherwise a strided view of ``sliding_window_view`` of the input
            (padded with -inf) taken every stride. A running first maximum over the kh*kw cells in
            row-major order (compare, max, keep the cell where strictly greater) gives the answer of
            ``argmax`` over the flattened window at a third of the cost (NumPy's argmax along a short
            axis goes row by row); when a NaN shows up, the flattened-window ``argmax`` itself runs
            (it ranks NaN first, as the kernels do).
  backward  dx is zeroed, then dy scattered through flat indices (n*C + c)*H*W + idx: a plain
            fancy-index assignment when windows cannot overlap (stride >= kernel: each input receives
            at most one dy), ``np.add.at`` when they can (adds repeats in order: deterministic).
cuda/sim: :mod:`gpu_cnn.kernels.pool` (forward one thread per output; backward ``gather``, the
deterministic default, or ``atomic``).
"""
import numbers

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .. import backend as _backend
from ._base import (
    _as_cuda_array, as_input, check_no_overlap, check_out, check_shape, check_version, empty, is_device_array, pair, result,
    to_device,
)

_LAYOUT = "(N, C, H, W)"
INDEX = np.int32
# = gpu_cnn.kernels.pool.VERSIONS (not imported from there on cpu; the tests check the two agree)
BACKWARD_VERSIONS = ("gather", "atomic")


# ---------------------------------------------------------------------------------------------------
# argument checks


def _params(kernel_size, stride, padding):
    """-> (kh, kw), (sh, sw), (ph, pw), validated; stride None (or PyTorch's empty list) means kernel_size."""
    k = pair("kernel_size", kernel_size, 1)
    s = k if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else pair("stride", stride, 1)
    p = pair("padding", padding, 0)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(
            f"padding: must be at most kernel_size // 2 = {(k[0] // 2, k[1] // 2)} per axis "
            f"(so every window holds a real cell), got {p} with kernel_size {k}")
    return k, s, p


def _pooled(size, k, s, p, d=1, ceil_mode=False):
    """PyTorch's pooled length (= gpu_cnn.kernels.pool.pool_output_size): floor or ceil of
    (size + 2p - d*(k-1) - 1) / s, plus 1; in ceil mode a last window that would start past the input
    and its left padding is dropped."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _out_shape(x_shape, k, s, p, d=(1, 1), ceil_mode=False):
    n, c, h, w = x_shape
    e = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)
    if h + 2 * p[0] < e[0] or w + 2 * p[1] < e[1]:
        what = f"window {k}" if d == (1, 1) else f"window {k} with dilation {d} (spanning {e})"
        raise ValueError(
            f"kernel_size: {what} is larger than the padded input {(h + 2 * p[0], w + 2 * p[1])} "
            f"(input {(h, w)}, padding {p})")
    return (n, c, _pooled(h, k[0], s[0], p[0], d[0], ceil_mode), _pooled(w, k[1], s[1], p[1], d[1], ceil_mode))


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def _unbatch(name, a, what="pooling"):
    """(a as a 4-D batch, whether it came unbatched (C, H, W)); other ranks are left to the rank checks."""
    shape = getattr(a, "shape", None)
    if shape is None and a is not None:
        a = np.asarray(a)
        shape = a.shape
    if shape is not None and len(shape) == 3:
        return a.reshape((1,) + tuple(shape)), True
    if shape is not None and len(shape) in (2, 5):
        kind = "1-D" if len(shape) == 2 else "3-D"
        raise ValueError(f"{name}: {kind} {what} ({len(shape)}-D input) is not supported; it takes (N, C, H, W) "
                         f"or unbatched (C, H, W), got shape {tuple(shape)}")
    return a, False


def _rebatch(a, unbatched):
    return a.reshape(tuple(a.shape[1:])) if unbatched else a


def _out_batched(out, unbatched):
    if out is None or not unbatched:
        return out
    if isinstance(out, (tuple, list)):
        return type(out)(_out_batched(o, True) for o in out)
    return out.reshape((1,) + tuple(out.shape)) if len(getattr(out, "shape", ())) == 3 else out


def _x_shape(x_shape):
    if not (isinstance(x_shape, (tuple, list)) and len(x_shape) == 4 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in x_shape)):
        raise TypeError(f"x_shape: expected the input shape (N, C, H, W) as 4 ints, got {x_shape!r}")
    x_shape = tuple(int(v) for v in x_shape)
    if x_shape[0] < 0 or min(x_shape[1:]) < 1:  # an empty batch (N = 0), as max_pool2d accepts
        raise ValueError(f"x_shape: every dimension must be >= 1 (N may be 0), got {x_shape}")
    return x_shape


def _as_index(name, idx, shape, x_shape, k, s, p, check_windows=True, d=(1, 1)):
    """Argmax indices -> int32 of `shape` where the backend computes (host int arrays are converted).

    Host indices are checked on the host, before any cast: each must name a cell of its own window, as
    max_pool2d's do, so that every backend and version computes the same dx. Device indices are taken
    as they are (checking them would copy them back): pass the idx max_pool2d returned.
    """
    if idx is None:
        raise TypeError(f"{name}: expected an int32 index array, got None")
    if is_device_array(idx):
        if not _backend.uses_kernels():
            raise TypeError(f"{name}: a device array was passed but the backend is 'cpu'; pass a NumPy array")
        dev = _as_cuda_array(idx)
        if np.dtype(dev.dtype) != INDEX:
            raise TypeError(f"{name}: device index arrays must be int32, got {np.dtype(dev.dtype).name}")
        check_shape(name, dev, shape)
        if not dev.is_c_contiguous():
            raise ValueError(f"{name}: device arrays must be C-contiguous")
        return dev
    host = np.asarray(idx)
    if not np.issubdtype(host.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer index array (int32, from max_pool2d), got dtype {host.dtype.name}")
    check_shape(name, host, shape)
    _check_in_windows(name, host, x_shape, k, s, p, check_windows, d)
    host = np.ascontiguousarray(host, dtype=INDEX)
    return to_device(host) if _backend.uses_kernels() else host


def _check_in_windows(name, idx, x_shape, k, s, p, check_windows=True, d=(1, 1)):
    """Every idx[n, c, i, j] = h*W + w lies in [0, H*W) (always: two cheap passes, before the int32 cast),
    and names a real cell of output (i, j)'s window (when ``check_windows``)."""
    h, w = x_shape[2:]
    if idx.size == 0:
        return
    if idx.min() < 0 or idx.max() >= h * w:
        bad = idx[(idx < 0) | (idx >= h * w)].flat[0]
        raise ValueError(f"{name}: indices must lie in [0, H*W) = [0, {h * w}), found {int(bad)}")
    if not check_windows:
        return
    i64 = idx.astype(np.int64)
    rows, cols = i64 // w, i64 % w
    r0 = (np.arange(idx.shape[2]) * s[0] - p[0])[:, None]
    c0 = (np.arange(idx.shape[3]) * s[1] - p[1])[None, :]
    e = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)
    outside = (rows < r0) | (rows >= r0 + e[0]) | (cols < c0) | (cols >= c0 + e[1])
    if d != (1, 1):  # a dilated window holds every d-th cell only
        outside |= ((rows - r0) % d[0] != 0) | ((cols - c0) % d[1] != 0)
    if outside.any():
        n, c, i, j = (int(v[0]) for v in np.nonzero(outside))
        raise ValueError(
            f"{name}: idx[{n}, {c}, {i}, {j}] = {int(idx[n, c, i, j])} (row {int(rows[n, c, i, j])}, column "
            f"{int(cols[n, c, i, j])}) is outside that output's window (rows {int(r0[i, 0])}..{int(r0[i, 0]) + e[0] - 1}, "
            f"columns {int(c0[0, j])}..{int(c0[0, j]) + e[1] - 1}); pass the idx that max_pool2d returned")


# ---------------------------------------------------------------------------------------------------
# cpu


def _windows(x, k, s, p, out_hw):
    """The pooling windows as a (kh, kw, N, C, Ho, Wo) array: win[i, j] is cell (i, j) of every window.

    Non-overlapping and unpadded (kernel == stride): a reshape of the (cropped) input to
    (N, C, Ho, kh, Wo, kw), made contiguous in the order above (one copy of x; every later pass then
    streams contiguous memory). Otherwise a strided view of ``sliding_window_view`` of the input taken
    every stride (padded with -inf first when there is padding), with no copy of the windows.
    """
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    n, c = x.shape[:2]
    ho, wo = out_hw
    if p == (0, 0) and k == s:
        blocks = x[:, :, : ho * kh, : wo * kw].reshape(n, c, ho, kh, wo, kw)
        return np.ascontiguousarray(blocks.transpose(3, 5, 0, 1, 2, 4))
    if p != (0, 0):
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :ho, :wo]
    return win.transpose(4, 5, 0, 1, 2, 3)


def _cpu_forward(x, k, s, p, y, idx):
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    h, w = x.shape[2:]
    ho, wo = y.shape[2:]
    win = _windows(x, k, s, p, (ho, wo))
    # offset of window cell (i, j) from the window origin, in the plane: i*W + j
    table = (np.arange(kh, dtype=INDEX)[:, None] * w + np.arange(kw, dtype=INDEX)).ravel()
    # A running first maximum over the cells in row-major order t = 0 .. kh*kw-1 (what argmax over the
    # flattened window computes, without NumPy's slow row-by-row argmax along a short axis): a later
    # cell replaces the best only when strictly greater. The value kept is table[t], or t itself when
    # the table is not increasing (kw > W, possible only with padding). Both only grow with t, so
    # "acc = v where cell > y" is max(acc, v * (cell > y)): two cheap passes, no masked copy.
    increasing = kw <= w
    acc = idx if increasing else np.empty(y.shape, INDEX)
    acc.fill(0)  # cell 0: table[0] == 0
    gt = np.empty(y.shape, bool)
    tmp = np.empty(y.shape, INDEX)
    np.copyto(y, win[0, 0])
    for t in range(1, kh * kw):
        cell = win[t // kw, t % kw]
        np.greater(cell, y, out=gt)
        np.maximum(y, cell, out=y)
        np.multiply(gt, table[t] if increasing else INDEX(t), out=tmp)
        np.maximum(acc, tmp, out=acc)
    q = None if increasing else acc  # the winning cell t of every window, when kept
    if np.isnan(y).any():  # comparisons with NaN are false: redo with argmax, which ranks NaN first
        flat = win.reshape((kh * kw,) + y.shape)  # a copy when win is a strided view; NaN input only
        q = flat.argmax(axis=0)
        np.copyto(y, np.take_along_axis(flat, q[None], axis=0)[0])
    if q is not None:
        np.take(table, q, out=idx)
    # plus the window origin (h0, w0) = (ho*sh - ph, wo*sw - pw): idx = h*W + w in the unpadded plane
    h0 = np.arange(ho, dtype=INDEX) * sh - ph
    w0 = np.arange(wo, dtype=INDEX) * sw - pw
    origin = h0[:, None] * w + w0
    idx += origin
    if p != (0, 0) and np.isneginf(y).any():
        # a window whose real cells are all -inf ties with its -inf padding, which may come first in
        # row-major order: point those at the window's first real cell instead
        n_, c_, i_, j_ = np.nonzero(np.isneginf(y))
        if q is None:  # idx - origin = i*W + j with j < kw <= W
            a, b = np.divmod(idx[n_, c_, i_, j_] - origin[i_, j_], w)
        else:
            a, b = np.divmod(q[n_, c_, i_, j_], kw)
        a, b = a + h0[i_], b + w0[j_]
        pad = (a < 0) | (a >= h) | (b < 0) | (b >= w)
        n_, c_, i_, j_ = n_[pad], c_[pad], i_[pad], j_[pad]
        idx[n_, c_, i_, j_] = np.maximum(h0[i_], 0) * w + np.maximum(w0[j_], 0)


def _cpu_backward(dy, idx, dx, k, s):
    n, c, h, w = dx.shape
    plane = h * w  # idx was checked against the windows in _as_index
    if dx.size == 0:
        return
    flat = ((np.arange(n * c, dtype=np.intp) * plane)[:, None] + idx.reshape(n * c, -1)).reshape(-1)
    dx.fill(0)
    if s[0] >= k[0] and s[1] >= k[1]:  # windows cannot overlap: each input receives at most one dy
        dx.reshape(-1)[flat] = dy.reshape(-1)
    else:  # overlapping windows: add repeats (unbuffered, in order: deterministic)
        np.add.at(dx.reshape(-1), flat, dy.reshape(-1))


# ---------------------------------------------------------------------------------------------------
# public ops


def max_pool2d(x, kernel_size=2, stride=None, padding=0, dilation=1, ceil_mode=False, *, out=None):
    """Max pooling of x (N, C, H, W) (or unbatched (C, H, W)): returns (y, idx), both (N, C, Ho, Wo).

    Ho = floor((H + 2*ph - dh*(kh-1) - 1) / sh) + 1 (likewise Wo; ``ceil_mode``: ceil, and a last
    window that would start past the input and its left padding is dropped, as in PyTorch).
    kernel_size, stride, padding, dilation: an int or a pair (rows, cols); stride defaults to
    kernel_size; padding <= kernel_size // 2 per axis, padded cells never win; a window holds every
    dilation-th cell. ``idx`` (int32) is the position h*W + w of each maximum within its unpadded (n, c)
    plane; ties go to the FIRST maximum in row-major window order; NaN wins (the first NaN). ``out`` =
    (y, idx): preallocated float32 and int32 arrays (no allocation). Host float64 input is computed in
    float32; host input gives host results (idx as int32).
    """
    k, s, p = _params(kernel_size, stride, padding)
    d = pair("dilation", dilation, 1)
    ceil_mode = _flag("ceil_mode", ceil_mode)
    x, unbatched = _unbatch("x", x)
    out = _out_batched(out, unbatched)
    x, on_host = as_input("x", x, 4, _LAYOUT)
    if min(x.shape[1:]) < 1:
        raise ValueError(f"x: expected C, H, W >= 1, got shape {tuple(x.shape)}")
    out_shape = _out_shape(tuple(x.shape), k, s, p, d, ceil_mode)
    if out is None:
        y, idx = empty(out_shape), empty(out_shape, INDEX)
    else:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError("out: expected a tuple (y, idx) of a float32 and an int32 array")
        y = check_out("out[0] (y)", out[0], out_shape)
        idx = check_out("out[1] (idx)", out[1], out_shape, dtype=INDEX)
    check_no_overlap([("out[0] (y)", y), ("out[1] (idx)", idx)], [("x", x)])

    if not _backend.uses_kernels():
        plain = out_shape == _out_shape(tuple(x.shape), k, s, p) and d == (1, 1)
        (_cpu_forward if plain else _cpu_forward_general)(x, k, s, p, y, idx, *(() if plain else (d,)))
        return _rebatch(y, unbatched), _rebatch(idx, unbatched)
    from ..kernels import pool as kpool

    kpool.max_pool2d_forward(x, y, idx, k, s, p, d, ceil_mode)
    return _rebatch(result(y, on_host), unbatched), _rebatch(result(idx, on_host), unbatched)


def max_pool2d_backward(dy, idx, x_shape, kernel_size=2, stride=None, padding=0, dilation=1, ceil_mode=False, *,
                        out=None, version=None, check_idx=True):
    """Gradient of :func:`max_pool2d`: dx (x_shape) with every dy added at its argmax idx.

    dy: (N, C, Ho, Wo) float; idx: (N, C, Ho, Wo) int32 from max_pool2d with the same kernel_size,
    stride, padding, dilation and ceil_mode; x_shape: the input's (N, C, H, W) (or (C, H, W), with
    unbatched dy and idx). dx is WRITTEN in full (0 where no output routes; summed where overlapping
    windows share a maximum). ``out``: a preallocated float32 array of x_shape (no allocation).
    ``version`` picks the backward kernel on cuda/sim (``gpu_cnn.kernels.pool.VERSIONS``: ``gather``,
    the deterministic default, or ``atomic``); ignored on cpu. Host float64 input is computed in
    float32. Host ``idx`` are checked to name a cell of their own window (every backend then computes
    the same dx); ``check_idx=False`` skips the window pass (the range check stays), for idx straight
    from max_pool2d (as nn.MaxPool2d passes them). Device idx are never checked.
    """
    check_version(version, BACKWARD_VERSIONS, "max-pool backward")
    k, s, p = _params(kernel_size, stride, padding)
    d = pair("dilation", dilation, 1)
    ceil_mode = _flag("ceil_mode", ceil_mode)
    unbatched = isinstance(x_shape, (tuple, list)) and len(x_shape) == 3
    if unbatched:
        x_shape = (1,) + tuple(x_shape)
        dy, idx = _unbatch("dy", dy)[0], _unbatch("idx", idx)[0]
        out = _out_batched(out, True)
    x_shape = _x_shape(x_shape)
    out_shape = _out_shape(x_shape, k, s, p, d, ceil_mode)
    dy, on_host = as_input("dy", dy, 4, _LAYOUT)
    check_shape("dy", dy, out_shape)
    idx = _as_index("idx", idx, out_shape, x_shape, k, s, p, check_windows=check_idx, d=d)
    dx = empty(x_shape) if out is None else check_out("out", out, x_shape)
    check_no_overlap([("out", dx)], [("dy", dy), ("idx", idx)])

    if not _backend.uses_kernels():
        if not dx.flags.c_contiguous:
            raise ValueError("out: expected a C-contiguous array")
        e = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)  # windows may overlap when stride < span
        _cpu_backward(dy, idx, dx, e, s)
        return _rebatch(dx, unbatched)
    from ..kernels import pool as kpool

    kpool.max_pool2d_backward(dy, idx, dx, k, s, p, version=version, dilation=d, ceil_mode=ceil_mode)
    return _rebatch(result(dx, on_host), unbatched)


def _cpu_forward_general(x, k, s, p, y, idx, d):
    """Dilation and ceil_mode: the windows of an input padded with -inf (more at the bottom/right where
    ceil_mode windows reach past it), every d-th cell; argmax over the flattened window (first maximum,
    NaN first, as the kernels)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, s, p, d
    n, c, h, w = x.shape
    ho, wo = y.shape[2:]
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    extra_h = max(0, (ho - 1) * sh + eh - (h + 2 * ph))
    extra_w = max(0, (wo - 1) * sw + ew - (w + 2 * pw))
    pads = ((0, 0), (0, 0), (ph, ph + extra_h), (pw, pw + extra_w))
    xp = np.pad(x, pads, constant_values=-np.inf)
    real = np.pad(np.ones((h, w), bool), pads[2:])
    win = sliding_window_view(xp, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :ho, :wo, ::dh, ::dw]
    flat = win.reshape(n, c, ho, wo, kh * kw)
    q = flat.argmax(axis=-1)
    rwin = sliding_window_view(real, (eh, ew))[::sh, ::sw][:ho, :wo, ::dh, ::dw].reshape(ho, wo, kh * kw)
    np.copyto(y, np.take_along_axis(flat, q[..., None], axis=-1)[..., 0])
    # a window whose real cells are all -inf ties with its padding: take its first real cell
    first_real = rwin.argmax(axis=-1)
    q = np.where(np.isneginf(y) & ~np.take_along_axis(np.broadcast_to(rwin, flat.shape), q[..., None], -1)[..., 0],
                 first_real, q)
    rows = (np.arange(ho) * sh - ph)[:, None] + (q // kw) * dh
    cols = (np.arange(wo) * sw - pw)[None, :] + (q % kw) * dw
    np.copyto(idx, (rows * w + cols).astype(INDEX))


# ---------------------------------------------------------------------------------------------------
# average pooling
#
# avg_pool2d: PyTorch's divisor rule. The window of output (ho, wo) runs over rows hs = ho*sh - ph ..
# he = min(hs + kh, H + ph) (cells past the padded input, which ceil_mode windows reach, are never
# counted); with count_include_pad the divisor is (he - hs)*(we - ws), padding included; without it,
# the number of real cells. cpu: the zero-padded input's windows summed tap by tap, divided by a
# (Ho, Wo) table of divisors; backward adds dy / divisor into every tap's cells of a padded dx.
# adaptive_avg_pool2d: output row i averages rows floor(i*H/Ho) .. ceil((i+1)*H/Ho) - 1 (likewise
# columns); cpu loops over the Ho*Wo outputs (1 for global pooling), each a vectorised mean.


def _avg_divisors(h, w, ho, wo, k, s, p, count_include_pad):
    def axis(size, n_out, kk, ss, pp):
        start = np.arange(n_out) * ss - pp
        end = np.minimum(start + kk, size + pp)
        full = end - start
        real = np.minimum(end, size) - np.maximum(start, 0)
        return full, real
    fh, rh = axis(h, ho, k[0], s[0], p[0])
    fw, rw = axis(w, wo, k[1], s[1], p[1])
    return (np.outer(fh, fw) if count_include_pad else np.outer(rh, rw)).astype(np.float32)


def _avg_padded(h, w, ho, wo, k, s, p):
    extra_h = max(0, (ho - 1) * s[0] + k[0] - (h + 2 * p[0]))
    extra_w = max(0, (wo - 1) * s[1] + k[1] - (w + 2 * p[1]))
    return ((0, 0), (0, 0), (p[0], p[0] + extra_h), (p[1], p[1] + extra_w))


def _avg_args(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    if divisor_override is not None:
        raise ValueError(f"divisor_override: not supported by gpu-cnn (got {divisor_override!r}); leave it None")
    k, s, p = _params(kernel_size, stride, padding)
    return k, s, p, _flag("ceil_mode", ceil_mode), _flag("count_include_pad", count_include_pad)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None, *, out=None):
    """Average pooling of x (N, C, H, W) (or unbatched (C, H, W)), PyTorch's arguments and output size
    (as :func:`max_pool2d`, without dilation). ``count_include_pad``: the padding counts in the
    divisor (cells past the padded input never do). ``divisor_override`` is not supported (an error).
    ``out``: a preallocated float32 array (no allocation)."""
    k, s, p, ceil_mode, cip = _avg_args(kernel_size, stride, padding, ceil_mode, count_include_pad,
                                        divisor_override)
    x, unbatched = _unbatch("x", x)
    out = _out_batched(out, unbatched)
    x, on_host = as_input("x", x, 4, _LAYOUT)
    if min(x.shape[1:]) < 1:
        raise ValueError(f"x: expected C, H, W >= 1, got shape {tuple(x.shape)}")
    out_shape = _out_shape(tuple(x.shape), k, s, p, (1, 1), ceil_mode)
    y = empty(out_shape) if out is None else check_out("out", out, out_shape)
    if not _backend.uses_kernels():
        n, c, h, w = x.shape
        ho, wo = out_shape[2:]
        xp = np.pad(x, _avg_padded(h, w, ho, wo, k, s, p))
        acc = np.zeros(out_shape, np.float32)
        for i in range(k[0]):
            for j in range(k[1]):
                acc += xp[:, :, i:i + (ho - 1) * s[0] + 1:s[0], j:j + (wo - 1) * s[1] + 1:s[1]]
        np.divide(acc, _avg_divisors(h, w, ho, wo, k, s, p, cip), out=y)
        return _rebatch(y, unbatched)
    from ..kernels import pool as kpool

    kpool.avg_pool2d_forward(x, y, k, s, p, ceil_mode, cip)
    return _rebatch(result(y, on_host), unbatched)


def avg_pool2d_backward(dy, x_shape, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                        divisor_override=None, *, out=None):
    """Gradient of :func:`avg_pool2d`: dx (x_shape), WRITTEN in full: every input gets dy / divisor of
    each output whose window holds it."""
    k, s, p, ceil_mode, cip = _avg_args(kernel_size, stride, padding, ceil_mode, count_include_pad,
                                        divisor_override)
    unbatched = isinstance(x_shape, (tuple, list)) and len(x_shape) == 3
    if unbatched:
        x_shape = (1,) + tuple(x_shape)
        dy = _unbatch("dy", dy)[0]
        out = _out_batched(out, True)
    x_shape = _x_shape(x_shape)
    out_shape = _out_shape(x_shape, k, s, p, (1, 1), ceil_mode)
    dy, on_host = as_input("dy", dy, 4, _LAYOUT)
    check_shape("dy", dy, out_shape)
    dx = empty(x_shape) if out is None else check_out("out", out, x_shape)
    if not _backend.uses_kernels():
        n, c, h, w = x_shape
        ho, wo = out_shape[2:]
        pads = _avg_padded(h, w, ho, wo, k, s, p)
        dxp = np.zeros((n, c, h + pads[2][0] + pads[2][1], w + pads[3][0] + pads[3][1]), np.float32)
        g = dy / _avg_divisors(h, w, ho, wo, k, s, p, cip)
        for i in range(k[0]):
            for j in range(k[1]):
                dxp[:, :, i:i + (ho - 1) * s[0] + 1:s[0], j:j + (wo - 1) * s[1] + 1:s[1]] += g
        np.copyto(dx, dxp[:, :, p[0]:p[0] + h, p[1]:p[1] + w])
        return _rebatch(dx, unbatched)
    from ..kernels import pool as kpool

    kpool.avg_pool2d_backward(dy, dx, k, s, p, ceil_mode, cip)
    return _rebatch(result(dx, on_host), unbatched)


def _adaptive_size(output_size, hw):
    """output_size (an int, a pair, None entries meaning the input's size) -> (Ho, Wo)."""
    if isinstance(output_size, (tuple, list)) and len(output_size) == 2:
        output_size = tuple(hw[i] if v is None else v for i, v in enumerate(output_size))
    return pair("output_size", output_size, 1)


def _windows_1d(size, n_out):
    return [((i * size) // n_out, -(-((i + 1) * size) // n_out)) for i in range(n_out)]


def adaptive_avg_pool2d(x, output_size, *, out=None):
    """Adaptive average pooling of x (N, C, H, W) (or unbatched (C, H, W)) to (N, C, Ho, Wo):
    output row i averages input rows floor(i*H/Ho) .. ceil((i+1)*H/Ho) - 1 (likewise columns), as in
    PyTorch; ``output_size=1`` is global average pooling. output_size: an int or a pair (an entry None
    keeps the input's size)."""
    x, unbatched = _unbatch("x", x)
    out = _out_batched(out, unbatched)
    x, on_host = as_input("x", x, 4, _LAYOUT)
    if min(x.shape[1:]) < 1:
        raise ValueError(f"x: expected C, H, W >= 1, got shape {tuple(x.shape)}")
    ho, wo = _adaptive_size(output_size, tuple(x.shape[2:]))
    out_shape = (x.shape[0], x.shape[1], ho, wo)
    y = empty(out_shape) if out is None else check_out("out", out, out_shape)
    if not _backend.uses_kernels():
        for i, (hs, he) in enumerate(_windows_1d(x.shape[2], ho)):
            for j, (ws, we) in enumerate(_windows_1d(x.shape[3], wo)):
                y[:, :, i, j] = x[:, :, hs:he, ws:we].mean(axis=(2, 3), dtype=np.float32)
        return _rebatch(y, unbatched)
    from ..kernels import pool as kpool

    kpool.adaptive_avg_pool2d_forward(x, y)
    return _rebatch(result(y, on_host), unbatched)


def adaptive_avg_pool2d_backward(dy, x_shape, *, out=None):
    """Gradient of :func:`adaptive_avg_pool2d`: dx (x_shape), WRITTEN in full (dy / window size added
    into each output's window)."""
    unbatched = isinstance(x_shape, (tuple, list)) and len(x_shape) == 3
    if unbatched:
        x_shape = (1,) + tuple(x_shape)
        dy = _unbatch("dy", dy)[0]
        out = _out_batched(out, True)
    x_shape = _x_shape(x_shape)
    dy, on_host = as_input("dy", dy, 4, _LAYOUT)
    if tuple(dy.shape[:2]) != x_shape[:2] or min(dy.shape[2:]) < 1:
        raise ValueError(f"dy: expected shape {x_shape[:2]} + (Ho, Wo), got {tuple(dy.shape)}")
    dx = empty(x_shape) if out is None else check_out("out", out, x_shape)
    if not _backend.uses_kernels():
        dx.fill(0)
        ho, wo = dy.shape[2:]
        for i, (hs, he) in enumerate(_windows_1d(x_shape[2], ho)):
            for j, (ws, we) in enumerate(_windows_1d(x_shape[3], wo)):
                dx[:, :, hs:he, ws:we] += (dy[:, :, i, j] / ((he - hs) * (we - ws)))[:, :, None, None]
        return _rebatch(dx, unbatched)
    from ..kernels import pool as kpool

    kpool.adaptive_avg_pool2d_backward(dy, dx)
    return _rebatch(result(dx, on_host), unbatched)
