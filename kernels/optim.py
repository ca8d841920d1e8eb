"""Optimizer updates: SGD (momentum, dampening, Nesterov, L2 weight decay) and Adam / AdamW.

Element-wise, in place, on flat float32 views of C-contiguous parameter, gradient and state arrays;
the formulas are PyTorch's (``torch.optim.SGD``, ``torch.optim.Adam``, ``torch.optim.AdamW``).

Versions (``VERSIONS``), for every optimizer:

    naive  one thread per element
    ilp    each thread updates ELEMS_PER_THREAD elements, one block width apart (accesses stay
           coalesced): a quarter of the blocks and several independent loads in flight per thread

Adam also has ``adam_counted_kernel``, which reads its step from a device counter instead of taking the
bias corrections as arguments, so that a recorded training step (``gpu_cnn.graph``) can replay it.

Run the checks with ``python -m pytest tests/test_optim.py`` (simulator) and build for real GPUs with
``python -m gpu_cnn.compile_check``.

Scalars derived from the hyperparameters (``1 - dampening``, ``1 - beta``, the bias corrections,
``1 - lr * weight_decay``) are computed on the host in float64 and passed as float32, as PyTorch
computes them in Python doubles before its float kernels see them.
"""
import math
import numbers

import numpy as np
from numba import cuda, float32, float64

from ._common import TPB_1D, ceil_div, check_device_array, device_function, kernel

VERSIONS = ("naive", "ilp")
DEFAULT_VERSION = "naive"  # element-wise and memory bound: the simplest is expected to be as fast (not yet measured)

# Elements per thread of the ilp versions.
ELEMS_PER_THREAD = 4
# Smallest block: one warp (tiny parameters such as biases do not need 256 threads).
WARP = 32


# --- reference ---


def sgd_reference(p, g, buf, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=True):
    """One torch.optim.SGD step in float64. Returns (new p, new momentum buffer or None when momentum == 0).

    g' = g + wd·p;  buf = g' on the first step, else momentum·buf + (1 − dampening)·g';
    d = g' + momentum·buf if nesterov else buf (g' without momentum);  p − lr·d.
    """
    p = np.asarray(p, np.float64)
    d = np.asarray(g, np.float64) + weight_decay * p
    new_buf = None
    if momentum != 0:
        new_buf = d.copy() if first_step else momentum * np.asarray(buf, np.float64) + (1.0 - dampening) * d
        d = d + momentum * new_buf if nesterov else new_buf
    return p - lr * d, new_buf


def adam_reference(p, g, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False):
    """One torch.optim.Adam (decoupled=False, L2 decay added to g) or AdamW (decoupled=True,
    p·(1 − lr·wd)) step in float64, `step` counting from 1. Returns (new p, new m, new v).
    """
    p = np.asarray(p, np.float64)
    g = np.asarray(g, np.float64)
    if decoupled:
        p = p * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = beta1 * np.asarray(m, np.float64) + (1.0 - beta1) * g
    v = beta2 * np.asarray(v, np.float64) + (1.0 - beta2) * g * g
    m_hat = m / (1.0 - beta1**step)
    v_hat = v / (1.0 - beta2**step)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


# --- kernels ---
# Each update is one device function on element i; the naive and ilp kernels differ only in which
# elements a thread visits (inlined: the kernels build to the same code as if written out).

_SGD_ARGS = "float32[::1], float32[::1], int64, float32, float32"
_SGD_MOMENTUM_ARGS = "float32[::1], float32[::1], float32[::1], int64, float32, float32, float32, float32, int64, int64"
_ADAM_ARGS = ("float32[::1], float32[::1], float32[::1], float32[::1], int64, float32, float32, float32, float32, "
              "float32, float32, float32, float32, float32")


@device_function(f"void({_SGD_ARGS})")
def sgd_element(p, g, i, lr, weight_decay):
    """Plain SGD (no momentum, no state) on element i."""
    d = g[i]
    if weight_decay != float32(0.0):
        d += weight_decay * p[i]
    p[i] -= lr * d


@device_function(f"void({_SGD_MOMENTUM_ARGS})")
def sgd_momentum_element(p, g, buf, i, lr, momentum, one_minus_dampening, weight_decay, nesterov, first_step):
    """SGD with a momentum buffer (dampening, Nesterov, L2 decay) on element i.

    nesterov, first_step: 0 or 1 (uniform across the grid, no divergence).
    """
    pi = p[i]
    d = g[i]
    if weight_decay != float32(0.0):
        d += weight_decay * pi
    if first_step != 0:
        b = d  # PyTorch starts the buffer at the gradient itself, not at zero
    else:
        b = momentum * buf[i] + one_minus_dampening * d
    buf[i] = b
    if nesterov != 0:
        d += momentum * b
    else:
        d = b
    p[i] = pi - lr * d


@device_function(f"void({_ADAM_ARGS})")
def adam_element(p, g, m, v, i, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bias_correction2_sqrt,
                 eps, weight_decay, decay):
    """Adam / AdamW on element i.

    step_size = lr / (1 − beta1^t); weight_decay: L2 term added to g (Adam; 0 for AdamW);
    decay: p multiplier 1 − lr·wd (AdamW; 1 for Adam).
    """
    pi = p[i]
    gi = g[i]
    if weight_decay != float32(0.0):
        gi += weight_decay * pi
    if decay != float32(1.0):
        pi *= decay
    mi = beta1 * m[i] + one_minus_beta1 * gi
    vi = beta2 * v[i] + one_minus_beta2 * gi * gi
    m[i] = mi
    v[i] = vi
    # m̂ / (sqrt(v̂) + eps) with the corrections folded into step_size and the denominator, as PyTorch
    denom = math.sqrt(vi) / bias_correction2_sqrt + eps
    p[i] = pi - step_size * (mi / denom)


@kernel("void(float32[::1], float32[::1], float32, float32)", block=TPB_1D)
def sgd_naive_kernel(p, g, lr, weight_decay):
    """Plain SGD, one thread per element."""
    # p, g: (n,) float32
    i = cuda.grid(1)
    if i < p.shape[0]:
        sgd_element(p, g, i, lr, weight_decay)


@kernel("void(float32[::1], float32[::1], float32, float32)", block=TPB_1D)
def sgd_ilp_kernel(p, g, lr, weight_decay):
    """Plain SGD, ELEMS_PER_THREAD elements per thread, one block width apart (coalesced)."""
    # p, g: (n,) float32
    base = cuda.blockIdx.x * cuda.blockDim.x * ELEMS_PER_THREAD + cuda.threadIdx.x
    for k in range(ELEMS_PER_THREAD):
        i = base + k * cuda.blockDim.x
        if i < p.shape[0]:
            sgd_element(p, g, i, lr, weight_decay)


@kernel("void(float32[::1], float32[::1], float32[::1], float32, float32, float32, float32, int64, int64)",
        block=TPB_1D)
def sgd_momentum_naive_kernel(p, g, buf, lr, momentum, one_minus_dampening, weight_decay, nesterov, first_step):
    """SGD with momentum, one thread per element."""
    # p, g, buf: (n,) float32; nesterov, first_step: 0 or 1
    i = cuda.grid(1)
    if i < p.shape[0]:
        sgd_momentum_element(p, g, buf, i, lr, momentum, one_minus_dampening, weight_decay, nesterov, first_step)


@kernel("void(float32[::1], float32[::1], float32[::1], float32, float32, float32, float32, int64, int64)",
        block=TPB_1D)
def sgd_momentum_ilp_kernel(p, g, buf, lr, momentum, one_minus_dampening, weight_decay, nesterov, first_step):
    """SGD with momentum, ELEMS_PER_THREAD elements per thread, one block width apart (coalesced)."""
    # p, g, buf: (n,) float32; nesterov, first_step: 0 or 1
    base = cuda.blockIdx.x * cuda.blockDim.x * ELEMS_PER_THREAD + cuda.threadIdx.x
    for k in range(ELEMS_PER_THREAD):
        i = base + k * cuda.blockDim.x
        if i < p.shape[0]:
            sgd_momentum_element(p, g, buf, i, lr, momentum, one_minus_dampening, weight_decay, nesterov, first_step)


@kernel(
    "void(float32[::1], float32[::1], float32[::1], float32[::1], float32, float32, float32, float32, "
    "float32, float32, float32, float32, float32)",
    block=TPB_1D,
)
def adam_naive_kernel(p, g, m, v, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bias_correction2_sqrt,
                      eps, weight_decay, decay):
    """Adam / AdamW, one thread per element."""
    # p, g, m, v: (n,) float32
    i = cuda.grid(1)
    if i < p.shape[0]:
        adam_element(p, g, m, v, i, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
                     bias_correction2_sqrt, eps, weight_decay, decay)


@kernel(
    "void(float32[::1], float32[::1], float32[::1], float32[::1], float32, float32, float32, float32, "
    "float32, float32, float32, float32, float32)",
    block=TPB_1D,
)
def adam_ilp_kernel(p, g, m, v, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bias_correction2_sqrt,
                    eps, weight_decay, decay):
    """Adam / AdamW, ELEMS_PER_THREAD elements per thread, one block width apart (coalesced)."""
    # p, g, m, v: (n,) float32
    base = cuda.blockIdx.x * cuda.blockDim.x * ELEMS_PER_THREAD + cuda.threadIdx.x
    for k in range(ELEMS_PER_THREAD):
        i = base + k * cuda.blockDim.x
        if i < p.shape[0]:
            adam_element(p, g, m, v, i, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
                         bias_correction2_sqrt, eps, weight_decay, decay)


@kernel(
    "void(float32[::1], float32[::1], float32[::1], float32[::1], int64[::1], float64, float64, float64, "
    "float32, float64, int64)",
    block=TPB_1D,
)
def adam_counted_kernel(p, g, m, v, count, lr, beta1, beta2, eps, weight_decay, decoupled):
    """Adam / AdamW, one thread per element, with the step read from the device: graph-replayable.

    count[0] counts blocks launched so far: each block's thread 0 takes a ticket with one atomic add, and
    its step is ticket // gridDim.x + 1 (every block of the previous launch has taken its ticket), so no
    launch argument changes from step to step. Thread 0 computes the bias corrections in float64, as
    the host does for the other versions, and shares them.
    """
    # p, g, m, v: (n,) float32; count: (1,) int64
    s = cuda.shared.array(4, float32)
    if cuda.threadIdx.x == 0:
        ticket = cuda.atomic.add(count, 0, 1)
        t = float64(ticket // cuda.gridDim.x + 1)
        step_size = lr / (float64(1.0) - beta1**t)
        s[0] = float32(step_size)
        s[1] = float32(math.sqrt(float64(1.0) - beta2**t))
        if decoupled != 0:
            s[2] = float32(0.0)
            s[3] = float32(float64(1.0) - lr * weight_decay)
        else:
            s[2] = float32(weight_decay)
            s[3] = float32(1.0)
    cuda.syncthreads()
    i = cuda.grid(1)
    if i < p.shape[0]:
        adam_element(p, g, m, v, i, float32(beta1), float32(beta2), float32(float64(1.0) - beta1),
                     float32(float64(1.0) - beta2), s[0], s[1], eps, s[2], s[3])


# --- launchers ---


def launch_config(n, elems_per_thread=1):
    """(blocks, threads) for n elements, elems_per_thread each: TPB_1D threads, fewer (whole warps)
    for small arrays, at least one block."""
    threads = min(TPB_1D, max(WARP, ceil_div(ceil_div(n, elems_per_thread), WARP) * WARP))
    return max(1, ceil_div(n, threads * elems_per_thread)), threads


def _flat(name, a, like=None):
    """Validate a device array (float32, C-contiguous, same shape as `like`) and view it flat (no copy)."""
    check_device_array(name, a, shape=None if like is None else like.shape)
    return a if a.ndim == 1 else a.reshape(a.size)


def _scalar(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    return float(value)


def _sgd_launch(kernels, elems, p, g, buf, lr, momentum, dampening, nesterov, weight_decay, first_step):
    lr = _scalar("lr", lr)
    momentum = _scalar("momentum", momentum)
    dampening = _scalar("dampening", dampening)
    weight_decay = _scalar("weight_decay", weight_decay)
    pf = _flat("p", p)
    gf = _flat("g", g, like=p)
    blocks, threads = launch_config(pf.shape[0], elems)
    if momentum == 0.0:
        if nesterov:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0")
        kernels[0][blocks, threads](pf, gf, np.float32(lr), np.float32(weight_decay))
        return p
    if buf is None:
        raise ValueError("buf: SGD with momentum needs a momentum buffer (a device array shaped like p)")
    bf = _flat("buf", buf, like=p)
    kernels[1][blocks, threads](
        pf, gf, bf, np.float32(lr), np.float32(momentum), np.float32(1.0 - dampening), np.float32(weight_decay),
        int(bool(nesterov)), int(bool(first_step)),
    )
    return p


def sgd_naive(p, g, buf, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=True):
    """Launch the naive SGD kernels (plain when momentum == 0, else with the buffer `buf`)."""
    return _sgd_launch((sgd_naive_kernel, sgd_momentum_naive_kernel), 1,
                       p, g, buf, lr, momentum, dampening, nesterov, weight_decay, first_step)


def sgd_ilp(p, g, buf, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=True):
    """Launch the ilp SGD kernels (ELEMS_PER_THREAD elements per thread)."""
    return _sgd_launch((sgd_ilp_kernel, sgd_momentum_ilp_kernel), ELEMS_PER_THREAD,
                       p, g, buf, lr, momentum, dampening, nesterov, weight_decay, first_step)


def adam_scalars(step, lr, beta1, beta2, weight_decay, decoupled):
    """Host float64 scalars for the Adam kernels: (step_size, bias_correction2_sqrt, l2, decay)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step: expected an int >= 1 (the step being taken, counting from 1), got {step!r}")
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    step_size = lr / bias_correction1
    l2, decay = (0.0, 1.0 - lr * weight_decay) if decoupled else (weight_decay, 1.0)
    return step_size, math.sqrt(bias_correction2), l2, decay


def _adam_args(p, g, m, v, lr, beta1, beta2, eps, weight_decay):
    """The Adam launchers' checks: flat views of p, g, m, v (one shape) and the scalars as floats."""
    scalars = [_scalar(name, value) for name, value in
               (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay))]
    flats = [_flat("p", p)] + [_flat(name, a, like=p) for name, a in (("g", g), ("m", m), ("v", v))]
    return flats, scalars


def _adam_launch(kern, elems, p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    (pf, gf, mf, vf), (lr, beta1, beta2, eps, weight_decay) = _adam_args(p, g, m, v, lr, beta1, beta2, eps,
                                                                         weight_decay)
    step_size, bc2_sqrt, l2, decay = adam_scalars(step, lr, beta1, beta2, weight_decay, decoupled)
    blocks, threads = launch_config(pf.shape[0], elems)
    kern[blocks, threads](
        pf, gf, mf, vf, np.float32(beta1), np.float32(beta2), np.float32(1.0 - beta1), np.float32(1.0 - beta2),
        np.float32(step_size), np.float32(bc2_sqrt), np.float32(eps), np.float32(l2), np.float32(decay),
    )
    return p


def adam_naive(p, g, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False):
    """Launch the naive Adam/AdamW kernel; `step` is the step being taken, counting from 1."""
    return _adam_launch(adam_naive_kernel, 1, p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled)


def adam_ilp(p, g, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False):
    """Launch the ilp Adam/AdamW kernel (ELEMS_PER_THREAD elements per thread)."""
    return _adam_launch(adam_ilp_kernel, ELEMS_PER_THREAD,
                        p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled)


def adam_counted(p, g, m, v, count, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False):
    """Launch the Adam/AdamW kernel that takes its step from ``count`` (a (1,) int64 device array, updated).

    ``count`` must hold (steps taken) × the launch's blocks (:func:`adam_counted_blocks`): 0 before the
    first step; :func:`adam_counted_set` writes it for a restored step count."""
    (pf, gf, mf, vf), (lr, beta1, beta2, eps, weight_decay) = _adam_args(p, g, m, v, lr, beta1, beta2, eps,
                                                                         weight_decay)
    check_device_array("count", count, shape=(1,), dtype=np.int64)
    blocks, threads = launch_config(pf.shape[0])
    adam_counted_kernel[blocks, threads](pf, gf, mf, vf, count, lr, beta1, beta2, np.float32(eps),
                                         weight_decay, int(bool(decoupled)))
    return p


def adam_counted_blocks(n):
    """Blocks of :func:`adam_counted`'s launch for n elements (what one step adds to its count)."""
    return launch_config(n)[0]


def adam_counted_set(count, n, steps):
    """Write ``count`` so that the next :func:`adam_counted` on n elements takes step ``steps + 1``."""
    count.copy_to_device(np.array([steps * adam_counted_blocks(n)], np.int64))


# --- dispatcher ---

_SGD = {"naive": sgd_naive, "ilp": sgd_ilp}
_ADAM = {"naive": adam_naive, "ilp": adam_ilp}


def resolve_version(version):
    """The version name to run (None: the default); ValueError listing VERSIONS for an unknown one."""
    version = DEFAULT_VERSION if version is None else version
    if version not in VERSIONS:
        raise ValueError(f"version: expected one of {', '.join(VERSIONS)}, got {version!r}")
    return version


def sgd_step(p, g, buf, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=True,
             version=None):
    """One in-place SGD step on device arrays p (updated), g (read) and buf (updated; None without momentum).

    first_step: True on the optimizer's first step (the buffer is then set to the gradient).
    """
    return _SGD[resolve_version(version)](p, g, buf, lr, momentum, dampening, nesterov, weight_decay, first_step)


def adam_step(p, g, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False,
              version=None):
    """One in-place Adam (decoupled=False) or AdamW (decoupled=True) step on device arrays p, m, v (updated)
    and g (read); `step` is the step being taken, counting from 1 (for the bias corrections)."""
    return _ADAM[resolve_version(version)](p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled)
