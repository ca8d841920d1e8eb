"""Softmax + cross-entropy, fused, forward and backward.

Forward, one block per row (logits (N, C)):

    m       = max_j z_j                                     shared-memory tree reduction
    s       = Σ_j exp(z_j − m)                               shared-memory tree reduction
    p_j     = exp(z_j − m) / s                               written to probs
    loss_n  = log s − (z_label − m)                          = −log p_label, without rounding p first

then the mean over the batch by a single-block reduction (a separate tiny kernel, so no atomics and
a deterministic sum). Subtracting the row max keeps exp() in range: logits of 1e4 give a finite loss.

Backward: dlogits = (p − onehot(labels)) / N, one thread per element.

Versions: ``fused`` (the only one: the row is read three times from global memory; for rows that fit
in a block a register-cached variant would read it once).

Run the checks: ``python -m pytest tests/test_softmax.py`` (simulator); build for real GPUs:
``python -m gpu_cnn.compile_check``.
"""
import math

import numpy as np
from numba import cuda, float32
from numba.core import config

from ._common import TPB_1D, block_max, block_sum, check_device_array, grid_1d, kernel

VERSIONS = ("fused",)
DEFAULT_VERSION = "fused"

# Threads per block of the row kernel and of the batch-mean kernel. A power of two (tree reduction).
# Under the simulator every thread of a block is a Python thread and every barrier a rendezvous of all
# of them, so it runs with 8 threads (same code; rows shorter and longer than a block exist in the
# tests, so the strided loops and the tree are exercised either way).
SM_TPB = 8 if config.ENABLE_CUDASIM else 128
assert SM_TPB & (SM_TPB - 1) == 0

NEG_INF = np.float32(-np.inf)
NAN = np.float32(np.nan)


# --- reference ---------------------------------------------------------------------------------------


def softmax_cross_entropy_reference(logits, labels):
    """float64 (mean loss, probs (N, C), per-row losses (N,)), stable log-sum-exp."""
    z = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    rows = lse - z[np.arange(z.shape[0]), labels]
    probs = np.exp(z - lse[:, None])
    return float(rows.mean()), probs, rows


def softmax_cross_entropy_backward_reference(probs, labels):
    """float64 dlogits = (p − onehot(labels)) / N."""
    d = np.array(probs, np.float64)
    n = d.shape[0]
    d[np.arange(n), np.asarray(labels)] -= 1.0
    return d / n


# --- kernels -----------------------------------------------------------------------------------------


@kernel("void(float32[:, ::1], int32[::1], float32[:, ::1], float32[::1])", block=SM_TPB)
def softmax_xent_forward_kernel(logits, labels, probs, row_loss):
    """fused: one block per row; max and Σexp by shared-memory reductions, then p and −log p[label] in one pass."""
    # logits, probs: (N, C) float32; labels: (N,) int32; row_loss: (N,) float32
    buf = cuda.shared.array(SM_TPB, float32)
    tid = cuda.threadIdx.x
    row = cuda.blockIdx.x
    N = logits.shape[0]
    C = logits.shape[1]
    valid = row < N  # the grid is exactly N blocks; the barriers below stay outside any branch

    # 1. row max: each thread strides over the row, then a tree reduction in shared memory
    mx = NEG_INF
    if valid:
        for j in range(tid, C, SM_TPB):
            mx = max(mx, logits[row, j])
    buf[tid] = mx
    block_max(buf, tid)
    mx = buf[0]
    cuda.syncthreads()  # everyone has read buf[0] before buf is reused

    # 2. s = Σ exp(z − max): every term is <= 1, one term equals 1, so s is in [1, C]
    acc = float32(0.0)
    if valid:
        for j in range(tid, C, SM_TPB):
            acc += math.exp(logits[row, j] - mx)
    # the label's logit, read before the barriers of the sum: after them, probs may overwrite the row
    # (probs may be logits itself)
    z_label = NAN  # a bad id (validated on the host) still shows up as NaN, never as a stray read
    if valid and tid == 0:
        lab = labels[row]
        if lab >= 0 and lab < C:
            z_label = logits[row, lab]
    buf[tid] = acc
    block_sum(buf, tid)
    total = buf[0]

    # 3. probabilities and the row's loss from the log-sum-exp (never log of a rounded p)
    if valid:
        inv = float32(1.0) / total
        for j in range(tid, C, SM_TPB):
            probs[row, j] = math.exp(logits[row, j] - mx) * inv
        if tid == 0:
            row_loss[row] = math.log(total) - (z_label - mx)


@kernel("void(float32[::1], float32[::1])", block=SM_TPB)
def batch_mean_kernel(row_loss, loss):
    """Mean of the per-row losses by one block: strided partial sums, then a shared-memory tree (no atomics)."""
    # row_loss: (N,) float32; loss: (1,) float32
    buf = cuda.shared.array(SM_TPB, float32)
    tid = cuda.threadIdx.x
    N = row_loss.shape[0]
    acc = float32(0.0)
    for i in range(tid, N, SM_TPB):
        acc += row_loss[i]
    buf[tid] = acc
    block_sum(buf, tid)
    if tid == 0:
        loss[0] = buf[0] / float32(N)


@kernel("void(float32[:, ::1], int32[::1], float32[:, ::1])", block=TPB_1D)
def softmax_xent_backward_kernel(probs, labels, dlogits):
    """dlogits = (p − onehot(labels)) / N, one thread per element (in place on probs is safe)."""
    # probs, dlogits: (N, C) float32; labels: (N,) int32
    i = cuda.grid(1)
    N = probs.shape[0]
    C = probs.shape[1]
    n = i // C
    j = i - n * C
    if i < N * C:
        d = probs[n, j]
        if labels[n] == j:
            d -= float32(1.0)
        dlogits[n, j] = d / float32(N)


# --- launchers ---------------------------------------------------------------------------------------


def _check_logits(name, a):
    check_device_array(name, a)
    if len(a.shape) != 2:
        raise ValueError(f"{name}: expected a 2-D array (N, num_classes), got shape {tuple(a.shape)}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one row and one class, got shape {tuple(a.shape)}")
    return a.shape


def softmax_xent_forward_fused(logits, labels, probs, row_loss, loss):
    """probs = softmax(logits); row_loss[n] = −log probs[n, labels[n]]; loss[0] = mean(row_loss)."""
    n, c = _check_logits("logits", logits)
    check_device_array("labels", labels, shape=(n,), dtype=np.int32)
    check_device_array("probs", probs, shape=(n, c))
    check_device_array("row_loss", row_loss, shape=(n,))
    check_device_array("loss", loss, shape=(1,))
    softmax_xent_forward_kernel[n, SM_TPB](logits, labels, probs, row_loss)
    batch_mean_kernel[1, SM_TPB](row_loss, loss)
    return probs, loss


def softmax_xent_backward(probs, labels, dlogits):
    """dlogits = (probs − onehot(labels)) / N; dlogits may be probs itself."""
    n, c = _check_logits("probs", probs)
    check_device_array("labels", labels, shape=(n,), dtype=np.int32)
    check_device_array("dlogits", dlogits, shape=(n, c))
    blocks, threads = grid_1d(n * c)
    softmax_xent_backward_kernel[blocks, threads](probs, labels, dlogits)
    return dlogits


_FORWARD = {"fused": softmax_xent_forward_fused}


# --- dispatcher --------------------------------------------------------------------------------------


def softmax_cross_entropy_forward(logits, labels, probs, row_loss, loss, version=None):
    """Device arrays in and out, no allocation: probs (N, C), row_loss (N,), loss (1,) are written."""
    version = DEFAULT_VERSION if version is None else version
    if version not in _FORWARD:
        raise ValueError(f"version: unknown softmax version {version!r}; expected one of {', '.join(VERSIONS)}")
    return _FORWARD[version](logits, labels, probs, row_loss, loss)


def softmax_cross_entropy_backward(probs, labels, dlogits):
    return softmax_xent_backward(probs, labels, dlogits)


__all__ = [
    "VERSIONS", "DEFAULT_VERSION", "SM_TPB", "softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
    "softmax_cross_entropy_reference", "softmax_cross_entropy_backward_reference",
]
