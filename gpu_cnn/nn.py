"""Layers and containers, PyTorch-like: ``Conv2d``, ``ReLU``, ``MaxPool2d``, ``Flatten``, ``Linear``,
``Sequential``.

A layer owns its parameters and their gradients, and its buffers (output, input gradient, pool argmax)
in a :class:`gpu_cnn.memory.Workspace`, allocated on the first forward for a batch size and reused
after. ``forward`` caches what ``backward`` reads (the input, the pool argmax). ``backward`` WRITES the
parameter gradients (it does not accumulate), then returns the gradient of the input.

Bad input is a clear error naming the argument: constructors check their sizes (positive ints) and
geometry (as the functional ops do); ``forward`` checks the batch's rank (a layer says what it expects,
e.g. ``x: expected a 4-D batch (N, C, H, W)``) and that the filter or window fits the input;
``backward`` checks that a forward ran and that ``dy`` is a floating-point array shaped like that
forward's output.

Weights use Kaiming (He) normal initialisation, std = sqrt(2 / fan_in), drawn from the module's
generator (seed it with :func:`manual_seed`); biases start at zero.
"""
import numbers
from collections.abc import Mapping

import numpy as np

from . import backend as _backend
from . import functional as F
from .memory import HostStaging, Workspace, format_report
from .ops import _base

_rng = np.random.default_rng(0)


def manual_seed(seed):
    """Seed the generator that initialises new layers' weights (a non-negative int)."""
    global _rng
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected a non-negative int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    _rng = np.random.default_rng(int(seed))


def positive_int(name, value):
    """`value` as an int >= 1 (NumPy integers accepted; bool, float and str rejected), else a clear
    error naming `name`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def _shape_of(a):
    return tuple(int(s) for s in a.shape)


def _host_array(name, a):
    """np.asarray(a), or a clear TypeError when `a` is not array-like (a str, None, a ragged list)."""
    return _base.host_array(name, a)


def _kind_of(a):
    """How to describe a non-float argument in an error: its dtype, or its Python type."""
    dtype = getattr(a, "dtype", None)
    return f"dtype {np.dtype(dtype).name}" if dtype is not None else f"a {type(a).__name__}"


class StateDictError(ValueError):
    """A state_dict that does not fit the model (missing or unexpected names); a ValueError like every
    other bad argument (it was a KeyError)."""


def _init_weight(who, shape, std):
    """Kaiming-normal weights of `shape`, the size checked before the (float64) draw allocates."""
    _base.check_alloc(f"{who} weight", shape, np.float64)
    return _rng.normal(0.0, std, shape)


class Parameter:
    """A float32 tensor of the current backend's kind (``data``) with its gradient (``grad``)."""

    def __init__(self, host):
        host = np.ascontiguousarray(host, dtype=np.float32)
        self.shape = host.shape
        self.data = _base.to_device(host) if _backend.uses_kernels() else host.copy()
        self.grad = _base.zeros(host.shape)

    def numpy(self):
        """A host copy of the values."""
        return self.data.copy() if isinstance(self.data, np.ndarray) else self.data.copy_to_host()

    def grad_numpy(self):
        return self.grad.copy() if isinstance(self.grad, np.ndarray) else self.grad.copy_to_host()

    def assign(self, host):
        """Copy host values in place (no allocation)."""
        host = np.ascontiguousarray(host, dtype=np.float32)
        if isinstance(self.data, np.ndarray):
            np.copyto(self.data, host)
        else:
            self.data.copy_to_device(host)


def _view(flat, off, n, shape):
    """flat[off:off + n] seen as `shape` (a view, no copy)."""
    v = flat[off:off + n]
    return v.reshape(shape) if tuple(shape) != (n,) else v


def _host_copy(a):
    """A host copy the caller owns (never a view of a reused buffer)."""
    return a.copy() if isinstance(a, np.ndarray) else a.copy_to_host()


class Module:
    """Base class: forward/backward, parameters, state_dict, workspace."""

    # (ndim, layout) of the batch a layer takes; None: any rank (ReLU). Flatten needs at least 2-D.
    input_rank = None

    def __init__(self):
        self.ws = Workspace(type(self).__name__)
        self.needs_input_grad = True
        self._y_shape = None  # shape of the last successful forward's output; None: no forward yet

    # -- what each layer defines
    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def named_parameters(self):
        return []

    def output_shape(self, in_shape):
        """Shape of one sample's output given one sample's input shape (no batch axis)."""
        return tuple(in_shape)

    def spec(self):
        """A JSON-able description from which :func:`from_spec` rebuilds the layer."""
        return {"type": type(self).__name__}

    # -- shared
    def __call__(self, x):
        return self.forward(x)

    def check_input(self, x, name="x", hint=""):
        """Raise a clear ValueError naming `name` when `x` (anything with .shape) has the wrong rank."""
        rank = self.input_rank
        if rank is not None and len(x.shape) != rank[0]:
            raise ValueError(f"{name}: expected a {rank[0]}-D batch {rank[1]}, got shape {_shape_of(x)}{hint}")

    def _begin_forward(self, x):
        """Check the input's rank and forget the previous forward (so a failed forward cannot be
        followed by a backward that reads stale caches)."""
        self._y_shape = None
        self.check_input(x)

    def _grad_output(self, dy):
        """`dy` checked against the last forward's output: floating point (not int, bool or str), and
        of the same shape. Host input comes back as a NumPy array; device input as it was."""
        if self._y_shape is None:
            raise RuntimeError(f"{type(self).__name__}: backward() called before forward() "
                               "(or after a forward that failed)")
        if _base.is_device_array(dy):
            dy = _base._as_cuda_array(dy)  # CuPy or PyTorch too: their dtypes are not NumPy's
        else:
            dy = _host_array("dy", dy)
        if not np.issubdtype(np.dtype(dy.dtype), np.floating):
            raise TypeError(f"dy: expected a floating-point array, got {_kind_of(dy)}")
        if _shape_of(dy) != self._y_shape:
            raise ValueError(f"dy: expected shape {self._y_shape} (the output of {type(self).__name__}), "
                             f"got {_shape_of(dy)}")
        return dy

    def _cached(self, attr):
        value = getattr(self, attr, None)
        if value is None:
            raise RuntimeError(f"{type(self).__name__}: backward() called before forward()")
        return value

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def flatten_parameters(self):
        """Move every parameter's values into one flat float32 buffer and its gradients into another,
        in :meth:`parameters` order, back to back; each ``Parameter.data``/``.grad`` becomes a view of
        them (values kept, gradients zeroed). Returns ``(flat params, flat grads)``, the pair an
        optimizer's ``flat=`` takes to update the whole model in one launch (and a data-parallel
        all-reduce needs to make one call). ``state_dict`` and checkpoints are unchanged. Arrays taken
        from ``p.data`` before the call are no longer the parameters.
        """
        params = self.parameters()
        sizes = [int(np.prod(p.shape, dtype=np.int64)) for p in params]
        if self._is_flat(params, sizes):
            return self.flat_parameters  # already: a second Trainer on the model shares the same buffers
        data, grad = _base.empty((sum(sizes),)), _base.zeros((sum(sizes),))
        off = 0
        for p, n in zip(params, sizes):
            values = p.numpy()
            p.data, p.grad = _view(data, off, n, p.shape), _view(grad, off, n, p.shape)
            p.assign(values)
            off += n
        self.flat_parameters, self._flat_backend = (data, grad), _backend.get_backend()
        return self.flat_parameters

    def _is_flat(self, params, sizes):
        flat = getattr(self, "flat_parameters", None)
        if flat is None or flat[0].shape[0] != sum(sizes) or self._flat_backend != _backend.get_backend():
            return False
        item, off = np.dtype(np.float32).itemsize, 0
        for p, n in zip(params, sizes):
            for a, base in ((p.data, flat[0]), (p.grad, flat[1])):
                if _base.data_address(a) != _base.data_address(base) + off * item:
                    return False
            off += n
        return True

    def zero_grad(self):
        for p in self.parameters():
            _base.fill(p.grad, 0.0)

    def state_dict(self):
        """Host copies of the parameters, keyed as PyTorch names them."""
        return {name: p.numpy() for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy values in place. Missing or unexpected names (:class:`StateDictError`, a ValueError),
        wrongly shaped entries, NaN/Inf values and finite values beyond float32's range raise a clear
        error naming the entry, as :func:`gpu_cnn.load` does; nothing is copied then."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a dict of arrays (name -> array), got {type(state).__name__}")
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise StateDictError(f"state_dict does not match the model: missing {missing}, unexpected {extra}")
        for name, p in own.items():
            try:
                value = np.asarray(state[name])
            except (ValueError, TypeError) as exc:  # a ragged list
                raise TypeError(f"state_dict[{name!r}]: expected an array of floats ({exc})") from None
            if not np.issubdtype(value.dtype, np.floating):
                raise TypeError(f"state_dict[{name!r}]: expected floating values, got {value.dtype}")
            if value.shape != p.shape:
                raise ValueError(f"state_dict[{name!r}]: expected shape {p.shape}, got {value.shape}")
            _base.check_finite(f"state_dict[{name!r}]", value)
            _base.check_float32_range(f"state_dict[{name!r}]", value)
        for name, p in own.items():
            p.assign(state[name])

    def buffers_nbytes(self):
        return self.ws.nbytes()

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "type")
        return f"{type(self).__name__}({args})"


def _sample_chw(who, in_shape):
    """One sample's (C, H, W), else a clear error (the batch axis is not part of `in_shape`)."""
    in_shape = tuple(in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"{who} expects samples of shape (C, H, W) (batches (N, C, H, W)), got {in_shape}")
    if min(in_shape) < 1:  # before any window check, which would blame kernel_size for an empty image
        raise ValueError(f"{who} expects samples of shape (C, H, W) with C, H, W >= 1, got {in_shape}")
    return in_shape


def _sliding_out(who, what, h, w, k, s, p):
    """(Ho, Wo) of a window k sliding with stride s over an (h, w) input padded by p, or a clear error
    when the window does not fit (the functional ops' rule, checked before any buffer is planned)."""
    if h + 2 * p[0] < k[0] or w + 2 * p[1] < k[1]:
        raise ValueError(
            f"kernel_size: {who}'s {what} {k} is larger than the padded input {(h + 2 * p[0], w + 2 * p[1])} "
            f"(input {(h, w)}, padding {p})")
    return (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1


class Conv2d(Module):
    """2-D convolution (cross-correlation), NCHW, weight (C_out, C_in, kH, kW)."""

    input_rank = (4, "(N, C, H, W)")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.kernel_size = _base.pair("kernel_size", kernel_size, 1)
        self.stride = _base.pair("stride", stride, 1)
        self.padding = _base.pair("padding", padding, 0)
        bias = _flag("bias", bias)
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        w = _init_weight("Conv2d", (self.out_channels, self.in_channels, kh, kw), np.sqrt(2.0 / fan_in))
        self.weight = Parameter(w)
        self.bias = Parameter(np.zeros(self.out_channels)) if bias else None
        self._x = None

    def named_parameters(self):
        return [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None else [])

    def output_shape(self, in_shape):
        c, h, w = _sample_chw("Conv2d", in_shape)
        if c != self.in_channels:
            raise ValueError(f"Conv2d expects {self.in_channels} input channels, got {c}")
        return (self.out_channels,) + _sliding_out("Conv2d", "filter", h, w, self.kernel_size, self.stride,
                                                   self.padding)

    def forward(self, x):
        self._begin_forward(x)
        self._x = None
        out_shape = (x.shape[0],) + self.output_shape(tuple(x.shape[1:]))
        y = self.ws.get("output", out_shape)
        F.conv2d(x, self.weight.data, None if self.bias is None else self.bias.data,
                 self.stride, self.padding, out=y)
        self._x, self._y_shape = x, _shape_of(y)
        return y

    def backward(self, dy):
        dy = self._grad_output(dy)
        x = self._cached("_x")
        dx = self.ws.get("grad_input", x.shape) if self.needs_input_grad else None
        F.conv2d_backward(dy, x, self.weight.data, self.stride, self.padding,
                          out=(dx, self.weight.grad, None if self.bias is None else self.bias.grad),
                          need_dx=self.needs_input_grad, bias=self.bias is not None)
        return dx

    def spec(self):
        return {"type": "Conv2d", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "bias": self.bias is not None}


class ReLU(Module):
    """max(x, 0); backward passes dy where x > 0."""

    def forward(self, x):
        self._begin_forward(x)
        self._x = None
        y = self.ws.get("output", x.shape)
        F.relu(x, out=y)
        self._x, self._y_shape = x, _shape_of(y)
        return y

    def backward(self, dy):
        dy = self._grad_output(dy)
        x = self._cached("_x")
        dx = self.ws.get("grad_input", x.shape)
        F.relu_backward(dy, x, out=dx)
        return dx


class MaxPool2d(Module):
    """Max pooling; forward keeps the argmax of every output for backward."""

    input_rank = (4, "(N, C, H, W)")

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = k = _base.pair("kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else _base.pair("stride", stride, 1)
        self.padding = p = _base.pair("padding", padding, 0)
        if p[0] > k[0] // 2 or p[1] > k[1] // 2:  # F.max_pool2d's rule, checked now rather than at forward
            raise ValueError(
                f"padding: must be at most kernel_size // 2 = {(k[0] // 2, k[1] // 2)} per axis "
                f"(so every window holds a real cell), got {p} with kernel_size {k}")
        self._x_shape = self._idx = None

    def output_shape(self, in_shape):
        c, h, w = _sample_chw("MaxPool2d", in_shape)
        return (c,) + _sliding_out("MaxPool2d", "window", h, w, self.kernel_size, self.stride, self.padding)

    def forward(self, x):
        self._begin_forward(x)
        self._x_shape = self._idx = None
        out_shape = (x.shape[0],) + self.output_shape(tuple(x.shape[1:]))
        y = self.ws.get("output", out_shape)
        idx = self.ws.get("argmax", out_shape, np.int32)
        F.max_pool2d(x, self.kernel_size, self.stride, self.padding, out=(y, idx))
        self._x_shape, self._idx, self._y_shape = _shape_of(x), idx, _shape_of(y)
        return y

    def backward(self, dy):
        dy = self._grad_output(dy)
        x_shape, idx = self._cached("_x_shape"), self._cached("_idx")
        dx = self.ws.get("grad_input", x_shape)
        F.max_pool2d_backward(dy, idx, x_shape, self.kernel_size, self.stride, self.padding, out=dx,
                              check_idx=False)  # its own forward's idx
        return dx

    def spec(self):
        return {"type": "MaxPool2d", "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding)}


class Flatten(Module):
    """(N, C, H, W) -> (N, C*H*W), a view. Any batch of at least 2 dimensions."""

    def check_input(self, x, name="x", hint=""):
        if len(x.shape) < 2:
            raise ValueError(f"{name}: expected a batch of at least 2 dimensions (N, ...), "
                             f"got shape {_shape_of(x)}{hint}")

    def output_shape(self, in_shape):
        return (int(np.prod(in_shape)),)

    def forward(self, x):
        self._begin_forward(x)
        self._x_shape = _shape_of(x)
        y = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
        self._y_shape = _shape_of(y)
        return y

    def backward(self, dy):
        dy = self._grad_output(dy)
        return dy.reshape(*self._cached("_x_shape"))


class Linear(Module):
    """y = x·wᵀ + b, weight (out_features, in_features)."""

    input_rank = (2, "(N, in_features)")

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        bias = _flag("bias", bias)
        w = _init_weight("Linear", (self.out_features, self.in_features), np.sqrt(2.0 / self.in_features))
        self.weight = Parameter(w)
        self.bias = Parameter(np.zeros(self.out_features)) if bias else None
        self._x = None

    def named_parameters(self):
        return [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None else [])

    def output_shape(self, in_shape):
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(f"Linear expects input of shape (N, {self.in_features}), got (N, {', '.join(map(str, in_shape))})")
        return (self.out_features,)

    def forward(self, x):
        self._begin_forward(x)
        self._x = None
        self.output_shape(tuple(x.shape[1:]))
        y = self.ws.get("output", (x.shape[0], self.out_features))
        F.linear(x, self.weight.data, None if self.bias is None else self.bias.data, out=y)
        self._x, self._y_shape = x, _shape_of(y)
        return y

    def backward(self, dy):
        dy = self._grad_output(dy)
        x = self._cached("_x")
        dx = self.ws.get("grad_input", x.shape) if self.needs_input_grad else None
        F.linear_backward(dy, x, self.weight.data,
                          out=(dx, self.weight.grad, None if self.bias is None else self.bias.grad),
                          bias=self.bias is not None, need_dx=self.needs_input_grad)
        return dx

    def spec(self):
        return {"type": "Linear", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}


class Sequential(Module):
    """Layers applied in order; parameter names follow PyTorch ("0.weight", "3.bias", ...).

    ``forward`` accepts a NumPy batch (copied to the backend through a reusable staging buffer, and the
    logits returned as NumPy) or, on ``cuda``/``sim``, a device array (logits returned on the device).
    ``backward(dlogits)`` writes every parameter gradient and returns the input gradient when
    ``requires_input_grad`` is set (default off, as for a network's input in PyTorch), else None.
    """

    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: layer {i} is a {type(layer).__name__}, not a gpu_cnn.nn.Module")
        self.layers = list(layers)
        self.backend = _backend.get_backend()
        self.staging = HostStaging()
        self.requires_input_grad = False
        self._host_io = False

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def named_parameters(self):
        return [(f"{i}.{name}", p) for i, layer in enumerate(self.layers) for name, p in layer.named_parameters()]

    def output_shape(self, in_shape):
        shape = tuple(in_shape)
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.output_shape(shape)
            except ValueError as exc:  # say where in the model the shapes stop fitting
                raise ValueError(f"layer {i} ({type(layer).__name__}), input {shape}: {exc}") from None
        return shape

    def _check_backend(self):
        if _backend.get_backend() != self.backend:
            raise RuntimeError(
                f"this model lives on backend {self.backend!r} but the backend is now {_backend.get_backend()!r}: "
                "call model.to_backend() to move it"
            )

    def forward(self, x):
        """Logits for a batch x (N, C, H, W) (or whatever rank the first layer takes); a host batch
        gives host logits, a device batch device logits."""
        self._check_backend()
        self._y_shape = None
        if _base.is_device_array(x):  # each layer checks the rank of its own input
            h, self._host_io = _base.as_input("x", x)[0], False
        else:
            host = _host_array("x", x)
            if not np.issubdtype(host.dtype, np.floating):
                raise TypeError(f"x: expected a floating-point batch, got dtype {host.dtype.name}")
            if host.ndim == 0:
                raise ValueError("x: expected a batch (N, ...) such as (N, C, H, W), got a 0-d array (a scalar)")
            _base.check_float32_range("x", host)
            h, self._host_io = self.staging.to_backend("input", host), True
        for i, layer in enumerate(self.layers):
            layer.needs_input_grad = i > 0 or self.requires_input_grad
            if i > 0:  # a wrong rank here is a model built wrongly (a missing Flatten), not a bad x
                prev = f"layer {i - 1} ({type(self.layers[i - 1]).__name__})"
                hint = "; is an nn.Flatten() missing before it?" if len(h.shape) > 2 and isinstance(layer, Linear) else ""
                layer.check_input(h, f"layer {i} ({type(layer).__name__}): its input from {prev}", hint)
            h = layer.forward(h)
        self._y_shape = _shape_of(h)
        return _host_copy(h) if self._host_io else h

    def backward(self, dy):
        """Gradients for dy = dLoss/dlogits, of the shape the last forward returned (N, classes)."""
        self._check_backend()
        if self._y_shape is None:
            raise RuntimeError("Sequential: backward() called before forward() (or after a forward that failed)")
        if _base.is_device_array(dy):
            dy = _base.as_input("dy", dy)[0]  # float32, C-contiguous, on this backend
        else:
            dy = _host_array("dy", dy)
        if not np.issubdtype(np.dtype(dy.dtype), np.floating):
            raise TypeError(f"dy: expected a floating-point array, got dtype {np.dtype(dy.dtype).name}")
        if _shape_of(dy) != self._y_shape:
            raise ValueError(f"dy: expected shape {self._y_shape} (the model's output), got {_shape_of(dy)}")
        if not _base.is_device_array(dy) and _backend.uses_kernels():
            dy = self.staging.to_backend("grad_output", dy)
        elif not _base.is_device_array(dy):
            dy = np.ascontiguousarray(dy, dtype=np.float32)
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return _host_copy(dy) if (self._host_io and dy is not None) else dy

    def to_backend(self):
        """Move parameters to the current backend (values kept; buffers replanned)."""
        state = {name: p.numpy() for name, p in self.named_parameters()}
        self.backend = _backend.get_backend()
        for layer in self.layers:
            for attr in ("weight", "bias"):
                p = getattr(layer, attr, None)
                if isinstance(p, Parameter):
                    setattr(layer, attr, Parameter(p.numpy()))
            layer.ws = Workspace(type(layer).__name__)
        self.staging = HostStaging()
        self.load_state_dict(state)
        if getattr(self, "flat_parameters", None) is not None:  # it was flat: it stays flat, on the new backend
            self.flatten_parameters()
        return self

    def memory_rows(self):
        rows = []
        for i, layer in enumerate(self.layers):
            params = sum(int(np.prod(p.shape)) * 4 for p in layer.parameters())
            rows.append((f"{i}: {type(layer).__name__}", {"parameters": params, "gradients": params,
                                                          "buffers": layer.buffers_nbytes()}))
        rows.append(("input staging", {"buffers": self.staging.ws.nbytes()}))
        return rows

    def memory_report(self, extra_rows=()):
        """Bytes each layer holds (parameters, gradients, planned buffers) and the total, as text.
        Buffers are planned on the first forward: call it after a step to see them."""
        return format_report(self.memory_rows() + list(extra_rows))

    def spec(self):
        return {"type": "Sequential", "layers": [layer.spec() for layer in self.layers]}

    def __repr__(self):
        inner = "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"


_TYPES = {cls.__name__: cls for cls in (Conv2d, ReLU, MaxPool2d, Flatten, Linear, Sequential)}


def from_spec(spec):
    """Rebuild a layer or Sequential from :meth:`Module.spec` output (fresh weights)."""
    if not isinstance(spec, dict) or spec.get("type") not in _TYPES:
        raise ValueError(f"unknown layer spec {spec!r}; known types: {', '.join(_TYPES)}")
    kind = spec["type"]
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind == "Sequential":
        return Sequential(*[from_spec(s) for s in args["layers"]])
    for k, v in args.items():
        if isinstance(v, list):
            args[k] = tuple(v)
    return _TYPES[kind](**args)
