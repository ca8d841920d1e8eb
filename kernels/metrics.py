"""Training metrics kept on the device: a batch's loss sum, correct predictions and non-finite losses are
added to a small accumulator, so a training loop reads them once an epoch (or once a progress-bar
refresh) instead of copying the loss and the probabilities back, and waiting, every step.

    acc[0]  Σ finite per-row losses        (float64: an epoch of float32 losses sums without drift)
    acc[1]  rows whose argmax(probs) equals the label   (the first maximum, as NumPy's argmax)
    acc[2]  rows whose loss is NaN or infinite
    acc[3]  the step of the first batch with a non-finite loss (the caller's number, or acc[5] + 1 where
            the device numbers the batches); -1: none yet
    acc[4]  that batch's first non-finite loss (NaN, +inf or -inf), for the error message
    acc[5]  batches added since :func:`reset`: the device's own step count, so a training step's launch
            takes no host number that changes from step to step (a CUDA graph replays it as it is)

Versions: ``block`` (the only one: one block strides over the batch, then shared-memory trees; thread 0
adds the block's sums, so the result is the same bits every run, with no atomics).

Two entry points:

    accumulate(row_loss, probs, labels, acc, step=None)   the metrics of a batch whose loss and
                                                          probabilities another kernel computed
    train_loss_step(logits, labels, dlogits, acc)         a training step's whole loss in ONE launch:
                                                          softmax, cross-entropy, dlogits (of the batch
                                                          mean) and the metrics; nothing else is written

Run the checks: ``python -m pytest tests/test_metrics.py`` (simulator); build for real GPUs:
``python -m gpu_cnn.compile_check``.
"""
import math

import numpy as np
from numba import cuda, float32, float64, int64
from numba.core import config

from ._common import check_device_array, device_function, kernel

VERSIONS = ("block",)
DEFAULT_VERSION = "block"

# Threads of the one block (a power of two, for the tree). Under the simulator every thread is a Python
# thread, so it runs with 8: batches longer and shorter than a block exist in the tests either way.
TPB = 8 if config.ENABLE_CUDASIM else 256
assert TPB & (TPB - 1) == 0

SLOTS = 6  # acc's length
NO_STEP = -1.0
EMPTY = (0.0, 0.0, 0.0, NO_STEP, 0.0, 0.0)  # acc with nothing seen yet (what reset writes)
NAN = np.float32(np.nan)
HOST_STEP_NONE = -1  # accumulate's kernel argument for "no host step: number the batch acc[5] + 1"


# --- reference ---------------------------------------------------------------------------------------


def epoch_metrics_reference(batches):
    """float64 accumulator after `batches`, a list of (step, row_loss (N,), probs (N, C), labels (N,));
    step None: the batch's number since the reset (1, 2, ...), as the device counts them in acc[5]."""
    acc = np.array([0.0, 0.0, 0.0, NO_STEP, 0.0, 0.0])
    for step, row_loss, probs, labels in batches:
        acc[5] += 1
        step = acc[5] if step is None else step
        row_loss = np.asarray(row_loss, np.float64)
        finite = np.isfinite(row_loss)
        acc[0] += row_loss[finite].sum()
        acc[1] += np.count_nonzero(np.asarray(probs).argmax(axis=1) == np.asarray(labels))
        acc[2] += np.count_nonzero(~finite)
        if (~finite).any() and acc[3] == NO_STEP:
            acc[3], acc[4] = step, row_loss[~finite][0]
    return acc


def train_loss_step_reference(logits, labels):
    """float64 (row losses, probs, dlogits of the batch mean) that train_loss_step computes."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels).astype(np.int64)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    probs = np.exp(z - lse[:, None])
    onehot = np.zeros_like(z)
    onehot[np.arange(len(y)), y] = 1.0
    return lse - z[np.arange(len(y)), y], probs, (probs - onehot) / len(y)


# --- kernels -----------------------------------------------------------------------------------------


@device_function("void(float64[::1], float64[::1], float64[::1], float64[::1], int64[::1], int64)")
def _block_totals(s_loss, s_ok, s_bad, s_first, s_row, tid):
    """The block's totals into element 0 of its shared arrays: a tree over the loss sums, correct and
    non-finite counts, keeping the first non-finite row (and its loss). Every thread of the block calls
    it once its own entries are written (it starts and ends with a barrier)."""
    cuda.syncthreads()
    half = TPB // 2
    while half > 0:
        if tid < half:
            s_loss[tid] += s_loss[tid + half]
            s_ok[tid] += s_ok[tid + half]
            s_bad[tid] += s_bad[tid + half]
            if s_row[tid + half] < s_row[tid]:
                s_row[tid] = s_row[tid + half]
                s_first[tid] = s_first[tid + half]
        cuda.syncthreads()
        half //= 2


@kernel("void(float32[::1], float32[:, ::1], int32[::1], float64[::1], int64)", block=TPB)
def epoch_metrics_block_kernel(row_loss, probs, labels, acc, step):
    """block: one block strides over the batch, shared-memory trees sum its three counts, thread 0 adds them."""
    # row_loss: (N,) float32; probs: (N, C) float32; labels: (N,) int32; acc: (SLOTS,) float64
    s_loss = cuda.shared.array(TPB, float64)
    s_ok = cuda.shared.array(TPB, float64)
    s_bad = cuda.shared.array(TPB, float64)
    s_first = cuda.shared.array(TPB, float64)  # each thread's first non-finite loss (0: none)
    s_row = cuda.shared.array(TPB, int64)  # ... and its row (N: none), to keep the batch's first
    tid = cuda.threadIdx.x
    N = row_loss.shape[0]
    C = probs.shape[1]
    loss = float64(0.0)
    ok = float64(0.0)
    bad = float64(0.0)
    first = float64(0.0)
    first_row = N
    for i in range(tid, N, TPB):
        v = row_loss[i]
        if math.isfinite(v):
            loss += v
        else:
            bad += 1.0
            if i < first_row:
                first_row = i
                first = v
        best = probs[i, 0]
        arg = 0
        for j in range(1, C):
            p = probs[i, j]
            if p > best:  # strict: the first maximum wins, as np.argmax
                best = p
                arg = j
        if arg == labels[i]:
            ok += 1.0
    s_loss[tid] = loss
    s_ok[tid] = ok
    s_bad[tid] = bad
    s_first[tid] = first
    s_row[tid] = first_row
    _block_totals(s_loss, s_ok, s_bad, s_first, s_row, tid)
    if tid == 0:
        acc[0] += s_loss[0]
        acc[1] += s_ok[0]
        acc[2] += s_bad[0]
        number = acc[5] + 1.0  # read before it is written: this batch's number since the reset
        if s_bad[0] > 0.0 and acc[3] < 0.0:
            acc[3] = float64(step) if step >= 0 else number
            acc[4] = s_first[0]
        acc[5] = number


@kernel("void(float32[:, ::1], int32[::1], float32[:, ::1], float64[::1])", block=TPB)
def train_loss_step_block_kernel(logits, labels, dlogits, acc):
    """block: softmax cross-entropy, its mean's gradient and the metrics of a batch in one block; a thread a row."""
    # logits, dlogits: (N, C) float32 (dlogits may be logits itself); labels: (N,) int32; acc: (SLOTS,) float64
    s_loss = cuda.shared.array(TPB, float64)
    s_ok = cuda.shared.array(TPB, float64)
    s_bad = cuda.shared.array(TPB, float64)
    s_first = cuda.shared.array(TPB, float64)
    s_row = cuda.shared.array(TPB, int64)
    tid = cuda.threadIdx.x
    N = logits.shape[0]
    C = logits.shape[1]
    inv_n = float32(1.0) / float32(N)  # the mean's 1/N, from the shape: no host scalar
    loss = float64(0.0)
    ok = float64(0.0)
    bad = float64(0.0)
    first = float64(0.0)
    first_row = N
    for i in range(tid, N, TPB):
        # the row's max, then s = sum exp(z - max) (every term <= 1, one equals 1); NaN propagates to s
        m = logits[i, 0]
        for j in range(1, C):
            m = max(m, logits[i, j])
        s = float32(0.0)
        for j in range(C):
            s += math.exp(logits[i, j] - m)
        lab = labels[i]
        z_label = NAN  # a bad id (the host checks them) gives a NaN loss, never a stray read
        if lab >= 0 and lab < C:
            z_label = logits[i, lab]
        v = (m + math.log(s)) - z_label  # the log-sum-exp form: never the log of a rounded p
        # p, its argmax (the first maximum, as np.argmax of the probabilities) and dz = (p - onehot) / N;
        # logits[i, j] is read before dlogits[i, j] is written, by this thread only: in place is safe
        inv = float32(1.0) / s
        best = float32(0.0)
        arg = 0
        for j in range(C):
            p = math.exp(logits[i, j] - m) * inv
            if j == 0 or p > best:
                best = p
                arg = j
            hit = float32(1.0) if j == lab else float32(0.0)
            dlogits[i, j] = (p - hit) * inv_n
        if math.isfinite(v):
            loss += v
        else:
            bad += 1.0
            if i < first_row:
                first_row = i
                first = v
        if arg == lab:
            ok += 1.0
    s_loss[tid] = loss
    s_ok[tid] = ok
    s_bad[tid] = bad
    s_first[tid] = first
    s_row[tid] = first_row
    _block_totals(s_loss, s_ok, s_bad, s_first, s_row, tid)
    if tid == 0:
        number = acc[5] + 1.0  # this batch's number since the reset, kept on the device
        acc[0] += s_loss[0]
        acc[1] += s_ok[0]
        acc[2] += s_bad[0]
        if s_bad[0] > 0.0 and acc[3] < 0.0:
            acc[3] = number
            acc[4] = s_first[0]
        acc[5] = number


# --- launchers ---------------------------------------------------------------------------------------


def reset(acc):
    """Set an accumulator (SLOTS,) float64 device array to 'nothing seen yet', without allocating."""
    check_device_array("acc", acc, shape=(SLOTS,), dtype=np.float64)
    acc.copy_to_device(np.array(EMPTY))
    return acc


def _check_version(version):
    if (DEFAULT_VERSION if version is None else version) not in VERSIONS:
        raise ValueError(f"version: expected one of {', '.join(VERSIONS)}, got {version!r}")


def _check_2d(name, a):
    check_device_array(name, a)
    if len(a.shape) != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name}: expected a non-empty (N, num_classes) array, got shape {tuple(a.shape)}")
    return a.shape[0]


def accumulate(row_loss, probs, labels, acc, step=None, version=None):
    """Add one batch (its per-row losses, probabilities and int32 labels) to acc; `step` numbers it
    (an int >= 0; None: the device's count, acc[5] + 1)."""
    _check_version(version)
    n = _check_2d("probs", probs)
    check_device_array("row_loss", row_loss, shape=(n,))
    check_device_array("labels", labels, shape=(n,), dtype=np.int32)
    check_device_array("acc", acc, shape=(SLOTS,), dtype=np.float64)
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0):
        raise ValueError(f"step: expected an int >= 0 or None, got {step!r}")
    epoch_metrics_block_kernel[1, TPB](row_loss, probs, labels, acc, HOST_STEP_NONE if step is None else int(step))
    return acc


def train_loss_step(logits, labels, dlogits, acc, version=None):
    """A training step's loss in one launch: dlogits = d(mean softmax cross-entropy)/d(logits) is written
    (N, C), and the batch's loss sum, correct count and non-finite losses are added to acc, the batch
    numbered acc[5] + 1 by the device. No host scalar goes in, so a captured CUDA graph replays it as it
    is. logits (N, C) float32, labels (N,) int32 class ids (checked on the host beforehand: a bad id
    gives that row a NaN loss), dlogits may be logits itself."""
    _check_version(version)
    n = _check_2d("logits", logits)
    check_device_array("labels", labels, shape=(n,), dtype=np.int32)
    check_device_array("dlogits", dlogits, shape=tuple(logits.shape))
    check_device_array("acc", acc, shape=(SLOTS,), dtype=np.float64)
    train_loss_step_block_kernel[1, TPB](logits, labels, dlogits, acc)
    return dlogits


__all__ = ["VERSIONS", "DEFAULT_VERSION", "TPB", "SLOTS", "NO_STEP", "epoch_metrics_reference", "reset",
           "accumulate", "train_loss_step", "train_loss_step_reference"]
