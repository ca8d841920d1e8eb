"""PyTorch-like functional ops. Layouts: activations NCHW, conv weights (C_out, C_in, kH, kW),
linear weights (out_features, in_features), float32.

Each function runs on the current backend (see :func:`gpu_cnn.set_backend`). NumPy input gives NumPy
output; on ``cuda`` a device array (Numba, CuPy, PyTorch) gives a device array, with no host copy.
Host float64 input is computed in float32. Every op also takes a keyword-only ``out=``.
"""
from .ops.conv import conv2d, conv2d_backward, conv2d_relu_maxpool2d
from .ops.activation import relu, relu_backward, bias_relu
from .ops.pool import max_pool2d, max_pool2d_backward
from .ops.dense import linear, linear_backward
from .ops.softmax import softmax_cross_entropy, softmax_cross_entropy_backward

__all__ = [
    "conv2d", "conv2d_backward", "conv2d_relu_maxpool2d",
    "relu", "relu_backward", "bias_relu",
    "max_pool2d", "max_pool2d_backward",
    "linear", "linear_backward",
    "softmax_cross_entropy", "softmax_cross_entropy_backward",
]
