"""Fusion planning for :class:`gpu_cnn.nn.Sequential`: runs of layers that one kernel computes.

    Conv2d -> ReLU -> MaxPool2d(2)   one kernel (kernels.conv2d ``fused``): conv + bias + ReLU + 2x2 max
                                     pool, writing the pooled output and its argmax, never the conv output
    Conv2d -> ReLU                   the implicit-GEMM conv with bias and ReLU in its epilogue
    Linear -> ReLU                   the dense GEMM (kernels.gemm split_k_ticket, one launch) with bias
                                     and ReLU in its epilogue; a Linear alone gets its bias there too

:func:`plan` cuts a layer list into runs; each run has ``forward(x)`` and ``backward(dy)`` like a layer,
uses the layers' own parameters and workspaces, and gives the unfused layers' results (to float32
rounding; the state_dict is unchanged; a batch too large for the kernels' 32-bit offsets runs the
layers unfused). Backward needs no pre-activation: where the 2x2 window's maximum
is > 0 the ReLU passed it, so dy masked by (pooled > 0) and routed through the argmax is the gradient of
the conv output; without the pool, the ReLU output itself is the mask. Each fused run's backward reads
dy that way inside the kernels that consume it -- the conv's dX and dW (db folded into dW) implicit
GEMMs, a Linear's dx and dw GEMMs (db as dw's extra column) -- so a ReLU or a pool costs no backward
launch and no masked copy is written.

Fusion is on by default on ``cuda`` (where the conv2d dispatcher picks implicit_gemm, for the same
reason) and off on ``sim`` (each fused kernel is an implicit GEMM, which the simulator runs slowly) and
``cpu`` (no kernels). :func:`set_enabled` overrides that (``True``/``False``; ``None``: automatic).
"""
import numpy as np

from . import backend as _backend
from . import functional as F

_enabled = None


def set_enabled(flag):
    """Force fusion on (True) or off (False), or back to automatic (None)."""
    global _enabled
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"flag: expected True, False or None, got {flag!r}")
    _enabled = flag


def enabled():
    """Whether :func:`plan` fuses now: the override, else True on cuda only."""
    if _enabled is not None:
        return _enabled and _backend.uses_kernels()
    return _backend.get_backend() == "cuda"


def _plain_conv(conv):
    """A conv the implicit-GEMM kernels take: int pairs of stride/padding, dilation 1, groups 1."""
    pairs = all(isinstance(v, tuple) and len(v) == 2 and all(isinstance(e, int) for e in v)
                for v in (conv.stride, conv.padding))
    return (pairs and tuple(getattr(conv, "dilation", (1, 1))) == (1, 1) and getattr(conv, "groups", 1) == 1
            and getattr(conv, "padding_mode", "zeros") == "zeros")


def _pool_2x2(pool):
    return (pool.kernel_size == (2, 2) and pool.stride == (2, 2) and pool.padding == (0, 0)
            and tuple(getattr(pool, "dilation", (1, 1))) == (1, 1) and not getattr(pool, "ceil_mode", False))


def plan(layers):
    """[(start, stop, run)] covering ``layers`` in order: a run is a layer, or a fused run of several."""
    from .nn import Conv2d, Linear, MaxPool2d, ReLU

    on = enabled()
    runs, i = [], 0
    while i < len(layers):
        a = layers[i]
        if on and type(a) is Conv2d and _plain_conv(a) and i + 1 < len(layers) and type(layers[i + 1]) is ReLU:
            if i + 2 < len(layers) and type(layers[i + 2]) is MaxPool2d and _pool_2x2(layers[i + 2]):
                runs.append((i, i + 3, ConvReLUPool(a, layers[i + 1], layers[i + 2])))
                i += 3
            else:
                runs.append((i, i + 2, ConvReLU(a, layers[i + 1])))
                i += 2
            continue
        if on and type(a) is Linear and i + 1 < len(layers) and type(layers[i + 1]) is ReLU:
            runs.append((i, i + 2, LinearReLU(a, layers[i + 1])))
            i += 2
            continue
        runs.append((i, i + 1, a))
        i += 1
    return runs


def _fits(conv, x):
    """The implicit-GEMM kernels take this batch (32-bit offsets); else the run goes unfused."""
    from .kernels import conv2d as kconv

    return kconv.implicit_gemm_supported(tuple(x.shape), tuple(conv.weight.data.shape), conv.stride, conv.padding)


class _Run:
    layers = ()
    _unfused = False

    def _forward_unfused(self, x):
        self._unfused = True
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def _backward_unfused(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy


class ConvReLU(_Run):
    """Conv2d -> ReLU: the implicit-GEMM conv with max(., 0) in its epilogue (one store per output)."""

    def __init__(self, conv, relu):
        self.conv, self.relu = conv, relu
        self.layers = (conv, relu)

    def forward(self, x):
        from .kernels import conv2d as kconv

        if not _fits(self.conv, x):
            return self._forward_unfused(x)
        self._unfused = False
        conv, relu = self.conv, self.relu
        conv._begin_forward(x)
        relu._y_shape = relu._x = None
        conv._x = None
        shape = (x.shape[0],) + conv.output_shape(tuple(x.shape[1:]))
        y = relu.ws.get("output", shape)
        kconv.conv2d_forward_implicit_gemm(x, conv.weight.data, None if conv.bias is None else conv.bias.data,
                                           y, conv.stride, conv.padding, relu=True)
        conv._x, self._y, relu._y_shape = x, y, shape
        return y

    def backward(self, dy):
        if self._unfused:
            return self._backward_unfused(dy)
        conv, relu = self.conv, self.relu
        dy = relu._grad_output(dy)
        conv._y_shape = relu._y_shape
        return _conv_backward(conv, dy, mask=self._y)  # relu(pre) > 0 exactly where pre > 0


def _conv_backward(conv, dy, mask, pool_idx=None):
    """The conv's dx (when wanted), dw and db with dy read through the ReLU's mask (and the pool's
    argmax) inside the implicit-GEMM kernels: two launches, or one for a first layer."""
    from .kernels import conv2d as kconv

    x = conv._cached("_x")
    dx = conv.ws.get("grad_input", x.shape) if conv.needs_input_grad else None
    if dx is not None:
        kconv.conv2d_backward_input_implicit_gemm(dy, conv.weight.data, dx, conv.stride, conv.padding, mask=mask,
                                                  pool_idx=pool_idx)
    kconv.conv2d_backward_weight_implicit_gemm(dy, x, conv.weight.grad, conv.stride, conv.padding,
                                               db=None if conv.bias is None else conv.bias.grad, mask=mask,
                                               pool_idx=pool_idx)
    return dx


class ConvReLUPool(_Run):
    """Conv2d -> ReLU -> MaxPool2d(2): one fused kernel forward; backward is the conv's two implicit-GEMM
    kernels reading the pooled gradient through the argmax and the (pooled > 0) mask: no ReLU- or
    pool-backward launch."""

    def __init__(self, conv, relu, pool):
        self.conv, self.relu, self.pool = conv, relu, pool
        self.layers = (conv, relu, pool)

    def forward(self, x):
        if not _fits(self.conv, x):
            return self._forward_unfused(x)
        self._unfused = False
        conv, relu, pool = self.conv, self.relu, self.pool
        conv._begin_forward(x)
        relu._y_shape = pool._y_shape = pool._idx = conv._x = None
        conv_shape = (x.shape[0],) + conv.output_shape(tuple(x.shape[1:]))
        pooled = (conv_shape[0],) + pool.output_shape(conv_shape[1:])
        y = pool.ws.get("output", pooled)
        idx = pool.ws.get("argmax", pooled, np.int32)
        F.conv2d_relu_maxpool2d(x, conv.weight.data, None if conv.bias is None else conv.bias.data,
                                conv.stride, conv.padding, out=(y, idx))
        conv._x, self._y, self._conv_shape = x, y, conv_shape
        pool._x_shape, pool._idx, pool._y_shape = conv_shape, idx, pooled
        return y

    def backward(self, dy):
        if self._unfused:
            return self._backward_unfused(dy)
        conv, relu, pool = self.conv, self.relu, self.pool
        dy = pool._grad_output(dy)
        conv._y_shape = self._conv_shape
        # the window's max > 0 exactly where the ReLU passed it; the argmax routes it to the conv output
        return _conv_backward(conv, dy, mask=self._y, pool_idx=pool._idx)


class LinearReLU(_Run):
    """Linear -> ReLU: one GEMM with bias and max(., 0) in its epilogue; backward masks dy by the stored
    output inside the dx and dw GEMMs (db folded into dw's), so the ReLU costs no launch either way."""

    def __init__(self, linear, relu):
        self.linear, self.relu = linear, relu
        self.layers = (linear, relu)

    def forward(self, x):
        from .ops import dense

        self._unfused = False
        lin, relu = self.linear, self.relu
        lin._begin_forward(x)
        relu._y_shape = relu._x = None
        lin._x = None
        lin.output_shape(tuple(x.shape[1:]))
        shape = (x.shape[0], lin.out_features)
        y = relu.ws.get("output", shape)
        dense.linear_relu(x, lin.weight.data, None if lin.bias is None else lin.bias.data, y)
        lin._x, self._y, relu._y_shape = x, y, shape
        return y

    def backward(self, dy):
        from .ops import dense

        lin, relu = self.linear, self.relu
        dy = relu._grad_output(dy)
        x = lin._cached("_x")
        dx = lin.ws.get("grad_input", x.shape) if lin.needs_input_grad else None
        dense.linear_relu_backward(dy, x, lin.weight.data, self._y, dx, lin.weight.grad,
                                   None if lin.bias is None else lin.bias.grad)
        return dx
