"""Batch normalisation (NCHW, per channel), dropout and the residual add, on every backend.

``batch_norm2d`` / ``batch_norm2d_backward``: training mode normalises with the batch's statistics
(mean and biased variance over N, H, W) and updates the running statistics in place as PyTorch does
(``running_var`` with the unbiased variance; ``momentum=None``: the caller passes 1/num_batches_tracked);
eval mode uses the running statistics. Both return what backward needs (mean, invstd).

``dropout`` / ``dropout_backward``: keep element i when a counter-based hash of (seed, step, i) says
so (see :mod:`gpu_cnn.kernels.norm`), so cpu, sim and cuda drop the same elements for the same seed and
step; kept elements are scaled by 1 / (1 - p). The mask is never stored: backward recomputes it.

cpu: vectorised NumPy in float32 (two-pass statistics, as the kernels). cuda/sim: :mod:`gpu_cnn.kernels.norm`.
"""
import numpy as np

from .. import backend as _backend
from ._base import as_input, check_out, empty, result

MASK32 = 0xFFFFFFFF
DROP_BITS = 24


# NumPy twin of the kernels' hash (gpu_cnn.kernels.norm is not imported on cpu: importing numba.cuda fixes
# the simulator choice; the tests check the two agree)
def _hash32(v):
    v = v & MASK32
    v ^= v >> 16
    v = (v * 0x7FEB352D) & MASK32
    v ^= v >> 15
    v = (v * 0x846CA68B) & MASK32
    v ^= v >> 16
    return v


def dropout_threshold(p):
    return int(np.ceil(float(p) * (1 << DROP_BITS)))


def dropout_mask(seed, step, shape, p):
    """The boolean keep mask dropout uses for (seed, step) on an array of `shape` (host NumPy)."""
    n = int(np.prod(shape))
    key = _hash32(np.uint64(step & MASK32) ^ _hash32(np.uint64(seed & MASK32)))
    h = _hash32(np.arange(n, dtype=np.uint64) ^ key)
    return ((h >> np.uint64(32 - DROP_BITS)) >= np.uint64(dropout_threshold(p))).reshape(shape)


def _check_p(p):
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a drop probability in [0, 1], got {p!r}")
    return float(p)


def dropout(x, p, seed, step, *, out=None):
    """x with each element dropped (0) with probability p and the rest scaled by 1/(1 - p); p = 1 drops all."""
    p = _check_p(p)
    x, on_host = as_input("x", x)
    y = empty(x.shape) if out is None else check_out("out", out, x.shape)
    if not _backend.uses_kernels():
        if p == 1.0:
            y.fill(0)
        else:
            np.multiply(x, dropout_mask(seed, step, x.shape, p) * np.float32(1.0 / (1.0 - p)), out=y)
        return y
    from ..kernels import _common, norm as knorm

    if p == 1.0:
        _common.fill(y, 0.0)
    else:
        knorm.dropout(x, y, p, seed, step)
    return result(y, on_host)


def dropout_backward(dy, p, seed, step, *, out=None):
    """dx = dy * keep / (1 - p), the keep mask of :func:`dropout` for the same (seed, step)."""
    return dropout(dy, p, seed, step, out=out)


def add(a, b, *, out=None):
    """a + b (same shapes), on the backend (the residual connection's join)."""
    a, on_host = as_input("a", a)
    b, _ = as_input("b", b)
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"b: expected the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    y = empty(a.shape) if out is None else check_out("out", out, a.shape)
    if not _backend.uses_kernels():
        np.add(a, b, out=y)
        return y
    from ..kernels import norm as knorm

    knorm.add(a, b, y)
    return result(y, on_host)


def batch_norm2d(x, weight, bias, running_mean, running_var, training, momentum, eps, *, out, mean, invstd):
    """BatchNorm2d forward on backend arrays (the layer's own buffers, no allocation): y into ``out``;
    ``mean``/``invstd`` (C,) receive what backward needs. training: batch statistics, and the running
    ones updated with ``momentum`` (None: not updated); else the running statistics."""
    c = x.shape[1]
    if not _backend.uses_kernels():
        if training:
            m = x.shape[0] * x.shape[2] * x.shape[3]
            np.mean(x, axis=(0, 2, 3), out=mean)
            var = np.mean(np.square(x - mean[None, :, None, None]), axis=(0, 2, 3), dtype=np.float32)
            np.divide(1.0, np.sqrt(var + np.float32(eps)), out=invstd)
            if momentum is not None:
                mo = np.float32(momentum)
                running_mean *= 1 - mo
                running_mean += mo * mean
                running_var *= 1 - mo
                running_var += mo * var * np.float32(m / max(m - 1, 1))
        else:
            np.copyto(mean, running_mean)
            np.divide(1.0, np.sqrt(running_var + np.float32(eps)), out=invstd)
        scale = (invstd * weight)[None, :, None, None]
        np.subtract(x, mean[None, :, None, None], out=out)
        out *= scale
        out += bias[None, :, None, None]
        return out
    from ..kernels import norm as knorm

    knorm.batchnorm_forward(x, weight, bias, out, mean, invstd, running_mean, running_var, eps, momentum, training)
    return out


def batch_norm2d_backward(dy, x, weight, mean, invstd, batch_stats, *, dx, dweight, dbias):
    """BatchNorm2d backward on backend arrays: dweight, dbias (C,) and dx (when not None) WRITTEN."""
    if not _backend.uses_kernels():
        xhat = (x - mean[None, :, None, None]) * invstd[None, :, None, None]
        np.sum(dy, axis=(0, 2, 3), out=dbias)
        np.sum(dy * xhat, axis=(0, 2, 3), out=dweight)
        if dx is not None:
            g = (weight * invstd)[None, :, None, None]
            if batch_stats:
                m = np.float32(x.shape[0] * x.shape[2] * x.shape[3])
                np.multiply(g / m, m * dy - dbias[None, :, None, None] - xhat * dweight[None, :, None, None], out=dx)
            else:
                np.multiply(g, dy, out=dx)
        return dx, dweight, dbias
    from ..kernels import norm as knorm

    knorm.batchnorm_backward(dy, x, weight, mean, invstd, dx, dweight, dbias, batch_stats)
    return dx, dweight, dbias
