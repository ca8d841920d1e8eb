"""Fully connected layer: y = x · wᵀ + b, weight (out_features, in_features) as in PyTorch.

x may have any leading dimensions, as in PyTorch: (in_features,), (N, in_features) or (d1, …, dk,
in_features); the product runs on the (d1·…·dk, in_features) view, and the gradient of w sums over
every leading position.

cpu: BLAS matmul through NumPy (``x @ w.T`` reads w transposed in place). cuda/sim: the GEMM kernels
of :mod:`gpu_cnn.kernels.gemm`, which also read the transposed operands in place. The default version
(``version=None``) is picked by shape: ``split_k_ticket`` (one launch, the bias in its epilogue, db in
the dW pass) for the dense layers' shapes, ``register_tiled`` for big ones. The split-K rungs need
float32 scratch for their partial tiles:
pass ``workspace=`` (a 1-D device array of at least ``gemm.linear_workspace_size(rows, in, out)``
elements) or let the op keep one reusable buffer (allocated on first use and when a larger layer
arrives, reused after that, so a training loop allocates nothing per step).
"""
import numpy as np

from .. import backend as _backend
from ._base import as_input, check_no_overlap, check_out, check_shape, check_version, empty, is_device_array, result

_W_LAYOUT = "(out_features, in_features)"


# = gpu_cnn.kernels.gemm.VERSIONS (not imported from there on cpu; the tests check the two agree)
VERSIONS = ("naive", "tiled", "blocktiled", "register_tiled", "split_k", "split_k_ticket")
_SCRATCH_VERSIONS = (None, "split_k", "split_k_ticket")  # the versions that may need a workspace

# Reusable device scratch for split_k when the caller passes no workspace.
_scratch = {"buf": None}


def _check_version(version):
    check_version(version, VERSIONS, "GEMM")


def _workspace(workspace, rows, fin, fout, version, fused=False):
    """The split-K scratch for a (rows, fin) -> (rows, fout) layer: the caller's, checked, or the op's."""
    from ..kernels import gemm

    if version not in _SCRATCH_VERSIONS:
        return None
    need = gemm.linear_workspace_size(rows, fin, fout, version, fused=fused)
    if need == 0:
        return workspace  # no product runs as split_k: no scratch
    if workspace is not None:
        ws = check_out("workspace", workspace, tuple(workspace.shape))
        if len(ws.shape) != 1 or ws.shape[0] < need:
            raise ValueError(f"workspace: expected a 1-D float32 array of at least {need} elements, "
                             f"got shape {tuple(ws.shape)}")
        return ws
    buf = _scratch["buf"]
    if buf is None or buf.shape[0] < need or not is_device_array(buf):
        buf = empty((need,))
        _scratch["buf"] = buf
    return buf


def _features(name, a, what):
    """Validate (..., features) and return (array, on_host, leading shape)."""
    a, on_host = as_input(name, a)
    if len(a.shape) < 1:
        raise ValueError(f"{name}: expected an array of shape (..., {what}), got a 0-D array")
    return a, on_host, tuple(a.shape)[: len(a.shape) - 1]


def _rows(a, lead):
    """The (prod(lead), features) view of a C-contiguous array (no copy)."""
    rows = int(np.prod(lead, dtype=np.int64))
    return a.reshape(rows, _last(a)) if len(a.shape) != 2 else a


def _last(a):
    return a.shape[len(a.shape) - 1]  # (the simulator's shape tuples refuse negative indices)


def linear(x, w, b=None, *, out=None, version=None, workspace=None):
    """y = x · wᵀ (+ b). x: (..., in_features), w: (out_features, in_features), b: (out_features,).

    Returns y (..., out_features), written into ``out`` when given (with ``workspace`` too, or a version
    other than split_k, no allocation). ``version`` picks the GEMM kernel on cuda/sim
    (``gpu_cnn.kernels.gemm.VERSIONS``; None: by shape) and is ignored on cpu. Host float64 input is
    computed in float32.
    """
    _check_version(version)
    x, on_host, lead = _features("x", x, "in_features")
    w, _ = as_input("w", w, 2, _W_LAYOUT)
    fin = _last(x)
    fout = w.shape[0]
    if w.shape[1] != fin:
        raise ValueError(f"w: expected in_features = {fin} (x is {tuple(x.shape)}), got w of shape {tuple(w.shape)}")
    if b is not None:
        b, _ = as_input("b", b, 1, "(out_features,)")
        check_shape("b", b, (fout,))
    y = empty(lead + (fout,)) if out is None else check_out("out", out, lead + (fout,))
    x2, y2 = _rows(x, lead), _rows(y, lead)
    check_no_overlap([("out", y)], [("x", x), ("w", w), ("b", b)])

    if not _backend.uses_kernels():
        np.matmul(x2, w.T, out=y2)
        if b is not None:
            y2 += b
        return y
    from ..kernels import gemm

    ws = _workspace(workspace, x2.shape[0], fin, fout, version)
    gemm.linear_forward(x2, w, b, y2, version=version, workspace=ws)
    return result(y, on_host)


def linear_backward(dy, x, w, *, out=None, bias=True, need_dx=True, version=None, workspace=None):
    """Gradients of y = x · wᵀ + b: returns (dx, dw, db).

    dy: (..., out_features), x: (..., in_features) with the same leading dimensions. dx = dy · w
    (..., in_features), None when ``need_dx`` is False; dw = Σ over every leading position of dyᵀ · x
    (out_features, in_features); db = Σ dy over them (out_features,), None when ``bias`` is False. Each
    is written (not accumulated). ``out`` is a tuple (dx, dw, db) of preallocated arrays; an entry may
    be None (allocated when needed; with every needed entry given, and ``workspace`` or a non-split_k
    version, nothing is allocated). ``version`` and ``workspace`` as in :func:`linear`.
    """
    _check_version(version)
    dy, on_host, lead = _features("dy", dy, "out_features")
    x, _ = as_input("x", x)
    w, _ = as_input("w", w, 2, _W_LAYOUT)
    fout = _last(dy)
    fout_w, fin = w.shape
    if fout_w != fout:
        raise ValueError(f"w: expected out_features = {fout} (dy is {tuple(dy.shape)}), got w of shape {tuple(w.shape)}")
    if tuple(x.shape) != lead + (fin,):
        raise ValueError(f"x: expected shape {lead + (fin,)} (leading dims from dy, in_features from w), "
                         f"got {tuple(x.shape)}")
    if out is None:
        out = (None, None, None)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError("out: expected a tuple (dx, dw, db) whose entries may be None")
    dx = dw = db = None
    if need_dx:
        dx = empty(lead + (fin,)) if out[0] is None else check_out("out[0] (dx)", out[0], lead + (fin,))
    dw = empty((fout, fin)) if out[1] is None else check_out("out[1] (dw)", out[1], (fout, fin))
    if bias:
        db = empty((fout,)) if out[2] is None else check_out("out[2] (db)", out[2], (fout,))
    check_no_overlap([("out[0] (dx)", dx), ("out[1] (dw)", dw), ("out[2] (db)", db)], [("dy", dy), ("x", x), ("w", w)])
    dy2, x2 = _rows(dy, lead), _rows(x, lead)
    dx2 = None if dx is None else _rows(dx, lead)

    if not _backend.uses_kernels():
        if dx2 is not None:
            np.matmul(dy2, w, out=dx2)
        np.matmul(dy2.T, x2, out=dw)
        if db is not None:
            np.sum(dy2, axis=0, out=db)
        return dx, dw, db
    from ..kernels import gemm

    ws = _workspace(workspace, dy2.shape[0], fin, fout, version)
    gemm.linear_backward(dy2, x2, w, dx2, dw, db, version=version, workspace=ws)
    return result(dx, on_host), result(dw, on_host), result(db, on_host)


# --- fused with the ReLU that follows (gpu_cnn.fusion's Linear -> ReLU) ---------------------------------


def linear_relu(x, w, b, out):
    """y = max(x · wᵀ + b, 0) into ``out`` (N, out_features): on the kernel backends one launch, the
    bias and the ReLU in split_k_ticket's epilogue. x: (N, in_features); b may be None. Internal to
    fusion: arrays are the layers' own (backend arrays, checked shapes)."""
    if not _backend.uses_kernels():
        np.matmul(x, w.T, out=out)
        if b is not None:
            out += b
        np.maximum(out, 0.0, out=out)
        return out
    from ..kernels import gemm

    ws = _workspace(None, x.shape[0], w.shape[1], w.shape[0], None, fused=True)
    gemm.linear_forward(x, w, b, out, workspace=ws, relu=True)
    return out


def linear_relu_backward(dy, x, w, y, dx, dw, db):
    """Gradients of y = max(x · wᵀ + b, 0) given dy = dLoss/dy and the stored y: the ReLU's gradient is
    dy where y > 0 (y > 0 exactly where the pre-activation is), read through that mask inside the two
    GEMMs (dx, and dw with db as its extra column): two launches, no masked copy. dx and db may be None."""
    if not _backend.uses_kernels():
        g = np.where(y > 0, dy, np.float32(0.0))
        if dx is not None:
            np.matmul(g, w, out=dx)
        np.matmul(g.T, x, out=dw)
        if db is not None:
            np.sum(g, axis=0, out=db)
        return dx, dw, db
    from ..kernels import gemm

    ws = _workspace(None, dy.shape[0], w.shape[1], w.shape[0], None, fused=True)
    gemm.linear_backward(dy, x, w, dx, dw, db, workspace=ws, mask=y)
    return dx, dw, db
