"""What every op module shares: argument checks, moving arrays to the backend, allocation.

Conventions (every op in ``gpu_cnn.ops`` keeps them):

* Host input (NumPy, lists) of a floating dtype is converted to C-contiguous float32 (float64 is
  computed in float32: documented, not rejected). Integer and bool input is a ``TypeError``.
* On ``cuda``/``sim`` a device array (``__cuda_array_interface__`` or a simulator array) must already be
  float32 and C-contiguous; it is used in place, never copied through the host.
* Results come back on the host when the first array argument came from the host, else on the device.
* Every op takes a keyword-only ``out=`` (a tuple for ops with several results): preallocated outputs of
  the backend's kind. With ``out`` given the op makes no device allocation; the planned-memory layers
  rely on that. All device allocation goes through :func:`empty` / :func:`zeros` so it can be counted.
* No output may share memory with an input or with another output (:func:`check_no_overlap` compares
  the byte ranges of host and device arrays), except the exact in-place uses an op documents (``relu``
  with ``out=x``): an overlapping ``out`` is a ``ValueError`` naming both arguments, never a wrong answer.
* Finite host input that does not fit float32 (|v| > 3.4028235e38, say 1e39 as a Python float) is a
  ``ValueError`` naming the argument and its largest magnitude (:func:`check_float32_range`); it would
  otherwise become inf silently.
* NaN/Inf policy (every backend alike): NaN and ±inf already IN the input are not refused by the ops
  (checking would cost a pass over every array on every call); they go through IEEE float32
  arithmetic, so an output that depends on a NaN is NaN, with two rules an op states itself:
  ``relu_backward`` gives 0 wherever x <= 0 (or x is NaN), whatever dy holds, and max-pooling lets a NaN
  win its window. What refuses non-finite values is the layer above: ``Trainer.fit``, ``train_step``,
  ``evaluate`` and ``predict`` refuse NaN/Inf images, ``load`` and ``load_state_dict`` refuse NaN/Inf
  weights, and training stops with ``TrainingError`` on a non-finite loss or weight.
* Sizes are bounded: kernel_size, stride and padding (every op, every layer) are at most
  :data:`MAX_INT` (int32, what the kernels' index math holds), and an allocation larger than the
  memory there is is refused up front with the figure (:func:`check_alloc`), not left to MemoryError.
"""
import numbers
import os

import numpy as np

from .. import backend as _backend

FLOAT = np.float32
FLOAT32_MAX = float(np.finfo(np.float32).max)
# The one bound on kernel_size, stride and padding for every op and layer: int32, what the kernels'
# index math holds (a stride of 2**63 was an OverflowError on max-pool and accepted by conv).
MAX_INT = 2**31 - 1


# ---------------------------------------------------------------------------------------------------
# argument checks


def pair(name, value, minimum):
    """An int or a pair of ints -> (int, int), each >= minimum, else a clear error naming `name`."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        value = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if value[0] < minimum or value[1] < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value}")
    if value[0] > MAX_INT or value[1] > MAX_INT:
        raise ValueError(f"{name}: expected values <= {MAX_INT} (2**31 - 1), got {value}")
    return value


def is_device_array(a):
    return hasattr(a, "__cuda_array_interface__") or type(a).__name__ == "FakeCUDAArray"


def data_address(a):
    """Where an array's data starts (host, simulator or device memory), for telling one buffer from two.

    Converted wrappers of the same PyTorch or CuPy tensor are distinct objects, so ``id`` cannot tell."""
    if type(a).__name__ == "FakeCUDAArray":
        a = a._ary
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return a.__cuda_array_interface__["data"][0]


def _layout(a):
    """(data pointer, shape, strides in bytes, item size) from the array interface: ``__array_interface__``
    for NumPy and the simulator's arrays, ``__cuda_array_interface__`` for device arrays; None for
    anything else."""
    if type(a).__name__ == "FakeCUDAArray":
        a = a._ary
    if isinstance(a, np.ndarray):
        iface = a.__array_interface__
    elif hasattr(a, "__cuda_array_interface__"):
        iface = a.__cuda_array_interface__
    else:
        return None
    shape = tuple(int(s) for s in iface["shape"])
    itemsize = np.dtype(iface["typestr"]).itemsize
    strides = iface.get("strides")
    if strides is None:  # C-contiguous
        strides, step = [], itemsize
        for s in reversed(shape):
            strides.insert(0, step)
            step *= s
    return int(iface["data"][0]), shape, tuple(int(v) for v in strides), itemsize


def _extent(a):
    """[first byte, one past the last byte) that array `a` can touch, or None when it is empty (or
    not an array). Negative strides reach below the data pointer."""
    lay = _layout(a)
    if lay is None or 0 in lay[1]:
        return None
    ptr, shape, strides, itemsize = lay
    start = end = ptr
    for s, st in zip(shape, strides):
        if st < 0:
            start += st * (s - 1)
        else:
            end += st * (s - 1)
    return start, end + itemsize


def _same_view(a, b):
    """Whether a and b are the very same elements in the same order (what an in-place op may take)."""
    return _layout(a) == _layout(b)


def check_no_overlap(outputs, inputs, in_place=()):
    """Refuse outputs that share memory with an input or with each other: a ``ValueError`` naming both.

    outputs, inputs: sequences of (name, array or None), the arrays as the op will use them (after
    conversion: a host input that was copied cannot overlap). ``in_place``: (output name, input name)
    pairs the op documents as safe when the two are exactly the same view (element-wise ops); a
    partial or shifted overlap is refused even there. Works on host and device arrays alike by
    comparing byte ranges (host and device pointers never coincide on one backend: outputs are of the
    backend's kind, and host inputs are copied to the device there)."""
    outs = [(n, a, _extent(a)) for n, a in outputs if a is not None]
    ins = [(n, a, _extent(a)) for n, a in inputs if a is not None]
    for i, (on, oa, oe) in enumerate(outs):
        if oe is None:
            continue
        for other, kind in [(x, "input") for x in ins] + [(x, "output") for x in outs[i + 1:]]:
            n, a, e = other
            if e is None or e[0] >= oe[1] or oe[0] >= e[1]:
                continue
            if kind == "input" and (on, n) in in_place and _same_view(oa, a):
                continue
            allowed = [i_ for o_, i_ in in_place if o_ == on]
            hint = (f"; it may be {' or '.join(allowed)} itself (in place), not a part or another view of it"
                    if allowed else "; pass a separate array")
            raise ValueError(f"{on}: shares memory with the {kind} {n} (their byte ranges overlap), so the op "
                             f"would overwrite values it still reads{hint}")


def check_float32_range(name, host):
    """Refuse a host array of a wider float dtype (float64, longdouble) whose finite values do not fit
    float32: the cast would make them inf. NaN and ±inf themselves pass (see the NaN/Inf policy)."""
    if host.dtype.kind != "f" or host.dtype.itemsize <= 4 or host.size == 0:
        return
    finite = np.isfinite(host)
    with np.errstate(invalid="ignore"):
        mag = np.abs(host, where=finite, out=np.zeros(host.shape, host.dtype))
    largest = float(mag.max())
    if largest > FLOAT32_MAX:
        raise ValueError(f"{name}: holds a finite value of magnitude {largest:.6g}, beyond float32's range "
                         f"(largest {FLOAT32_MAX:.8g}); it would become inf. Scale the data, or pass NaN/inf "
                         f"explicitly if that is meant")


def check_finite(name, host, what="values"):
    """Refuse a host array holding NaN or ±inf, naming it, the count and the first position."""
    bad = ~np.isfinite(host)
    if bad.any():
        first = tuple(int(v[0]) for v in np.nonzero(bad)) if host.ndim else ()
        raise ValueError(f"{name}: {int(bad.sum())} of its {host.size} {what} are NaN or infinite "
                         f"(the first at index {first}: {host[first]})")


def host_array(name, a):
    """np.asarray(a), or a clear TypeError naming `name` when NumPy cannot make an array of it (a
    ragged list, a str): never NumPy's own message without the argument."""
    try:
        arr = np.asarray(a)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{name}: expected an array of floats, got a {type(a).__name__} NumPy cannot "
                        f"convert ({exc})") from None
    if arr.dtype.kind in "OUSV" and not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected an array of floats, got a {type(a).__name__}")
    return arr


def check_version(version, versions, what):
    """None (the default) or one of ``versions``, on every backend: a script tried on cpu, where the
    kernel versions do not apply, must not break on a GPU over a typo."""
    if version is None:
        return
    if not isinstance(version, str):
        raise TypeError(f"version: expected a version name (str) or None, got {version!r}")
    if version not in versions:
        raise ValueError(f"version: unknown {what} version {version!r}; expected one of {', '.join(versions)}")


def check_rank(name, a, ndim, layout):
    if len(a.shape) != ndim:
        layout = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected a {ndim}-D array{layout}, got shape {tuple(a.shape)}")


def check_shape(name, a, shape):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")


def as_input(name, a, ndim=None, layout=""):
    """Validate an array argument and put it where the current backend computes.

    Returns ``(array, on_host)``: a NumPy float32 array on ``cpu``; a device array on ``cuda``/``sim``.
    """
    if a is None:
        raise TypeError(f"{name}: expected an array, got None")
    if is_device_array(a):
        if not _backend.uses_kernels():
            raise TypeError(f"{name}: a device array was passed but the backend is 'cpu'; pass a NumPy array")
        dev = _as_cuda_array(a)
        if np.dtype(dev.dtype) != FLOAT:
            raise TypeError(f"{name}: device arrays must be float32, got {np.dtype(dev.dtype).name}")
        if not dev.is_c_contiguous():
            raise ValueError(f"{name}: device arrays must be C-contiguous")
        if ndim is not None:
            check_rank(name, dev, ndim, layout)
        return dev, False
    host = host_array(name, a)
    if not np.issubdtype(host.dtype, np.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {host.dtype.name}")
    if ndim is not None:
        check_rank(name, host, ndim, layout)
    check_float32_range(name, host)
    host = np.require(host, dtype=FLOAT, requirements="C")  # keeps 0-d arrays 0-d (ascontiguousarray would not)
    if _backend.uses_kernels():
        return to_device(host), True
    return host, True


def as_labels(name, labels, n, num_classes):
    """Integer class ids of shape (n,) in [0, num_classes), on the host as int32 (then on the backend)."""
    dev = None
    if is_device_array(labels):
        dev = _as_cuda_array(labels)  # read dtypes from the converted array: PyTorch's are not NumPy's
        if not np.issubdtype(np.dtype(dev.dtype), np.integer):
            raise TypeError(f"{name}: expected integer class ids, got dtype {np.dtype(dev.dtype).name}")
        if tuple(dev.shape) != (n,):
            raise ValueError(f"{name}: expected shape ({n},), got {tuple(dev.shape)}")
        host = dev.copy_to_host()  # range check needs the values; labels are small
    else:
        host = np.asarray(labels)
        if not np.issubdtype(host.dtype, np.integer):
            raise TypeError(f"{name}: expected integer class ids, got dtype {host.dtype.name}")
        if host.shape != (n,):
            raise ValueError(f"{name}: expected shape ({n},), got {host.shape}")
    check_class_ids(name, host, num_classes)
    host = np.ascontiguousarray(host, dtype=np.int32)
    if _backend.uses_kernels():
        if dev is not None and np.dtype(dev.dtype) == np.int32:
            return dev
        return to_device(host)
    return host


def check_class_ids(name, ids, num_classes, note=""):
    """Raise unless every id of the host integer array lies in [0, num_classes), naming the first that
    does not (run before any cast to int32, which could wrap an id into range)."""
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        bad = ids[(ids < 0) | (ids >= num_classes)].flat[0]
        raise ValueError(f"{name}: class ids must be in [0, {num_classes}){note}, found {int(bad)}")


def check_out(name, out, shape, on_kernels=None, dtype=FLOAT):
    """Validate a caller-provided output buffer of the backend's kind (float32 unless ``dtype`` says)."""
    on_kernels = _backend.uses_kernels() if on_kernels is None else on_kernels
    if on_kernels:
        if not is_device_array(out):
            raise TypeError(f"{name}: expected a device array on backend {_backend.get_backend()!r}")
        out = _as_cuda_array(out)
        if not out.is_c_contiguous():
            raise ValueError(f"{name}: device arrays must be C-contiguous")
    elif not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array on backend 'cpu'")
    elif not out.flags.writeable:
        raise ValueError(f"{name}: the array is read-only")
    if np.dtype(out.dtype) != np.dtype(dtype):
        raise TypeError(f"{name}: expected {np.dtype(dtype).name}, got {np.dtype(out.dtype).name}")
    check_shape(name, out, shape)
    return out


# ---------------------------------------------------------------------------------------------------
# memory: every device allocation of the orchestrator goes through here and is counted

_alloc_count = 0
_alloc_bytes = 0


def allocation_stats():
    """(number of device allocations, bytes) made through gpu_cnn since the process started."""
    return _alloc_count, _alloc_bytes


def _count(shape, dtype):
    global _alloc_count, _alloc_bytes
    _alloc_count += 1
    _alloc_bytes += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _memory_limit():
    """(bytes, what) an allocation may not exceed: the GPU's memory on cuda, else the machine's RAM."""
    if _backend.get_backend() == "cuda":
        from numba import cuda

        return int(cuda.current_context().get_memory_info()[1]), "GPU memory"
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")), "memory (RAM)"
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): let the allocator decide
        return None, "memory"


def format_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def check_alloc(what, shape, dtype=FLOAT):
    """Refuse, before allocating, an array larger than the memory there is: a ``ValueError`` naming
    `what`, the shape and the bytes needed (NumPy's MemoryError from deep inside said neither)."""
    nbytes = np.dtype(dtype).itemsize
    for s in shape:
        nbytes *= int(s)  # Python ints: no overflow
    limit, kind = _memory_limit()
    if limit is not None and nbytes > limit:
        raise ValueError(f"{what}: shape {tuple(int(s) for s in shape)} of {np.dtype(dtype).name} needs "
                         f"{format_bytes(nbytes)} ({nbytes} bytes), more than the {format_bytes(limit)} of "
                         f"{kind} on this machine")
    return nbytes


def _as_cuda_array(a):
    if type(a).__name__ == "FakeCUDAArray" or hasattr(a, "copy_to_host"):
        return a
    from numba import cuda

    return cuda.as_cuda_array(a)


def to_device(host):
    from numba import cuda

    check_alloc("device copy", host.shape, host.dtype)
    _count(host.shape, host.dtype)
    return cuda.to_device(host)


def empty(shape, dtype=FLOAT, what="output"):
    """Uninitialised array on the current backend (NumPy on cpu, device array otherwise); refused with
    the figure when it cannot fit (:func:`check_alloc`; `what` names it in the error)."""
    shape = tuple(int(s) for s in shape)
    check_alloc(what, shape, dtype)
    if not _backend.uses_kernels():
        return np.empty(shape, dtype)
    from numba import cuda

    _count(shape, dtype)
    return cuda.device_array(shape, dtype)


def zeros(shape, dtype=FLOAT, what="output"):
    a = empty(shape, dtype, what)
    if _backend.uses_kernels():
        fill(a, 0.0)
    else:
        a.fill(0)
    return a


def fill(a, value):
    """Fill a float32 array of the backend's kind in place (no allocation)."""
    if isinstance(a, np.ndarray):
        a.fill(value)
        return a
    from ..kernels import _common

    return _common.fill(a, value)


def result(a, on_host):
    """Return `a` where the caller's input lived: host (NumPy) or device."""
    if a is None or isinstance(a, np.ndarray) or not on_host:
        return a
    return a.copy_to_host()
