"""ReLU, its gradient, and the bias-add fused with ReLU.

cpu: NumPy ufuncs writing into the output (``np.maximum(x, 0, out=y)``); cuda/sim: the element-wise
kernels of :mod:`gpu_cnn.kernels.activation`. Every op may run in place (``out`` may be the input).

After a fused :func:`bias_relu`, ``relu_backward(dy, y)`` with ``y`` the ReLU OUTPUT gives the same
gradient as with the pre-activation: ``y > 0`` exactly where ``x + b > 0``. So a layer may overwrite its
pre-activation in place and keep only the output.
"""
import numpy as np

from .. import backend as _backend
from ._base import as_input, check_no_overlap, check_out, check_shape, empty, result


def relu(x, *, out=None):
    """y = max(x, 0), element-wise, any shape. ``out`` (same shape) may be x itself (in place).

    NaN propagates (as ``np.maximum`` and PyTorch). Host float64 input is computed in float32.
    """
    x, on_host = as_input("x", x)
    y = empty(x.shape) if out is None else check_out("out", out, x.shape)
    check_no_overlap([("out", y)], [("x", x)], in_place=[("out", "x")])

    if not _backend.uses_kernels():
        np.maximum(x, np.float32(0.0), out=y)
        return y
    from ..kernels import activation as kact

    kact.relu_forward(x, y)
    return result(y, on_host)


def relu_backward(dy, x, *, out=None):
    """dx = dy where x > 0, else 0. ``x`` is the ReLU input, or equally its output (``y > 0`` iff ``x > 0``).

    0 where x <= 0 (or x is NaN) even when dy there is NaN or inf, on every backend. dy and x have the
    same (any) shape; ``out`` may be dy or x itself (in place), not another view of either. Host float64 input is
    computed in float32.
    """
    dy, on_host = as_input("dy", dy)
    x, _ = as_input("x", x)
    check_shape("x", x, dy.shape)
    dx = empty(dy.shape) if out is None else check_out("out", out, dy.shape)
    check_no_overlap([("out", dx)], [("dy", dy), ("x", x)], in_place=[("out", "dy"), ("out", "x")])

    if not _backend.uses_kernels():
        off = ~(x > 0)  # before dx is written: dx may be x itself
        if dx is not dy:
            np.copyto(dx, dy)
        dx[off] = 0  # 0 where x <= 0 whatever dy holds (NaN * 0 would be NaN), as the kernels do
        return dx
    from ..kernels import activation as kact

    kact.relu_backward(dy, x, dx)
    return result(dx, on_host)


def bias_relu(x, b, *, out=None):
    """y = max(x + b[channel], 0): the bias-add of a conv or linear layer fused with its ReLU.

    x: (N, C, H, W) with b: (C,), or x: (N, F) with b: (F,) (the channel is dim 1 in both). ``out`` may
    be x itself (in place). Backward: ``relu_backward(dy, y)`` on the output y, then the bias gradient of
    the layer. Host float64 input is computed in float32.
    """
    x, on_host = as_input("x", x)
    if len(x.shape) not in (2, 4):
        raise ValueError(f"x: expected a 4-D array (N, C, H, W) or a 2-D array (N, F), got shape {tuple(x.shape)}")
    b, _ = as_input("b", b, 1, "(C,) or (F,)")
    check_shape("b", b, (x.shape[1],))
    y = empty(x.shape) if out is None else check_out("out", out, x.shape)
    check_no_overlap([("out", y)], [("x", x), ("b", b)], in_place=[("out", "x")])

    if not _backend.uses_kernels():
        np.add(x, b.reshape((1, -1) + (1,) * (x.ndim - 2)), out=y)
        np.maximum(y, np.float32(0.0), out=y)
        return y
    from ..kernels import activation as kact

    kact.bias_relu(x, b, y)
    return result(y, on_host)
