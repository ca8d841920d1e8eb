"""Softmax + cross-entropy, fused, and its gradient with respect to the logits, with PyTorch's
``F.cross_entropy`` keywords: ``weight``, ``ignore_index``, ``label_smoothing``, ``reduction``.

Logits are (N, C), (N, C, d1, …) (a loss per position, as ONNX's and PyTorch's N-D losses) or
unbatched (C,); labels are integer class ids of shape (N,), (N, d1, …) or () to match. Soft-label
(probability) targets are refused: not supported. The loss of a row is computed from the log-sum-exp,
``log Σ exp(z − max) − (z_label − max)``, never as ``−log`` of a rounded probability, so it stays finite
and accurate for logits of any magnitude. Reductions as PyTorch: ``"mean"`` divides by Σ weight[label]
over the rows not ignored (the weighted mean; NaN when every row is ignored), ``"sum"``, ``"none"``
(a loss per row). With label smoothing ε PyTorch's formula, weights included:
``(1 − ε) · nll + ε / C · Σ_c −w_c log p_c`` per row, both parts divided by the same Σ weight[label].

cpu: vectorized NumPy. cuda/sim: :mod:`gpu_cnn.kernels.softmax` (``warp`` by default: a warp per row;
``fused``: a block per row; then a one-block sum). The device path needs N·d + 1 floats of scratch
(per-row losses and their total): pass them as ``out=(probs, loss_buf)``, or let the op keep one
reusable buffer (allocated on first use and when a larger batch arrives; reused after that, so a
training loop allocates nothing per step).
"""
import numbers

import numpy as np

from .. import backend as _backend
from . import _base
from ._base import as_input, check_no_overlap, check_out, check_version, empty, is_device_array, result, to_device

REDUCTIONS = ("mean", "sum", "none")
# = gpu_cnn.kernels.softmax.VERSIONS (not imported from there on cpu; the tests check the two agree)
VERSIONS = ("fused", "warp")

# Reusable device scratch for the per-row losses + their total, when the caller does not pass one.
_scratch = {"buf": None}


# --- argument checks ---------------------------------------------------------------------------------


def _check_logits(name, a):
    """(N, C), (N, C, d…) or (C,) -> (the array, batch shape of the labels, C, unbatched)."""
    shape = tuple(a.shape)
    if len(shape) == 0:
        raise ValueError(f"{name}: expected logits of shape (N, num_classes), (N, num_classes, d1, ...) or "
                         f"(num_classes,), got a 0-D array")
    unbatched = len(shape) == 1
    c = shape[0] if unbatched else shape[1]
    if c < 1 or (not unbatched and shape[0] < 1) or any(d < 1 for d in shape[2:]):
        raise ValueError(f"{name}: expected at least one row and one class, got shape {shape}")
    batch = () if unbatched else (shape[0],) + shape[2:]
    return c, batch, unbatched


def _options(weight, ignore_index, label_smoothing, reduction, c):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if not isinstance(label_smoothing, numbers.Real) or isinstance(label_smoothing, bool) \
            or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing!r}")
    w_host = w_dev = None
    if weight is not None:
        if is_device_array(weight):
            w_dev = _base._as_cuda_array(weight)
            if not _backend.uses_kernels():
                raise TypeError("weight: a device array was passed but the backend is 'cpu'; pass a NumPy array")
            if np.dtype(w_dev.dtype) != np.float32 or tuple(w_dev.shape) != (c,):
                raise ValueError(f"weight: expected a float32 array of shape ({c},), got "
                                 f"{np.dtype(w_dev.dtype).name} {tuple(w_dev.shape)}")
            w_host = w_dev.copy_to_host().astype(np.float64)  # C floats: the host needs Σ w[label]
        else:
            w_host = np.asarray(weight)
            if not np.issubdtype(w_host.dtype, np.floating) or w_host.shape != (c,):
                raise ValueError(f"weight: expected a floating-point array of shape ({c},) (one per class), "
                                 f"got {w_host.dtype.name} {w_host.shape}")
            w_host = w_host.astype(np.float64)
    return w_host, w_dev, int(ignore_index), float(label_smoothing)


def _labels(name, labels, batch, c, ignore_index):
    """Integer class ids of shape `batch`, each in [0, C) or ignore_index -> host int32 (rows,), device copy."""
    dev = None
    if is_device_array(labels):
        dev = _base._as_cuda_array(labels)
        host = dev.copy_to_host()
    else:
        host = np.asarray(labels)
    if np.issubdtype(host.dtype, np.floating):
        raise TypeError(f"{name}: soft-label (class probability) targets are not supported; pass integer "
                        f"class ids of shape {batch}")
    if not np.issubdtype(host.dtype, np.integer):
        raise TypeError(f"{name}: expected integer class ids, got dtype {host.dtype.name}")
    if host.shape != batch:
        raise ValueError(f"{name}: expected shape {batch} (the logits' without the class dimension), got {host.shape}")
    bad = (host != ignore_index) & ((host < 0) | (host >= c))
    if bad.any():
        raise ValueError(f"{name}: class ids must be in [0, {c}) or ignore_index ({ignore_index}), "
                         f"found {int(host[bad].flat[0])}")
    return np.ascontiguousarray(host, dtype=np.int32).reshape(-1), dev


def _norm(y, w, ignore_index):
    """(valid mask, per-row target weight a, Σ a) in float64 on the host."""
    valid = y != ignore_index
    ys = np.where(valid, y, 0)
    a = np.where(valid, 1.0 if w is None else w[ys], 0.0)
    return valid, ys, a, float(a.sum())


def _rows_view(a, c, unbatched):
    """(N, C, S) view of (N, C, d…) / (C,) logits (no copy)."""
    shape = tuple(a.shape)
    if unbatched:
        return a.reshape(1, c, 1)
    s = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    return a.reshape(shape[0], c, s)


def _scratch_buffer(n):
    buf = _scratch["buf"]
    if buf is None or buf.shape[0] < n + 1 or not is_device_array(buf):
        buf = empty((n + 1,))
        _scratch["buf"] = buf
    return buf[: n + 1]


def _split_out(out, shape, rows):
    """out -> (probs or None, loss_buf or None)."""
    if out is None:
        return None, None
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise TypeError("out: expected probs, or a tuple (probs, loss_buf) with loss_buf of shape (rows + 1,)")
        probs, loss_buf = out
    else:
        probs, loss_buf = out, None
    probs = None if probs is None else check_out("out (probs)", probs, shape)
    loss_buf = None if loss_buf is None else check_out("out (loss_buf)", loss_buf, (rows + 1,))
    return probs, loss_buf


# --- forward -----------------------------------------------------------------------------------------


def softmax_cross_entropy(logits, labels, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                          *, out=None, version=None):
    """Cross-entropy of softmax(logits) against integer class ids, as PyTorch's ``F.cross_entropy``:
    returns (loss, probs).

    logits: (N, C), (N, C, d1, …) or (C,) float; labels: (N,), (N, d1, …) or () integers in [0, C) or
    equal to ``ignore_index`` (those rows count for nothing). ``weight`` (C,): a weight per class.
    ``reduction``: "mean" (Σ loss / Σ weight[label] over the rows not ignored), "sum" or "none". For
    mean/sum ``loss`` is a Python float (on a device backend one scalar is copied back); for "none" an
    array of the labels' shape, where the logits came from. ``probs`` has the logits' shape and place.
    ``out`` is probs, or a tuple (probs, loss_buf) where loss_buf (rows + 1,) float32 receives the
    per-row losses followed by their reduction (rows = N·d1·…); given, nothing is allocated (with
    reduction "none" the returned array is a view of loss_buf). ``version`` picks the kernel on
    cuda/sim (``fused``/``warp``; default warp). Host float64 input is computed in float32.
    """
    check_version(version, VERSIONS, "softmax")
    logits, on_host = as_input("logits", logits)
    c, batch, unbatched = _check_logits("logits", logits)
    w_host, w_dev, ignore_index, eps = _options(weight, ignore_index, label_smoothing, reduction, c)
    y_host, y_dev = _labels("labels", labels, batch, c, ignore_index)
    rows = y_host.shape[0]
    shape = tuple(logits.shape)
    probs, loss_buf = _split_out(out, shape, rows)
    if probs is None:
        probs = empty(shape)
    check_no_overlap([("out (probs)", probs), ("out (loss_buf)", loss_buf)], [("logits", logits), ("labels", y_dev), ("weight", w_dev)],
                     in_place=[("out (probs)", "logits")])
    valid, ys, a, a_sum = _norm(y_host, w_host, ignore_index)
    divisor = {"mean": a_sum, "sum": 1.0, "none": 1.0}[reduction]

    if not _backend.uses_kernels():
        z3 = _rows_view(logits, c, unbatched)
        p3 = _rows_view(probs, c, unbatched)
        zr = np.moveaxis(z3, 1, 2).reshape(rows, c)  # a copy when S > 1: fine on cpu
        m = zr.max(axis=1, keepdims=True)
        e = np.exp(zr - m)
        s = e.sum(axis=1)
        lse = m[:, 0] + np.log(s)
        z_label = zr[np.arange(rows), ys]
        nll = a * (lse - z_label)
        if eps:
            wz = zr @ (np.ones(c, np.float32) if w_host is None else w_host.astype(np.float32))
            w_sum = c if w_host is None else float(w_host.sum())
            smooth = np.where(valid, w_sum * lse - wz, 0.0)
            row_loss = (1.0 - eps) * nll + eps / c * smooth
        else:
            row_loss = nll
        row_loss = row_loss.astype(np.float32)
        e /= s[:, None]
        np.copyto(p3, np.moveaxis(e.reshape(z3.shape[0], z3.shape[2], c), 2, 1))
        total = float(row_loss.sum(dtype=np.float64))
        red = total / a_sum if reduction == "mean" and a_sum != 0 else (float("nan") if reduction == "mean" else total)
        if loss_buf is not None:
            loss_buf[:rows] = row_loss
            loss_buf[rows] = red if reduction != "none" else total
        if reduction == "none":
            per_row = row_loss.reshape(batch) if loss_buf is None else loss_buf[:rows].reshape(batch)
            return per_row, probs
        return red, probs
    from ..kernels import softmax as ksoftmax

    if loss_buf is None:
        loss_buf = _scratch_buffer(rows)
    y_arg = y_dev if (y_dev is not None and np.dtype(y_dev.dtype) == np.int32 and len(y_dev.shape) == 1) \
        else to_device(y_host)
    w_arg = None
    if w_host is not None:
        w_arg = w_dev if w_dev is not None else to_device(w_host.astype(np.float32))
    z3 = _rows_view(logits, c, unbatched)
    p3 = _rows_view(probs, c, unbatched)
    ksoftmax.softmax_cross_entropy_forward(
        z3, y_arg, p3, loss_buf[:rows], loss_buf[rows:], version=version, weight=w_arg,
        weight_sum=None if w_host is None else float(w_host.sum()), ignore_index=ignore_index,
        label_smoothing=eps, divisor=divisor if divisor != 0 else 1.0)  # 0 rows counted: NaN set below
    if reduction == "none":
        return result(loss_buf[:rows].reshape(batch) if batch else loss_buf[:1].reshape(()), on_host), \
            result(probs, on_host)
    loss = float(loss_buf[rows:].copy_to_host()[0])
    if reduction == "mean" and a_sum == 0:
        loss = float("nan")  # 0 / 0, as PyTorch (the kernel divides by 0 too; stated, not left to chance)
    return loss, result(probs, on_host)


# --- backward ----------------------------------------------------------------------------------------


def softmax_cross_entropy_backward(probs, labels, weight=None, ignore_index=-100, label_smoothing=0.0,
                                   reduction="mean", *, grad=None, out=None):
    """d(loss)/d(logits) for :func:`softmax_cross_entropy` with the same keywords; probs from it.

    mean: (1 − ε) w_y (p − onehot) + ε / C (W p − w) per row, over Σ weight[label]; sum: not divided;
    none: the gradient of Σ grad · loss, ``grad`` of the labels' shape (default ones). Ignored rows get
    0. ``out`` may be probs itself (in place).
    """
    probs, on_host = as_input("probs", probs)
    c, batch, unbatched = _check_logits("probs", probs)
    w_host, w_dev, ignore_index, eps = _options(weight, ignore_index, label_smoothing, reduction, c)
    y_host, y_dev = _labels("labels", labels, batch, c, ignore_index)
    rows = y_host.shape[0]
    shape = tuple(probs.shape)
    d = empty(shape) if out is None else check_out("out", out, shape)
    check_no_overlap([("out", d)], [("probs", probs), ("labels", y_dev), ("weight", w_dev)], in_place=[("out", "probs")])
    valid, ys, a, a_sum = _norm(y_host, w_host, ignore_index)
    g = None
    if grad is not None:
        if reduction != "none":
            raise ValueError(f"grad: only for reduction='none' (a gradient per row); with {reduction!r} the "
                             f"loss is a scalar")
        g, _ = as_input("grad", grad)
        if tuple(g.shape) != batch:
            raise ValueError(f"grad: expected shape {batch} (the loss's), got {tuple(g.shape)}")
    scale = 1.0 / a_sum if reduction == "mean" and a_sum != 0 else (float("nan") if reduction == "mean" else 1.0)

    if not _backend.uses_kernels():
        p3 = _rows_view(probs, c, unbatched)
        d3 = _rows_view(d, c, unbatched)
        pr = np.moveaxis(p3, 1, 2).reshape(rows, c).astype(np.float32)
        w = np.ones(c, np.float32) if w_host is None else w_host.astype(np.float32)
        dr = pr.copy()
        dr[np.arange(rows), ys] -= 1.0
        dr *= (np.float32(1.0 - eps) * a.astype(np.float32))[:, None]
        if eps:
            dr += np.float32(eps / c) * valid[:, None] * (np.float32(w.sum()) * pr - w[None, :])
        if g is not None:
            dr *= np.asarray(g, np.float32).reshape(rows, 1)
        else:
            dr *= np.float32(scale)
        np.copyto(d3, np.moveaxis(dr.reshape(p3.shape[0], p3.shape[2], c), 2, 1))
        return d
    from ..kernels import softmax as ksoftmax

    y_arg = y_dev if (y_dev is not None and np.dtype(y_dev.dtype) == np.int32 and len(y_dev.shape) == 1) \
        else to_device(y_host)
    w_arg = None
    if w_host is not None:
        w_arg = w_dev if w_dev is not None else to_device(w_host.astype(np.float32))
    g_arg = None if g is None else g.reshape(rows)
    ksoftmax.softmax_cross_entropy_backward(
        _rows_view(probs, c, unbatched), y_arg, _rows_view(d, c, unbatched), weight=w_arg,
        weight_sum=None if w_host is None else float(w_host.sum()), ignore_index=ignore_index,
        label_smoothing=eps, scale=scale, row_grad=g_arg)
    return result(d, on_host)
