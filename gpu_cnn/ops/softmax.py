"""Softmax + cross-entropy (mean over the batch), fused, and its gradient with respect to the logits.

The loss of a row is computed from the log-sum-exp, ``log Σ exp(z − max) − (z_label − max)``, never
as ``−log`` of a rounded probability, so it stays finite and accurate for logits of any magnitude.

cpu: vectorized NumPy. cuda/sim: :mod:`gpu_cnn.kernels.softmax` (one block per row, then a one-block
mean). The device path needs N + 1 floats of scratch (per-row losses and their mean): pass them as
``out=(probs, loss_buf)``, or let the op keep one reusable buffer (allocated on first use and when a
larger batch arrives; reused after that, so a training loop allocates nothing per step).
"""
import numpy as np

from .. import backend as _backend
from ._base import as_input, as_labels, check_no_overlap, check_out, empty, is_device_array, result

_LAYOUT = "(N, num_classes)"

# Reusable device scratch for the per-row losses + their mean, when the caller does not pass one.
_scratch = {"buf": None}


def _check_batch(name, a):
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one row and one class, got shape {tuple(a.shape)}")
    return a.shape


def _scratch_buffer(n):
    buf = _scratch["buf"]
    if buf is None or buf.shape[0] < n + 1 or not is_device_array(buf):
        buf = empty((n + 1,))
        _scratch["buf"] = buf
    return buf[: n + 1]


def _split_out(out, n, c):
    """out -> (probs or None, loss_buf or None)."""
    if out is None:
        return None, None
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise TypeError("out: expected probs, or a tuple (probs, loss_buf) with loss_buf of shape (N + 1,)")
        probs, loss_buf = out
    else:
        probs, loss_buf = out, None
    probs = None if probs is None else check_out("out (probs)", probs, (n, c))
    loss_buf = None if loss_buf is None else check_out("out (loss_buf)", loss_buf, (n + 1,))
    return probs, loss_buf


def softmax_cross_entropy(logits, labels, *, out=None):
    """Mean cross-entropy of softmax(logits) against integer class ids: returns (loss, probs).

    logits: (N, num_classes) float; labels: (N,) integers in [0, num_classes). ``loss`` is a Python
    float (on a device backend one scalar is copied back); ``probs`` (N, num_classes) is where the
    logits came from (host or device). ``out`` is probs, or a tuple (probs, loss_buf) where loss_buf
    (N + 1,) float32 receives the per-row losses followed by their mean; given, nothing is allocated.
    Host float64 input is computed in float32.
    """
    logits, on_host = as_input("logits", logits, 2, _LAYOUT)
    n, c = _check_batch("logits", logits)
    labels = as_labels("labels", labels, n, c)
    probs, loss_buf = _split_out(out, n, c)
    if probs is None:
        probs = empty((n, c))
    check_no_overlap([("out (probs)", probs), ("out (loss_buf)", loss_buf)], [("logits", logits), ("labels", labels)],
                     in_place=[("out (probs)", "logits")])

    if not _backend.uses_kernels():
        z = np.subtract(logits, logits.max(axis=1, keepdims=True), out=probs)
        rows = np.arange(n)
        z_label = z[rows, labels]  # copied before z is overwritten with the probabilities
        np.exp(z, out=probs)
        s = probs.sum(axis=1)
        probs /= s[:, None]
        row_loss = np.log(s) - z_label
        if loss_buf is not None:
            loss_buf[:n] = row_loss
            loss_buf[n] = row_loss.mean()
        return float(row_loss.mean(dtype=np.float64)), probs
    from ..kernels import softmax as ksoftmax

    if loss_buf is None:
        loss_buf = _scratch_buffer(n)
    ksoftmax.softmax_cross_entropy_forward(logits, labels, probs, loss_buf[:n], loss_buf[n:])
    loss = float(loss_buf[n:].copy_to_host()[0])
    return loss, result(probs, on_host)


def softmax_cross_entropy_backward(probs, labels, *, out=None):
    """dlogits = (probs − onehot(labels)) / N, the gradient of the mean loss. probs: (N, num_classes)
    from :func:`softmax_cross_entropy`; labels as there. ``out`` may be probs itself (in place)."""
    probs, on_host = as_input("probs", probs, 2, _LAYOUT)
    n, c = _check_batch("probs", probs)
    labels = as_labels("labels", labels, n, c)
    d = empty((n, c)) if out is None else check_out("out", out, (n, c))
    check_no_overlap([("out", d)], [("probs", probs), ("labels", labels)], in_place=[("out", "probs")])

    if not _backend.uses_kernels():
        if d is not probs:
            np.copyto(d, probs)
        d[np.arange(n), labels] -= 1.0
        np.divide(d, np.float32(n), out=d)  # the same rounding as the kernel
        return d
    from ..kernels import softmax as ksoftmax

    ksoftmax.softmax_cross_entropy_backward(probs, labels, d)
    return result(d, on_host)
