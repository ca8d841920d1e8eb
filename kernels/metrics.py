"""Training metrics kept on the device: a batch's loss sum, correct predictions and non-finite losses are
added to a small accumulator, so a training loop reads them once an epoch (or once a progress-bar
refresh) instead of copying the loss and the probabilities back, and waiting, every step.

    acc[0]  Σ finite per-row losses        (float64: an epoch of float32 losses sums without drift)
    acc[1]  rows whose argmax(probs) equals the label   (the first maximum, as NumPy's argmax)
    acc[2]  rows whose loss is NaN or infinite
    acc[3]  the step (as the caller numbers it) of the first batch with a non-finite loss; -1: none yet
    acc[4]  that batch's first non-finite loss (NaN, +inf or -inf), for the error message

Versions: ``block`` (the only one: one block strides over the batch, then shared-memory trees; thread 0
adds the block's sums, so the result is the same bits every run, with no atomics).

Run the checks: ``python -m pytest tests/test_metrics.py`` (simulator); build for real GPUs:
``python -m gpu_cnn.compile_check``.
"""
import math

import numpy as np
from numba import cuda, float64, int64
from numba.core import config

from ._common import check_device_array, kernel

VERSIONS = ("block",)
DEFAULT_VERSION = "block"

# Threads of the one block (a power of two, for the tree). Under the simulator every thread is a Python
# thread, so it runs with 8: batches longer and shorter than a block exist in the tests either way.
TPB = 8 if config.ENABLE_CUDASIM else 256
assert TPB & (TPB - 1) == 0

SLOTS = 5  # acc's length
NO_STEP = -1.0


# --- reference ---------------------------------------------------------------------------------------


def epoch_metrics_reference(batches):
    """float64 accumulator after `batches`, a list of (step, row_loss (N,), probs (N, C), labels (N,))."""
    acc = np.array([0.0, 0.0, 0.0, NO_STEP, 0.0])
    for step, row_loss, probs, labels in batches:
        row_loss = np.asarray(row_loss, np.float64)
        finite = np.isfinite(row_loss)
        acc[0] += row_loss[finite].sum()
        acc[1] += np.count_nonzero(np.asarray(probs).argmax(axis=1) == np.asarray(labels))
        acc[2] += np.count_nonzero(~finite)
        if (~finite).any() and acc[3] == NO_STEP:
            acc[3], acc[4] = step, row_loss[~finite][0]
    return acc


# --- kernels -----------------------------------------------------------------------------------------


@kernel("void(float32[::1], float32[:, ::1], int32[::1], float64[::1], int64)")
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
    if tid == 0:
        acc[0] += s_loss[0]
        acc[1] += s_ok[0]
        acc[2] += s_bad[0]
        if s_bad[0] > 0.0 and acc[3] < 0.0:
            acc[3] = float64(step)
            acc[4] = s_first[0]


# --- launchers ---------------------------------------------------------------------------------------


def reset(acc):
    """Set an accumulator (SLOTS,) float64 device array to 'nothing seen yet', without allocating."""
    check_device_array("acc", acc, shape=(SLOTS,), dtype=np.float64)
    acc.copy_to_device(np.array([0.0, 0.0, 0.0, NO_STEP, 0.0]))
    return acc


def accumulate(row_loss, probs, labels, acc, step, version=None):
    """Add one batch (its per-row losses, probabilities and int32 labels) to acc; `step` numbers it."""
    if (DEFAULT_VERSION if version is None else version) not in VERSIONS:
        raise ValueError(f"version: expected one of {', '.join(VERSIONS)}, got {version!r}")
    check_device_array("probs", probs)
    if len(probs.shape) != 2 or probs.shape[0] < 1 or probs.shape[1] < 1:
        raise ValueError(f"probs: expected a non-empty (N, num_classes) array, got shape {tuple(probs.shape)}")
    n = probs.shape[0]
    check_device_array("row_loss", row_loss, shape=(n,))
    check_device_array("labels", labels, shape=(n,), dtype=np.int32)
    check_device_array("acc", acc, shape=(SLOTS,), dtype=np.float64)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    epoch_metrics_block_kernel[1, TPB](row_loss, probs, labels, acc, int(step))
    return acc


__all__ = ["VERSIONS", "DEFAULT_VERSION", "TPB", "SLOTS", "NO_STEP", "epoch_metrics_reference", "reset",
           "accumulate"]
