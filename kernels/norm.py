"""BatchNorm2d, Dropout and the residual add, NCHW float32, forward and backward.

BatchNorm2d (training), per channel c over the M = N*H*W values x[:, c]:

    mean[c] = Σ x / M,   var[c] = Σ (x - mean)² / M (biased, normalises),   invstd = 1 / sqrt(var + eps)
    y = (x - mean) * invstd * weight[c] + bias[c]
    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)   (unbiased, as PyTorch)

Eval (or track_running_stats with running statistics): mean/invstd come from the running buffers.

Backward (training statistics), with xhat = (x - mean) * invstd:

    dbias[c]   = Σ dy,   dweight[c] = Σ dy * xhat
    dx = weight * invstd / M * (M * dy - dbias - xhat * dweight)
    (running statistics: dx = weight * invstd * dy, the statistics being constants)

Kernels, one idea each:

    running    (eval) one thread per channel: mean, invstd from the running statistics.
    stats      one BLOCK per channel: two passes over its M values (the mean first, then the squared
               deviations: no catastrophic cancellation of E[x²] - E[x]²), each a strided sum plus a
               shared-memory tree (block_sum): deterministic, no atomics. Thread 0 writes mean, invstd
               and, when asked, updates the running statistics.
    apply      one thread per element: y = (x - mean[c]) * invstd[c] * weight[c] + bias[c].
    reduce     one BLOCK per channel: Σ dy and Σ dy * xhat by the same strided sum + tree.
    dx         one thread per element, the formula above.

Dropout (training): keep element i when u(seed, step, i) >= p, y = x * keep / (1 - p). The uniform u
is a counter-based hash (no state, no sequence): the 32-bit "lowbias32" integer hash (Chris Wellons)
chained over seed, step and the flat element index i, top 24 bits as the uniform. Every backend
computes the same integers, so cpu, sim and cuda drop the same elements for the same (seed, step):
``dropout_keep_reference`` is the NumPy twin the cpu path and the tests use. Backward: dx = dy * keep /
(1 - p), the mask recomputed from the same (seed, step), never stored.

Residual add: y = a + b, one thread per element.

Run the checks: ``python -m pytest tests/test_norm.py`` (simulator); build for real GPUs:
``python -m gpu_cnn.compile_check``.
"""
import math

import numpy as np
from numba import config, cuda, float32, uint64

from ._common import TPB_1D, block_sum, check_device_array, device_function, grid_1d, kernel

# threads of the block that reduces one channel (a power of two for the tree); under the simulator
# every thread is a Python thread and every barrier a rendezvous, so it shrinks (same code)
RED_THREADS = 8 if config.ENABLE_CUDASIM else 256
assert RED_THREADS & (RED_THREADS - 1) == 0

MASK32 = 0xFFFFFFFF
DROP_BITS = 24  # the uniform's resolution: u = (hash >> 8) / 2**24


# --- reference ---------------------------------------------------------------------------------------


def _hash32_np(v):
    """lowbias32 on a uint64 array holding 32-bit values (the products masked back to 32 bits)."""
    v = v & MASK32
    v ^= v >> 16
    v = (v * 0x7FEB352D) & MASK32
    v ^= v >> 15
    v = (v * 0x846CA68B) & MASK32
    v ^= v >> 16
    return v


def dropout_threshold(p):
    """The integer threshold: keep when (hash >> 8) >= ceil(p * 2**24) (p in [0, 1))."""
    return int(np.ceil(float(p) * (1 << DROP_BITS)))


def dropout_keep_reference(seed, step, n, p):
    """Boolean keep mask of n elements for (seed, step) and drop probability p, in NumPy."""
    key = _hash32_np(np.uint64(step & MASK32) ^ _hash32_np(np.uint64(seed & MASK32)))
    h = _hash32_np(np.arange(n, dtype=np.uint64) ^ key)
    return (h >> np.uint64(32 - DROP_BITS)) >= np.uint64(dropout_threshold(p))


def batchnorm_reference(x, weight, bias, eps):
    """float64 (y, mean, biased var) of a training-mode BatchNorm2d over (N, H, W)."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    xhat = (x - mean[None, :, None, None]) / np.sqrt(var + eps)[None, :, None, None]
    return xhat * np.asarray(weight, np.float64)[None, :, None, None] + np.asarray(bias, np.float64)[None, :, None, None], mean, var


# --- kernels -----------------------------------------------------------------------------------------


@device_function("uint64(uint64)")
def _hash32(v):
    # v: a uint64 holding a 32-bit value; every product masked back to 32 bits (the same integers as
    # the NumPy twin on every backend)
    v = v & uint64(MASK32)
    v ^= v >> uint64(16)
    v = (v * uint64(0x7FEB352D)) & uint64(MASK32)
    v ^= v >> uint64(15)
    v = (v * uint64(0x846CA68B)) & uint64(MASK32)
    v ^= v >> uint64(16)
    return v


@kernel("void(float32[:, :, :, ::1], float32[::1], float32[::1], float32[::1], float32[::1], float32, float32, int64)",
        block=RED_THREADS)
def batchnorm_stats_kernel(x, mean, invstd, running_mean, running_var, eps, momentum, update_running):
    """stats: one block per channel, two-pass mean / variance by strided sums and a shared-memory tree."""
    # x: (N, C, H, W) float32; mean, invstd, running_mean, running_var: (C,)
    part = cuda.shared.array(RED_THREADS, float32)
    N, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    tid = cuda.threadIdx.x
    c = cuda.blockIdx.x
    valid = c < C  # uniform over the block: every thread still reaches the barriers
    hw = H * W
    total = N * hw

    acc = float32(0.0)
    if valid:
        for e0 in range(0, total, RED_THREADS):
            e = e0 + tid
            if e < total:
                n = e // hw
                r = e - n * hw
                acc += x[n, c, r // W, r % W]
    part[tid] = acc
    block_sum(part, tid)
    m = part[0] / float32(max(total, 1))
    cuda.syncthreads()  # everyone has read part[0] before it is overwritten

    acc = float32(0.0)
    if valid:
        for e0 in range(0, total, RED_THREADS):
            e = e0 + tid
            if e < total:
                n = e // hw
                r = e - n * hw
                dv = x[n, c, r // W, r % W] - m
                acc += dv * dv
    part[tid] = acc
    block_sum(part, tid)
    if valid and tid == 0:
        var = part[0] / float32(max(total, 1))
        mean[c] = m
        invstd[c] = float32(1.0) / float32(math.sqrt(var + eps))
        if update_running:
            unbiased = var * float32(total) / float32(max(total - 1, 1))
            running_mean[c] = (float32(1.0) - momentum) * running_mean[c] + momentum * m
            running_var[c] = (float32(1.0) - momentum) * running_var[c] + momentum * unbiased


@kernel("void(float32[::1], float32[::1], float32, float32[::1], float32[::1])", block=TPB_1D)
def batchnorm_running_kernel(running_mean, running_var, eps, mean, invstd):
    """eval: one thread per channel, mean = running_mean, invstd = 1 / sqrt(running_var + eps)."""
    # all (C,) float32
    c = cuda.grid(1)
    if c < mean.shape[0]:
        mean[c] = running_mean[c]
        invstd[c] = float32(1.0) / float32(math.sqrt(running_var[c] + eps))


@kernel("void(float32[::1], float32[::1], float32[::1], float32[::1], float32[::1], float32[::1], int64, int64)",
        block=TPB_1D)
def batchnorm_apply_kernel(x, mean, invstd, weight, bias, y, C, inner):
    """apply: one thread per element, y = (x - mean[c]) * invstd[c] * weight[c] + bias[c]."""
    # x, y: (N*C*H*W,) float32 viewed flat, c = (i // inner) % C with inner = H*W; the rest (C,)
    i = cuda.grid(1)
    if i < x.shape[0]:
        c = (i // inner) % C
        y[i] = (x[i] - mean[c]) * invstd[c] * weight[c] + bias[c]


@kernel("void(float32[:, :, :, ::1], float32[:, :, :, ::1], float32[::1], float32[::1], float32[::1], float32[::1])",
        block=RED_THREADS)
def batchnorm_reduce_kernel(dy, x, mean, invstd, dweight, dbias):
    """reduce: one block per channel, Σ dy and Σ dy * xhat by strided sums and a shared-memory tree."""
    # dy, x: (N, C, H, W) float32; mean, invstd, dweight, dbias: (C,)
    part = cuda.shared.array(RED_THREADS, float32)
    N, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    tid = cuda.threadIdx.x
    c = cuda.blockIdx.x
    valid = c < C
    hw = H * W
    total = N * hw
    m = float32(0.0)
    s = float32(0.0)
    if valid:
        m = mean[c]
        s = invstd[c]

    acc = float32(0.0)
    if valid:
        for e0 in range(0, total, RED_THREADS):
            e = e0 + tid
            if e < total:
                n = e // hw
                r = e - n * hw
                acc += dy[n, c, r // W, r % W]
    part[tid] = acc
    block_sum(part, tid)
    if valid and tid == 0:
        dbias[c] = part[0]
    cuda.syncthreads()

    acc = float32(0.0)
    if valid:
        for e0 in range(0, total, RED_THREADS):
            e = e0 + tid
            if e < total:
                n = e // hw
                r = e - n * hw
                acc += dy[n, c, r // W, r % W] * (x[n, c, r // W, r % W] - m) * s
    part[tid] = acc
    block_sum(part, tid)
    if valid and tid == 0:
        dweight[c] = part[0]


@kernel("void(float32[::1], float32[::1], float32[::1], float32[::1], float32[::1], float32[::1], float32[::1], "
        "float32[::1], int64, int64, int64)", block=TPB_1D)
def batchnorm_dx_kernel(dy, x, mean, invstd, weight, dweight, dbias, dx, C, inner, batch_stats):
    """dx: one thread per element; batch statistics: w*invstd/M * (M*dy - dbias - xhat*dweight)."""
    # dy, x, dx: (N*C*H*W,) float32 viewed flat, c = (i // inner) % C; the rest (C,)
    i = cuda.grid(1)
    if i < x.shape[0]:
        c = (i // inner) % C
        s = invstd[c]
        if batch_stats:
            m = float32(x.shape[0] // C)  # M = N*H*W values per channel
            xhat = (x[i] - mean[c]) * s
            dx[i] = weight[c] * s / m * (m * dy[i] - dbias[c] - xhat * dweight[c])
        else:
            dx[i] = weight[c] * s * dy[i]


@kernel("void(float32[::1], float32[::1], uint32, uint32, uint32, float32)", block=TPB_1D)
def dropout_kernel(x, y, seed, step, threshold, scale):
    """counter-based: one thread per element keeps it when (hash(seed, step, i) >> 8) >= threshold."""
    # x, y: (n,) float32 viewed flat (dy/dx for the backward: the same mask)
    i = cuda.grid(1)
    if i < x.shape[0]:
        key = _hash32(uint64(step) ^ _hash32(uint64(seed)))
        h = _hash32(uint64(i) ^ key)
        if (h >> uint64(32 - DROP_BITS)) >= uint64(threshold):
            y[i] = x[i] * scale
        else:
            y[i] = float32(0.0)


@kernel("void(float32[::1], float32[::1], float32[::1])", block=TPB_1D)
def add_kernel(a, b, y):
    """residual add: one thread per element, y = a + b."""
    # a, b, y: (n,) float32 viewed flat
    i = cuda.grid(1)
    if i < y.shape[0]:
        y[i] = a[i] + b[i]


# --- launchers ---------------------------------------------------------------------------------------


def _flat(a):
    return a.reshape(a.size) if len(a.shape) != 1 else a


def _check_nchw(name, a):
    check_device_array(name, a)
    if len(a.shape) != 4:
        raise ValueError(f"{name}: expected a 4-D array (N, C, H, W), got shape {tuple(a.shape)}")
    return tuple(int(v) for v in a.shape)


def batchnorm_forward(x, weight, bias, y, mean, invstd, running_mean, running_var, eps, momentum, training):
    """Device arrays, no allocation. training: batch statistics into mean/invstd (and the running ones
    updated when ``momentum`` is not None); else mean/invstd from the running statistics."""
    shape = _check_nchw("x", x)
    c = shape[1]
    for name, a in (("weight", weight), ("bias", bias), ("mean", mean), ("invstd", invstd),
                    ("running_mean", running_mean), ("running_var", running_var)):
        check_device_array(name, a, shape=(c,))
    check_device_array("y", y, shape=shape)
    if training:
        update = momentum is not None
        batchnorm_stats_kernel[c, RED_THREADS](x, mean, invstd, running_mean, running_var, np.float32(eps),
                                               np.float32(momentum if update else 0.0), int(update))
    else:
        blocks, threads = grid_1d(c)
        batchnorm_running_kernel[blocks, threads](running_mean, running_var, np.float32(eps), mean, invstd)
    if x.size == 0:
        return y
    blocks, threads = grid_1d(x.size)
    batchnorm_apply_kernel[blocks, threads](_flat(x), mean, invstd, weight, bias, _flat(y), c, shape[2] * shape[3])
    return y


def batchnorm_backward(dy, x, weight, mean, invstd, dx, dweight, dbias, batch_stats):
    """Device arrays, no allocation: dweight, dbias (C,) and dx (when not None) written in full."""
    shape = _check_nchw("x", x)
    c = shape[1]
    check_device_array("dy", dy, shape=shape)
    for name, a in (("weight", weight), ("mean", mean), ("invstd", invstd), ("dweight", dweight), ("dbias", dbias)):
        check_device_array(name, a, shape=(c,))
    batchnorm_reduce_kernel[c, RED_THREADS](dy, x, mean, invstd, dweight, dbias)
    if dx is None or x.size == 0:
        return dx
    check_device_array("dx", dx, shape=shape)
    blocks, threads = grid_1d(x.size)
    batchnorm_dx_kernel[blocks, threads](_flat(dy), _flat(x), mean, invstd, weight, dweight, dbias, _flat(dx), c,
                                         shape[2] * shape[3], int(bool(batch_stats)))
    return dx


def dropout(x, y, p, seed, step):
    """Device arrays, no allocation: y = x * keep / (1 - p) with keep from (seed, step) (see the header)."""
    check_device_array("x", x)
    check_device_array("y", y, shape=tuple(x.shape))
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected a drop probability in [0, 1), got {p!r}")
    if x.size == 0:
        return y
    blocks, threads = grid_1d(x.size)
    dropout_kernel[blocks, threads](_flat(x), _flat(y), np.uint32(seed & MASK32), np.uint32(step & MASK32),
                                    np.uint32(dropout_threshold(p)), np.float32(1.0 / (1.0 - p)))
    return y


def add(a, b, y):
    """Device arrays, no allocation: y = a + b (same shapes)."""
    check_device_array("a", a)
    check_device_array("b", b, shape=tuple(a.shape))
    check_device_array("y", y, shape=tuple(a.shape))
    if y.size == 0:
        return y
    blocks, threads = grid_1d(y.size)
    add_kernel[blocks, threads](_flat(a), _flat(b), _flat(y))
    return y


__all__ = [
    "RED_THREADS", "dropout_threshold", "dropout_keep_reference", "batchnorm_reference", "batchnorm_forward",
    "batchnorm_backward", "dropout", "add",
]
