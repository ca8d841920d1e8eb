"""simcheck: Numba's CUDA simulator as a checker, like compute-sanitizer without a GPU.

    from gpu_cnn import simcheck

    with simcheck.checking():          # or @simcheck.checking() on a test, or GPU_CNN_SIMCHECK=1
        my_kernel[blocks, threads](x, y)

Every kernel launched under the simulator while checking is on runs on instrumented arrays and
barriers. The first problem raises :class:`SimcheckError` (a ``RuntimeError``) whose ``kind`` is one of

``"race"``
    two different threads of one block touch the same shared-memory element between two barriers, at
    least one of them writing and not both atomically; or, for a kernel's array arguments (global
    memory), two threads of the launch write the same element, or one writes what another reads, with
    no barrier of their block between them (threads of different blocks are never ordered). A thread
    reading and writing its own element, and ``cuda.atomic.*`` on the same element, are fine.
``"barrier"``
    a ``syncthreads()`` (``_count``/``_and``/``_or``) that not every thread of the block reaches at the
    same call site: threads waiting at different barriers, or a thread that returns while others of its
    block wait at (or later reach) a barrier. Reported at once, never a hang; a block whose waiting
    threads see no progress for ``$GPU_CNN_SIMCHECK_TIMEOUT`` seconds (default 60) is reported too.
``"uninitialized"``
    a read of a shared-array element that no thread of the block has written in this launch, or of an
    element of a ``cuda.device_array`` (and so of gpu_cnn's ``empty``) that nothing has written since
    it was allocated while checking was on. Copies to the device, host-side item assignment, fills and
    kernel writes count as writes; ``to_device`` copies and NumPy arguments are initialized.
``"bounds"``
    an index past the end of an array axis, or any negative index (Numba wraps it on a GPU; in a CNN
    kernel that is almost always an off-by-one).

The message names the kernel, the array (argument or shared-array name), the element index, the
threads (block and thread index) and the source lines (file:line) of both accesses.

On the ``cpu`` backend it is a no-op (no kernel runs); on ``cuda`` it refuses (there, use
compute-sanitizer: ``--tool memcheck|racecheck|synccheck|initcheck``; ``benchmarks/run_gpu.sh``
runs memcheck and racecheck over the kernels).

Ordering between blocks: only through ``cuda.threadfence()`` and an atomic (the "last block reduces"
pattern). A thread's ``threadfence()`` covers its own global writes before it; an atomic on an element
by a block releases what its threads had fenced before it (the atomic's own thread in the same
barrier interval, the others in earlier ones: fence, ``syncthreads()``, then the atomic); a later
atomic on that element by another block acquires every release made on it so far, for the acquiring
thread at once and for its whole block after its next barrier. Any other access by another block to
an element one wrote is a race, as before. Limits: a write after the fence in the fencing thread's
barrier interval also counts as released; local arrays are not checked; the memory model is the
simulator's (no warp-synchronous execution).
"""
import contextlib
import functools
import inspect
import linecache
import operator
import os
import re
import sys
import threading
import time
import weakref

import numpy as np

from . import backend as _backend

ENV_VAR = "GPU_CNN_SIMCHECK"
TIMEOUT_ENV_VAR = "GPU_CNN_SIMCHECK_TIMEOUT"
KINDS = ("race", "barrier", "uninitialized", "bounds")


class SimcheckError(RuntimeError):
    """A problem simcheck found in a simulated kernel launch; ``kind`` is one of :data:`KINDS`."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


_depth = 0  # nesting of checking() contexts
_installed = False
_hooks_installed = False


def enabled():
    """True while simulator launches are checked (inside checking() or with GPU_CNN_SIMCHECK=1)."""
    return _depth > 0 or os.environ.get(ENV_VAR, "").strip() == "1"


def _refusal():
    return _backend.BackendError(
        "gpu_cnn.simcheck checks kernels under Numba's CUDA simulator only (backend 'sim'); on a real GPU "
        "(backend 'cuda') use NVIDIA's compute-sanitizer (--tool memcheck, racecheck, synccheck, initcheck; "
        "benchmarks/run_gpu.sh runs memcheck and racecheck over the kernels). Unset GPU_CNN_SIMCHECK there."
    )


def _simulator_on():
    """True/False once numba.cuda is imported; before that, whether it will be the simulator."""
    if "numba.cuda" in sys.modules:
        from numba.core import config

        return bool(config.ENABLE_CUDASIM)
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "") == "1"


class _Checking(contextlib.ContextDecorator):
    def __enter__(self):
        global _depth
        backend = _backend.get_backend()
        if backend == "cuda" or ("numba.cuda" in sys.modules and not _simulator_on()):
            raise _refusal()
        if _simulator_on():
            install()
        _depth += 1
        return self

    def __exit__(self, *exc):
        global _depth
        _depth -= 1
        if not enabled():
            _tracked.clear()  # arrays allocated while checking now count as initialized
        return False


def checking(fn=None):
    """Check every simulator launch inside: ``with checking(): ...`` or ``@checking()`` (or ``@checking``)."""
    if callable(fn):
        return _Checking()(fn)
    return _Checking()


# ---------------------------------------------------------------------------------------------------
# initialization tracking for device allocations: owner ndarray id -> (weakref, byte mask)

_tracked = {}


def _owner(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _address(a):
    return a.__array_interface__["data"][0]


def _track(nd):
    owner = _owner(nd)
    key = id(owner)

    def forget(_ref, key=key):
        _tracked.pop(key, None)

    _tracked[key] = (weakref.ref(owner, forget), np.zeros(owner.nbytes, np.bool_))


def _mask_of(nd):
    """(owner, byte mask) when nd's memory is tracked, else (owner, None)."""
    owner = _owner(nd)
    entry = _tracked.get(id(owner))
    if entry is None or entry[0]() is not owner:
        return owner, None
    return owner, entry[1]


def _byte_view(nd, owner, mask):
    """The mask bytes under nd, shaped nd.shape + (itemsize,)."""
    off = _address(nd) - _address(owner)
    return np.lib.stride_tricks.as_strided(mask[off:], shape=nd.shape + (nd.itemsize,),
                                           strides=nd.strides + (1,))


def _mark_written(nd, idx=Ellipsis):
    if not _tracked:
        return
    owner, mask = _mask_of(nd)
    if mask is not None:
        view = _byte_view(nd, owner, mask)
        try:
            view[idx] = True
        except Exception:  # an index the mask cannot take (a field name, ...): all of it counts as written
            view[...] = True


# ---------------------------------------------------------------------------------------------------
# installation: hooks into numba-cuda 0.30.4's simulator


def install():
    """Install the hooks into the simulator (idempotent). Launches are checked only while enabled()."""
    global _installed
    if _installed:
        return
    if not _simulator_on():
        if enabled():
            raise _refusal()
        return
    from numba.cuda.simulator import kernel as kmod

    global _sim
    _sim = _SimModules()
    orig_call = kmod.FakeCUDAKernel.__call__

    @functools.wraps(orig_call)
    def __call__(self, *args):
        if self._device or kmod._kernel_context is not None or not enabled():
            return orig_call(self, *args)
        _install_memory_hooks()
        return _launch(self, args)

    kmod.FakeCUDAKernel.__call__ = __call__
    _installed = True


def _install_memory_hooks():
    """device_array allocations are tracked, and host-side writes mark them written (first check only)."""
    global _hooks_installed
    if _hooks_installed:
        return
    import numba.cuda
    from numba.cuda import simulator
    from numba.cuda.simulator.cudadrv import devicearray as dmod

    orig_device_array = dmod.device_array

    @functools.wraps(orig_device_array)
    def device_array(*args, **kwargs):
        a = orig_device_array(*args, **kwargs)
        if enabled():
            _track(a._ary)
        return a

    for mod in (dmod, simulator, numba.cuda):
        if getattr(mod, "device_array", None) is orig_device_array:
            mod.device_array = device_array

    cls = dmod.FakeCUDAArray
    orig_setitem, orig_copy, orig_getattr = cls.__setitem__, cls.copy_to_device, cls.__getattr__

    def __setitem__(self, idx, val):
        r = orig_setitem(self, idx, val)
        _mark_written(self._ary, idx)
        return r

    def copy_to_device(self, ary, stream=0):
        r = orig_copy(self, ary, stream=stream)
        _mark_written(self._ary)
        return r

    mutating = frozenset(("fill", "put", "itemset", "setfield", "sort", "partition", "resize", "byteswap"))

    def __getattr__(self, name):
        if name in mutating:
            _mark_written(self._ary)  # conservative: the whole array counts as written
        return orig_getattr(self, name)

    cls.__setitem__, cls.copy_to_device, cls.__getattr__ = __setitem__, copy_to_device, __getattr__
    _hooks_installed = True


class _SimModules:
    def __init__(self):
        from numba.cuda.simulator import kernel, kernelapi
        from numba.cuda.simulator.cudadrv import devicearray

        self.kernel, self.kernelapi, self.devicearray = kernel, kernelapi, devicearray


_sim = None


# ---------------------------------------------------------------------------------------------------
# reports

_OWN_FILES = None


def _is_internal(filename):
    global _OWN_FILES
    if _OWN_FILES is None:
        sim_dir = os.path.dirname(_sim.kernel.__file__)
        _OWN_FILES = (sim_dir, os.path.abspath(__file__), os.path.dirname(contextlib.__file__) + os.sep + "contextlib",
                      os.path.dirname(threading.__file__) + os.sep + "threading")
    return filename.startswith(_OWN_FILES)


def _where(code, line):
    path = code.co_filename
    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            path = rel
    except ValueError:
        pass
    return f"{path}:{line}"


def _dims(d):
    return "(" + ", ".join(str(int(v)) for v in d) + ")"


def _fmt_index(idx):
    return "[" + ", ".join(str(int(i)) for i in idx) + "]"


class _Report:
    """What a message needs to name a thread: block and thread index from linear numbers."""

    def __init__(self, launch):
        self.launch = launch

    def thread(self, blk, tid):
        return (f"block {_dims(np.unravel_index(blk, self.launch.grid_dim))} "
                f"thread {_dims(np.unravel_index(tid, self.launch.block_dim))}")


def _access_desc(launch, rec, what):
    blk, tid, _epoch, code, line, atomic = rec
    kind = "atomic update" if atomic else what
    return f"{kind} by {_Report(launch).thread(blk, tid)} at {_where(code, line)}"


# ---------------------------------------------------------------------------------------------------
# per-memory shadow state: element -> last accesses


class _Mem:
    """Shadow of one buffer (a kernel argument's memory for one launch, or a block's shared array).

    Keys are element slots (byte offset from the buffer start // g). Records are tuples
    (block, thread, epoch, code, line, atomic). W: last plain write; A, A2: last atomic and the last by
    another thread; R, R2: last plain read and the last by another thread."""

    __slots__ = ("W", "A", "A2", "R", "R2", "mask", "shared", "g", "lock", "launch")

    def __init__(self, launch, g, mask=None, shared=False):
        self.W, self.A, self.A2, self.R, self.R2 = {}, {}, {}, {}, {}
        self.mask = mask
        self.shared = shared
        self.g = g
        self.lock = launch.lock
        self.launch = launch


def _conflict(rec, b, t, e, launch=None):
    """rec and the access (b, t, e) are unordered: other block (unless a release/acquire through an
    atomic orders them, see the module docstring), or other thread in the same epoch."""
    if rec[0] != b:
        return launch is None or not _acquired(launch, rec, b, t, e)
    return rec[1] != t and rec[2] == e


def _acquired(launch, rec, b, t, e):
    """Another block's access rec is ordered before (b, t, e): block b acquired a release that covers it."""
    for b_w, fenced, t_a, e_a in launch.acquired.get(b, ()):
        if b_w == rec[0] and (t == t_a or e > e_a):
            f = fenced.get(rec[1])
            if f is not None and rec[2] <= f:
                return True
    return False


def _fence():
    """cuda.threadfence() by this thread: its global writes so far are covered by its block's next release."""
    th = threading.current_thread()
    th.block.fences[th.tid] = th.block.epoch


def _release_acquire(arr, bo, th):
    """An atomic on arr's element at bo by thread th: acquire the releases made on it by other blocks,
    then release what th's block has fenced (see the module docstring)."""
    mem = arr._mem
    if mem.shared:
        return
    launch, blk = th.block.launch, th.block
    key = (id(mem), bo // mem.g)
    with launch.lock:
        released = launch.releases.setdefault(key, [])
        for b_w, fenced in released:
            if b_w != th.blk:
                launch.acquired.setdefault(th.blk, []).append((b_w, fenced, th.tid, blk.epoch))
        fenced = {t: e for t, e in blk.fences.items() if e < blk.epoch or t == th.tid}
        if fenced:
            released.append((th.blk, fenced))


# ---------------------------------------------------------------------------------------------------
# the instrumented array seen by kernels


class _CheckedArray:
    """A kernel's view of an array under simcheck: every element access is checked and recorded."""

    __slots__ = ("_a", "_mem", "_off", "_st", "_shp", "_nd", "_n0", "_s0", "_name", "_root")

    def __init__(self, a, mem, off, name, root):
        self._a = a
        self._mem = mem
        self._off = off  # byte offset of a's first element from the buffer start
        self._st = a.strides
        self._shp = a.shape
        self._nd = a.ndim
        self._n0 = a.shape[0] if a.ndim else 0
        self._s0 = a.strides[0] if a.ndim else 0
        self._name = name
        self._root = root  # (offset, shape, strides) of the argument / shared array itself

    # what kernels read off an array
    @property
    def shape(self):
        return _sim.devicearray.FakeShape(self._shp)

    def __getattr__(self, name):
        return getattr(self._a, name)

    def __len__(self):
        return self._n0

    def __iter__(self):
        for i in range(self._n0):
            yield self[i]

    def __repr__(self):
        return f"<simcheck {self._name} {self._shp} {self._a.dtype}>"

    # element access
    def _locate(self, idx, frame):
        """Byte offset of the element idx names, or None when idx selects a sub-array."""
        if type(idx) is not tuple:
            idx = (idx,)
        if len(idx) != self._nd:
            return None
        bo = self._off
        for d, i in enumerate(idx):
            if type(i) is not int:
                try:
                    i = operator.index(i)
                except TypeError:
                    return None
            if i < 0 or i >= self._shp[d]:
                self._bounds(idx, d, i, frame)
            bo += i * self._st[d]
        return bo

    def __getitem__(self, idx):
        f = sys._getframe(1)
        if type(idx) is int and self._nd == 1:
            if idx < 0 or idx >= self._n0:
                self._bounds((idx,), 0, idx, f)
            bo = self._off + idx * self._s0
        else:
            bo = self._locate(idx, f)
            if bo is None:
                return self._sub(idx, f)
        _read(self, bo, threading.current_thread(), f, idx)
        return self._a[idx]

    def __setitem__(self, idx, val):
        f = sys._getframe(1)
        if type(idx) is int and self._nd == 1:
            if idx < 0 or idx >= self._n0:
                self._bounds((idx,), 0, idx, f)
            bo = self._off + idx * self._s0
        else:
            bo = self._locate(idx, f)
            if bo is None:
                sub = self._sub(idx, f)
                if isinstance(sub, _CheckedArray):
                    sub._write_all(val, f)
                    return
                self._a[idx] = val
                return
        _write(self, bo, threading.current_thread(), f, idx, False)
        self._a[idx] = val

    def _write_all(self, val, f):
        th = threading.current_thread()
        for i in np.ndindex(*self._shp):
            bo = self._off + sum(a * s for a, s in zip(i, self._st))
            _write(self, bo, th, f, i, False)
        self._a[...] = val

    def _sub(self, idx, f):
        """A sub-array (row, slice) of this array: same shadow, bounds of its integer indices checked."""
        parts = idx if type(idx) is tuple else (idx,)
        if not any(p is Ellipsis or p is None for p in parts):
            for d, p in enumerate(parts[: self._nd]):
                if not isinstance(p, (slice, np.ndarray, list)):
                    try:
                        i = operator.index(p)
                    except TypeError:
                        continue
                    if i < 0 or i >= self._shp[d]:
                        self._bounds(parts, d, i, f)
        sub = self._a[idx]
        if not isinstance(sub, np.ndarray):
            return sub
        off = self._off + (_address(sub) - _address(self._a))
        return _CheckedArray(sub, self._mem, off, self._name, self._root)

    def _element_of(self, bo):
        """The element index at byte offset bo, in the argument's (shared array's) own coordinates."""
        off, shape, strides = self._root
        rem = bo - off
        idx = [0] * len(shape)
        for d in sorted(range(len(shape)), key=lambda d: -abs(strides[d])):
            if strides[d]:
                idx[d], rem = divmod(rem, strides[d])
        return tuple(idx)

    def _bounds(self, idx, d, i, f):
        th = threading.current_thread()
        launch = th.block.launch
        if i < 0:
            what = (f"negative index {i} on axis {d} (a GPU wraps it silently under Numba; simcheck "
                    f"reports every negative index)")
        else:
            what = f"index {i} past the end of axis {d} (size {self._shp[d]})"
        raise SimcheckError("bounds", (
            f"bounds: {what} of {self._name} with shape {tuple(self._shp)}, index "
            f"{_fmt_index(idx) if all(_is_int(x) for x in idx) else idx}, in kernel {launch.kname}, by "
            f"{_Report(launch).thread(th.blk, th.tid)} at {_where(f.f_code, f.f_lineno)}"))


def _is_int(x):
    try:
        operator.index(x)
        return True
    except TypeError:
        return False


def _race(arr, bo, th, f, rec, mine, theirs, atomic=False):
    launch = th.block.launch
    me = (th.blk, th.tid, th.block.epoch, f.f_code, f.f_lineno, atomic)
    where = "shared memory" if arr._mem.shared else "global memory"
    hint = (" with no syncthreads() between them" if rec[0] == th.blk else
            " from different blocks, which are never ordered within a launch (use cuda.atomic, or a second launch)")
    raise SimcheckError("race", (
        f"race on {arr._name} element {_fmt_index(arr._element_of(bo))} ({where}) in kernel {launch.kname}: "
        f"{_access_desc(launch, rec, theirs)} and {_access_desc(launch, me, mine)}{hint}"))


def _read(arr, bo, th, f, idx):
    mem = arr._mem
    k = bo // mem.g
    blk = th.block
    b, t, e = th.blk, th.tid, blk.epoch
    lc = None if mem.shared else mem.launch
    with mem.lock:
        w = mem.W.get(k)
        if w is not None and _conflict(w, b, t, e, lc):
            _race(arr, bo, th, f, w, "read", "write")
        a = mem.A.get(k)
        if a is not None:
            if _conflict(a, b, t, e, lc):
                _race(arr, bo, th, f, a, "read", "write")
            a2 = mem.A2.get(k)
            if a2 is not None and _conflict(a2, b, t, e, lc):
                _race(arr, bo, th, f, a2, "read", "write")
        elif w is None and (mem.shared or (mem.mask is not None and not mem.mask[bo])):
            if blk.pending is None:  # reported at the next barrier or block end, unless a race comes first
                blk.pending = (arr, bo, b, t, f.f_code, f.f_lineno)
        r = mem.R.get(k)
        if r is not None and (r[0] != b or r[1] != t):
            mem.R2[k] = r
        mem.R[k] = (b, t, e, f.f_code, f.f_lineno, False)


def _write(arr, bo, th, f, idx, atomic):
    mem = arr._mem
    k = bo // mem.g
    blk = th.block
    b, t, e = th.blk, th.tid, blk.epoch
    mine = "atomic" if atomic else "write"
    lc = None if mem.shared else mem.launch
    with mem.lock:
        w = mem.W.get(k)
        if w is not None and _conflict(w, b, t, e, lc):
            _race(arr, bo, th, f, w, mine, "write", atomic)
        for rd in (mem.R, mem.R2):
            r = rd.get(k)
            if r is not None and _conflict(r, b, t, e, lc):
                _race(arr, bo, th, f, r, mine, "read", atomic)
        rec = (b, t, e, f.f_code, f.f_lineno, atomic)
        a = mem.A.get(k)
        if atomic:
            if w is None and a is None and (mem.shared or (mem.mask is not None and not mem.mask[bo])):
                if blk.pending is None:
                    blk.pending = (arr, bo, b, t, f.f_code, f.f_lineno)
            if a is not None and (a[0] != b or a[1] != t):
                mem.A2[k] = a
            mem.A[k] = rec
        else:
            if a is not None:
                if _conflict(a, b, t, e, lc):
                    _race(arr, bo, th, f, a, mine, "write", True)
                a2 = mem.A2.get(k)
                if a2 is not None and _conflict(a2, b, t, e, lc):
                    _race(arr, bo, th, f, a2, mine, "write", True)
            mem.W[k] = rec


# ---------------------------------------------------------------------------------------------------
# shared memory and atomics under checking


_ASSIGN = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?::[^=]+)?=\s*[\w.]*shared\.array\b")


def _shared_name(code, line):
    m = _ASSIGN.match(linecache.getline(code.co_filename, line))
    return f"shared array '{m.group(1)}'" if m else f"shared array made at {_where(code, line)}"


class _CheckedShared:
    """cuda.shared.array under checking: one array per block and call site, created under a lock."""

    def __init__(self, dynshared_size):
        self._dynshared_size = dynshared_size

    def array(self, shape, dtype, alignment=None):
        if alignment is not None:
            raise RuntimeError("Array alignment is not supported in cudasim")
        km = _sim.kernelapi
        if isinstance(dtype, km.types.Type):
            dtype = km.numpy_support.as_dtype(dtype)
        dtype = np.dtype(dtype)
        blk = threading.current_thread().block
        f = sys._getframe(1)
        with blk.shared_lock:
            if shape == 0:  # dynamic shared memory: one buffer per block, every such array aliases it
                if blk.dyn is None:
                    buf = np.empty(self._dynshared_size, np.byte)
                    blk.dyn = (buf, _Mem(blk.launch, dtype.itemsize, shared=True))
                buf, mem = blk.dyn
                a = np.frombuffer(buf.data, dtype=dtype, count=self._dynshared_size // dtype.itemsize)
                return _CheckedArray(a, mem, 0, "dynamic shared array", (0, a.shape, a.strides))
            key = (f.f_code, f.f_lasti)
            res = blk.shared.get(key)
            if res is None:
                a = np.empty(shape, dtype)
                res = _CheckedArray(a, _Mem(blk.launch, dtype.itemsize, shared=True), 0,
                                    _shared_name(f.f_code, f.f_lineno), (0, a.shape, a.strides))
                blk.shared[key] = res
            return res


def _make_atomic_class():
    base = _sim.kernelapi.FakeCUDAAtomic

    def op(name):
        impl = getattr(base, name)

        def method(self, array, index, *vals):
            if isinstance(array, _CheckedArray):
                f = sys._getframe(1)
                bo = array._locate(index, f)
                if bo is None:
                    raise TypeError(f"cuda.atomic.{name}: index {index!r} does not name one element of {array._name}")
                th = threading.current_thread()
                _write(array, bo, th, f, index, True)
                _release_acquire(array, bo, th)
                return impl(self, array._a, index, *vals)
            return impl(self, array, index, *vals)

        method.__name__ = name
        return method

    ns = {n: op(n) for n in ("add", "sub", "and_", "or_", "xor", "inc", "dec", "exch", "max", "min",
                              "nanmax", "nanmin", "cas")}

    def compare_and_swap(self, array, old, val):
        if isinstance(array, _CheckedArray):
            f = sys._getframe(1)
            index = (0,) * array._nd
            th, bo = threading.current_thread(), array._locate(index, f)
            _write(array, bo, th, f, index, True)
            _release_acquire(array, bo, th)
            return base.compare_and_swap(self, array._a, old, val)
        return base.compare_and_swap(self, array, old, val)

    ns["compare_and_swap"] = compare_and_swap
    return type("CheckedAtomic", (base,), ns)


_atomic_class = None


def _make_module_class():
    km = _sim.kernelapi

    class CheckedCUDAModule(km.FakeCUDAModule):
        def __init__(self, grid_dim, block_dim, dynshared_size):
            super().__init__(grid_dim, block_dim, dynshared_size)
            self._shared = _CheckedShared(dynshared_size)
            self._atomic = _atomic_class()

        def syncthreads(self):
            threading.current_thread().block.barrier(None)

        def threadfence(self):
            _fence()

        def threadfence_system(self):
            _fence()

        def syncthreads_count(self, val):
            return threading.current_thread().block.barrier(val)[0]

        def syncthreads_and(self, val):
            return 1 if threading.current_thread().block.barrier(val)[1] else 0

        def syncthreads_or(self, val):
            return 1 if threading.current_thread().block.barrier(val)[2] else 0

    return CheckedCUDAModule


_module_class = None


# ---------------------------------------------------------------------------------------------------
# blocks, threads and barriers


class _Abort(BaseException):
    """Unwinds a simulated thread after another thread of its block failed."""


class _Thread(threading.Thread):
    def __init__(self, block, point, tid, fn, args, debug):
        super().__init__(daemon=True)
        km = _sim.kernelapi
        self.block = block
        self.blk = block.lin
        self.tid = tid
        self.threadIdx = km.Dim3(*point)
        self.blockIdx = block.blockIdx
        bd = block.launch.block_dim
        self.thread_id = point[0] + bd[0] * (point[1] + bd[1] * point[2])  # as the simulator (laneid)
        self.kframe = None  # the kernel's frame: where the thread returned, for barrier reports
        self._fn, self._args, self._debug = fn, args, debug

    def _catch_kernel_frame(self, frame, event, arg):
        if event == "call" and frame.f_code is self._fn.__code__:
            self.kframe = frame
            sys.setprofile(None)

    def run(self):
        try:
            if self._debug:
                np.seterr(divide="raise")
            sys.setprofile(self._catch_kernel_frame)  # this thread only, until the kernel is entered
            self._fn(*self._args)
        except _Abort:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the launching thread
            self.block.fail(e, self)
        finally:
            sys.setprofile(None)
            self.block.thread_done(self)

    # the simulator's other entry points (cg.this_grid().sync())
    def syncthreads(self):
        self.block.barrier(None)


_RUN_CODE = _Thread.run.__code__


def _barrier_site():
    """(identity, description) of the barrier call: the kernel's frames from the thread's entry."""
    f = sys._getframe(2)
    key = []
    desc = []
    while f is not None and f.f_code is not _RUN_CODE:
        key.append((f.f_code, f.f_lasti))
        if not _is_internal(f.f_code.co_filename):
            desc.append(_where(f.f_code, f.f_lineno))
        f = f.f_back
    return tuple(key), " called from ".join(desc) if desc else "?"


class _Block:
    def __init__(self, launch, lin, point):
        self.launch = launch
        self.lin = lin
        self.blockIdx = _sim.kernelapi.Dim3(*point)
        self.n = launch.nthreads
        self.cond = threading.Condition(threading.Lock())
        self.shared_lock = threading.Lock()
        self.shared = {}
        self.dyn = None
        self.epoch = 0
        self.gen = 0
        self.arrived = 0
        self.site = None
        self.first = None  # (thread, description) of the first thread at the current barrier
        self.agg = None
        self.result = None
        self.finished = None  # first thread that returned
        self.nfinished = 0
        self.error = None
        self.progress = 0
        self.pending = None  # first uninitialized read, reported at the next barrier or block end
        self.fences = {}  # thread -> epoch of its last cuda.threadfence()

    def _thread(self, th):
        return _Report(self.launch).thread(th.blk, th.tid)

    def _set_error(self, err):
        if self.error is None:
            self.error = err
        self.cond.notify_all()

    def fail(self, exc, th):
        with self.cond:
            if not isinstance(exc, SimcheckError):
                try:
                    exc.add_note(f"in kernel {self.launch.kname}, {self._thread(th)}")
                except AttributeError:
                    pass
            self._set_error(exc)

    def _barrier_error(self, msg):
        return SimcheckError("barrier", f"barrier divergence in kernel {self.launch.kname}: {msg}")

    def _returned(self, th):
        f = th.kframe
        at = f" at {_where(f.f_code, f.f_lineno)}" if f is not None else ""
        return f"{self._thread(th)} returned from the kernel{at} without reaching it"

    def barrier(self, value):
        th = threading.current_thread()
        key, where = _barrier_site()
        with self.cond:
            if self.error is not None:
                raise _Abort
            if self.finished is not None:
                self._set_error(self._barrier_error(
                    f"{self._thread(th)} reached syncthreads() at {where}, but {self._returned(self.finished)}"))
                raise _Abort
            if self.arrived == 0:
                self.site = key
                self.first = (th, where)
                self.agg = [0, True, False]
            elif key != self.site:
                other, owhere = self.first
                self._set_error(self._barrier_error(
                    f"{self._thread(other)} waits at syncthreads() at {owhere}, but {self._thread(th)} reached "
                    f"a different syncthreads() at {where} (a barrier under a thread-dependent branch?)"))
                raise _Abort
            if value is not None:
                self.agg[0] += 1 if value else 0
                self.agg[1] = self.agg[1] and bool(value)
                self.agg[2] = self.agg[2] or bool(value)
            self.arrived += 1
            self.progress += 1
            if self.arrived == self.n:
                self._flush_pending()
                if self.error is not None:
                    raise _Abort
                self.result = tuple(self.agg)
                self.epoch += 1
                self.gen += 1
                self.arrived = 0
                self.cond.notify_all()
                return self.result
            gen = self.gen
            while self.gen == gen and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise _Abort
            return self.result

    def thread_done(self, th):
        with self.cond:
            self.nfinished += 1
            self.progress += 1
            if self.finished is None:
                self.finished = th
            if self.arrived and self.error is None:
                other, owhere = self.first
                self._set_error(self._barrier_error(
                    f"{self._thread(other)} waits at syncthreads() at {owhere}, but {self._returned(th)}"))
            self.cond.notify_all()

    def _flush_pending(self):
        if self.pending is None or self.error is not None:
            return
        arr, bo, b, t, code, line = self.pending
        self.pending = None
        mem = arr._mem
        if mem.shared:
            why = "no thread of the block wrote it before (shared memory is not initialized)"
        else:
            why = "nothing wrote it since it was allocated (cuda.device_array / empty memory is not initialized)"
        self._set_error(SimcheckError("uninitialized", (
            f"uninitialized read of {arr._name} element {_fmt_index(arr._element_of(bo))} in kernel "
            f"{self.launch.kname}: read by {_Report(self.launch).thread(b, t)} at {_where(code, line)}; {why}")))

    def run(self, fn, args, debug):
        launch = self.launch
        threads = [_Thread(self, point, tid, fn, args, debug)
                   for tid, point in enumerate(np.ndindex(*launch.block_dim))]
        for th in threads:
            th.start()
        timeout = float(os.environ.get(TIMEOUT_ENV_VAR, "") or 60)
        with self.cond:
            seen, since = self.progress, time.monotonic()
            while self.nfinished < self.n and self.error is None:
                self.cond.wait(0.5)
                if self.progress != seen:
                    seen, since = self.progress, time.monotonic()
                elif self.arrived and time.monotonic() - since > timeout:
                    other, owhere = self.first
                    self._set_error(self._barrier_error(
                        f"{self.arrived} of {self.n} threads, {self._thread(other)} the first, wait at "
                        f"syncthreads() at {owhere} and the others made no progress for {timeout:g} s "
                        f"(a deadlock? set {TIMEOUT_ENV_VAR} to wait longer)"))
            if self.error is None:
                self._flush_pending()
            err = self.error
        if err is not None:
            for th in threads:  # let the others unwind (they stop at their next barrier)
                th.join(0.05)
            raise err


class _Launch:
    def __init__(self, kern, grid_dim, block_dim):
        self.kern = kern
        fn = kern.fn
        self.kname = f"'{getattr(fn, '__qualname__', fn.__name__)}'"
        self.grid_dim = tuple(grid_dim)
        self.block_dim = tuple(block_dim)
        self.nthreads = int(np.prod(block_dim))
        self.lock = threading.Lock()
        self.mems = {}  # id(owner) -> (owner, _Mem)
        self.releases = {}  # (id(_Mem), element) -> [(block, {thread: epoch of its fence})] by atomics there
        self.acquired = {}  # block -> [(releasing block, {thread: fence epoch}, acquiring thread, its epoch)]
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        self.names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def wrap(self, i, arg):
        """A FakeCUDAArray argument -> a checked array over the same memory."""
        nd = arg._ary
        if nd.dtype.fields is not None:
            return _sim.devicearray.FakeWithinKernelCUDAArray(arg)
        owner, mask = _mask_of(nd)
        entry = self.mems.get(id(owner))
        if entry is None:
            entry = (owner, _Mem(self, nd.itemsize, mask=mask))
            self.mems[id(owner)] = entry
        off = _address(nd) - _address(owner)
        name = f"argument '{self.names[i]}'" if i < len(self.names) else f"argument {i}"
        return _CheckedArray(nd, entry[1], off, name, (off, nd.shape, nd.strides))

    def flush(self):
        """Elements written in this launch count as initialized from now on."""
        for owner, mem in self.mems.values():
            if mem.mask is None or not (mem.W or mem.A):
                continue
            ks = np.fromiter(list(mem.W) + list(mem.A), np.int64)
            bos = ks * mem.g
            for j in range(mem.g):
                np.put(mem.mask, bos + j, True, mode="clip")


def _launch(kern, args):
    global _atomic_class, _module_class
    km, kmod = _sim.kernelapi, _sim.kernel
    if _module_class is None:
        _atomic_class = _make_atomic_class()
        _module_class = _make_module_class()
    from numba.cuda.errors import normalize_kernel_dimensions
    from numba.cuda.simulator.args import ArgHint, InOut

    grid_dim, block_dim = normalize_kernel_dimensions(kern.grid_dim, kern.block_dim)
    launch = _Launch(kern, grid_dim, block_dim)
    mod = _module_class(grid_dim, block_dim, kern.dynshared_size)
    FakeCUDAArray = _sim.devicearray.FakeCUDAArray
    with kmod._push_kernel_context(mod):
        retr = []

        def fake_arg(i, arg):  # as FakeCUDAKernel.__call__, with checked arrays for device arrays
            _, arg = functools.reduce(
                lambda ty_val, extension: extension.prepare_args(*ty_val, stream=0, retr=retr),
                kern.extensions, (None, arg))
            if isinstance(arg, np.ndarray) and arg.ndim > 0:
                ret = InOut(arg).to_device(retr)
            elif isinstance(arg, ArgHint):
                ret = arg.to_device(retr)
            elif isinstance(arg, np.void):
                ret = FakeCUDAArray(arg)
            else:
                ret = arg
            if isinstance(ret, FakeCUDAArray):
                if isinstance(ret._ary, np.ndarray):
                    return launch.wrap(i, ret)
                return _sim.devicearray.FakeWithinKernelCUDAArray(ret)
            return ret

        fake_args = [fake_arg(i, a) for i, a in enumerate(args)]
        with km.swapped_cuda_module(kern.fn, mod):
            for lin, point in enumerate(np.ndindex(*grid_dim)):
                _Block(launch, lin, point).run(kern.fn, fake_args, kern._debug)
        launch.flush()
        for wb in retr:
            wb()


# Installed on import whenever the simulator is (or will be) the CUDA implementation; gpu_cnn's kernel
# modules import this module, so GPU_CNN_SIMCHECK=1 covers every launch in a process that uses them.
if _simulator_on():
    install()
elif enabled() and "numba.cuda" in sys.modules:
    raise _refusal()
