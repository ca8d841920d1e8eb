"""2-D convolution (cross-correlation, as in PyTorch), NCHW, weight (C_out, C_in, kH, kW), and its gradients.

    y[n, o, ho, wo] = b[o] + Σ_{c, i, j} x[n, c, ho*sh - ph + i, wo*sw - pw + j] * w[o, c, i, j]
    Ho = (H + 2*ph - kH) // sh + 1,  Wo = (W + 2*pw - kW) // sw + 1   (zero padding, stride per axis)

cpu: im2col + one BLAS GEMM per gradient and slice of the batch, no Python loop over elements (the
other loops run over channels or filter taps). The batch goes in slices whose largest buffer stays near
_CHUNK_BYTES (4 MiB; see ``_chunk``): whole batches of 512 outgrew the caches. Within a slice everything
runs "batch-last": x is copied once into a zero-bordered (C, H + 2ph, W + 2pw, N) buffer,
``sliding_window_view`` gives every window as a view, and ONE copy lays the windows out as the
(C*kH*kW, Ho*Wo*N) matrix "cols" (the copy moves runs of Wo*N contiguous floats; with NCHW buffers the
runs are Wo floats, 10 in LeNet's second conv, and the per-run overhead dominated):

    forward   y  = w (O, C*kH*kW) · cols        -> (O, Ho, Wo, N), copied to NCHW with the bias added
    dW        dw = (cols · dyᵀ)ᵀ, dy as (O, Ho*Wo*N)   (cols rebuilt from x: the op keeps no state;
              BLAS runs the long reduction faster this way round; the slices' dw are summed)
    db        db = Σ over (Ho, Wo, N) of dy  (summed over the slices)
    dX        col2im: dcols = wᵀ · dy (same shape as cols), then the kH*kW taps are added into a
              (C, Hp, Wp, N) buffer (a loop over the TAPS, each a vectorized add of Wo*N-long runs),
              cropped to the unpadded input and copied to NCHW.

Why col2im for dX rather than the "full" correlation of the stride-dilated, (k-1)-padded dy with the
flipped weights (im2col + GEMM once more): that cols matrix is (O*kH*kW, N*H*W), larger than the
forward's by O/C * H*W/(Ho*Wo) (LeNet-5's second conv: 40 MB instead of 7.7 MB), and on that layer at
batch 128 it measured ~23 ms against ~2.5-3 ms for col2im.

The NCHW <-> batch-last copies go one channel at a time (a whole-array transposed copy strides N
floats through one side for every element; per channel the working set stays in cache: ~1.0 ms
instead of ~1.5 ms for LeNet's first conv output).

LeNet-5 at batch 128 on a 2-core AMD EPYC VM (OpenBLAS, 2 threads, machine shared with other jobs;
best / median of 50 calls; measured before the slicing, which leaves batch 128 about as it was):
conv 1x28x28 -> 6, 5x5, pad 2: forward ~3.6 / 4.0 ms, backward without dX (first layer) ~3.4 / 3.9 ms;
conv 6x14x14 -> 16, 5x5: forward ~1.7 / 1.8 ms, backward with dX ~3.6 / 4.1 ms. Together ~13 ms per
training step for the two conv layers.

Scratch buffers (the batch-last input, cols, the outputs before the NCHW copy) are kept per thread and
per shape in a small LRU cache, so a training loop calling with the same shapes does not re-allocate
(and page-fault) tens of MB per call; results never alias them.

cuda/sim: :mod:`gpu_cnn.kernels.conv2d` (forward ``naive``, ``tiled`` or ``implicit_gemm``; backward
``implicit_gemm`` -- dX transposed GEMM, split-K dW with db, deterministic -- or ``direct``: dX gather,
dW and db block reductions; no atomics; the fused conv + ReLU + 2x2 max-pool).

Host float64 input is computed in float32.
"""
import collections
import numbers
import threading

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .. import backend as _backend
from ._base import as_input, check_alloc, check_no_overlap, check_out, check_version, empty, pair, result

_X_LAYOUT = "(N, C_in, H, W)"
_W_LAYOUT = "(C_out, C_in, kH, kW)"
_DY_LAYOUT = "(N, C_out, H_out, W_out)"

# = gpu_cnn.kernels.conv2d.VERSIONS; not imported from there on cpu, because importing numba.cuda fixes
# the simulator choice for the process (tests check the two agree).
VERSIONS = ("naive", "tiled", "implicit_gemm")
BACKWARD_VERSIONS = ("direct", "implicit_gemm")  # = gpu_cnn.kernels.conv2d.BACKWARD_VERSIONS


# ---------------------------------------------------------------------------------------------------
# argument checks


def _check_version(version):
    check_version(version, VERSIONS, "conv2d")


def _check_dims(name, a, batch=False):
    """Every dimension >= 1; with ``batch``, the first (N) may be 0: an empty batch gives an empty
    output and zero weight gradients, as in every op that takes a batch (softmax cross-entropy excepted)."""
    dims = tuple(a.shape[1:]) if batch else tuple(a.shape)
    if min(dims) < 1:
        what = "every dimension but the batch" if batch else "every dimension"
        raise ValueError(f"{name}: expected {what} >= 1, got shape {tuple(a.shape)}")


def _geometry(x_shape, w_shape, s, p):
    """(N, O, Ho, Wo) for x and w that fit together, else a clear error."""
    n, c, h, wd = x_shape
    o, cw, kh, kw = w_shape
    if cw != c:
        raise ValueError(
            f"w: expected C_in = {c} input channels (x is {tuple(x_shape)}), got w of shape {tuple(w_shape)}")
    if h + 2 * p[0] < kh or wd + 2 * p[1] < kw:
        raise ValueError(
            f"w: filter {(kh, kw)} is larger than the padded input {(h + 2 * p[0], wd + 2 * p[1])} "
            f"(input {(h, wd)}, padding {p})")
    return (n, o, (h + 2 * p[0] - kh) // s[0] + 1, (wd + 2 * p[1] - kw) // s[1] + 1)


def _out_entry(out, k, name, shape):
    """Entry k of a backward `out` tuple, validated, or None."""
    a = out[k] if out is not None else None
    return None if a is None else check_out(f"out[{k}] ({name})", a, shape)


# ---------------------------------------------------------------------------------------------------
# cpu

_local = threading.local()
# Scratch kept per thread: the least recently used buffers go first beyond either limit
# (a LeNet-5 training step at batch 512 keeps 24 buffers, ~18 MB: each conv's slices of two sizes).
_SCRATCH_ENTRIES = 64
_SCRATCH_BYTES = 256 * 2**20
_CHUNK_BYTES = 4 * 2**20  # a slice's largest buffer (see _chunk): the best of 2, 4, 8, 16 MiB here
_MIN_SLICE_COLUMNS = 4096  # a slice's Ho*Wo*N at the least (see _chunk): the best of 1024, 2048, 4096 here


def _scratch(tag, shape):
    """A float32 buffer of `shape` reused across calls (per thread); contents are undefined."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = collections.OrderedDict()
    key = (tag, shape)
    buf = cache.get(key)
    if buf is not None:
        cache.move_to_end(key)
        return buf
    check_alloc(f"conv2d scratch ({tag})", shape)
    buf = np.empty(shape, np.float32)
    cache[key] = buf
    while len(cache) > 1 and (len(cache) > _SCRATCH_ENTRIES
                              or sum(a.nbytes for a in cache.values()) > _SCRATCH_BYTES):
        cache.popitem(last=False)
    return buf


def _to_batch_last(src, dst):
    """dst[c, h, w, n] = src[n, c, h, w], one channel at a time (a whole-array transposed copy walks
    memory N floats apart in one of the two arrays for every element; per channel it stays in cache)."""
    for c in range(src.shape[1]):
        np.copyto(dst[c], src[:, c].transpose(1, 2, 0))


def _from_batch_last(src, dst, bias=None):
    """dst[n, c, h, w] = src[c, h, w, n] (+ bias[c]), one channel at a time, the bias added in the same pass."""
    for c in range(dst.shape[1]):
        if bias is None:
            np.copyto(dst[:, c], src[c].transpose(2, 0, 1))
        else:
            np.add(src[c].transpose(2, 0, 1), bias[c], out=dst[:, c])


def _batch_last(x, p):
    """x (N, C, H, W) -> a (C, H + 2ph, W + 2pw, N) scratch copy, zero border: the batch innermost."""
    n, c, h, w = x.shape
    xl = _scratch("x_last", (c, h + 2 * p[0], w + 2 * p[1], n))
    if p != (0, 0):  # only the border is zeroed; the interior is overwritten
        xl[:, : p[0]] = 0
        xl[:, h + p[0]:] = 0
        xl[:, :, : p[1]] = 0
        xl[:, :, w + p[1]:] = 0
    _to_batch_last(x, xl[:, p[0]:p[0] + h, p[1]:p[1] + w])
    return xl


def _cols(x, kh, kw, s, p, out_hw):
    """im2col: a (C*kH*kW, Ho*Wo*N) view of a scratch buffer; row (c, i, j), column (ho, wo, n).

    cols[(c, i, j), (ho, wo, n)] = xpad[n, c, ho*sh + i, wo*sw + j]. With the batch innermost, the copy
    moves runs of Wo*N contiguous floats (stride 1), not Wo.
    """
    n, c = x.shape[:2]
    ho, wo = out_hw
    xl = _batch_last(x, p)
    win = sliding_window_view(xl, (kh, kw), axis=(1, 2))[:, ::s[0], ::s[1]][:, :ho, :wo]  # C Ho Wo N kH kW
    cols = _scratch("cols", (c, kh, kw, ho, wo, n))
    np.copyto(cols, win.transpose(0, 4, 5, 1, 2, 3))
    return cols.reshape(c * kh * kw, ho * wo * n)


def _chunk(x_shape, w_shape, out_hw, p):
    """Images per pass: whole batches make cols and the transposed copies outgrow the caches (LeNet-5's
    first conv ran ~2× slower per image at batch 512 than at 128), so the batch goes in slices whose
    largest buffer (cols, the output before its NCHW copy, or the padded input) stays near _CHUNK_BYTES
    (a LeNet-5 step at batch 512: 65 -> 48 ms on 2 EPYC cores; 128 unchanged). But each slice also pays
    for a whole (C*kH*kW, O) dW product and its sum, and BLAS wants long rows: a slice keeps at least
    _MIN_SLICE_COLUMNS output positions (512 -> 512 channels, 3×3 on 7×7 images, got slices of 4 images
    without it, and its backward ran 2.3× slower than whole batches; with it, as fast)."""
    n, c, h, w = x_shape
    o, _, kh, kw = w_shape
    ho, wo = out_hw
    per_image = 4 * max(c * kh * kw * ho * wo, o * ho * wo, c * (h + 2 * p[0]) * (w + 2 * p[1]))
    nb = max(_CHUNK_BYTES // max(per_image, 1), -(-_MIN_SLICE_COLUMNS // max(ho * wo, 1)))
    return max(1, min(n, nb))


def _cpu_forward(x, w, b, s, p, y):
    n, o, ho, wo = y.shape
    nb = _chunk(x.shape, w.shape, (ho, wo), p)
    for i in range(0, n, nb):  # slices along N of C-contiguous arrays stay C-contiguous
        _cpu_forward_slice(x[i:i + nb], w, b, s, p, y[i:i + nb])


def _cpu_forward_slice(x, w, b, s, p, y):
    n, o, ho, wo = y.shape
    kh, kw = w.shape[2:]
    cols = _cols(x, kh, kw, s, p, (ho, wo))
    yl = _scratch("y_last", (o, ho * wo * n))
    np.matmul(w.reshape(o, -1), cols, out=yl)
    _from_batch_last(yl.reshape(o, ho, wo, n), y, b)


def _cpu_backward(dy, x, w, s, p, dx, dw, db):
    n, o, ho, wo = dy.shape
    nb = _chunk(x.shape, w.shape, (ho, wo), p)
    if nb >= n:
        return _cpu_backward_slice(dy, x, w, s, p, dx, dw, db)
    dw_part = _scratch("dw_part", w.shape)
    db_part = None if db is None else _scratch("db_part", db.shape)
    for i in range(0, n, nb):  # the first slice writes dw and db, the others add theirs
        first = i == 0
        _cpu_backward_slice(dy[i:i + nb], x[i:i + nb], w, s, p, None if dx is None else dx[i:i + nb],
                            dw if first else dw_part, db if first else db_part)
        if not first:
            np.add(dw, dw_part, out=dw)
            if db is not None:
                np.add(db, db_part, out=db)


def _cpu_backward_slice(dy, x, w, s, p, dx, dw, db):
    n, o, ho, wo = dy.shape
    c, h, wd = x.shape[1:]
    kh, kw = w.shape[2:]
    (sh, sw), (ph, pw) = s, p
    dyl = _scratch("dy_last", (o, ho, wo, n))
    _to_batch_last(dy, dyl)
    dyl = dyl.reshape(o, ho * wo * n)
    if db is not None:
        np.sum(dyl, axis=1, out=db)
    cols = _cols(x, kh, kw, s, p, (ho, wo))
    # dw = dy · colsᵀ, computed as (cols · dyᵀ)ᵀ: BLAS runs the long reduction ~1.7× faster this way round
    dw_t = np.matmul(cols, dyl.T, out=_scratch("dw_t", (cols.shape[0], o)))
    np.copyto(dw, dw_t.T.reshape(dw.shape))
    if dx is None:
        return
    # dcols = wᵀ · dy, written over cols (same shape, no longer needed):
    # dcols[(c, i, j), (ho, wo, n)] = Σ_o w[o, c, i, j] * dy[n, o, ho, wo]
    dcols = np.matmul(w.reshape(o, c * kh * kw).T, dyl, out=cols).reshape(c, kh, kw, ho, wo, n)
    # col2im: tap (i, j) of output (ho, wo) read padded input (ho*sh + i, wo*sw + j); every such row is
    # < H + 2*ph because (Ho - 1)*sh + kH <= H + 2*ph. Rows/cols no window reads keep their 0.
    dxl = _scratch("dx_last", (c, h + 2 * ph, wd + 2 * pw, n))
    dxl.fill(0)
    for i in range(kh):
        for j in range(kw):
            dxl[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw] += dcols[:, i, j]
    _from_batch_last(dxl[:, ph:ph + h, pw:pw + wd], dx)


# ---------------------------------------------------------------------------------------------------
# public ops


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, *, out=None, version=None):
    """Cross-correlation of x (N, C_in, H, W) with w (C_out, C_in/groups, kH, kW), plus b (C_out,) if given.

    stride, dilation: an int or a pair (rows, cols). padding: an int, a pair, ``'valid'`` (0) or
    ``'same'`` (stride 1 only; the output keeps H, W; when the total padding dilation*(k-1) is odd the
    extra row/column goes at the bottom/right, as in PyTorch); zero padding. groups: C_in and C_out
    split into ``groups`` independent convolutions (depthwise: groups = C_in, C_out a multiple of it).
    Returns y (N, C_out, Ho, Wo) with Ho = (H + 2*ph - dh*(kH-1) - 1) // sh + 1 (likewise Wo), written
    into ``out`` when given (no allocation). An unbatched x (C_in, H, W) gives an unbatched y.
    ``version`` picks the forward kernel on cuda/sim (:data:`VERSIONS`: ``naive``, ``tiled`` or
    ``implicit_gemm``; None: ``implicit_gemm`` where it applies on a GPU, else ``tiled`` where it
    applies, else ``naive``) when dilation = groups = 1 and the padding is symmetric; otherwise the
    ``general`` kernel runs. Ignored on cpu. Host float64 input is computed in float32.
    """
    _check_version(version)
    x, unbatched = _unbatch("x", x)
    g = _general_args(x, w, stride, padding, dilation, groups)
    if not _is_plain(g):
        y = _conv2d_general(x, w, b, g, out=_unbatch_out(out, unbatched))
        return _rebatch(y, unbatched)
    s, pads = g[0], g[1]
    y = _conv2d_plain(x, w, b, s, (pads[0], pads[2]), _unbatch_out(out, unbatched), version)
    return _rebatch(y, unbatched)


def _conv2d_plain(x, w, b, s, p, out, version):
    x, on_host = as_input("x", x, 4, _X_LAYOUT)
    w, _ = as_input("w", w, 4, _W_LAYOUT)
    _check_dims("x", x, batch=True)
    _check_dims("w", w)
    out_shape = _geometry(tuple(x.shape), tuple(w.shape), s, p)
    if b is not None:
        b, _ = as_input("b", b, 1, "(C_out,)")
        if tuple(b.shape) != (out_shape[1],):
            raise ValueError(f"b: expected shape ({out_shape[1]},), one value per output channel of w "
                             f"{tuple(w.shape)}, got {tuple(b.shape)}")
    y = empty(out_shape) if out is None else check_out("out", out, out_shape)
    check_no_overlap([("out", y)], [("x", x), ("w", w), ("b", b)])

    if not _backend.uses_kernels():
        _cpu_forward(x, w, b, s, p, y)
        return y
    from ..kernels import conv2d as kconv

    kconv.conv2d_forward(x, w, b, y, s, p, version=version)
    return result(y, on_host)


def conv2d_backward(dy, x, w, stride=1, padding=0, dilation=1, groups=1, *, out=None, need_dx=True,
                    bias=True, version=None):
    """Gradients of y = conv2d(x, w, b, stride, padding, dilation, groups) given dy = dL/dy: returns
    (dx, dw, db).

    dx (N, C_in, H, W), None when ``need_dx`` is False (a first layer skips it); dw (C_out, C_in/groups,
    kH, kW); db (C_out,) = Σ over (N, Ho, Wo) of dy, None when ``bias`` is False (the layer has no bias).
    Each is WRITTEN in full, not accumulated. ``out`` is a tuple (dx, dw, db) of preallocated arrays of
    the backend's kind; an entry may be None (then allocated when needed; with every needed entry given
    nothing is allocated). Unbatched dy (C_out, Ho, Wo) and x (C_in, H, W) give an unbatched dx. Host
    float64 input is computed in float32. ``version`` picks the kernels on cuda/sim when dilation =
    groups = 1 and the padding is symmetric (:data:`BACKWARD_VERSIONS`: ``implicit_gemm``, dX as the
    transposed implicit GEMM and dW + db as a deterministic split-K GEMM; ``direct``, the gather and
    block-reduction kernels; None: the first where it applies); otherwise the ``general`` kernels run.
    Ignored on cpu.
    """
    check_version(version, BACKWARD_VERSIONS, "conv2d backward")
    x, unbatched = _unbatch("x", x)
    if unbatched:
        dy, dy_unbatched = _unbatch("dy", dy)
        if not dy_unbatched:
            raise ValueError(f"dy: expected an unbatched (C_out, H_out, W_out) array like x, got shape "
                             f"{tuple(dy.shape)}")
        if out is not None and isinstance(out, (tuple, list)) and len(out) == 3:
            out = (_unbatch_out(out[0], True), out[1], out[2])
    g = _general_args(x, w, stride, padding, dilation, groups)
    if not _is_plain(g):
        dx, dw, db = _conv2d_backward_general(dy, x, w, g, out, need_dx, bias)
    else:
        s, pads = g[0], g[1]
        dx, dw, db = _conv2d_backward_plain(dy, x, w, s, (pads[0], pads[2]), out, need_dx, bias, version)
    return _rebatch(dx, unbatched), dw, db


def _conv2d_backward_plain(dy, x, w, s, p, out, need_dx, bias, version):
    dy, on_host = as_input("dy", dy, 4, _DY_LAYOUT)
    x, _ = as_input("x", x, 4, _X_LAYOUT)
    w, _ = as_input("w", w, 4, _W_LAYOUT)
    _check_dims("x", x, batch=True)
    _check_dims("w", w)
    out_shape = _geometry(tuple(x.shape), tuple(w.shape), s, p)
    if tuple(dy.shape) != out_shape:
        raise ValueError(f"dy: expected shape {out_shape} (the output of x {tuple(x.shape)} with w "
                         f"{tuple(w.shape)}, stride {s}, padding {p}), got {tuple(dy.shape)}")
    dx, dw, db = _backward_outs(out, x.shape, w.shape, out_shape[1], need_dx, bias)
    check_no_overlap([("out[0] (dx)", dx), ("out[1] (dw)", dw), ("out[2] (db)", db)], [("dy", dy), ("x", x), ("w", w)])

    if not _backend.uses_kernels():
        _cpu_backward(dy, x, w, s, p, dx, dw, db)
        return dx, dw, db
    from ..kernels import conv2d as kconv

    kconv.conv2d_backward(dy, x, w, dx, dw, db, s, p, version=version)
    return result(dx, on_host), result(dw, on_host), result(db, on_host)


def _backward_outs(out, x_shape, w_shape, c_out, need_dx, bias):
    if out is not None and not (isinstance(out, (tuple, list)) and len(out) == 3):
        raise TypeError("out: expected a tuple (dx, dw, db); an entry may be None")
    dx = db = None
    if need_dx:
        dx = _out_entry(out, 0, "dx", x_shape)
        dx = empty(x_shape) if dx is None else dx
    dw = _out_entry(out, 1, "dw", w_shape)
    dw = empty(w_shape) if dw is None else dw
    if bias:
        db = _out_entry(out, 2, "db", (c_out,))
        db = empty((c_out,)) if db is None else db
    return dx, dw, db


# ---------------------------------------------------------------------------------------------------
# dilation, groups, 'same'/'valid' padding, unbatched input (the general path)
#
# cpu: the input zero-padded once (asymmetrically where 'same' asks), then a loop over the kH*kW taps,
# each one batched product per group (einsum "ngchw,gmc->ngmhw": a GEMM per group, an element-wise
# product for depthwise) -- the float64 reference's scheme, in float32. dX is the transpose, tap by tap,
# added into the padded dx. cuda/sim: the ``general`` kernels of gpu_cnn.kernels.conv2d.


def _unbatch(name, a):
    """(a as a batch, whether it came unbatched (3-D)); other ranks are left to the rank checks."""
    shape = getattr(a, "shape", None)
    if shape is None:
        if a is None:
            return a, False
        a = np.asarray(a)
        shape = a.shape
    if len(shape) == 3:
        return a.reshape((1,) + tuple(shape)), True
    if len(shape) in (2, 5):
        what = "1-D" if len(shape) == 2 else "3-D"
        raise ValueError(f"{name}: {what} convolutions ({len(shape)}-D input) are not supported; conv2d takes "
                         f"(N, C, H, W) or unbatched (C, H, W), got shape {tuple(shape)}")
    return a, False


def _unbatch_out(out, unbatched):
    if out is None or not unbatched or isinstance(out, (tuple, list)):
        return out
    return out.reshape((1,) + tuple(out.shape)) if len(out.shape) == 3 else out


def _rebatch(y, unbatched):
    return y.reshape(tuple(y.shape[1:])) if (unbatched and y is not None) else y


def _general_args(x, w, stride, padding, dilation, groups):
    """The normalised (stride, (top, bottom, left, right), dilation, groups)."""
    d = pair("dilation", dilation, 1)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups: expected a positive int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    groups = int(groups)
    s = pair("stride", stride, 1)
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if s != (1, 1):
                raise ValueError(f"padding: 'same' is not supported for strided convolutions (stride {s}), "
                                 "as in PyTorch")
            kshape = getattr(w, "shape", None)
            if kshape is None or len(kshape) != 4:
                w_arr = np.asarray(w) if kshape is None else w
                raise ValueError(f"w: expected a 4-D array {_W_LAYOUT}, got shape {tuple(w_arr.shape)}")
            th, tw = d[0] * (int(kshape[2]) - 1), d[1] * (int(kshape[3]) - 1)
            pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            raise ValueError(f"padding: expected an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        p = pair("padding", padding, 0)
        pads = (p[0], p[0], p[1], p[1])
    return s, pads, d, groups


def _is_plain(g):
    """Whether the plain kernels (and the im2col cpu path) apply: dilation 1, groups 1, symmetric padding."""
    s, pads, d, groups = g
    return d == (1, 1) and groups == 1 and pads[0] == pads[1] and pads[2] == pads[3]


def _general_geometry(x_shape, w_shape, g):
    s, pads, d, groups = g
    n, c, h, wd = x_shape
    o, cg, kh, kw = w_shape
    if c % groups:
        raise ValueError(f"groups: C_in = {c} (x {tuple(x_shape)}) is not divisible by groups = {groups}")
    if o % groups:
        raise ValueError(f"groups: C_out = {o} (w {tuple(w_shape)}) is not divisible by groups = {groups}")
    if cg != c // groups:
        raise ValueError(f"w: expected C_in/groups = {c // groups} input channels per filter (x is "
                         f"{tuple(x_shape)}, groups = {groups}), got w of shape {tuple(w_shape)}")
    eh, ew = d[0] * (kh - 1) + 1, d[1] * (kw - 1) + 1
    hp, wp = h + pads[0] + pads[1], wd + pads[2] + pads[3]
    if hp < eh or wp < ew:
        raise ValueError(f"w: filter {(kh, kw)} with dilation {d} spans {(eh, ew)}, larger than the padded "
                         f"input {(hp, wp)} (input {(h, wd)}, padding {pads})")
    return (n, o, (hp - eh) // s[0] + 1, (wp - ew) // s[1] + 1)


def _conv2d_general(x, w, b, g, out=None):
    x, on_host = as_input("x", x, 4, _X_LAYOUT)
    w, _ = as_input("w", w, 4, "(C_out, C_in/groups, kH, kW)")
    _check_dims("x", x, batch=True)
    _check_dims("w", w)
    out_shape = _general_geometry(tuple(x.shape), tuple(w.shape), g)
    if b is not None:
        b, _ = as_input("b", b, 1, "(C_out,)")
        if tuple(b.shape) != (out_shape[1],):
            raise ValueError(f"b: expected shape ({out_shape[1]},), one value per output channel of w "
                             f"{tuple(w.shape)}, got {tuple(b.shape)}")
    y = empty(out_shape) if out is None else check_out("out", out, out_shape)
    s, pads, d, groups = g
    if not _backend.uses_kernels():
        _cpu_general_forward(x, w, b, s, pads, d, groups, y)
        return y
    from ..kernels import conv2d as kconv

    kconv.conv2d_forward_general(x, w, b, y, s, pads, d, groups)
    return result(y, on_host)


def _conv2d_backward_general(dy, x, w, g, out, need_dx, bias):
    dy, on_host = as_input("dy", dy, 4, _DY_LAYOUT)
    x, _ = as_input("x", x, 4, _X_LAYOUT)
    w, _ = as_input("w", w, 4, "(C_out, C_in/groups, kH, kW)")
    _check_dims("x", x, batch=True)
    _check_dims("w", w)
    out_shape = _general_geometry(tuple(x.shape), tuple(w.shape), g)
    s, pads, d, groups = g
    if tuple(dy.shape) != out_shape:
        raise ValueError(f"dy: expected shape {out_shape} (the output of x {tuple(x.shape)} with w "
                         f"{tuple(w.shape)}, stride {s}, padding {pads}, dilation {d}, groups {groups}), "
                         f"got {tuple(dy.shape)}")
    dx, dw, db = _backward_outs(out, x.shape, w.shape, out_shape[1], need_dx, bias)
    if not _backend.uses_kernels():
        _cpu_general_backward(dy, x, w, s, pads, d, groups, dx, dw, db)
        return dx, dw, db
    from ..kernels import conv2d as kconv

    if dx is not None:
        kconv.conv2d_backward_input_general(dy, w, dx, s, pads, d, groups)
    kconv.conv2d_backward_weight_general(dy, x, dw, s, pads, d, groups)
    if db is not None:
        kconv.conv2d_backward_bias(dy, db)
    return result(dx, on_host), result(dw, on_host), result(db, on_host)


def _tap(i, d, s, n_out):
    return slice(i * d, i * d + (n_out - 1) * s + 1, s)


def _cpu_general_forward(x, w, b, s, pads, d, groups, y):
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho, wo = y.shape[2:]
    og = o // groups
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[1]), (pads[2], pads[3])))
    xg = xp.reshape(n, groups, cg, xp.shape[2], xp.shape[3])
    wg = w.reshape(groups, og, cg, kh, kw)
    acc = np.zeros((n, groups, og, ho, wo), np.float32)
    for i in range(kh):
        for j in range(kw):
            patch = xg[:, :, :, _tap(i, d[0], s[0], ho), _tap(j, d[1], s[1], wo)]
            acc += np.einsum("ngchw,gmc->ngmhw", patch, wg[:, :, :, i, j], optimize=True)
    acc = acc.reshape(n, o, ho, wo)
    if b is not None:
        acc += b[None, :, None, None]
    np.copyto(y, acc)


def _cpu_general_backward(dy, x, w, s, pads, d, groups, dx, dw, db):
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho, wo = dy.shape[2:]
    og = o // groups
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[1]), (pads[2], pads[3])))
    xg = xp.reshape(n, groups, cg, xp.shape[2], xp.shape[3])
    wg = w.reshape(groups, og, cg, kh, kw)
    dyg = dy.reshape(n, groups, og, ho, wo)
    dwg = np.empty((groups, og, cg, kh, kw), np.float32)
    dxp = np.zeros(xg.shape, np.float32) if dx is not None else None
    for i in range(kh):
        for j in range(kw):
            rows, cols = _tap(i, d[0], s[0], ho), _tap(j, d[1], s[1], wo)
            dwg[:, :, :, i, j] = np.einsum("ngmhw,ngchw->gmc", dyg, xg[:, :, :, rows, cols], optimize=True)
            if dxp is not None:
                dxp[:, :, :, rows, cols] += np.einsum("ngmhw,gmc->ngchw", dyg, wg[:, :, :, i, j], optimize=True)
    np.copyto(dw, dwg.reshape(w.shape))
    if db is not None:
        np.sum(dy, axis=(0, 2, 3), out=db)
    if dx is not None:
        dxp = dxp.reshape(n, c, xp.shape[2], xp.shape[3])
        np.copyto(dx, dxp[:, :, pads[0]:pads[0] + h, pads[2]:pads[2] + wd])


def conv2d_relu_maxpool2d(x, w, b=None, stride=1, padding=0, *, out=None):
    """max_pool2d(relu(conv2d(x, w, b, stride, padding)), 2) -> (y, idx), fused on cuda/sim.

    y (N, C_out, Ho // 2, Wo // 2) and idx (int32, in max_pool2d's format: the argmax's row*Wo + col
    within its plane of the conv output) equal the three ops run one after the other (to float32
    rounding), so ``max_pool2d_backward(dy, idx, (N, C_out, Ho, Wo), 2)`` routes the gradient; the
    conv output itself is never stored on cuda/sim (one kernel, ``kernels.conv2d``'s ``fused``). On cpu
    the three ops run in turn. ``out``: a preallocated (y, idx) pair.
    """
    s = pair("stride", stride, 1)
    p = pair("padding", padding, 0)
    x, on_host = as_input("x", x, 4, _X_LAYOUT)
    w, _ = as_input("w", w, 4, _W_LAYOUT)
    _check_dims("x", x, batch=True)
    _check_dims("w", w)
    conv_shape = _geometry(tuple(x.shape), tuple(w.shape), s, p)
    if conv_shape[2] < 2 or conv_shape[3] < 2:
        raise ValueError(f"w: the convolution's output {conv_shape[2:]} is smaller than the 2x2 pooling window")
    pooled = conv_shape[:2] + (conv_shape[2] // 2, conv_shape[3] // 2)
    if b is not None:
        b, _ = as_input("b", b, 1, "(C_out,)")
        if tuple(b.shape) != (conv_shape[1],):
            raise ValueError(f"b: expected shape ({conv_shape[1]},), one value per output channel of w "
                             f"{tuple(w.shape)}, got {tuple(b.shape)}")
    if out is not None and not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("out: expected a tuple (y, idx)")
    y = empty(pooled) if out is None else check_out("out[0] (y)", out[0], pooled)
    idx = empty(pooled, np.int32) if out is None else check_out("out[1] (idx)", out[1], pooled, dtype=np.int32)
    if not _backend.uses_kernels():
        from .activation import relu
        from .pool import max_pool2d

        a = relu(conv2d(x, w, b, s, p))
        max_pool2d(a, 2, 2, 0, out=(y, idx))
        return y, idx
    from ..kernels import conv2d as kconv

    kconv.conv2d_relu_maxpool_fused(x, w, b, y, idx, s, p)
    return result(y, on_host), result(idx, on_host)
