"""ReLU, its gradient, and bias-add fused with ReLU: element-wise kernels on flat views.

    relu            y  = max(x, 0)                       any rank, viewed flat (no copy)
    relu_backward   dx = dy where x > 0, else 0           any rank, viewed flat
    bias_relu       y  = max(x + b[channel], 0)           x (N, C, H, W) or (N, F); channel = dim 1

All three may run in place (``y`` may be ``x``, ``dx`` may be ``dy``): each thread reads its element
before it writes it, and no thread touches another's element.

ReLU after a fused bias: ``relu_backward(dy, y)`` with ``y`` the ReLU *output* gives the same mask as
with the pre-activation ``x + b``, because ``y > 0`` exactly where ``x + b > 0`` (where ``x + b <= 0``,
``y`` is 0). So a layer that runs :func:`bias_relu` in place, overwriting its pre-activation, can still
compute its gradient from the output it kept.

NaN propagates through the forward (``max(NaN, 0)`` is NaN, as in NumPy's ``np.maximum`` and PyTorch);
its gradient is 0 (``NaN > 0`` is false).

Versions: ``naive`` only (one thread per element; these ops are memory bound, one load and one store per
element, and there is nothing for a cleverer version to save).

Run the checks: ``python -m pytest tests/test_activation.py`` (simulator); build for real GPUs:
``python -m gpu_cnn.compile_check``.
"""
import numpy as np
from numba import cuda, float32

from ._common import TPB_1D, check_device_array, grid_1d, kernel

VERSIONS = ("naive",)
DEFAULT_VERSION = "naive"


# --- reference ---------------------------------------------------------------------------------------


def relu_reference(x):
    """float64 max(x, 0)."""
    return np.maximum(np.asarray(x, np.float64), 0.0)


def relu_backward_reference(dy, x):
    """float64 dy where x > 0, else 0."""
    return np.where(np.asarray(x) > 0, np.asarray(dy, np.float64), 0.0)


def bias_relu_reference(x, b):
    """float64 max(x + b[channel], 0); channel is dim 1 of x (N, C, H, W) or (N, F)."""
    x = np.asarray(x, np.float64)
    b = np.asarray(b, np.float64)
    shape = (1, b.shape[0]) + (1,) * (x.ndim - 2)
    return np.maximum(x + b.reshape(shape), 0.0)


# --- kernels -----------------------------------------------------------------------------------------


@kernel("void(float32[::1], float32[::1])", block=TPB_1D)
def relu_kernel(x, y):
    """naive: one thread per element, y = max(x, 0) (y may be x)."""
    # x, y: (n,) float32, flat views of arrays of any rank
    i = cuda.grid(1)
    if i < x.shape[0]:
        v = x[i]
        if v < float32(0.0):  # a comparison, not max(): NaN is not < 0, so it propagates
            v = float32(0.0)
        y[i] = v


@kernel("void(float32[::1], float32[::1], float32[::1])", block=TPB_1D)
def relu_backward_kernel(dy, x, dx):
    """naive: one thread per element, dx = dy where x > 0 else 0 (dx may be dy; x may be the ReLU output)."""
    # dy, x, dx: (n,) float32, flat views
    i = cuda.grid(1)
    if i < dy.shape[0]:
        if x[i] > float32(0.0):
            dx[i] = dy[i]
        else:
            dx[i] = float32(0.0)


@kernel("void(float32[::1], float32[::1], float32[::1], int64, int64)", block=TPB_1D)
def bias_relu_kernel(x, b, y, C, inner):
    """naive: one thread per element, y = max(x + b[channel], 0); the channel comes from the flat index."""
    # x, y: (N * C * inner,) float32, flat views of (N, C, H, W) (inner = H*W) or (N, F) (inner = 1)
    # b: (C,) float32
    i = cuda.grid(1)
    c = (i // inner) % C
    if i < x.shape[0]:
        v = x[i] + b[c]
        if v < float32(0.0):
            v = float32(0.0)
        y[i] = v


# --- launchers ---------------------------------------------------------------------------------------


def _flat(a):
    """A 1-D view of a C-contiguous device array (no copy)."""
    return a if a.ndim == 1 else a.reshape(a.size)


def relu_naive(x, y):
    """y = max(x, 0) for device arrays of any rank (same shape, float32, C-contiguous); y may be x."""
    check_device_array("x", x)
    check_device_array("y", y, shape=x.shape)
    xf, yf = _flat(x), _flat(y)
    blocks, threads = grid_1d(xf.shape[0])
    relu_kernel[blocks, threads](xf, yf)
    return y


def relu_backward_naive(dy, x, dx):
    """dx = dy where x > 0 else 0 (same shapes, any rank); dx may be dy. x may be the ReLU output."""
    check_device_array("dy", dy)
    check_device_array("x", x, shape=dy.shape)
    check_device_array("dx", dx, shape=dy.shape)
    dyf, xf, dxf = _flat(dy), _flat(x), _flat(dx)
    blocks, threads = grid_1d(dyf.shape[0])
    relu_backward_kernel[blocks, threads](dyf, xf, dxf)
    return dx


def bias_relu_naive(x, b, y):
    """y = max(x + b[channel], 0), x (N, C, H, W) or (N, F), b (C,) or (F,); y may be x (in place)."""
    check_device_array("x", x)
    if len(x.shape) not in (2, 4):
        raise ValueError(f"x: expected a 4-D array (N, C, H, W) or a 2-D array (N, F), got shape {tuple(x.shape)}")
    c = x.shape[1]
    check_device_array("b", b, shape=(c,))
    check_device_array("y", y, shape=x.shape)
    inner = x.shape[2] * x.shape[3] if len(x.shape) == 4 else 1
    xf, yf = _flat(x), _flat(y)
    blocks, threads = grid_1d(xf.shape[0])
    bias_relu_kernel[blocks, threads](xf, b, yf, np.int64(max(c, 1)), np.int64(max(inner, 1)))
    return y


# --- dispatcher --------------------------------------------------------------------------------------


def _check_version(version):
    version = DEFAULT_VERSION if version is None else version
    if version not in VERSIONS:
        raise ValueError(f"version: unknown activation version {version!r}; expected one of {', '.join(VERSIONS)}")
    return version


def relu_forward(x, y, version=None):
    """Device arrays in and out, no allocation: y = max(x, 0)."""
    _check_version(version)
    return relu_naive(x, y)


def relu_backward(dy, x, dx, version=None):
    """Device arrays in and out, no allocation: dx = dy where x > 0 else 0."""
    _check_version(version)
    return relu_backward_naive(dy, x, dx)


def bias_relu(x, b, y, version=None):
    """Device arrays in and out, no allocation: y = max(x + b[channel], 0)."""
    _check_version(version)
    return bias_relu_naive(x, b, y)


__all__ = [
    "VERSIONS", "DEFAULT_VERSION", "relu_forward", "relu_backward", "bias_relu",
    "relu_reference", "relu_backward_reference", "bias_relu_reference",
]
