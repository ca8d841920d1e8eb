"""Optimizers, PyTorch-like: ``SGD``, ``Adam``, ``AdamW`` and ``make_optimizer(name, params, lr, **kw)``.

``params`` is a list of ``(param, grad)`` pairs of float32 C-contiguous arrays of the current backend's
kind (NumPy arrays on ``cpu``, device arrays on ``cuda``/``sim``), or objects with ``.data`` and ``.grad``
such as :class:`gpu_cnn.nn.Parameter`. ``step()`` updates every param in place from its grad with
PyTorch's formulas (``torch.optim.SGD``, ``torch.optim.Adam``, ``torch.optim.AdamW``); the grads are only
read. The optimizer state (momentum buffers, Adam's m and v) is allocated once, at construction, through
``gpu_cnn.ops._base.zeros``, so a step allocates nothing: on ``cuda``/``sim`` it launches the kernels of
``gpu_cnn.kernels.optim``, on ``cpu`` it runs in-place NumPy into scratch buffers planned up front.

    opt = SGD([(p.data, p.grad) for p in model.parameters()], lr=0.1, momentum=0.9)
    opt.zero_grad(); model.backward(dlogits); opt.step()

One launch a step: where the params and grads are views of two flat buffers, in order and back to back
(``model.flatten_parameters()`` makes them so and returns the pair), pass that pair as ``flat=``; the
state is then flat too, and a step (and ``zero_grad``) updates the whole model in one launch. The
elements and their formulas are the same, so the results are bit-identical to one launch per param;
``state_dict`` keeps one array per param either way.

    flat = model.flatten_parameters()
    opt = Adam(model.parameters(), lr=1e-3, flat=flat)
"""
import math
import numbers

import numpy as np

from . import backend as _backend
from . import graph as _graph
from .ops import _base

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "make_optimizer", "OPTIMIZERS"]


# ---------------------------------------------------------------------------------------------------
# argument checks


def _real(name, value, low=None, high=None, low_open=False, high_open=False):
    """A finite real number within [low, high] (ends open when asked), else a clear error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if high is None:
            want = f"> {low:g}" if low_open else f">= {low:g}"
        else:
            want = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected a number {want}, got {value:g}")
    return value


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def _backend_array(name, a, on_kernels):
    """`a` as an array of the backend's kind (a device array, converted from CuPy/PyTorch, on cuda/sim; a
    NumPy array on cpu), else a TypeError naming `name`."""
    if on_kernels:
        if not _base.is_device_array(a):
            raise TypeError(f"{name}: expected a device array on backend {_backend.get_backend()!r}, "
                            f"got {type(a).__name__}")
        return _base._as_cuda_array(a)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array on backend 'cpu', got {type(a).__name__}")
    return a


def _pairs(params, on_kernels):
    """Validate (param, grad) pairs; returns [(param, grad, flat param, flat grad)] (flat: views, no copy)."""
    if isinstance(params, (np.ndarray, str, bytes)) or _base.is_device_array(params):
        raise TypeError("params: expected a list of (param, grad) pairs")
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"params: expected a list of (param, grad) pairs, got {type(params).__name__}") from None
    if not params:
        raise ValueError("params: got an empty list; the optimizer needs at least one (param, grad) pair")
    seen = []  # (index, (first byte, end)) of each non-empty param
    out = []
    for i, item in enumerate(params):
        if hasattr(item, "data") and hasattr(item, "grad") and not isinstance(item, (tuple, list)):
            item = (item.data, item.grad)  # a gpu_cnn.nn.Parameter
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"params[{i}]: expected a (param, grad) pair, got {type(item).__name__}")
        arrays = []
        for role, a in zip(("param", "grad"), item):
            name = f"params[{i}] {role}"
            a = _backend_array(name, a, on_kernels)
            if np.dtype(a.dtype) != _base.FLOAT:
                raise TypeError(f"{name}: expected float32, got {np.dtype(a.dtype).name}")
            contiguous = a.is_c_contiguous() if on_kernels else a.flags.c_contiguous
            if not contiguous:
                raise ValueError(f"{name}: expected a C-contiguous array (it is updated in place)")
            if not on_kernels and role == "param" and not a.flags.writeable:
                raise ValueError(f"{name}: the array is read-only; the optimizer updates it in place")
            arrays.append(a)
        p, g = arrays
        if tuple(p.shape) != tuple(g.shape):
            raise ValueError(f"params[{i}]: param shape {tuple(p.shape)} and grad shape {tuple(g.shape)} differ")
        n = int(np.prod(p.shape, dtype=np.int64))
        if n:  # memory shared with an earlier param (the same one, a reshape, a view) would be updated twice
            start = _base.data_address(p)
            span = (start, start + n * _base.FLOAT().itemsize)
            for j, (lo, hi) in seen:
                if span[0] < hi and lo < span[1]:
                    raise ValueError(f"params[{i}]: this param appears more than once (its memory overlaps "
                                     f"params[{j}]'s), so a step would update it twice")
            seen.append((i, span))
        out.append((p, g, p.reshape(n) if p.ndim != 1 else p, g.reshape(n) if g.ndim != 1 else g))
    return out


def _flat_pair(flat, params, on_kernels):
    """Validate ``flat = (flat params, flat grads)``: 1-D float32 buffers of the backend's kind that hold
    every (param, grad) of `params` as back-to-back views, in order. Returns the pair and each param's
    element offset."""
    if not (isinstance(flat, (tuple, list)) and len(flat) == 2):
        raise TypeError(f"flat: expected a (flat params, flat grads) pair, got {type(flat).__name__}")
    arrays = []
    for role, a in zip(("params", "grads"), flat):
        name = f"flat {role}"
        a = _backend_array(name, a, on_kernels)
        if np.dtype(a.dtype) != _base.FLOAT or len(a.shape) != 1:
            raise ValueError(f"{name}: expected a 1-D float32 buffer, got {np.dtype(a.dtype).name} of shape "
                             f"{tuple(a.shape)}")
        arrays.append(a)
    fp, fg = arrays
    total = sum(pf.shape[0] for _, _, pf, _ in params)
    if fp.shape[0] != total or fg.shape[0] != total:
        raise ValueError(f"flat: the buffers hold {fp.shape[0]} and {fg.shape[0]} elements, but the params "
                         f"hold {total}")
    item = _base.FLOAT().itemsize
    offsets, off = [], 0
    for i, (_, _, pf, gf) in enumerate(params):
        for role, a, base in (("param", pf, fp), ("grad", gf, fg)):
            if _base.data_address(a) != _base.data_address(base) + off * item:
                raise ValueError(f"flat: params[{i}] {role} is not the view of the flat {role}s at element {off} "
                                 "(the params must be back-to-back views of the flat buffers, in order)")
        offsets.append(off)
        off += pf.shape[0]
    return (fp, fg), offsets


# ---------------------------------------------------------------------------------------------------
# base class


class Optimizer:
    """What SGD and Adam share: the (param, grad) pairs, lr, the step count, state buffers, zero_grad and
    state_dict. Subclasses name their buffers in ``BUFFERS`` and implement ``_update_cpu``/``_update_kernels``
    (one param)."""

    NAME = "optimizer"
    BUFFERS = ()

    def __init__(self, params, lr, version=None, flat=None):
        self._on_kernels = _backend.uses_kernels()
        self._backend = _backend.get_backend()
        self._params = _pairs(params, self._on_kernels)
        # what a step updates, one launch each: (flat param, flat grad, first param index, param count)
        if flat is None:
            self._flat, self._offsets = None, None
            self._segments = [(pf, gf, i, 1) for i, (_, _, pf, gf) in enumerate(self._params)]
        else:
            self._flat, self._offsets = _flat_pair(flat, self._params, self._on_kernels)
            self._segments = [(self._flat[0], self._flat[1], 0, len(self._params))]
        self.lr = lr
        if version is not None and self._on_kernels:  # on cpu there are no kernel versions: ignored
            from .kernels import optim as kernels

            version = kernels.resolve_version(version)
        self.version = version
        self.step_count = 0
        self.state = {}  # buffer name -> one array per param, shaped like it, on the backend (live, not copies)
        self._state = {}  # the same buffers viewed flat
        self._seg_state = {}  # buffer name -> one flat buffer per segment (what the update kernels get)
        self._scratch = ()

    # -- lr: a settable attribute, validated (schedules change it between steps)
    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _real("lr", value, low=0.0)

    @property
    def params(self):
        """The (param, grad) pairs, as given (Parameter objects unpacked)."""
        return [(p, g) for p, g, _, _ in self._params]

    # -- memory, planned once
    def _alloc_state(self, names):
        """One zeroed buffer shaped like its param for every name (through _base.zeros: counted, on the
        backend); the kernels and the cpu path use flat views of them. With ``flat=``, one flat buffer
        per name, and the per-param arrays are views of it."""
        for name in names:
            if self._flat is None:
                bufs = [_base.zeros(p.shape) for p, _, _, _ in self._params]
                flats = [b.reshape(pf.shape[0]) if b.ndim != 1 else b for b, (_, _, pf, _) in zip(bufs, self._params)]
                self._seg_state[name] = flats
            else:
                whole = _base.zeros((self._flat[0].shape[0],))
                flats = [whole[o:o + pf.shape[0]] for o, (_, _, pf, _) in zip(self._offsets, self._params)]
                bufs = [f.reshape(p.shape) if len(p.shape) != 1 else f for f, (p, _, _, _) in zip(flats, self._params)]
                self._seg_state[name] = [whole]
            self.state[name] = bufs
            self._state[name] = flats

    def _alloc_scratch(self, count):
        """cpu only: `count` flat host scratch arrays of the largest segment's size, reused every step."""
        if not self._on_kernels:
            n = max(pf.shape[0] for pf, _, _, _ in self._segments)
            self._scratch = tuple(np.empty(n, _base.FLOAT) for _ in range(count))

    def _views(self, n):
        return tuple(s[:n] for s in self._scratch)

    # -- steps
    def step(self):
        """Update every param in place from its grad (the grads are read, not changed). No allocation."""
        t = self.step_count + 1
        if self._on_kernels:
            from .kernels import optim as kernels

            for k, (pf, gf, _, _) in enumerate(self._segments):
                self._update_kernels(kernels, k, pf, gf, t)
        else:
            for k, (pf, gf, _, _) in enumerate(self._segments):
                self._update_cpu(k, pf, gf, t)
        _graph.host_effect(self._count_step)  # a replayed step (gpu_cnn.graph) counts too

    def _count_step(self):
        self.step_count += 1

    def zero_grad(self):
        """Fill every grad with 0 in place (no allocation; one fill with ``flat=``)."""
        for _, gf, _, _ in self._segments:
            _base.fill(gf, 0.0)

    # k: the segment (one param, or the whole flat model); its state buffers are self._seg_state[name][k]
    def _update_cpu(self, k, p, g, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_kernels(self, kernels, k, p, g, t):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- state
    def hyperparameters(self):
        return {"lr": self.lr}

    def state_dict(self):
        """Host copies: {"optimizer", "step", "hyperparameters", and one list of arrays (shaped like the
        params) per state buffer}."""
        sd = {"optimizer": self.NAME, "step": self.step_count, "hyperparameters": self.hyperparameters()}
        for name in self.BUFFERS:
            if name in self._state:
                sd[name] = [_host_copy(buf) for buf in self.state[name]]
        return sd

    def load_state_dict(self, state):
        """Restore the step count, lr and the state buffers (copied in place, no device allocation).

        Other hyperparameters keep the values given to the constructor. Everything is checked before
        anything is changed."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict from state_dict(), got {type(state).__name__}")
        if state.get("optimizer") != self.NAME:
            raise ValueError(f"state: it holds the state of {state.get('optimizer')!r}, not {self.NAME!r}")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"state['step']: expected an int >= 0, got {step!r}")
        hyper = state.get("hyperparameters", {})
        if not isinstance(hyper, dict):
            raise TypeError(f"state['hyperparameters']: expected a dict, got {type(hyper).__name__}")
        lr = hyper.get("lr", self.lr)
        _real("state['hyperparameters']['lr']", lr, low=0.0)
        new = {}
        for name in self._state:
            if name not in state:
                raise ValueError(f"state: missing {name!r}")
            bufs = state[name]
            if not isinstance(bufs, (list, tuple)) or len(bufs) != len(self._params):
                raise ValueError(f"state[{name!r}]: expected a list of {len(self._params)} arrays")
            new[name] = []
            for i, (b, (p, _, _, _)) in enumerate(zip(bufs, self._params)):
                b = np.asarray(b)
                if not np.issubdtype(b.dtype, np.floating):
                    raise TypeError(f"state[{name!r}][{i}]: expected floating point, got {b.dtype.name}")
                if b.shape != tuple(p.shape):
                    raise ValueError(f"state[{name!r}][{i}]: expected shape {tuple(p.shape)}, got {b.shape}")
                new[name].append(np.ascontiguousarray(b, dtype=_base.FLOAT).reshape(b.size))
        extra = [k for k in self.BUFFERS if k in state and k not in self._state]
        if extra:
            raise ValueError(f"state: holds {extra[0]!r}, which this optimizer does not keep (check its hyperparameters)")
        for name, hosts in new.items():
            for buf, host in zip(self._state[name], hosts):
                if isinstance(buf, np.ndarray):
                    np.copyto(buf, host)
                else:
                    buf.copy_to_device(host)
        self.step_count = int(step)
        self.lr = lr
        self._restored_step()

    def _restored_step(self):
        """Hook: device state that follows the step count (Adam's step counter)."""

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({len(self._params)} params, {hp}, step={self.step_count}, backend={self._backend!r})"


def _host_copy(a):
    return a.copy() if isinstance(a, np.ndarray) else a.copy_to_host()


# ---------------------------------------------------------------------------------------------------
# SGD


class SGD(Optimizer):
    """``torch.optim.SGD``: g' = g + weight_decay·p; with momentum, buf = g' on the first step, then
    buf = momentum·buf + (1 − dampening)·g', and d = g' + momentum·buf (nesterov) or buf; p −= lr·d.

    The momentum buffers (one per param, only when momentum > 0) are allocated here, once.
    version: kernel version on cuda/sim (see ``gpu_cnn.kernels.optim.VERSIONS``; None = the default).
    """

    NAME = "sgd"
    BUFFERS = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, *, version=None,
                 flat=None):
        self.momentum = _real("momentum", momentum, low=0.0)
        self.dampening = _real("dampening", dampening, low=0.0, high=1.0)
        self.nesterov = _flag("nesterov", nesterov)
        self.weight_decay = _real("weight_decay", weight_decay, low=0.0)
        if self.nesterov and (self.momentum == 0.0 or self.dampening != 0.0):
            raise ValueError(
                f"nesterov: Nesterov momentum needs momentum > 0 and dampening == 0, "
                f"got momentum={self.momentum:g}, dampening={self.dampening:g}"
            )
        super().__init__(params, lr, version, flat)
        if self.momentum != 0.0:
            self._alloc_state(["momentum_buffer"])
        self._alloc_scratch(2)

    def hyperparameters(self):
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    def _update_kernels(self, kernels, k, p, g, t):
        buf = self._seg_state["momentum_buffer"][k] if self.momentum != 0.0 else None
        kernels.sgd_step(p, g, buf, self.lr, self.momentum, self.dampening, self.nesterov, self.weight_decay,
                         first_step=t == 1, version=self.version)

    def _update_cpu(self, k, p, g, t):
        f = np.float32
        s, tmp = self._views(p.shape[0])
        d = g  # the effective gradient; g itself is never written
        if self.weight_decay != 0.0:
            np.multiply(p, f(self.weight_decay), out=s)
            s += g
            d = s
        if self.momentum != 0.0:
            buf = self._seg_state["momentum_buffer"][k]
            if t == 1:
                np.copyto(buf, d)
            else:
                buf *= f(self.momentum)
                np.multiply(d, f(1.0 - self.dampening), out=tmp)
                buf += tmp
            if self.nesterov:
                np.multiply(buf, f(self.momentum), out=tmp)
                tmp += d
                d = tmp
            else:
                d = buf
        np.multiply(d, f(self.lr), out=tmp)
        p -= tmp


# ---------------------------------------------------------------------------------------------------
# Adam, AdamW


class Adam(Optimizer):
    """``torch.optim.Adam`` (decoupled=False: weight_decay·p added to the gradient) or
    ``torch.optim.AdamW`` (decoupled=True: p *= 1 − lr·weight_decay), bias-corrected:
    m = b1·m + (1 − b1)·g; v = b2·v + (1 − b2)·g²; p −= lr·m̂/(sqrt(v̂) + eps), m̂ = m/(1 − b1^t),
    v̂ = v/(1 − b2^t). m and v (``exp_avg``, ``exp_avg_sq``) are allocated here, once.
    version: kernel version on cuda/sim (see ``gpu_cnn.kernels.optim.VERSIONS``; None = the default).
    """

    NAME = "adam"
    BUFFERS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False, *,
                 version=None, flat=None):
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        self.betas = (_real("betas[0]", betas[0], low=0.0, high=1.0, high_open=True),
                      _real("betas[1]", betas[1], low=0.0, high=1.0, high_open=True))
        self.eps = _real("eps", eps, low=0.0, low_open=True)
        self.weight_decay = _real("weight_decay", weight_decay, low=0.0)
        self.decoupled = _flag("decoupled", decoupled)
        if self.decoupled:
            self.NAME = "adamw"
        super().__init__(params, lr, version, flat)
        self._alloc_state(["exp_avg", "exp_avg_sq"])
        # the default kernel reads the step from a device counter (one per segment), so a recorded step
        # replays (gpu_cnn.graph); an explicit version= takes the bias corrections from the host
        self._counts = None
        if self._on_kernels and self.version is None:
            self._counts = [_base.empty((1,), np.int64, "Adam's step counter") for _ in self._segments]
            self._restored_step()
        self._alloc_scratch(2 if self.weight_decay != 0.0 and not self.decoupled else 1)

    def hyperparameters(self):
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay,
                "decoupled": self.decoupled}

    def _restored_step(self):
        if self._counts is not None:
            from .kernels import optim as kernels

            for count, (pf, _, _, _) in zip(self._counts, self._segments):
                kernels.adam_counted_set(count, pf.shape[0], self.step_count)

    def _update_kernels(self, kernels, k, p, g, t):
        if self._counts is not None:
            kernels.adam_counted(p, g, self._seg_state["exp_avg"][k], self._seg_state["exp_avg_sq"][k],
                                 self._counts[k], self.lr, self.betas[0], self.betas[1], self.eps,
                                 self.weight_decay, self.decoupled)
            return
        kernels.adam_step(p, g, self._seg_state["exp_avg"][k], self._seg_state["exp_avg_sq"][k], t, self.lr,
                          self.betas[0], self.betas[1], self.eps, self.weight_decay, self.decoupled,
                          version=self.version)

    def _update_cpu(self, k, p, g, t):
        f = np.float32
        beta1, beta2 = self.betas
        # host float64 scalars, as gpu_cnn.kernels.optim.adam_scalars computes them for the kernels
        # (not imported from there: that would import numba.cuda on the cpu backend)
        step_size = self.lr / (1.0 - beta1**t)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
        m, v = self._seg_state["exp_avg"][k], self._seg_state["exp_avg_sq"][k]
        views = self._views(p.shape[0])
        tmp = views[0]
        d = g  # the effective gradient; g itself is never written
        if self.weight_decay != 0.0:
            if self.decoupled:
                p *= f(1.0 - self.lr * self.weight_decay)
            else:
                s = views[1]
                np.multiply(p, f(self.weight_decay), out=s)
                s += g
                d = s
        m *= f(beta1)
        np.multiply(d, f(1.0 - beta1), out=tmp)
        m += tmp
        v *= f(beta2)
        np.multiply(d, d, out=tmp)
        tmp *= f(1.0 - beta2)
        v += tmp
        np.sqrt(v, out=tmp)
        tmp /= f(bias_correction2_sqrt)
        tmp += f(self.eps)
        np.divide(m, tmp, out=tmp)
        tmp *= f(step_size)
        p -= tmp


class AdamW(Adam):
    """``torch.optim.AdamW``: :class:`Adam` with decoupled weight decay (p *= 1 − lr·weight_decay),
    weight_decay 1e-2 by default as in PyTorch."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, version=None,
                 flat=None):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled=True, version=version, flat=flat)


# ---------------------------------------------------------------------------------------------------
# by name

OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(name, params, lr, **kw):
    """The optimizer called `name` ("sgd", "adam" or "adamw", any case) over `params`, with `lr` and the
    class's other keyword arguments."""
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name.lower()](params, lr=lr, **kw)
