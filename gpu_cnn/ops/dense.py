"""Fully connected layer: y = x · wᵀ + b, weight (out_features, in_features) as in PyTorch.

cpu: BLAS matmul through NumPy (``x @ w.T`` reads w transposed in place). cuda/sim: the GEMM kernels
of :mod:`gpu_cnn.kernels.gemm`, which also read the transposed operands in place.
"""
import numpy as np

from .. import backend as _backend
from ._base import as_input, check_no_overlap, check_out, check_shape, check_version, empty, result

_X_LAYOUT = "(N, in_features)"
_W_LAYOUT = "(out_features, in_features)"


# = gpu_cnn.kernels.gemm.VERSIONS (not imported from there on cpu; the tests check the two agree)
VERSIONS = ("naive", "tiled", "register_tiled")


def _check_version(version):
    check_version(version, VERSIONS, "GEMM")


def linear(x, w, b=None, *, out=None, version=None):
    """y = x · wᵀ (+ b). x: (N, in_features), w: (out_features, in_features), b: (out_features,).

    Returns y (N, out_features), written into ``out`` when given (no allocation). ``version`` picks the
    GEMM kernel on cuda/sim (``gpu_cnn.kernels.gemm.VERSIONS``; default ``tiled``) and is ignored on cpu.
    Host float64 input is computed in float32.
    """
    _check_version(version)
    x, on_host = as_input("x", x, 2, _X_LAYOUT)
    w, _ = as_input("w", w, 2, _W_LAYOUT)
    n, fin = x.shape
    fout = w.shape[0]
    if w.shape[1] != fin:
        raise ValueError(f"w: expected in_features = {fin} (x is {tuple(x.shape)}), got w of shape {tuple(w.shape)}")
    if b is not None:
        b, _ = as_input("b", b, 1, "(out_features,)")
        check_shape("b", b, (fout,))
    y = empty((n, fout)) if out is None else check_out("out", out, (n, fout))
    check_no_overlap([("out", y)], [("x", x), ("w", w), ("b", b)])

    if not _backend.uses_kernels():
        np.matmul(x, w.T, out=y)
        if b is not None:
            y += b
        return y
    from ..kernels import gemm

    gemm.linear_forward(x, w, b, y, version=version)
    return result(y, on_host)


def linear_backward(dy, x, w, *, out=None, bias=True, need_dx=True, version=None):
    """Gradients of y = x · wᵀ + b: returns (dx, dw, db).

    dx = dy · w (N, in_features), None when ``need_dx`` is False; dw = dyᵀ · x (out_features,
    in_features); db = Σ_rows dy (out_features,), None when ``bias`` is False. Each is written (not
    accumulated). ``out`` is a tuple (dx, dw, db) of preallocated arrays; an entry may be None (allocated
    when needed; with every needed entry given nothing is allocated). ``version`` as in :func:`linear`.
    """
    _check_version(version)
    dy, on_host = as_input("dy", dy, 2, "(N, out_features)")
    x, _ = as_input("x", x, 2, _X_LAYOUT)
    w, _ = as_input("w", w, 2, _W_LAYOUT)
    n, fout = dy.shape
    fout_w, fin = w.shape
    if fout_w != fout:
        raise ValueError(f"w: expected out_features = {fout} (dy is {tuple(dy.shape)}), got w of shape {tuple(w.shape)}")
    if tuple(x.shape) != (n, fin):
        raise ValueError(f"x: expected shape {(n, fin)} (N from dy, in_features from w), got {tuple(x.shape)}")
    if out is None:
        out = (None, None, None)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError("out: expected a tuple (dx, dw, db) whose entries may be None")
    dx = dw = db = None
    if need_dx:
        dx = empty((n, fin)) if out[0] is None else check_out("out[0] (dx)", out[0], (n, fin))
    dw = empty((fout, fin)) if out[1] is None else check_out("out[1] (dw)", out[1], (fout, fin))
    if bias:
        db = empty((fout,)) if out[2] is None else check_out("out[2] (db)", out[2], (fout,))
    check_no_overlap([("out[0] (dx)", dx), ("out[1] (dw)", dw), ("out[2] (db)", db)], [("dy", dy), ("x", x), ("w", w)])

    if not _backend.uses_kernels():
        if dx is not None:
            np.matmul(dy, w, out=dx)
        np.matmul(dy.T, x, out=dw)
        if db is not None:
            np.sum(dy, axis=0, out=db)
        return dx, dw, db
    from ..kernels import gemm

    gemm.linear_backward(dy, x, w, dx, dw, db, version=version)
    return result(dx, on_host), result(dw, on_host), result(db, on_host)
