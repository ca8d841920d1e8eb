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


class BatchFeeder:
    """Host batches to the device for ``Trainer.fit``: two slots, each a pinned host buffer and a device
    buffer for the images and the labels, filled in turn. :meth:`put` copies a batch into the next slot
    and starts its host→device copy on a stream of its own, without waiting for it, so that the copy of
    batch k+1 is under way while step k runs; :meth:`ready` makes the compute stream wait for a slot's
    copy, :meth:`consumed` marks where the compute stream is done reading it (the next :meth:`put` into
    that slot waits for that on the copy stream, never on the host). The batches were checked when fit
    received them; nothing is checked again here. Device buffers are planned for the largest batch and
    a smaller one is a view (``buf[:n]``), so a step allocates nothing.

    On ``sim`` the streams and events are the simulator's, and every copy completes at once."""

    def __init__(self):
        from numba import cuda

        self._cuda = cuda
        self.stream = cuda.stream()
        self._compute = cuda.legacy_default_stream()  # where the kernels launch (Numba's stream 0)
        self._slots = [{}, {}]
        self._next = 0

    def _buffers(self, slot, x):
        n = x.shape[0]
        if "x" not in slot or slot["x"].shape[0] < n or slot["x"].shape[1:] != x.shape[1:]:
            what = "a batch of images for the device"
            _base.check_alloc(what, x.shape, np.float32)  # before the pinned buffer, which _base.empty does not guard
            slot["px"] = _pinned_empty(x.shape, np.float32)
            slot["py"] = _pinned_empty((n,), np.int32)
            slot["x"] = _base.empty(x.shape, np.float32, what)
            slot["y"] = _base.empty((n,), np.int32, "a batch of labels for the device")
            slot["copied"], slot["consumed"] = self._event(), self._event()
            slot["in_flight"] = slot["read"] = False
        return slot

    def _event(self):
        if _backend.get_backend() == "cuda":
            return self._cuda.event(timing=False)
        return self._cuda.event()  # the simulator's events take no options

    def put(self, x, y):
        """Start copying host images x (N, ...) and int labels y (N,) to the next slot; returns the slot
        token (slot, device images, device int32 labels), views of its planned buffers."""
        slot = self._buffers(self._slots[self._next], x)
        self._next ^= 1
        n = x.shape[0]
        copied = slot["copied"]
        if slot["in_flight"] and not getattr(copied, "query", lambda: True)():
            copied.synchronize()  # the pinned buffer's last copy is still in flight (one step of slack: rare)
        px, py = slot["px"][:n], slot["py"][:n]
        np.copyto(px, x, casting="unsafe")
        np.copyto(py, y, casting="unsafe")
        if slot["read"]:
            slot["consumed"].wait(self.stream)  # the step that read this slot's device buffers is done
        xd = slot["x"] if slot["x"].shape[0] == n else slot["x"][:n]
        yd = slot["y"] if slot["y"].shape[0] == n else slot["y"][:n]
        xd.copy_to_device(px, stream=self.stream)
        yd.copy_to_device(py, stream=self.stream)
        copied.record(self.stream)
        slot["in_flight"] = True
        return slot, xd, yd

    def ready(self, token):
        """The compute stream waits for the slot's copy (on the device: the host goes on)."""
        token[0]["copied"].wait(self._compute)

    def consumed(self, token):
        """Everything launched so far on the compute stream is all that reads the slot."""
        token[0]["consumed"].record(self._compute)
        token[0]["read"] = True


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
