"""Planned memory: buffers allocated once per model and batch size, reused every step.

A :class:`Workspace` hands out named buffers. The first request for a name allocates it (through
``gpu_cnn.ops._base.empty``, which counts device allocations); later requests for the same name and
any batch size up to the planned one return a view of the same memory (``buf[:n]``), so a training
step, including a last partial batch, allocates nothing.
"""
import numpy as np

from . import backend as _backend
from .ops import _base

allocation_stats = _base.allocation_stats


class Workspace:
    """Named, reusable buffers of the current backend's kind (NumPy on cpu, device arrays otherwise)."""

    def __init__(self, owner=""):
        self.owner = owner
        self._bufs = {}
        self.backend = _backend.get_backend()

    def get(self, name, shape, dtype=np.float32, zero=False):
        """A buffer of `shape` for `name`. Rows (axis 0) beyond the planned size trigger one new
        allocation sized for the larger batch; fewer rows return a view of the planned buffer."""
        shape = tuple(int(s) for s in shape)
        if not shape:
            raise ValueError(f"{self.owner or 'workspace'} buffer {name!r}: a planned buffer needs a batch "
                             f"axis (N, ...), got a 0-d shape")
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != np.dtype(dtype) or tuple(buf.shape[1:]) != shape[1:] or buf.shape[0] < shape[0]:
            what = f"{self.owner or 'workspace'} buffer {name!r}"
            buf = _base.zeros(shape, dtype, what) if zero else _base.empty(shape, dtype, what)
            self._bufs[name] = buf
        return buf if buf.shape[0] == shape[0] else buf[: shape[0]]

    def nbytes(self):
        return sum(int(np.prod(b.shape)) * np.dtype(b.dtype).itemsize for b in self._bufs.values())

    def items(self):
        return self._bufs.items()

    def clear(self):
        self._bufs.clear()


class HostStaging:
    """Host → backend copies through one reusable staging buffer (pinned on ``cuda``) and one device
    buffer per name: no allocation after the first batch of the planned size."""

    def __init__(self):
        self.ws = Workspace("staging")
        self._pinned = {}

    def to_backend(self, name, host, dtype=np.float32):
        host = np.asarray(host)
        if np.dtype(dtype).kind == "f":  # the cast below would make finite values beyond float32 inf
            _base.check_float32_range(name, host)
        if not _backend.uses_kernels():
            buf = self.ws.get(name, host.shape, dtype)
            np.copyto(buf, host, casting="same_kind" if np.dtype(dtype).kind == host.dtype.kind else "unsafe")
            return buf
        dev = self.ws.get(name, host.shape, dtype)
        stage = self._pinned.get(name)
        if stage is None or stage.shape[0] < host.shape[0] or stage.shape[1:] != host.shape[1:]:
            stage = _pinned_empty(host.shape, dtype)
            self._pinned[name] = stage
        view = stage[: host.shape[0]]
        np.copyto(view, host, casting="unsafe")
        dev.copy_to_device(view)
        return dev


def _pinned_empty(shape, dtype):
    from numba import cuda

    if _backend.get_backend() == "cuda":
        return cuda.pinned_array(shape, dtype)
    return np.empty(shape, dtype)


def format_report(rows):
    """rows: list of (layer, {category: bytes}) -> aligned text table with a total line."""
    cats = sorted({c for _, d in rows for c in d})
    width = max([len("layer"), len("total")] + [len(r[0]) for r in rows])
    head = f"{'layer':<{width}}" + "".join(f"  {c:>12}" for c in cats) + f"  {'total':>12}"
    lines = [head]
    totals = dict.fromkeys(cats, 0)
    for name, d in rows:
        lines.append(f"{name:<{width}}" + "".join(f"  {_fmt(d.get(c, 0)):>12}" for c in cats) + f"  {_fmt(sum(d.values())):>12}")
        for c in cats:
            totals[c] += d.get(c, 0)
    lines.append(f"{'total':<{width}}" + "".join(f"  {_fmt(totals[c]):>12}" for c in cats) + f"  {_fmt(sum(totals.values())):>12}")
    return "\n".join(lines)


def _fmt(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
