"""Softmax + cross-entropy, fused, forward and backward, with PyTorch's ``F.cross_entropy`` options.

Logits are viewed as (N, C, S): class dimension in the middle, S = d1·…·dk spatial positions (1 for
(N, C) logits), so a "row" is one (n, s) position and its C logits lie S apart. Per row r = n·S + s
with target y (``ignore_index``: the row counts for nothing), class weights w (1 when none),
W = Σ_c w_c, smoothing ε:

    m       = max_c z_c,  s = Σ_c exp(z_c − m),  lse = m + log s
    p_c     = exp(z_c − m) / s                                       written to probs
    nll     = w_y · (lse − z_y)                                      = −w_y log p_y, without rounding p
    smooth  = W · lse − Σ_c w_c z_c                                  = −Σ_c w_c log p_c
    loss_r  = (1 − ε) · nll + (ε / C) · smooth                       0 for an ignored row

then Σ_r loss_r / divisor by a single-block reduction (no atomics, a deterministic sum); the caller
passes the divisor (PyTorch's weighted mean: Σ_r w_{y_r} over the rows not ignored; 1 for "sum").
Subtracting the row max keeps exp() in range: logits of 1e4 give a finite loss.

Backward, one thread per element: dz_c = scale_r · [(1 − ε) · w_y · (p_c − [c = y]) + (ε / C) · (W p_c − w_c)],
0 on ignored rows; scale_r = 1 / divisor (mean), 1 (sum), or the incoming gradient of row r ("none").

Versions:

    fused   one block per row: max, then Σexp, by shared-memory tree reductions; the row is read three
            times from global memory
    warp    one warp per row: a single pass keeps each lane's running max and rescaled Σexp (online
            softmax) and Σ w·z, combined across the warp by shuffles (shfl_xor_sync: no shared memory, no
            barriers); a second pass writes p. Four rows per 128-thread block.

Under the simulator, which has no warp shuffles, :mod:`._common` adds them (every thread of the block
must reach each shuffle, as in these kernels). Run the checks: ``python -m pytest tests/test_softmax.py``
(simulator); static figures: ``gpu-cnn kernels --only softmax``; timings:
``python -m benchmarks.kernels --only softmax_xent``.
"""
import math

import numpy as np
from numba import cuda, float32
from numba.core import config

from ._common import TPB_1D, block_max, block_sum, check_device_array, grid_1d, kernel

VERSIONS = ("fused", "warp")
DEFAULT_VERSION = "warp"

# Threads per block of the fused row kernel and of the batch-mean kernel. A power of two (tree reduction).
# Under the simulator every thread of a block is a Python thread and every barrier a rendezvous of all
# of them, so it runs with 8 threads (same code; rows shorter and longer than a block exist in the
# tests, so the strided loops and the tree are exercised either way).
SM_TPB = 8 if config.ENABLE_CUDASIM else 128
assert SM_TPB & (SM_TPB - 1) == 0
# warp: 32 lanes per row, WARP_ROWS rows per block (one warp each; one under the simulator).
WARP = 32
WARP_ROWS = 1 if config.ENABLE_CUDASIM else 4
WARP_TPB = WARP * WARP_ROWS
FULL_MASK = 0xFFFFFFFF

NEG_INF = np.float32(-np.inf)
NAN = np.float32(np.nan)


# --- reference ---------------------------------------------------------------------------------------


def softmax_cross_entropy_reference(logits, labels, weight=None, ignore_index=-100, label_smoothing=0.0,
                                    reduction="mean"):
    """float64 (loss, probs, per-row losses) as PyTorch's F.cross_entropy defines them; logits (N, C)
    or (N, C, d1, …), labels (N,) or (N, d1, …). loss is a float for mean/sum, the per-row array for none."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels).astype(np.int64)
    C = z.shape[1]
    zc = np.moveaxis(z, 1, -1).reshape(-1, C)  # rows (n, d…) x classes
    yr = y.reshape(-1)
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    m = zc.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(zc - m).sum(axis=1, keepdims=True)))[:, 0]
    logp = zc - lse[:, None]
    valid = yr != ignore_index
    ys = np.where(valid, yr, 0)
    a = np.where(valid, w[ys], 0.0)
    nll = -a * logp[np.arange(len(yr)), ys]
    smooth = np.where(valid, -(logp * w).sum(axis=1), 0.0)
    eps = float(label_smoothing)
    rows = (1 - eps) * nll + eps / C * smooth
    probs = np.moveaxis(np.exp(logp).reshape(np.moveaxis(z, 1, -1).shape), -1, 1)
    if reduction == "mean":
        loss = float(rows.sum() / a.sum()) if a.sum() != 0 else float("nan")
    elif reduction == "sum":
        loss = float(rows.sum())
    else:
        loss = rows.reshape(y.shape)
    return loss, probs, rows.reshape(y.shape)


def softmax_cross_entropy_backward_reference(probs, labels, weight=None, ignore_index=-100, label_smoothing=0.0,
                                             reduction="mean", grad=None):
    """float64 d(loss)/d(logits) for the reduction; for "none", of Σ grad · loss (grad defaults to ones)."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels).astype(np.int64)
    C = p.shape[1]
    pc = np.moveaxis(p, 1, -1).reshape(-1, C)
    yr = y.reshape(-1)
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    valid = yr != ignore_index
    ys = np.where(valid, yr, 0)
    a = np.where(valid, w[ys], 0.0)
    onehot = np.zeros_like(pc)
    onehot[np.arange(len(yr)), ys] = 1.0
    eps = float(label_smoothing)
    d = (1 - eps) * a[:, None] * (pc - onehot) + eps / C * valid[:, None] * (w.sum() * pc - w[None, :])
    if reduction == "mean":
        d = d / a.sum()
    elif reduction == "none" and grad is not None:
        d = d * np.asarray(grad, np.float64).reshape(-1)[:, None]
    return np.moveaxis(d.reshape(np.moveaxis(p, 1, -1).shape), -1, 1)


# --- kernels -----------------------------------------------------------------------------------------

# (logits, labels, weight, has_weight, weight_sum, ignore_index, eps, probs, row_loss)
FORWARD_SIGNATURE = ("void(float32[:, :, ::1], int32[::1], float32[::1], int64, float32, int64, float32, "
                     "float32[:, :, ::1], float32[::1])")


@kernel(FORWARD_SIGNATURE, block=SM_TPB)
def softmax_xent_forward_kernel(logits, labels, weight, has_weight, weight_sum, ignore_index, eps, probs, row_loss):
    """fused: one block per row; max and Σexp by shared-memory reductions, then p and the row's loss in one pass."""
    # logits, probs: (N, C, S) float32; labels, row_loss: (N*S,) ; weight: (C,) float32 (unread unless has_weight)
    buf = cuda.shared.array(SM_TPB, float32)
    tid = cuda.threadIdx.x
    row = cuda.blockIdx.x
    C = logits.shape[1]
    S = logits.shape[2]
    R = logits.shape[0] * S
    valid = row < R  # the grid is exactly R blocks; the barriers below stay outside any branch
    n = row // S
    sp = row - n * S

    # 1. row max: each thread strides over the row, then a tree reduction in shared memory
    mx = NEG_INF
    if valid:
        for j in range(tid, C, SM_TPB):
            mx = max(mx, logits[n, j, sp])
    buf[tid] = mx
    block_max(buf, tid)
    mx = buf[0]
    cuda.syncthreads()  # everyone has read buf[0] before buf is reused

    # 2. s = Σ exp(z − max): every term is <= 1, one term equals 1, so s is in [1, C]
    acc = float32(0.0)
    wz = float32(0.0)  # Σ w_c z_c, for the smoothing term
    if valid:
        for j in range(tid, C, SM_TPB):
            zj = logits[n, j, sp]
            acc += math.exp(zj - mx)
            wz += (weight[j] if has_weight else float32(1.0)) * zj
    # the label's logit, read before the barriers of the sums: after them, probs may overwrite the row
    # (probs may be logits itself)
    z_label = NAN  # a bad id (validated on the host) still shows up as NaN, never as a stray read
    w_label = float32(0.0)
    lab = ignore_index
    if valid:
        lab = labels[row]
        if tid == 0 and lab >= 0 and lab < C:
            z_label = logits[n, lab, sp]
            w_label = weight[lab] if has_weight else float32(1.0)
    buf[tid] = acc
    block_sum(buf, tid)
    total = buf[0]
    cuda.syncthreads()
    buf[tid] = wz
    block_sum(buf, tid)
    wz = buf[0]

    # 3. probabilities and the row's loss from the log-sum-exp (never log of a rounded p)
    if valid:
        inv = float32(1.0) / total
        for j in range(tid, C, SM_TPB):
            probs[n, j, sp] = math.exp(logits[n, j, sp] - mx) * inv
        if tid == 0:
            if lab == ignore_index:
                row_loss[row] = float32(0.0)
            else:
                lse = mx + math.log(total)
                nll = w_label * (lse - z_label)
                smooth = weight_sum * lse - wz
                row_loss[row] = (float32(1.0) - eps) * nll + eps / float32(C) * smooth


@kernel(FORWARD_SIGNATURE, block=WARP_TPB)
def softmax_xent_forward_warp_kernel(logits, labels, weight, has_weight, weight_sum, ignore_index, eps, probs, row_loss):
    """warp: one warp per row; one pass of online max/Σexp/Σwz per lane, combined by warp shuffles; no shared memory, no barriers."""
    # logits, probs: (N, C, S) float32; labels, row_loss: (N*S,); weight: (C,) float32
    lane = cuda.threadIdx.x % WARP
    row = cuda.blockIdx.x * WARP_ROWS + cuda.threadIdx.x // WARP
    C = logits.shape[1]
    S = logits.shape[2]
    R = logits.shape[0] * S
    valid = row < R  # every lane still takes part in every shuffle below
    n = row // S
    sp = row - n * S

    # 1. one pass: running max m and Σ exp(z − m) rescaled whenever m grows (online softmax), and Σ w z
    m = NEG_INF
    s = float32(0.0)
    wz = float32(0.0)
    if valid:
        for j in range(lane, C, WARP):
            zj = logits[n, j, sp]
            if zj > m:
                s = s * math.exp(m - zj) + float32(1.0)
                m = zj
            else:
                s += math.exp(zj - m)
            wz += (weight[j] if has_weight else float32(1.0)) * zj
    # the label's logit, read before the shuffles: each shuffle is a meeting point of the warp's lanes,
    # so every read here comes before any lane writes p below (probs may be logits itself)
    lab = ignore_index
    z_label = NAN
    w_label = float32(0.0)
    if valid:
        lab = labels[row]
        if lab >= 0 and lab < C:
            z_label = logits[n, lab, sp]
            w_label = weight[lab] if has_weight else float32(1.0)
    # 2. butterfly across the 32 lanes: afterwards every lane holds the row's m, s and Σ w z
    off = WARP // 2
    while off > 0:
        m_o = cuda.shfl_xor_sync(FULL_MASK, m, off)
        s_o = cuda.shfl_xor_sync(FULL_MASK, s, off)
        wz += cuda.shfl_xor_sync(FULL_MASK, wz, off)
        mn = max(m, m_o)
        if mn > NEG_INF:  # both -inf: a lane with no element (C < 32) keeps s = 0
            s = s * math.exp(m - mn) + s_o * math.exp(m_o - mn)
        m = mn
        off //= 2

    # 3. p and the row's loss
    if valid:
        inv = float32(1.0) / s
        for j in range(lane, C, WARP):
            probs[n, j, sp] = math.exp(logits[n, j, sp] - m) * inv
        if lane == 0:
            if lab == ignore_index:
                row_loss[row] = float32(0.0)
            else:
                lse = m + math.log(s)
                nll = w_label * (lse - z_label)
                smooth = weight_sum * lse - wz
                row_loss[row] = (float32(1.0) - eps) * nll + eps / float32(C) * smooth


@kernel("void(float32[::1], float32[::1], float32)", block=SM_TPB)
def batch_mean_kernel(row_loss, loss, divisor):
    """loss[0] = Σ row_loss / divisor by one block: strided partial sums, then a shared-memory tree (no atomics)."""
    # row_loss: (R,) float32; loss: (1,) float32
    buf = cuda.shared.array(SM_TPB, float32)
    tid = cuda.threadIdx.x
    N = row_loss.shape[0]
    acc = float32(0.0)
    for i in range(tid, N, SM_TPB):
        acc += row_loss[i]
    buf[tid] = acc
    block_sum(buf, tid)
    if tid == 0:
        loss[0] = buf[0] / divisor


@kernel("void(float32[:, :, ::1], int32[::1], float32[::1], int64, float32, int64, float32, float32, "
        "float32[::1], int64, float32[:, :, ::1])", block=TPB_1D)
def softmax_xent_backward_kernel(probs, labels, weight, has_weight, weight_sum, ignore_index, eps, scale,
                                 row_grad, has_row_grad, dlogits):
    """dz = scale_r · [(1 − ε) w_y (p − onehot) + (ε / C)(W p − w)], one thread per element (in place on probs is safe)."""
    # probs, dlogits: (N, C, S) float32; labels, row_grad: (N*S,); weight: (C,)
    i = cuda.grid(1)
    C = probs.shape[1]
    S = probs.shape[2]
    total = probs.shape[0] * C * S
    if i < total:
        sp = i % S  # consecutive threads: consecutive s, then consecutive c (the array's own order)
        t = i // S
        c = t % C
        n = t // C
        row = n * S + sp
        lab = labels[row]
        d = float32(0.0)
        if lab != ignore_index:
            p = probs[n, c, sp]
            w_lab = weight[lab] if has_weight else float32(1.0)
            w_c = weight[c] if has_weight else float32(1.0)
            hit = float32(1.0) if lab == c else float32(0.0)
            d = (float32(1.0) - eps) * w_lab * (p - hit) + eps / float32(C) * (weight_sum * p - w_c)
            d *= row_grad[row] if has_row_grad else scale
        dlogits[n, c, sp] = d


# --- launchers ---------------------------------------------------------------------------------------


def _as3(name, a):
    """(N, C) or (N, C, S) device array -> the (N, C, S) view the kernels take."""
    check_device_array(name, a)
    if len(a.shape) == 2:
        a = a.reshape(a.shape[0], a.shape[1], 1)
    if len(a.shape) != 3:
        raise ValueError(f"{name}: expected a 2-D (N, num_classes) or 3-D (N, num_classes, S) array, "
                         f"got shape {tuple(a.shape)}")
    if a.shape[0] < 1 or a.shape[1] < 1 or a.shape[2] < 1:
        raise ValueError(f"{name}: expected at least one row and one class, got shape {tuple(a.shape)}")
    return a


def _weight_args(weight, c, like):
    if weight is None:
        return like.reshape(like.size)[:1], 0, np.float32(c)  # a view the kernels never read
    check_device_array("weight", weight, shape=(c,))
    return weight, 1, None


def _launch_forward(kern, blocks, threads, logits, labels, probs, row_loss, loss, weight, weight_sum,
                    ignore_index, label_smoothing, divisor):
    z = _as3("logits", logits)
    n, c, sp = z.shape
    rows = n * sp
    check_device_array("labels", labels, shape=(rows,), dtype=np.int32)
    p = _as3("probs", probs)
    if tuple(p.shape) != tuple(z.shape):
        raise ValueError(f"probs: expected shape {tuple(probs.shape[:1]) + tuple(z.shape[1:])}, got {tuple(probs.shape)}")
    check_device_array("row_loss", row_loss, shape=(rows,))
    check_device_array("loss", loss, shape=(1,))
    w, has_w, w_sum = _weight_args(weight, c, p)
    if has_w:
        if weight_sum is None:
            raise ValueError("weight_sum: give Σ weight (the host knows it) when weight is given")
        w_sum = np.float32(weight_sum)
    kern[blocks(rows), threads](z, labels, w, has_w, w_sum, int(ignore_index), np.float32(label_smoothing), p, row_loss)
    batch_mean_kernel[1, SM_TPB](row_loss, loss, np.float32(rows if divisor is None else divisor))
    return probs, loss


def softmax_xent_forward_fused(logits, labels, probs, row_loss, loss, weight=None, weight_sum=None,
                               ignore_index=-100, label_smoothing=0.0, divisor=None):
    """fused: probs = softmax(logits); row_loss as in the module docstring; loss[0] = Σ row_loss / divisor
    (None: the number of rows). logits/probs (N, C) or (N, C, S); labels, row_loss (N·S,)."""
    return _launch_forward(softmax_xent_forward_kernel, lambda r: r, SM_TPB, logits, labels, probs, row_loss,
                           loss, weight, weight_sum, ignore_index, label_smoothing, divisor)


def softmax_xent_forward_warp(logits, labels, probs, row_loss, loss, weight=None, weight_sum=None,
                              ignore_index=-100, label_smoothing=0.0, divisor=None):
    """warp: as fused, one warp per row, WARP_ROWS rows a block."""
    return _launch_forward(softmax_xent_forward_warp_kernel, lambda r: (r + WARP_ROWS - 1) // WARP_ROWS, WARP_TPB,
                           logits, labels, probs, row_loss, loss, weight, weight_sum, ignore_index,
                           label_smoothing, divisor)


def softmax_xent_backward(probs, labels, dlogits, weight=None, weight_sum=None, ignore_index=-100,
                          label_smoothing=0.0, scale=None, row_grad=None):
    """dlogits as in the module docstring; scale None: 1 / rows (the plain mean); row_grad (N·S,): per-row
    incoming gradients instead (reduction "none"). dlogits may be probs itself."""
    p = _as3("probs", probs)
    n, c, sp = p.shape
    rows = n * sp
    check_device_array("labels", labels, shape=(rows,), dtype=np.int32)
    d = _as3("dlogits", dlogits)
    if tuple(d.shape) != tuple(p.shape):
        raise ValueError(f"dlogits: expected shape {tuple(probs.shape)}, got {tuple(dlogits.shape)}")
    w, has_w, w_sum = _weight_args(weight, c, p)
    if has_w:
        if weight_sum is None:
            raise ValueError("weight_sum: give Σ weight (the host knows it) when weight is given")
        w_sum = np.float32(weight_sum)
    if row_grad is not None:
        check_device_array("row_grad", row_grad, shape=(rows,))
        rg, has_rg = row_grad, 1
    else:
        rg, has_rg = p.reshape(p.size)[:1], 0
    scale = np.float32(1.0 / rows if scale is None else scale)
    blocks, threads = grid_1d(n * c * sp)
    softmax_xent_backward_kernel[blocks, threads](p, labels, w, has_w, w_sum, int(ignore_index),
                                                  np.float32(label_smoothing), scale, rg, has_rg, d)
    return dlogits


_FORWARD = {"fused": softmax_xent_forward_fused, "warp": softmax_xent_forward_warp}


# --- dispatcher --------------------------------------------------------------------------------------


def softmax_cross_entropy_forward(logits, labels, probs, row_loss, loss, version=None, **options):
    """Device arrays in and out, no allocation: probs, row_loss (N·S,), loss (1,) are written.
    ``options``: weight, weight_sum, ignore_index, label_smoothing, divisor (see the launchers)."""
    version = DEFAULT_VERSION if version is None else version
    if version not in _FORWARD:
        raise ValueError(f"version: unknown softmax version {version!r}; expected one of {', '.join(VERSIONS)}")
    return _FORWARD[version](logits, labels, probs, row_loss, loss, **options)


def softmax_cross_entropy_backward(probs, labels, dlogits, **options):
    return softmax_xent_backward(probs, labels, dlogits, **options)


__all__ = [
    "VERSIONS", "DEFAULT_VERSION", "SM_TPB", "WARP_ROWS", "softmax_cross_entropy_forward",
    "softmax_cross_entropy_backward", "softmax_cross_entropy_reference", "softmax_cross_entropy_backward_reference",
]
