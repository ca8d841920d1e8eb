"""Layers and containers, PyTorch-like: ``Conv2d``, ``ReLU``, ``MaxPool2d``, ``AvgPool2d``,
``AdaptiveAvgPool2d``, ``BatchNorm2d``, ``Dropout``, ``Flatten``, ``Linear``, ``Sequential``, ``Residual``.

Every module has ``train()`` / ``eval()`` (``training``, True on construction; containers pass it to
their children): BatchNorm2d uses batch statistics in training and its running statistics in eval,
Dropout drops only in training. ``state_dict`` holds the parameters and the buffers (BatchNorm's
``running_mean``, ``running_var``, ``num_batches_tracked``), keyed as PyTorch names them.
``model.summary(input_shape)`` prints each layer's output shape and parameter count.

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
from . import fusion as _fusion
from . import graph as _graph
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


class Buffer:
    """A float32 state tensor of the backend's kind that is not trained (BatchNorm's running statistics)."""

    integer = False

    def __init__(self, host):
        host = np.ascontiguousarray(host, dtype=np.float32)
        self.shape = host.shape
        self.data = _base.to_device(host) if _backend.uses_kernels() else host.copy()

    numpy = Parameter.numpy
    assign = Parameter.assign


class Counter:
    """An integer held on the host (BatchNorm's ``num_batches_tracked``), saved as a 0-d int64 array."""

    integer = True
    shape = ()

    def __init__(self, value=0):
        self.value = int(value)

    def numpy(self):
        return np.array(self.value, np.int64)

    def assign(self, host):
        self.value = int(np.asarray(host))


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
        self.training = True
        self._y_shape = None  # shape of the last successful forward's output; None: no forward yet

    # -- what each layer defines
    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def named_parameters(self):
        return []

    def named_buffers(self):
        """(name, Buffer or Counter) of the state that is saved but not trained."""
        return []

    def children(self):
        """(name, module) of the modules this one contains (containers)."""
        return []

    def modules(self):
        """This module and every module inside it, depth first."""
        out = [self]
        for _, child in self.children():
            out.extend(child.modules())
        return out

    def train(self, mode=True):
        """Training mode (True) or evaluation mode (False) for this module and every module inside it."""
        mode = _flag("mode", mode)
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        """Evaluation mode: ``train(False)``."""
        return self.train(False)

    def output_shape(self, in_shape):
        """Shape of one sample's output given one sample's input shape (no batch axis)."""
        return tuple(in_shape)

    def summary(self, input_shape, print_fn=print):
        """Print (and return) a table of every layer's output shape and parameter count for one sample
        of `input_shape` (no batch axis), like Keras' ``model.summary()`` and torchinfo."""
        rows = []
        self._summary_rows(tuple(int(v) for v in input_shape), type(self).__name__, -1, rows)
        if len(rows) > 1 and self.children():
            rows = rows[1:]  # the model itself is the total line
        total = sum(int(np.prod(p.shape)) for p in self.parameters())
        width = max([len(r[0]) for r in rows] + [12]) + 2
        lines = [f"{'Layer (type)':<{width}}{'Output shape':<22}{'Param #':>10}", "=" * (width + 32)]
        for name, shape, params in rows:
            lines.append(f"{name:<{width}}{str(('N',) + tuple(shape)).replace(chr(39), ''):<22}{params:>10,}")
        lines += ["=" * (width + 32), f"Total params: {total:,}",
                  f"Input: (N, {', '.join(map(str, input_shape))}); output: "
                  f"(N, {', '.join(map(str, self.output_shape(tuple(input_shape))))})"]
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return text

    def _summary_rows(self, in_shape, name, depth, rows):
        out = self.output_shape(in_shape)
        own = sum(int(np.prod(p.shape)) for p in self.parameters())
        rows.append(("  " * max(depth, 0) + (f"{name} ({type(self).__name__})" if name != type(self).__name__
                                             else name), out, own))
        shape = in_shape
        for child_name, child in self.children():
            if child_name == "shortcut":
                child._summary_rows(in_shape, child_name, depth + 1, rows)
            else:
                shape = child._summary_rows(shape, child_name, depth + 1, rows)
        return out

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
        """Host copies of the parameters and buffers, keyed as PyTorch names them."""
        out = {name: p.numpy() for name, p in self.named_parameters()}
        out.update((name, b.numpy()) for name, b in self.named_buffers())
        return out

    def load_state_dict(self, state):
        """Copy values in place. Missing or unexpected names (:class:`StateDictError`, a ValueError),
        wrongly shaped entries, NaN/Inf values and finite values beyond float32's range raise a clear
        error naming the entry, as :func:`gpu_cnn.load` does; nothing is copied then."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a dict of arrays (name -> array), got {type(state).__name__}")
        own = dict(self.named_parameters())
        own.update(self.named_buffers())
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise StateDictError(f"state_dict does not match the model: missing {missing}, unexpected {extra}")
        for name, p in own.items():
            try:
                value = np.asarray(state[name])
            except (ValueError, TypeError) as exc:  # a ragged list
                raise TypeError(f"state_dict[{name!r}]: expected an array of {'integers' if getattr(p, 'integer', False) else 'floats'} ({exc})") from None
            if getattr(p, "integer", False):
                if not np.issubdtype(value.dtype, np.integer):
                    raise TypeError(f"state_dict[{name!r}]: expected an integer count, got {value.dtype}")
            elif not np.issubdtype(value.dtype, np.floating):
                raise TypeError(f"state_dict[{name!r}]: expected floating values, got {value.dtype}")
            if value.shape != p.shape:
                raise ValueError(f"state_dict[{name!r}]: expected shape {p.shape}, got {value.shape}")
            _base.check_finite(f"state_dict[{name!r}]", value)
            _base.check_float32_range(f"state_dict[{name!r}]", value)
        for name, p in own.items():
            p.assign(state[name])

    def buffers_nbytes(self):
        return self.ws.nbytes() + sum(child.buffers_nbytes() for _, child in self.children())

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
    """2-D convolution (cross-correlation), NCHW, weight (C_out, C_in/groups, kH, kW).

    PyTorch's arguments: stride, padding (an int, a pair, 'same' or 'valid'), dilation, groups
    (depthwise: groups = in_channels), bias. ``padding_mode`` other than 'zeros' is not supported."""

    input_rank = (4, "(N, C, H, W)")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros"):
        super().__init__()
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode: only 'zeros' is supported by gpu-cnn, got {padding_mode!r}")
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.kernel_size = _base.pair("kernel_size", kernel_size, 1)
        self.stride = _base.pair("stride", stride, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding: expected an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding: 'same' is not supported for strided convolutions (stride "
                                 f"{self.stride}), as in PyTorch")
            self.padding = padding
        else:
            self.padding = _base.pair("padding", padding, 0)
        self.dilation = _base.pair("dilation", dilation, 1)
        self.groups = positive_int("groups", groups)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups: in_channels ({self.in_channels}) and out_channels ({self.out_channels}) "
                             f"must both be divisible by groups ({self.groups})")
        bias = _flag("bias", bias)
        kh, kw = self.kernel_size
        fan_in = self.in_channels // self.groups * kh * kw
        w = _init_weight("Conv2d", (self.out_channels, self.in_channels // self.groups, kh, kw), np.sqrt(2.0 / fan_in))
        self.weight = Parameter(w)
        self.bias = Parameter(np.zeros(self.out_channels)) if bias else None
        self._x = None

    def named_parameters(self):
        return [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None else [])

    def _pads(self):
        """(top, bottom, left, right) padding (PyTorch's 'same': the odd extra at the bottom/right)."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            th = self.dilation[0] * (self.kernel_size[0] - 1)
            tw = self.dilation[1] * (self.kernel_size[1] - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        return (self.padding[0], self.padding[0], self.padding[1], self.padding[1])

    def output_shape(self, in_shape):
        c, h, w = _sample_chw("Conv2d", in_shape)
        if c != self.in_channels:
            raise ValueError(f"Conv2d expects {self.in_channels} input channels, got {c}")
        t, b, l, r = self._pads()
        k = (self.dilation[0] * (self.kernel_size[0] - 1) + 1, self.dilation[1] * (self.kernel_size[1] - 1) + 1)
        if h + t + b < k[0] or w + l + r < k[1]:
            raise ValueError(
                f"kernel_size: Conv2d's filter {self.kernel_size}"
                f"{'' if self.dilation == (1, 1) else f' (spanning {k} with dilation {self.dilation})'} is "
                f"larger than the padded input {(h + t + b, w + l + r)} (input {(h, w)}, padding {self.padding})")
        return (self.out_channels, (h + t + b - k[0]) // self.stride[0] + 1, (w + l + r - k[1]) // self.stride[1] + 1)

    def _conv_kw(self):
        return {"dilation": self.dilation, "groups": self.groups}

    def forward(self, x):
        self._begin_forward(x)
        self._x = None
        out_shape = (x.shape[0],) + self.output_shape(tuple(x.shape[1:]))
        y = self.ws.get("output", out_shape)
        F.conv2d(x, self.weight.data, None if self.bias is None else self.bias.data,
                 self.stride, self.padding, out=y, **self._conv_kw())
        self._x, self._y_shape = x, _shape_of(y)
        return y

    def backward(self, dy):
        dy = self._grad_output(dy)
        x = self._cached("_x")
        dx = self.ws.get("grad_input", x.shape) if self.needs_input_grad else None
        F.conv2d_backward(dy, x, self.weight.data, self.stride, self.padding,
                          out=(dx, self.weight.grad, None if self.bias is None else self.bias.grad),
                          need_dx=self.needs_input_grad, bias=self.bias is not None, **self._conv_kw())
        return dx

    def spec(self):
        spec = {"type": "Conv2d", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "bias": self.bias is not None}
        if self.dilation != (1, 1):  # written only when used: older checkpoints keep their architecture
            spec["dilation"] = list(self.dilation)
        if self.groups != 1:
            spec["groups"] = self.groups
        return spec


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


def _pool_out(who, in_shape, k, s, p, d=(1, 1), ceil_mode=False):
    """(C, Ho, Wo) of a pooling layer, PyTorch's rule (ceil_mode drops a last window that would start
    past the input and its left padding), or a clear error when the window does not fit."""
    c, h, w = _sample_chw(who, in_shape)
    e = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)
    if h + 2 * p[0] < e[0] or w + 2 * p[1] < e[1]:
        raise ValueError(f"kernel_size: {who}'s window {k}{'' if e == k else f' (spanning {e} with dilation {d})'} "
                         f"is larger than the padded input "
                         f"{(h + 2 * p[0], w + 2 * p[1])} (input {(h, w)}, padding {p})")

    def axis(size, kk, ss, pp, dd):
        span = size + 2 * pp - dd * (kk - 1) - 1
        out = (span + (ss - 1 if ceil_mode else 0)) // ss + 1
        return out - 1 if ceil_mode and (out - 1) * ss >= size + pp else out
    return (c, axis(h, k[0], s[0], p[0], d[0]), axis(w, k[1], s[1], p[1], d[1]))


def _pool_padding(k, p):
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:  # the functional ops' rule, checked now rather than at forward
        raise ValueError(
            f"padding: must be at most kernel_size // 2 = {(k[0] // 2, k[1] // 2)} per axis "
            f"(so every window holds a real cell), got {p} with kernel_size {k}")


class MaxPool2d(Module):
    """Max pooling; forward keeps the argmax of every output for backward. PyTorch's arguments
    (dilation, ceil_mode); ``return_indices`` is not supported (the layer keeps them itself)."""

    input_rank = (4, "(N, C, H, W)")

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False):
        super().__init__()
        if return_indices is not False:
            raise ValueError("return_indices: not supported by nn.MaxPool2d in gpu-cnn (F.max_pool2d returns "
                             "the indices)")
        self.kernel_size = k = _base.pair("kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else _base.pair("stride", stride, 1)
        self.padding = p = _base.pair("padding", padding, 0)
        self.dilation = _base.pair("dilation", dilation, 1)
        self.ceil_mode = _flag("ceil_mode", ceil_mode)
        _pool_padding(k, p)
        self._x_shape = self._idx = None

    def output_shape(self, in_shape):
        return _pool_out("MaxPool2d", in_shape, self.kernel_size, self.stride, self.padding, self.dilation,
                         self.ceil_mode)

    def forward(self, x):
        self._begin_forward(x)
        self._x_shape = self._idx = None
        out_shape = (x.shape[0],) + self.output_shape(tuple(x.shape[1:]))
        y = self.ws.get("output", out_shape)
        idx = self.ws.get("argmax", out_shape, np.int32)
        F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode, out=(y, idx))
        self._x_shape, self._idx, self._y_shape = _shape_of(x), idx, _shape_of(y)
        return y

    def backward(self, dy):
        dy = self._grad_output(dy)
        x_shape, idx = self._cached("_x_shape"), self._cached("_idx")
        dx = self.ws.get("grad_input", x_shape)
        F.max_pool2d_backward(dy, idx, x_shape, self.kernel_size, self.stride, self.padding, self.dilation,
                              self.ceil_mode, out=dx, check_idx=False)  # its own forward's idx
        return dx

    def spec(self):
        spec = {"type": "MaxPool2d", "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding)}
        if self.dilation != (1, 1):  # written only when used: older checkpoints keep their architecture
            spec["dilation"] = list(self.dilation)
        if self.ceil_mode:
            spec["ceil_mode"] = True
        return spec


class AvgPool2d(Module):
    """Average pooling, PyTorch's arguments and divisor rule (count_include_pad); divisor_override is
    not supported."""

    input_rank = (4, "(N, C, H, W)")

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
        super().__init__()
        if divisor_override is not None:
            raise ValueError(f"divisor_override: not supported by gpu-cnn, got {divisor_override!r}")
        self.kernel_size = k = _base.pair("kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else _base.pair("stride", stride, 1)
        self.padding = p = _base.pair("padding", padding, 0)
        self.ceil_mode = _flag("ceil_mode", ceil_mode)
        self.count_include_pad = _flag("count_include_pad", count_include_pad)
        _pool_padding(k, p)
        self._x_shape = None

    def output_shape(self, in_shape):
        return _pool_out("AvgPool2d", in_shape, self.kernel_size, self.stride, self.padding, (1, 1), self.ceil_mode)

    def _kw(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    ceil_mode=self.ceil_mode, count_include_pad=self.count_include_pad)

    def forward(self, x):
        self._begin_forward(x)
        out_shape = (x.shape[0],) + self.output_shape(tuple(x.shape[1:]))
        y = self.ws.get("output", out_shape)
        F.avg_pool2d(x, out=y, **self._kw())
        self._x_shape, self._y_shape = _shape_of(x), _shape_of(y)
        return y

    def backward(self, dy):
        dy = self._grad_output(dy)
        x_shape = self._cached("_x_shape")
        dx = self.ws.get("grad_input", x_shape)
        F.avg_pool2d_backward(dy, x_shape, out=dx, **self._kw())
        return dx

    def spec(self):
        return {"type": "AvgPool2d", "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "ceil_mode": self.ceil_mode,
                "count_include_pad": self.count_include_pad}


class AdaptiveAvgPool2d(Module):
    """Adaptive average pooling to ``output_size`` (an int or a pair; None keeps that axis); 1 is global
    average pooling."""

    input_rank = (4, "(N, C, H, W)")

    def __init__(self, output_size):
        super().__init__()
        if isinstance(output_size, (tuple, list)) and len(output_size) == 2:
            self.output_size = tuple(None if v is None else positive_int("output_size", v) for v in output_size)
        else:
            self.output_size = _base.pair("output_size", output_size, 1)
        self._x_shape = None

    def output_shape(self, in_shape):
        c, h, w = _sample_chw("AdaptiveAvgPool2d", in_shape)
        oh, ow = self.output_size
        return (c, h if oh is None else oh, w if ow is None else ow)

    def forward(self, x):
        self._begin_forward(x)
        out_shape = (x.shape[0],) + self.output_shape(tuple(x.shape[1:]))
        y = self.ws.get("output", out_shape)
        F.adaptive_avg_pool2d(x, out_shape[2:], out=y)
        self._x_shape, self._y_shape = _shape_of(x), _shape_of(y)
        return y

    def backward(self, dy):
        dy = self._grad_output(dy)
        x_shape = self._cached("_x_shape")
        dx = self.ws.get("grad_input", x_shape)
        F.adaptive_avg_pool2d_backward(dy, x_shape, out=dx)
        return dx

    def spec(self):
        return {"type": "AdaptiveAvgPool2d", "output_size": list(self.output_size)}


def _real(name, value, low, high, low_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not (np.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
        raise ValueError(f"{name}: expected a number in {'(' if low_open else '['}{low}, {high}], got {value!r}")
    return value


class BatchNorm2d(Module):
    """Batch normalisation over (N, H, W) per channel, PyTorch's arguments and state_dict keys.

    Training: batch statistics (biased variance to normalise), running statistics updated with
    ``momentum`` (the unbiased variance; ``momentum=None``: a cumulative average, 1/num_batches_tracked);
    eval: the running statistics (with ``track_running_stats=False``: batch statistics always).
    ``affine``: learnable weight (ones) and bias (zeros). backward WRITES weight.grad and bias.grad."""

    input_rank = (4, "(N, C, H, W)")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.num_features = c = positive_int("num_features", num_features)
        self.eps = _real("eps", eps, 0.0, np.inf, low_open=True)
        self.momentum = None if momentum is None else _real("momentum", momentum, 0.0, 1.0)
        self.affine = _flag("affine", affine)
        self.track_running_stats = _flag("track_running_stats", track_running_stats)
        self.weight = Parameter(np.ones(c)) if self.affine else None
        self.bias = Parameter(np.zeros(c)) if self.affine else None
        if self.track_running_stats:
            self.running_mean = Buffer(np.zeros(c))
            self.running_var = Buffer(np.ones(c))
            self.num_batches_tracked = Counter(0)
        self._x = None

    def named_parameters(self):
        return [("weight", self.weight), ("bias", self.bias)] if self.affine else []

    def named_buffers(self):
        if not self.track_running_stats:
            return []
        return [("running_mean", self.running_mean), ("running_var", self.running_var),
                ("num_batches_tracked", self.num_batches_tracked)]

    def output_shape(self, in_shape):
        c, h, w = _sample_chw("BatchNorm2d", in_shape)
        if c != self.num_features:
            raise ValueError(f"BatchNorm2d expects {self.num_features} channels (num_features), got {c}")
        return (c, h, w)

    def _constant(self, name, value):
        a = self.ws.get(name, (self.num_features,))
        _base.fill(a, value)
        return a

    def forward(self, x):
        self._begin_forward(x)
        self._x = None
        shape = (x.shape[0],) + self.output_shape(tuple(x.shape[1:]))
        batch_stats = self.training or not self.track_running_stats
        if batch_stats and shape[0] * shape[2] * shape[3] < 2:
            raise ValueError(f"x: BatchNorm2d needs more than 1 value per channel in training, got input "
                             f"shape {shape}")
        y = self.ws.get("output", shape)
        mean, invstd = self.ws.get("mean", (shape[1],)), self.ws.get("invstd", (shape[1],))
        w = self.weight.data if self.affine else self._constant("ones", 1.0)
        b = self.bias.data if self.affine else self._constant("zeros", 0.0)
        momentum = None
        if self.track_running_stats:
            rm, rv = self.running_mean.data, self.running_var.data
            if self.training:
                _graph.host_effect(self._track_batch)  # a replayed step (gpu_cnn.graph) counts too
                momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.value
        else:
            rm, rv = mean, invstd  # never read (batch statistics, momentum None)
        F.batch_norm2d(x, w, b, rm, rv, batch_stats, momentum, self.eps, out=y, mean=mean, invstd=invstd)
        self._x, self._batch_stats, self._y_shape = x, batch_stats, _shape_of(y)
        return y

    def _track_batch(self):
        self.num_batches_tracked.value += 1

    def backward(self, dy):
        dy = self._grad_output(dy)
        x = self._cached("_x")
        c = self.num_features
        dx = self.ws.get("grad_input", x.shape) if self.needs_input_grad else None
        w = self.weight.data if self.affine else self.ws.get("ones", (c,))
        dw = self.weight.grad if self.affine else self.ws.get("dweight", (c,))
        db = self.bias.grad if self.affine else self.ws.get("dbias", (c,))
        F.batch_norm2d_backward(dy, x, w, self.ws.get("mean", (c,)), self.ws.get("invstd", (c,)), self._batch_stats,
                                dx=dx, dweight=dw, dbias=db)
        return dx

    def spec(self):
        return {"type": "BatchNorm2d", "num_features": self.num_features, "eps": self.eps,
                "momentum": self.momentum, "affine": self.affine,
                "track_running_stats": self.track_running_stats}


class Dropout(Module):
    """Zero each element with probability p in training (the rest scaled by 1/(1 - p)); identity in eval.

    The mask is a counter-based hash of (seed, step, element index), so cpu, sim and cuda drop the same
    elements: ``seed`` (default: drawn from the generator :func:`manual_seed` seeds) and ``step``, the
    number of training forwards so far (``dropout.step``). ``inplace`` is accepted and has no effect
    (the layer writes its own buffer)."""

    def __init__(self, p=0.5, inplace=False, seed=None):
        super().__init__()
        self.p = _real("p", p, 0.0, 1.0)
        _flag("inplace", inplace)
        if seed is None:
            seed = int(_rng.integers(0, 2**31))
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self.seed = int(seed)
        self.step = 0
        self._active = False

    def forward(self, x):
        self._begin_forward(x)
        self._active = self.training and self.p > 0
        if not self._active:
            self._y_shape = _shape_of(x)
            return x
        self.step += 1
        y = self.ws.get("output", _shape_of(x))
        F.dropout(x, self.p, self.seed, self.step, out=y)
        self._y_shape = _shape_of(y)
        return y

    def backward(self, dy):
        dy = self._grad_output(dy)
        if not self._active:
            return dy
        dx = self.ws.get("grad_input", _shape_of(dy))
        F.dropout_backward(dy, self.p, self.seed, self.step, out=dx)
        return dx

    def spec(self):
        return {"type": "Dropout", "p": self.p, "seed": self.seed}


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
        for layer in self.layers:
            if isinstance(layer, (Sequential, Residual)):
                layer._nested = True  # a container inside a container: it gets backend arrays, no staging
        self.backend = _backend.get_backend()
        self.staging = HostStaging()
        self.requires_input_grad = False
        self._host_io = False
        self._nested = False

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def named_parameters(self):
        return [(f"{i}.{name}", p) for i, layer in enumerate(self.layers) for name, p in layer.named_parameters()]

    def named_buffers(self):
        return [(f"{i}.{name}", b) for i, layer in enumerate(self.layers) for name, b in layer.named_buffers()]

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

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
        self._y_shape = None
        if self._nested:  # inside another container: x is already a backend array
            return self._forward_nested(x)
        self._check_backend()
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
        self._runs = _fusion.plan(self.layers)  # runs of layers one kernel computes (gpu_cnn.fusion)
        for i, _, run in self._runs:
            layer = self.layers[i]
            layer.needs_input_grad = i > 0 or self.requires_input_grad
            if i > 0:  # a wrong rank here is a model built wrongly (a missing Flatten), not a bad x
                prev = f"layer {i - 1} ({type(self.layers[i - 1]).__name__})"
                hint = "; is an nn.Flatten() missing before it?" if len(h.shape) > 2 and isinstance(layer, Linear) else ""
                layer.check_input(h, f"layer {i} ({type(layer).__name__}): its input from {prev}", hint)
            h = run.forward(h)
        self._y_shape = _shape_of(h)
        return _host_copy(h) if self._host_io else h

    def _forward_nested(self, h):
        for i, layer in enumerate(self.layers):
            layer.needs_input_grad = i > 0 or self.needs_input_grad
            if i > 0:
                layer.check_input(h, f"layer {i} ({type(layer).__name__}): its input from layer {i - 1} "
                                     f"({type(self.layers[i - 1]).__name__})")
            h = layer.forward(h)
        self._y_shape = _shape_of(h)
        return h

    def backward(self, dy):
        """Gradients for dy = dLoss/dlogits, of the shape the last forward returned (N, classes)."""
        if self._nested:
            dy = self._grad_output(dy)
            for layer in reversed(self.layers):
                dy = layer.backward(dy)
            return dy
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
        for _, _, run in reversed(self._runs):
            dy = run.backward(dy)
        return _host_copy(dy) if (self._host_io and dy is not None) else dy

    def to_backend(self):
        """Move parameters to the current backend (values kept; buffers replanned)."""
        state = self.state_dict()
        self.backend = _backend.get_backend()
        for layer in self.modules()[1:]:
            for attr, p in list(vars(layer).items()):
                if isinstance(p, (Parameter, Buffer)):
                    setattr(layer, attr, type(p)(p.numpy()))
            layer.ws = Workspace(type(layer).__name__)
            if isinstance(layer, Sequential):
                layer.backend = self.backend
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


class Residual(Module):
    """y = block(x) + shortcut(x): the shortcut is the identity by default, or a module (e.g. a 1×1
    strided Conv2d + BatchNorm2d) when the block changes the shape. Parameter names follow PyTorch's
    for a module with attributes ``block`` and ``shortcut`` ("block.0.weight", "shortcut.1.running_mean").
    backward sends dy through both branches and returns their sum."""

    def __init__(self, block, shortcut=None):
        super().__init__()
        for name, m in (("block", block), ("shortcut", shortcut)):
            if m is not None and not isinstance(m, Module):
                raise TypeError(f"{name}: expected a gpu_cnn.nn.Module, got {type(m).__name__}")
        if block is None:
            raise TypeError("block: expected a gpu_cnn.nn.Module, got None")
        self.block, self.shortcut = block, shortcut
        for m in (block, shortcut):
            if isinstance(m, (Sequential, Residual)):
                m._nested = True
        self._nested = False
        self._x_shape = None

    def children(self):
        return [("block", self.block)] + ([("shortcut", self.shortcut)] if self.shortcut is not None else [])

    def named_parameters(self):
        return [(f"{n}.{k}", p) for n, m in self.children() for k, p in m.named_parameters()]

    def named_buffers(self):
        return [(f"{n}.{k}", b) for n, m in self.children() for k, b in m.named_buffers()]

    def output_shape(self, in_shape):
        out = self.block.output_shape(in_shape)
        short = tuple(in_shape) if self.shortcut is None else self.shortcut.output_shape(in_shape)
        if tuple(out) != tuple(short):
            raise ValueError(f"Residual: the block gives {tuple(out)} but the shortcut gives {tuple(short)} "
                             f"for input {tuple(in_shape)}; give a shortcut that matches (e.g. a 1x1 strided Conv2d)")
        return tuple(out)

    def forward(self, x):
        self._begin_forward(x)
        self._x_shape = None
        out_shape = (x.shape[0],) + self.output_shape(tuple(x.shape[1:]))
        for m in (self.block, self.shortcut):
            if m is not None:
                m.needs_input_grad = self.needs_input_grad
        a = self.block.forward(x)
        b = x if self.shortcut is None else self.shortcut.forward(x)
        y = self.ws.get("output", out_shape)
        F.add(a, b, out=y)
        self._x_shape, self._y_shape = _shape_of(x), _shape_of(y)
        return y

    def backward(self, dy):
        dy = self._grad_output(dy)
        self._cached("_x_shape")
        da = self.block.backward(dy)
        db = dy if self.shortcut is None else self.shortcut.backward(dy)
        if not self.needs_input_grad:
            return None
        dx = self.ws.get("grad_input", self._x_shape)
        F.add(da, db, out=dx)
        return dx

    def spec(self):
        return {"type": "Residual", "block": self.block.spec(),
                "shortcut": None if self.shortcut is None else self.shortcut.spec()}

    def __repr__(self):
        return f"Residual(block={self.block!r}, shortcut={self.shortcut!r})"


_TYPES = {cls.__name__: cls for cls in (Conv2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, BatchNorm2d, Dropout,
                                        Flatten, Linear, Sequential, Residual)}

# PyTorch layers gpu-cnn does not have: nn.<name> says so instead of an AttributeError
_NOT_SUPPORTED = {
    "ConvTranspose1d": "transposed convolutions", "ConvTranspose2d": "transposed convolutions",
    "ConvTranspose3d": "transposed convolutions", "Conv1d": "1-D convolutions (use Conv2d with a 1-row filter)",
    "Conv3d": "3-D convolutions", "MaxPool1d": "1-D pooling", "MaxPool3d": "3-D pooling",
    "AvgPool1d": "1-D pooling", "AvgPool3d": "3-D pooling", "BatchNorm1d": "1-D batch normalisation",
    "BatchNorm3d": "3-D batch normalisation", "LayerNorm": "layer normalisation", "GroupNorm": "group normalisation",
    "Dropout2d": "channel-wise dropout", "AdaptiveMaxPool2d": "adaptive max pooling",
}


def __getattr__(name):
    if name in _NOT_SUPPORTED:
        raise AttributeError(f"nn.{name}: {_NOT_SUPPORTED[name]} are not supported by gpu-cnn; "
                             f"supported layers: {', '.join(_TYPES)}")
    raise AttributeError(f"module 'gpu_cnn.nn' has no attribute {name!r}")


def from_spec(spec):
    """Rebuild a layer or Sequential from :meth:`Module.spec` output (fresh weights)."""
    if not isinstance(spec, dict) or spec.get("type") not in _TYPES:
        raise ValueError(f"unknown layer spec {spec!r}; known types: {', '.join(_TYPES)}")
    kind = spec["type"]
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind == "Sequential":
        return Sequential(*[from_spec(s) for s in args["layers"]])
    if kind == "Residual":
        short = args.get("shortcut")
        return Residual(from_spec(args["block"]), None if short is None else from_spec(short))
    for k, v in args.items():
        if isinstance(v, list):
            args[k] = tuple(v)
    return _TYPES[kind](**args)
