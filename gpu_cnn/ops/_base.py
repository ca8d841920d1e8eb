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
"""
import numbers

import numpy as np

from .. import backend as _backend

FLOAT = np.float32


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
    host = np.asarray(a)
    if not np.issubdtype(host.dtype, np.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {host.dtype.name}")
    if ndim is not None:
        check_rank(name, host, ndim, layout)
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


def _as_cuda_array(a):
    if type(a).__name__ == "FakeCUDAArray" or hasattr(a, "copy_to_host"):
        return a
    from numba import cuda

    return cuda.as_cuda_array(a)


def to_device(host):
    from numba import cuda

    _count(host.shape, host.dtype)
    return cuda.to_device(host)


def empty(shape, dtype=FLOAT):
    """Uninitialised array on the current backend (NumPy on cpu, device array otherwise)."""
    shape = tuple(int(s) for s in shape)
    if not _backend.uses_kernels():
        return np.empty(shape, dtype)
    from numba import cuda

    _count(shape, dtype)
    return cuda.device_array(shape, dtype)


def zeros(shape, dtype=FLOAT):
    a = empty(shape, dtype)
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
