"""Recorded training steps: the kernel launches of one step, replayed without the Python that made them.

After the first training step has planned every buffer, a step of a fixed batch size launches the same
kernels, with the same grids, on the same buffers, with the same scalars, every time: only the numbers
in the buffers change. :class:`Recording` captures those launches (``with recording() as rec:``) while
a step runs eagerly; :class:`StepPlan` checks that two recorded steps agree launch for launch (a launch
argument that changes from step to step, like a Dropout mask's step number, makes it refuse, naming the
kernel and the argument) and then replays them:

* ``sim``: the recorded launches in order, with no layer code, no dispatcher typing and no re-validation
  (the planned step);
* ``cuda``: the same, through pre-built ``cuda.core`` launch configurations and packed kernel
  arguments; with ``cuda_graph`` on, the launches are captured once into a CUDA graph (a ``cuda.core``
  ``GraphBuilder`` on a stream of its own) and a step is one graph launch. A capture that fails falls
  back to the launches, with one warning naming the reason.

The step's inputs (the batch's images and labels on the device) are the plan's parameters: the replay
substitutes the buffers it is given for the recorded ones, so double-buffered inputs share one plan
(and one graph per input buffer).

A plan keeps every recorded argument alive (the recording holds the arrays), so a workspace that a
later eager call replaces by a larger one is not freed under the plan or its graph: the replay goes on
using the buffers it recorded, which only its own launches share.

Host-side state that a step changes without a launch argument showing it (an optimizer's step count,
BatchNorm's ``num_batches_tracked``) is changed through :func:`host_effect`, which runs the change now
and, while a recording is on, records it to run again at every replay.
"""
import contextlib
import numbers
import warnings

import numpy as np

from . import backend as _backend

_active = []  # the recordings now on (innermost last)


class PlanError(RuntimeError):
    """A step that cannot be replayed: the message says which launch and why."""


def host_effect(fn):
    """Run ``fn()`` now; while a step is being recorded, also run it at every replay of that step."""
    fn()
    for rec in _active:
        rec.effects.append(fn)


class Launch:
    """One recorded launch: the kernel object, grid, block, stream, dynamic shared bytes and arguments."""

    __slots__ = ("kernel", "grid", "block", "stream", "shared", "args", "name")

    def __init__(self, kernel, grid, block, stream, shared, args, name):
        self.kernel, self.grid, self.block, self.stream, self.shared = kernel, grid, block, stream, shared
        self.args, self.name = args, name


def _array_key(a):
    """(address, shape, strides, typestr) of a device array (Numba's, or the simulator's), else None."""
    from numba.cuda.simulator.cudadrv import devicearray as fake

    if isinstance(a, fake.FakeCUDAArray):
        iface = a._ary.__array_interface__
        return (iface["data"][0], tuple(a._ary.shape), tuple(a._ary.strides), iface["typestr"])
    iface = getattr(a, "__cuda_array_interface__", None)
    if iface is None:
        return None
    return (iface["data"][0], tuple(iface["shape"]), iface.get("strides"), iface["typestr"])


def _arg_key(a):
    """What a launch argument is, for comparing two steps: a device array by address and layout, a scalar
    by type and value; anything else (a host array, which Numba would copy at every launch) refuses."""
    key = _array_key(a)
    if key is not None:
        return ("array",) + key
    if isinstance(a, (bool, np.bool_)):
        return ("bool", bool(a))
    if isinstance(a, numbers.Integral):
        return ("int", int(a))
    if isinstance(a, numbers.Real):
        v = float(a)
        return ("float", "nan" if v != v else v)
    if isinstance(a, np.ndarray):
        raise PlanError("a launch takes a host (NumPy) array, which would be copied at every launch")
    raise PlanError(f"a launch takes a {type(a).__name__} argument, which a recorded step cannot replay")


class Recording:
    """The launches and host effects of one step, in order (see :func:`recording`)."""

    def __init__(self):
        self.launches = []
        self.effects = []

    def keys(self, inputs=()):
        """Per launch: (name, grid, block, shared, argument keys); an array lying inside one of ``inputs``
        (the input itself, or a view of it such as a flattened batch) is named by the input's position and
        its byte offset there, so that two steps on different input buffers compare equal."""
        spans = [_span(a) for a in inputs]
        out = []
        for L in self.launches:
            args = []
            for a in L.args:
                k = _array_key(a)
                where = _inside(k, spans) if k is not None else None
                args.append(("input", where[0], where[1]) + k[1:] if where else _arg_key(a))
            out.append((L.name, tuple(L.grid), tuple(L.block), L.shared, tuple(args)))
        return out


def _span(a):
    """(first byte address, bytes) of a contiguous device array."""
    k = _array_key(a)
    return k[0], int(np.prod(k[1], dtype=np.int64)) * np.dtype(k[3]).itemsize


def _inside(key, spans):
    """(input index, byte offset) of the array with ``key`` if it starts inside one of ``spans``."""
    for i, (start, size) in enumerate(spans):
        if start <= key[0] < start + max(size, 1):
            return i, key[0] - start
    return None


def _view_at(base, offset, like):
    """A device array over ``base``'s memory at byte ``offset``, with ``like``'s shape, strides and dtype."""
    from numba.cuda.simulator.cudadrv import devicearray as fake

    if isinstance(base, fake.FakeCUDAArray):
        arr = np.ndarray(like._ary.shape, like._ary.dtype, buffer=base._ary, offset=offset,
                         strides=like._ary.strides)
        return fake.FakeCUDAArray(arr)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(like.shape, like.strides, like.dtype, gpu_data=base.gpu_data.view(offset))


def _dims(d):
    if isinstance(d, numbers.Integral):
        return (int(d), 1, 1)
    d = tuple(int(v) for v in d)
    return d + (1,) * (3 - len(d))


@contextlib.contextmanager
def recording():
    """Record every kernel launch (and :func:`host_effect`) made inside; the launches still run."""
    rec = Recording()
    undo = _patch_launches(rec)
    _active.append(rec)
    try:
        yield rec
    finally:
        _active.remove(rec)
        undo()


def _patch_launches(rec):
    """Wrap the launch entry point of the current backend so that it records; returns the undo."""
    if _backend.get_backend() == "sim":
        from numba.cuda.simulator import kernel as simkernel

        old = simkernel.FakeCUDAKernel.__call__

        def __call__(k, *args):
            if not (k._device or simkernel._kernel_context):  # a device function inside a kernel: not a launch
                rec.launches.append(Launch(k, _dims(k.grid_dim), _dims(k.block_dim), k.stream, 0, args,
                                           k.fn.__name__))
            return old(k, *args)

        simkernel.FakeCUDAKernel.__call__ = __call__
        return lambda: setattr(simkernel.FakeCUDAKernel, "__call__", old)
    from numba.cuda import dispatcher

    old = dispatcher._Kernel.launch

    def launch(k, args, griddim, blockdim, stream=0, sharedmem=0):
        rec.launches.append(Launch(k, _dims(griddim), _dims(blockdim), stream, int(sharedmem), tuple(args),
                                   getattr(getattr(k, "py_func", None), "__name__", type(k).__name__)))
        return old(k, args, griddim, blockdim, stream, sharedmem)

    dispatcher._Kernel.launch = launch
    return lambda: setattr(dispatcher._Kernel, "launch", old)


class StepPlan:
    """A step recorded twice and found the same: replayed with :meth:`replay`.

    ``recordings``: two :class:`Recording` of consecutive steps; ``inputs``: for each, the device arrays
    that are the step's inputs (substituted at replay). Raises :class:`PlanError` where they differ.
    cuda_graph: on ``cuda``, capture the launches into a CUDA graph; a failed capture warns once and
    replays the launches instead.
    """

    def __init__(self, first, second, first_inputs, second_inputs, cuda_graph=True):
        k1, k2 = first.keys(first_inputs), second.keys(second_inputs)
        if len(k1) != len(k2):
            raise PlanError(f"two steps made {len(k1)} and {len(k2)} launches")
        for i, (a, b) in enumerate(zip(k1, k2)):
            if a[:4] != b[:4]:
                raise PlanError(f"launch {i + 1} differs between two steps: {a[0]} {a[1]}x{a[2]} then "
                                f"{b[0]} {b[1]}x{b[2]}")
            for j, (x, y) in enumerate(zip(a[4], b[4])):
                if x != y:
                    raise PlanError(f"launch {i + 1} ({a[0]}): argument {j + 1} changes from step to step "
                                    f"({_show(x)} then {_show(y)}); it would have to live in device memory")
        if len(first.effects) != len(second.effects):
            raise PlanError("two steps changed different host state")
        self.recording = second
        self.inputs = tuple(second_inputs)
        self.backend = _backend.get_backend()
        self.launches = len(second.launches)
        self.kernels = [L.name for L in second.launches]
        self._prepared = {}  # inputs' keys -> packed launches (cuda) or a graph
        self.cuda_graph = bool(cuda_graph) and self.backend == "cuda"
        self.graph_error = None  # why the graph could not be used, if it could not

    def _substitute(self, inputs):
        """The recorded launches' arguments with the recorded inputs (and views of them) moved onto
        ``inputs``."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"inputs: expected {len(self.inputs)} device arrays, got {len(inputs)}")
        for old, new in zip(self.inputs, inputs):
            ko, kn = _array_key(old), _array_key(new)
            if kn is None or ko[1:] != kn[1:]:
                raise ValueError(f"inputs: a replayed step needs device arrays shaped like the recorded ones "
                                 f"({ko[1]}), got {kn[1] if kn else type(new).__name__}")
        spans = [_span(a) for a in self.inputs]
        same = all(_array_key(o) == _array_key(n) for o, n in zip(self.inputs, inputs))
        out = []
        for L in self.recording.launches:
            args = []
            for a in L.args:
                k = _array_key(a)
                where = None if same or k is None else _inside(k, spans)
                args.append(_view_at(inputs[where[0]], where[1], a) if where else a)
            out.append((L, tuple(args)))
        return out

    def replay(self, inputs=()):
        """One step: the recorded launches (or the graph) on ``inputs``, then the recorded host effects."""
        key = tuple(_array_key(a) for a in inputs)
        run = self._prepared.get(key)
        if run is None:
            run = self._prepared[key] = self._prepare(self._substitute(tuple(inputs)))
        run()
        for fn in self.recording.effects:
            fn()

    def _prepare(self, launches):
        if self.backend == "sim":
            def run():
                for L, args in launches:
                    L.kernel[L.grid, L.block, L.stream](*args)
            return run
        packed = [_pack(L, args) for L, args in launches]
        if self.cuda_graph and self.graph_error is None:
            try:
                return _capture(packed)
            except Exception as exc:  # any failure of capture: run the launches instead, and say why once
                self.graph_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"cuda_graph: capturing the training step failed ({self.graph_error}); "
                              f"the step runs its {len(packed)} launches eagerly", RuntimeWarning, stacklevel=4)
        from cuda.core import launch

        def run():
            for stream, config, kern, kargs in packed:
                launch(stream, config, kern, *kargs)
        return run


def _show(key):
    if key[0] == "array":
        return f"a device array at {key[1]:#x} {key[2]}"
    if key[0] == "input":
        return f"input {key[1] + 1}"
    return repr(key[1])


def _pack(L, args):
    """(core stream, LaunchConfig, kernel handle, packed arguments) of a recorded cuda launch: what
    ``_Kernel.launch`` computes every time, computed once."""
    from cuda.core import LaunchConfig
    from numba.cuda.cudadrv import driver

    k = L.kernel
    cufunc = k._codelibrary.get_cufunc()
    retr, kargs = [], []
    for t, v in zip(k.argument_types, args):
        k._prepare_args(t, v, L.stream, retr, kargs)
    if retr:
        raise PlanError(f"{L.name}: an argument is copied back after the launch (a host array)")
    try:
        config = LaunchConfig(grid=L.grid, block=L.block, shmem_size=L.shared, is_cooperative=k.cooperative)
    except TypeError:  # cuda.core < 1.0
        config = LaunchConfig(grid=L.grid, block=L.block, shmem_size=L.shared, cooperative_launch=k.cooperative)
    return driver._to_core_stream(L.stream), config, cufunc.kernel, kargs


def _capture(packed):
    """A CUDA graph of the packed launches, captured on a stream of its own; returns run()."""
    from cuda.core import Device, launch

    stream = Device().create_stream()
    builder = stream.create_graph_builder()
    builder.begin_building()
    try:
        for _, config, kern, kargs in packed:
            launch(builder, config, kern, *kargs)
    finally:
        builder.end_building()
    graph = builder.complete()
    default = packed[0][0] if packed else None

    def run():
        # the graph's stream waits for what the default stream has queued (the batch's copy), and the
        # default stream for the graph, so reads after the step see it
        stream.wait(default)
        graph.launch(stream)
        default.wait(stream)

    run.graph = graph  # kept alive with its stream and builder
    run.stream, run.builder = stream, builder
    return run


class StepPlanner:
    """Turns a trainer's steps of one batch size into a :class:`StepPlan`.

    Per batch size: the first ``warmup`` steps run eagerly (the first plans the buffers, and SGD's first
    step differs from the rest), the next two run eagerly while recorded, and if they agree every later
    step replays. A refusal (:class:`PlanError`) is kept in :attr:`reason` and that size stays eager.
    ``token``: anything the plan depends on that no launch argument shows (the learning rate); a new token
    drops every plan. cuda_graph: passed to the plan (None: a graph where the backend has them).
    """

    def __init__(self, cuda_graph=None, enabled=True, warmup=1):
        self.cuda_graph, self.enabled, self.warmup = cuda_graph, enabled, warmup
        self._sizes = {}
        self._token = None
        self.reason = None  # why the last refused plan was refused
        self.replays = 0

    def reset(self):
        self._sizes.clear()
        self._token = None

    def plan(self, n):
        """The plan for batch size n, or None."""
        entry = self._sizes.get(n)
        return entry["plan"] if entry else None

    def step(self, n, inputs, run, token=None):
        """One step of batch size n on device ``inputs``: replayed where planned, else ``run()``."""
        if token != self._token:
            self._sizes.clear()
            self._token = token
        entry = self._sizes.get(n)
        if entry is None:
            entry = self._sizes[n] = {"eager": 0, "recs": [], "plan": None, "refused": False}
        if entry["plan"] is not None:
            entry["plan"].replay(inputs)
            self.replays += 1
            return "replay"
        if entry["refused"] or not self.enabled or entry["eager"] < self.warmup:
            entry["eager"] += 1
            run()
            return "eager"
        with recording() as rec:
            run()
        entry["recs"].append((rec, tuple(inputs)))
        if len(entry["recs"]) == 2:
            (r1, i1), (r2, i2) = entry["recs"]
            entry["recs"] = []
            on_cuda = _backend.get_backend() == "cuda"
            try:
                entry["plan"] = StepPlan(r1, r2, i1, i2, cuda_graph=self.cuda_graph is not False)
            except PlanError as exc:
                entry["refused"] = True
                self.reason = str(exc)
                if on_cuda and self.cuda_graph:
                    warnings.warn(f"cuda_graph: the training step cannot be captured ({exc}); it runs eagerly",
                                  RuntimeWarning, stacklevel=3)
        return "recorded"
