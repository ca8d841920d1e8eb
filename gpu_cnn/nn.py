"""Layers and containers, PyTorch-like: ``Conv2d``, ``ReLU``, ``MaxPool2d``, ``Flatten``, ``Linear``,
``Sequential``.

A layer owns its parameters and their gradients, and its buffers (output, input gradient, pool argmax)
in a :class:`gpu_cnn.memory.Workspace`, allocated on the first forward for a batch size and reused
after. ``forward`` caches what ``backward`` reads (the input, the pool argmax). ``backward`` WRITES the
parameter gradients (it does not accumulate), then returns the gradient of the input.

Weights use Kaiming (He) normal initialisation, std = sqrt(2 / fan_in), drawn from the module's
generator (seed it with :func:`manual_seed`); biases start at zero.
"""
import numpy as np

from . import backend as _backend
from . import functional as F
from .memory import HostStaging, Workspace, format_report
from .ops import _base

_rng = np.random.default_rng(0)


def manual_seed(seed):
    """Seed the generator that initialises new layers' weights."""
    global _rng
    _rng = np.random.default_rng(seed)


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


def _host_copy(a):
    """A host copy the caller owns (never a view of a reused buffer)."""
    return a.copy() if isinstance(a, np.ndarray) else a.copy_to_host()


class Module:
    """Base class: forward/backward, parameters, state_dict, workspace."""

    def __init__(self):
        self.ws = Workspace(type(self).__name__)
        self.needs_input_grad = True

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

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        for p in self.parameters():
            _base.fill(p.grad, 0.0)

    def state_dict(self):
        """Host copies of the parameters, keyed as PyTorch names them."""
        return {name: p.numpy() for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy values in place. Missing, unexpected or wrongly shaped entries raise a clear error."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise KeyError(f"state_dict does not match the model: missing {missing}, unexpected {extra}")
        for name, p in own.items():
            value = np.asarray(state[name])
            if value.shape != p.shape:
                raise ValueError(f"state_dict[{name!r}]: expected shape {p.shape}, got {value.shape}")
            if not np.issubdtype(value.dtype, np.floating):
                raise TypeError(f"state_dict[{name!r}]: expected floating values, got {value.dtype}")
        for name, p in own.items():
            p.assign(state[name])

    def buffers_nbytes(self):
        return self.ws.nbytes()

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "type")
        return f"{type(self).__name__}({args})"


class Conv2d(Module):
    """2-D convolution (cross-correlation), NCHW, weight (C_out, C_in, kH, kW)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _base.pair("kernel_size", kernel_size, 1)
        self.stride = _base.pair("stride", stride, 1)
        self.padding = _base.pair("padding", padding, 0)
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        w = _rng.normal(0.0, np.sqrt(2.0 / fan_in), (self.out_channels, self.in_channels, kh, kw))
        self.weight = Parameter(w)
        self.bias = Parameter(np.zeros(self.out_channels)) if bias else None
        self._x = None

    def named_parameters(self):
        return [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None else [])

    def output_shape(self, in_shape):
        c, h, w = in_shape
        if c != self.in_channels:
            raise ValueError(f"Conv2d expects {self.in_channels} input channels, got {c}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (self.out_channels, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)

    def forward(self, x):
        out_shape = (x.shape[0],) + self.output_shape(tuple(x.shape[1:]))
        y = self.ws.get("output", out_shape)
        F.conv2d(x, self.weight.data, None if self.bias is None else self.bias.data,
                 self.stride, self.padding, out=y)
        self._x = x
        return y

    def backward(self, dy):
        x = self._x
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
        y = self.ws.get("output", x.shape)
        F.relu(x, out=y)
        self._x = x
        return y

    def backward(self, dy):
        dx = self.ws.get("grad_input", dy.shape)
        F.relu_backward(dy, self._x, out=dx)
        return dx


class MaxPool2d(Module):
    """Max pooling; forward keeps the argmax of every output for backward."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = _base.pair("kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else _base.pair("stride", stride, 1)
        self.padding = _base.pair("padding", padding, 0)

    def output_shape(self, in_shape):
        c, h, w = in_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)

    def forward(self, x):
        out_shape = (x.shape[0],) + self.output_shape(tuple(x.shape[1:]))
        y = self.ws.get("output", out_shape)
        idx = self.ws.get("argmax", out_shape, np.int32)
        F.max_pool2d(x, self.kernel_size, self.stride, self.padding, out=(y, idx))
        self._x_shape, self._idx = tuple(x.shape), idx
        return y

    def backward(self, dy):
        dx = self.ws.get("grad_input", self._x_shape)
        F.max_pool2d_backward(dy, self._idx, self._x_shape, self.kernel_size, self.stride, self.padding, out=dx)
        return dx

    def spec(self):
        return {"type": "MaxPool2d", "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding)}


class Flatten(Module):
    """(N, C, H, W) -> (N, C*H*W), a view."""

    def output_shape(self, in_shape):
        return (int(np.prod(in_shape)),)

    def forward(self, x):
        self._x_shape = tuple(x.shape)
        return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))

    def backward(self, dy):
        return dy.reshape(*self._x_shape)


class Linear(Module):
    """y = x·wᵀ + b, weight (out_features, in_features)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        w = _rng.normal(0.0, np.sqrt(2.0 / self.in_features), (self.out_features, self.in_features))
        self.weight = Parameter(w)
        self.bias = Parameter(np.zeros(self.out_features)) if bias else None

    def named_parameters(self):
        return [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None else [])

    def output_shape(self, in_shape):
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(f"Linear expects input of shape (N, {self.in_features}), got (N, {', '.join(map(str, in_shape))})")
        return (self.out_features,)

    def forward(self, x):
        self.output_shape(tuple(x.shape[1:]))
        y = self.ws.get("output", (x.shape[0], self.out_features))
        F.linear(x, self.weight.data, None if self.bias is None else self.bias.data, out=y)
        self._x = x
        return y

    def backward(self, dy):
        dx = self.ws.get("grad_input", self._x.shape) if self.needs_input_grad else None
        F.linear_backward(dy, self._x, self.weight.data,
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
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape

    def _check_backend(self):
        if _backend.get_backend() != self.backend:
            raise RuntimeError(
                f"this model lives on backend {self.backend!r} but the backend is now {_backend.get_backend()!r}: "
                "call model.to_backend() to move it"
            )

    def forward(self, x):
        self._check_backend()
        if _base.is_device_array(x):
            h, self._host_io = _base.as_input("x", x, 4 if self.layers and not isinstance(self.layers[0], Linear) else None)[0], False
        else:
            host = np.asarray(x)
            if not np.issubdtype(host.dtype, np.floating):
                raise TypeError(f"x: expected a floating-point batch, got dtype {host.dtype.name}")
            h, self._host_io = self.staging.to_backend("input", host), True
        for i, layer in enumerate(self.layers):
            layer.needs_input_grad = i > 0 or self.requires_input_grad
            h = layer.forward(h)
        return _host_copy(h) if self._host_io else h

    def backward(self, dy):
        self._check_backend()
        if not _base.is_device_array(dy) and _backend.uses_kernels():
            dy = self.staging.to_backend("grad_output", np.asarray(dy))
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
