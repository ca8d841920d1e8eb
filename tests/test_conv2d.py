"""2-D convolution (gpu_cnn.ops.conv and the kernels of gpu_cnn.kernels.conv2d) against float64 NumPy
and finite differences.

Every forward version (naive, tiled) and every gradient kernel (dX gather, dW and db block reductions)
runs under the simulator on shapes that are no multiple of the tile (TILE_H x TILE_W = 16 x 16) or the
reduction block, with stride 2, padding 1-2, asymmetric stride/padding, rectangular filters, no bias,
and a plane larger than one tile (several partial tiles). The cpu path runs the same cases and larger
ones. The simulator costs ~150 µs per thread, so the kernel-backend shapes stay tiny.
"""
import numpy as np
import pytest

from gpu_cnn.ops import _base
from gpu_cnn.ops.conv import VERSIONS as OP_VERSIONS
from gpu_cnn.ops.conv import conv2d, conv2d_backward


def _k():
    from gpu_cnn.kernels import conv2d as kconv  # after the backend is chosen (numba.cuda fixes the simulator)

    return kconv


# (N, C_in, H, W, C_out, (kH, kW), stride, padding, bias)
CASES = {
    "3x3-s1-p1": (2, 3, 7, 9, 2, (3, 3), (1, 1), (1, 1), True),
    "3x5-s21-p20": (1, 2, 13, 11, 3, (3, 5), (2, 1), (2, 0), True),  # rectangular, asymmetric
    "5x2-s2-p12-nobias": (2, 1, 9, 8, 2, (5, 2), (2, 2), (1, 2), False),
    "3x3-s1-p1-tiles": (1, 2, 19, 18, 1, (3, 3), (1, 1), (1, 1), True),  # Ho, Wo = 19, 18 > 16: 4 tiles
    "7x6-s12-p23": (1, 2, 6, 7, 2, (7, 6), (1, 2), (2, 3), True),  # the largest filter tiled holds
}
# a cheap case for the op-level tests on the kernel backend (24 weight elements)
SMALL_CASE = (1, 2, 5, 6, 2, (3, 2), (2, 1), (1, 1), True)
# the backward cases: the dW kernel costs one (simulated) block per weight element
BACKWARD_CASES = ["3x3-s1-p1", "3x5-s21-p20", "5x2-s2-p12-nobias", "3x3-s1-p1-tiles"]
# cpu only: bigger, and strides larger than the filter (input rows no window reads)
CPU_CASES = {
    "big-3x4-s21-p12": (8, 5, 23, 19, 7, (3, 4), (2, 1), (1, 2), True),
    "lenet1": (16, 1, 28, 28, 6, (5, 5), (1, 1), (2, 2), True),
    "lenet2": (16, 6, 14, 14, 16, (5, 5), (1, 1), (0, 0), True),
    "2x2-s3-gaps": (3, 4, 11, 10, 5, (2, 2), (3, 3), (0, 1), False),
    "1x1": (4, 6, 5, 7, 3, (1, 1), (1, 1), (0, 0), True),
    "k-eq-input": (2, 3, 5, 4, 2, (5, 4), (1, 1), (0, 0), True),
    "pad-ge-k": (2, 2, 4, 5, 3, (3, 2), (2, 1), (3, 2), True),
}

# float32 sums of C_in*kH*kW <= 84 products of N(0, 1) values against float64: a few ulps of the
# partial sums (~1e-6); dW and db sum up to N*Ho*Wo products, ~1e-5 for the sizes here
FWD_TOL = dict(rtol=1e-5, atol=1e-5)
BWD_TOL = dict(rtol=1e-5, atol=2e-5)
# cpu cases sum up to 16*28*28 = 12544 products in dW: float32 rounding of sums of size ~100
BIG_TOL = dict(rtol=1e-4, atol=1e-3)


def _problem(rng, case):
    n, c, h, w, o, (kh, kw), s, p, bias = case
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c, kh, kw)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32) if bias else None
    ho, wo = (h + 2 * p[0] - kh) // s[0] + 1, (w + 2 * p[1] - kw) // s[1] + 1
    dy = rng.standard_normal((n, o, ho, wo)).astype(np.float32)
    return x, wt, b, s, p, dy


def _reference():
    return _k().conv2d_reference, _k().conv2d_backward_reference


def test_versions_are_the_ones_tested(kernel_backend):
    assert _k().VERSIONS == OP_VERSIONS == ("naive", "tiled", "implicit_gemm")
    assert _k().DEFAULT_VERSION == "implicit_gemm"  # on a GPU; see IG_FORWARD_DEFAULT


def test_cases_are_what_they_claim():
    # not tile multiples; one case spans several tiles; the largest case fits the tiled limits
    k = _k()
    for name, (n, c, h, w, o, (kh, kw), s, p, _) in CASES.items():
        ho, wo = (h + 2 * p[0] - kh) // s[0] + 1, (w + 2 * p[1] - kw) // s[1] + 1
        assert ho % k.TILE_H and wo % k.TILE_W, name
        assert k.tiled_supported((o, c, kh, kw), s), name
    n, c, h, w, o, (kh, kw), s, p, _ = CASES["3x3-s1-p1-tiles"]
    assert h > k.TILE_H and w > k.TILE_W
    assert CASES["7x6-s12-p23"][5][0] == k.MAX_K


# --- forward: every version on the kernel backend, the cpu path ------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("version", OP_VERSIONS)
def test_forward_kernels_match_reference(kernel_backend, rng, version, case):
    x, w, b, s, p, _ = _problem(rng, CASES[case])
    ref = _reference()[0](x, w, b, s, p)
    y = conv2d(x, w, b, s, p, version=version)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == ref.shape
    assert np.abs(ref).max() > 1  # a real output, not zeros
    np.testing.assert_allclose(y, ref, **FWD_TOL)


@pytest.mark.parametrize("case", list(CASES) + list(CPU_CASES))
def test_forward_cpu_matches_reference(cpu_backend, rng, case):
    x, w, b, s, p, _ = _problem(rng, {**CASES, **CPU_CASES}[case])
    ref = _reference()[0](x, w, b, s, p)
    y = conv2d(x, w, b, s, p)
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, **FWD_TOL)


def test_padding_is_zero_padding(backend):
    # a constant image of ones and a filter of ones: each output counts the real (unpadded) cells
    # under its window, so corners see fewer than interior outputs
    x = np.ones((1, 1, 4, 5), np.float32)
    w = np.ones((1, 1, 3, 3), np.float32)
    y = conv2d(x, w, padding=1)
    expected = np.array([[4, 6, 6, 6, 4], [6, 9, 9, 9, 6], [6, 9, 9, 9, 6], [4, 6, 6, 6, 4]], np.float32)
    np.testing.assert_array_equal(y[0, 0], expected)


def test_tiled_limits_and_fallback(kernel_backend, rng):
    k = _k()
    from numba import cuda

    # a filter larger than MAX_K: tiled refuses by name, the default (None) falls back to naive
    x, w, b, s, p, _ = _problem(rng, (1, 1, 9, 9, 1, (k.MAX_K + 1, 2), (1, 1), (0, 0), True))
    assert not k.tiled_supported(w.shape, s)
    with pytest.raises(ValueError, match="w: the tiled kernel supports filters up to"):
        conv2d(x, w, b, s, p, version="tiled")
    np.testing.assert_allclose(conv2d(x, w, b, s, p), _reference()[0](x, w, b, s, p), **FWD_TOL)
    # a stride larger than MAX_STRIDE
    x, w, b, s, p, _ = _problem(rng, (1, 1, 10, 9, 1, (3, 3), (k.MAX_STRIDE + 1, 1), (0, 0), False))
    with pytest.raises(ValueError, match="stride: the tiled kernel supports strides up to"):
        conv2d(x, w, b, s, p, version="tiled")
    np.testing.assert_allclose(conv2d(x, w, b, s, p), _reference()[0](x, w, b, s, p), **FWD_TOL)
    # the dispatcher itself: an unknown version names the known ones
    y = cuda.device_array((1, 1, 3, 7), np.float32)
    with pytest.raises(ValueError, match="version.*naive, tiled"):
        k.conv2d_forward(_base.to_device(x), _base.to_device(w), None, y, s, p, version="fast")


# --- backward: each gradient on its own --------------------------------------------------------------


@pytest.mark.parametrize("case", BACKWARD_CASES)
@pytest.mark.parametrize("grad", ["dx", "dw", "db"])
def test_backward_kernels_match_reference(kernel_backend, rng, grad, case):
    # each gradient kernel launched on its own through the dispatcher (the op always computes dw)
    k = _k()
    x, w, b, s, p, dy = _problem(rng, CASES[case])
    ref = dict(zip(("dx", "dw", "db"), _reference()[1](dy, x, w, s, p)))[grad]
    got = _base.to_device(np.full(ref.shape, np.nan, np.float32))  # every element must be written
    dyd = _base.to_device(dy)
    if grad == "dx":
        k.conv2d_backward_input(dyd, _base.to_device(w), got, s, p)
    elif grad == "dw":
        # the reduction runs several strided passes per thread before the tree
        assert dy.shape[0] * dy.shape[2] * dy.shape[3] > k.RED_THREADS
        k.conv2d_backward_weight(dyd, _base.to_device(x), got, s, p)
    else:
        k.conv2d_backward_bias(dyd, got)
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(got.copy_to_host(), ref, **BWD_TOL)


def test_reductions_with_the_gpu_block_size(kernel_backend, rng, monkeypatch):
    """dW and db with the GPU's 256-thread trees (the suite otherwise runs 8 under the simulator)."""
    k = _k()
    monkeypatch.setattr(k, "RED_THREADS", 256)  # the simulator reads module globals when a kernel runs
    x, w, b, s, p, dy = _problem(rng, (3, 1, 9, 11, 1, (2, 2), (1, 1), (0, 0), True))  # N*Ho*Wo = 240
    _, rdw, rdb = _reference()[1](dy, x, w, s, p)
    dw = _base.to_device(np.full(rdw.shape, np.nan, np.float32))
    db = _base.to_device(np.full(rdb.shape, np.nan, np.float32))
    k.conv2d_backward_weight(_base.to_device(dy), _base.to_device(x), dw, s, p)
    k.conv2d_backward_bias(_base.to_device(dy), db)
    np.testing.assert_allclose(dw.copy_to_host(), rdw, **BWD_TOL)
    np.testing.assert_allclose(db.copy_to_host(), rdb, **BWD_TOL)


def test_empty_batch_launches_nothing_and_gives_zero_gradients(kernel_backend, rng):
    """N = 0: no output to compute (a GPU refuses a grid of 0 blocks), dW and db are sums over nothing."""
    k = _k()
    x = _base.to_device(np.zeros((0, 2, 5, 5), np.float32))
    w = _base.to_device(rng.standard_normal((3, 2, 3, 3)).astype(np.float32))
    y = _base.to_device(np.zeros((0, 3, 5, 5), np.float32))
    for version in k.VERSIONS:
        assert k.conv2d_forward(x, w, None, y, (1, 1), (1, 1), version=version) is y
    dx = _base.to_device(np.zeros((0, 2, 5, 5), np.float32))
    assert k.conv2d_backward_input(y, w, dx, (1, 1), (1, 1)) is dx
    dw = _base.to_device(np.full((3, 2, 3, 3), np.nan, np.float32))
    db = _base.to_device(np.full((3,), np.nan, np.float32))
    k.conv2d_backward_weight(y, x, dw, (1, 1), (1, 1))
    k.conv2d_backward_bias(y, db)
    assert not dw.copy_to_host().any() and not db.copy_to_host().any()


@pytest.mark.parametrize("need_dx,bias", [(True, True), (False, True), (True, False)])
def test_backward_op_on_kernel_backend(kernel_backend, rng, need_dx, bias):
    x, w, b, s, p, dy = _problem(rng, SMALL_CASE)
    rdx, rdw, rdb = _reference()[1](dy, x, w, s, p)
    dx, dw, db = conv2d_backward(dy, x, w, s, p, need_dx=need_dx, bias=bias)
    assert isinstance(dw, np.ndarray) and dw.dtype == np.float32
    np.testing.assert_allclose(dw, rdw, **BWD_TOL)
    if need_dx:
        np.testing.assert_allclose(dx, rdx, **BWD_TOL)
    else:
        assert dx is None
    if bias:
        np.testing.assert_allclose(db, rdb, **BWD_TOL)
    else:
        assert db is None


@pytest.mark.parametrize("case", list(CASES) + list(CPU_CASES))
def test_backward_cpu_matches_reference(cpu_backend, rng, case):
    x, w, b, s, p, dy = _problem(rng, {**CASES, **CPU_CASES}[case])
    rdx, rdw, rdb = _reference()[1](dy, x, w, s, p)
    dx, dw, db = conv2d_backward(dy, x, w, s, p, bias=b is not None)
    tol = BIG_TOL if case in CPU_CASES else BWD_TOL
    np.testing.assert_allclose(dx, rdx, **tol)
    np.testing.assert_allclose(dw, rdw, **tol)
    if b is None:
        assert db is None
    else:
        np.testing.assert_allclose(db, rdb, **tol)


@pytest.mark.parametrize("case", ["big-3x4-s21-p12", "lenet1", "1x1"])
@pytest.mark.parametrize("images_per_slice", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_batch_slices_match_reference(cpu_backend, rng, monkeypatch, case, images_per_slice, with_bias):
    """The cpu path cuts big batches into slices (cols near _CHUNK_BYTES); force slices of 1 and 3 images
    (3 leaves a shorter last slice) and check every output, every slice's share of dW and db included."""
    from gpu_cnn.ops import conv as conv_ops

    n, c, h, w_, o, (kh, kw), s, p, bias = {**CASES, **CPU_CASES}[case]
    ho, wo = (h + 2 * p[0] - kh) // s[0] + 1, (w_ + 2 * p[1] - kw) // s[1] + 1
    monkeypatch.setattr(conv_ops, "_CHUNK_BYTES", 1)  # every image over the byte budget: the floor decides
    monkeypatch.setattr(conv_ops, "_MIN_SLICE_COLUMNS", images_per_slice * ho * wo)
    assert conv_ops._chunk((n, c, h, w_), (o, c, kh, kw), (ho, wo), p) == images_per_slice < n
    x, w, b, s, p, dy = _problem(rng, {**CASES, **CPU_CASES}[case])
    b = b if with_bias else None
    rdx, rdw, rdb = _reference()[1](dy, x, w, s, p)
    y = np.full(dy.shape, np.nan, np.float32)
    np.testing.assert_allclose(conv2d(x, w, b, s, p, out=y), _reference()[0](x, w, b, s, p), **FWD_TOL)
    dx, dw = np.full(x.shape, np.nan, np.float32), np.full(w.shape, np.nan, np.float32)
    db = None if b is None else np.full(b.shape, np.nan, np.float32)
    conv2d_backward(dy, x, w, s, p, out=(dx, dw, db), bias=b is not None)
    np.testing.assert_allclose(dx, rdx, **BIG_TOL)
    np.testing.assert_allclose(dw, rdw, **BIG_TOL)
    if b is not None:
        np.testing.assert_allclose(db, rdb, **BIG_TOL)
    _, dw_only, _ = conv2d_backward(dy, x, w, s, p, need_dx=False, bias=b is not None)
    np.testing.assert_allclose(dw_only, rdw, **BIG_TOL)


def test_cpu_slices_keep_buffers_near_the_budget_and_rows_long():
    from gpu_cnn.ops import conv as conv_ops

    mib4 = 4 * 2**20
    assert (conv_ops._CHUNK_BYTES, conv_ops._MIN_SLICE_COLUMNS) == (mib4, 4096)
    # LeNet-5's first conv at batch 512: cols (25 floats per output position, 784 positions an image) decide
    nb = conv_ops._chunk((512, 1, 28, 28), (6, 1, 5, 5), (28, 28), (2, 2))
    assert nb * 25 * 784 * 4 <= mib4 < (nb + 1) * 25 * 784 * 4
    # a 1x1 conv to more channels: the output before its NCHW copy decides
    nb = conv_ops._chunk((512, 8, 32, 32), (128, 8, 1, 1), (32, 32), (0, 0))  # 128 floats a position, 1024 positions
    assert nb == 8 and nb * 128 * 1024 * 4 <= mib4 < (nb + 1) * 128 * 1024 * 4
    # 512 -> 512 channels on 7x7: the byte budget alone would give 4 images; the floor keeps 4096 positions
    assert conv_ops._chunk((128, 512, 7, 7), (512, 512, 3, 3), (7, 7), (1, 1)) == -(-4096 // 49) == 84
    assert conv_ops._chunk((3, 512, 7, 7), (512, 512, 3, 3), (7, 7), (1, 1)) == 3
    assert conv_ops._chunk((0, 1, 28, 28), (6, 1, 5, 5), (28, 28), (2, 2)) == 1


def test_stride_gaps_get_zero_gradient(backend, rng):
    # stride 3 with a 2x2 filter: input rows/cols 2, 5, 8 are read by no window, so their dx is 0
    x, w, b, s, p, dy = _problem(rng, (1, 2, 8, 8, 2, (2, 2), (3, 3), (0, 0), False))
    dx, _, _ = conv2d_backward(dy, x, w, s, p, bias=False)
    gaps = np.zeros((8, 8), bool)
    gaps[[2, 5], :] = True
    gaps[:, [2, 5]] = True
    assert np.all(dx[:, :, gaps] == 0) and np.all(dx[:, :, ~gaps] != 0)
    np.testing.assert_allclose(dx, _reference()[1](dy, x, w, s, p)[0], **BWD_TOL)


# --- finite differences (float64, tiny shapes) -------------------------------------------------------

FD_CASE = (1, 2, 5, 4, 2, (3, 2), (2, 1), (1, 0), True)


def _loss(conv, g, x, w, b, s, p):
    """L = Σ conv(x, w, b) * g: dL/dy = g."""
    return float(np.sum(np.asarray(conv(x, w, b, s, p), np.float64) * g))


def _fd(fn, a, eps):
    """Central differences of the scalar fn() with respect to every element of a (changed in place)."""
    grad = np.zeros(a.shape)
    for idx in np.ndindex(a.shape):
        keep = a[idx]
        a[idx] = keep + eps
        up = fn()
        a[idx] = keep - eps
        down = fn()
        a[idx] = keep
        grad[idx] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("grad", ["dx", "dw", "db"])
def test_reference_gradients_match_finite_differences(rng, grad):
    x, w, b, s, p, g = _problem(rng, FD_CASE)
    x, w, b, g = (a.astype(np.float64) for a in (x, w, b, g))
    ref_fwd, ref_bwd = _reference()
    arg = {"dx": x, "dw": w, "db": b}[grad]
    num = _fd(lambda: _loss(ref_fwd, g, x, w, b, s, p), arg, 1e-3)
    ana = dict(zip(("dx", "dw", "db"), ref_bwd(g, x, w, s, p)))[grad]
    assert np.abs(num).max() > 0.1
    # float64 and L linear in each argument: central differences are exact up to rounding (~1e-12)
    np.testing.assert_allclose(ana, num, rtol=1e-8, atol=1e-9)


def _fd_op(x, w, b, s, p, g, grad, eps):
    """Central differences of L = Σ conv2d(x, w, b) * g through the op itself, every perturbation in ONE
    call (a simulator launch costs ~0.1 s): the 2*size perturbed copies of the argument are stacked
    along the batch (x; needs N = 1) or along the output channels (w, b: copy k gives channels
    k*O ... k*O + O - 1), so output block k is the forward of perturbation k."""
    arg = {"dx": x, "dw": w, "db": b}[grad]
    size = arg.size
    steps = np.concatenate([np.eye(size), -np.eye(size)]) * eps  # (2*size, size)
    copies = arg.reshape(1, -1) + steps  # row k: the argument with perturbation k
    o = w.shape[0]
    if grad == "dx":
        assert x.shape[0] == 1
        y = conv2d(copies.reshape((2 * size,) + x.shape[1:]), w, b, s, p, version="naive")
        y = np.asarray(y, np.float64)  # (2*size, O, Ho, Wo)
    else:
        ws = copies.reshape((2 * size,) + w.shape) if grad == "dw" else np.broadcast_to(w, (2 * size,) + w.shape)
        bs = copies if grad == "db" else np.broadcast_to(b, (2 * size, o))
        y = conv2d(x, ws.reshape((2 * size * o,) + w.shape[1:]), bs.reshape(-1), s, p, version="naive")
        y = np.asarray(y, np.float64).reshape((2 * size, o) + tuple(y.shape[2:]))  # x has N = 1
    losses = (y * g[0]).sum(axis=(1, 2, 3))
    return ((losses[:size] - losses[size:]) / (2 * eps)).reshape(arg.shape)


@pytest.mark.parametrize("grad", ["dx", "dw", "db"])
def test_op_gradients_match_finite_differences(backend, rng, grad):
    x, w, b, s, p, g = _problem(rng, FD_CASE)
    x, w, b = (a.astype(np.float64) for a in (x, w, b))  # perturbed in float64, computed in float32
    # L is linear in each argument, so a large step has no truncation error and keeps the float32
    # rounding of L (~1e-6) small against 2*eps
    num = _fd_op(x, w, b, s, p, g.astype(np.float64), grad, 0.25)
    dx, dw, db = conv2d_backward(g, x.astype(np.float32), w.astype(np.float32), s, p)
    ana = {"dx": dx, "dw": dw, "db": db}[grad]
    assert np.abs(num).max() > 0.1
    np.testing.assert_allclose(ana, num, rtol=1e-4, atol=1e-4)


# --- out=, device arrays, allocation ------------------------------------------------------------------


def test_out_buffers_on_device_make_no_allocation(kernel_backend, rng):
    x, w, b, s, p, dy = _problem(rng, SMALL_CASE)
    xd, wd, bd, dyd = (_base.to_device(a) for a in (x, w, b, dy))
    y = _base.to_device(np.full(dy.shape, np.nan, np.float32))  # every element must be written
    dx = _base.to_device(np.full(x.shape, np.nan, np.float32))
    dw = _base.to_device(np.full(w.shape, np.nan, np.float32))
    db = _base.to_device(np.full(b.shape, np.nan, np.float32))
    before = _base.allocation_stats()
    for version in OP_VERSIONS:
        got = conv2d(xd, wd, bd, s, p, out=y, version=version)
        assert got is y
    grads = conv2d_backward(dyd, xd, wd, s, p, out=(dx, dw, db))
    assert _base.allocation_stats() == before
    assert grads[0] is dx and grads[1] is dw and grads[2] is db
    rdx, rdw, rdb = _reference()[1](dy, x, w, s, p)
    np.testing.assert_allclose(y.copy_to_host(), _reference()[0](x, w, b, s, p), **FWD_TOL)
    np.testing.assert_allclose(dx.copy_to_host(), rdx, **BWD_TOL)
    np.testing.assert_allclose(dw.copy_to_host(), rdw, **BWD_TOL)
    np.testing.assert_allclose(db.copy_to_host(), rdb, **BWD_TOL)


def test_device_input_gives_device_output(kernel_backend, rng):
    x, w, b, s, p, dy = _problem(rng, SMALL_CASE)
    y = conv2d(_base.to_device(x), _base.to_device(w), None, s, p)
    assert not isinstance(y, np.ndarray) and hasattr(y, "copy_to_host")
    np.testing.assert_allclose(y.copy_to_host(), _reference()[0](x, w, None, s, p), **FWD_TOL)
    dx, dw, db = conv2d_backward(_base.to_device(dy), _base.to_device(x), _base.to_device(w), s, p, bias=False)
    assert db is None
    for a in (dx, dw):
        assert not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host")


def test_out_buffers_on_cpu(cpu_backend, rng):
    x, w, b, s, p, dy = _problem(rng, CASES["3x3-s1-p1"])
    y = np.full(dy.shape, np.nan, np.float32)
    assert conv2d(x, w, b, s, p, out=y) is y
    dx, dw, db = (np.full(a.shape, np.nan, np.float32) for a in (x, w, b))
    got = conv2d_backward(dy, x, w, s, p, out=(dx, dw, db))
    assert got[0] is dx and got[1] is dw and got[2] is db
    # entries may be None: allocated; need_dx=False leaves dx out
    got = conv2d_backward(dy, x, w, s, p, out=(None, dw, None), need_dx=False)
    assert got[0] is None and got[1] is dw and got[2].shape == b.shape
    rdx, rdw, rdb = _reference()[1](dy, x, w, s, p)
    np.testing.assert_allclose(y, _reference()[0](x, w, b, s, p), **FWD_TOL)
    np.testing.assert_allclose(dx, rdx, **BWD_TOL)
    np.testing.assert_allclose(dw, rdw, **BWD_TOL)
    np.testing.assert_allclose(db, rdb, **BWD_TOL)


def test_float64_input_is_computed_in_float32(backend, rng):
    x, w, b, s, p, _ = _problem(rng, SMALL_CASE)
    y = conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), s, p)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, _reference()[0](x, w, b, s, p), **FWD_TOL)


# --- bad input ----------------------------------------------------------------------------------------


def _ok():
    return np.zeros((2, 3, 6, 5), np.float32), np.zeros((4, 3, 3, 3), np.float32), np.zeros(4, np.float32)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: dict(a, x=a["x"][0]), ValueError, "x: expected a 4-D"),
    (lambda a: dict(a, w=a["w"][0]), ValueError, "w: expected a 4-D"),
    (lambda a: dict(a, w=np.zeros((4, 2, 3, 3), np.float32)), ValueError, "w: expected C_in = 3"),
    (lambda a: dict(a, b=np.zeros(5, np.float32)), ValueError, "b: expected shape \\(4,\\)"),
    (lambda a: dict(a, b=np.zeros((4, 1), np.float32)), ValueError, "b: expected a 1-D"),
    (lambda a: dict(a, x=a["x"].astype(np.int32)), TypeError, "x: expected a floating-point"),
    (lambda a: dict(a, w=a["w"].astype(bool)), TypeError, "w: expected a floating-point"),
    (lambda a: dict(a, stride=0), ValueError, "stride"),
    (lambda a: dict(a, stride=(1, -2)), ValueError, "stride"),
    (lambda a: dict(a, stride=1.5), TypeError, "stride"),
    (lambda a: dict(a, padding=-1), ValueError, "padding"),
    (lambda a: dict(a, padding=(0, 1, 2)), TypeError, "padding"),
    (lambda a: dict(a, w=np.zeros((4, 3, 7, 3), np.float32)), ValueError, "w: filter .* larger than the padded input"),
    (lambda a: dict(a, w=np.zeros((4, 3, 7, 3), np.float32), padding=1, version="naive"), None, None),  # fits
    (lambda a: dict(a, x=np.zeros((2, 3, 0, 5), np.float32)), ValueError, "x: expected every dimension"),
    (lambda a: dict(a, version="fast"), ValueError, "version: unknown conv2d version 'fast'"),
    (lambda a: dict(a, out=np.zeros((2, 4, 4, 4), np.float32)), ValueError, "out: expected shape"),
    (lambda a: dict(a, out=np.zeros((2, 4, 4, 3), np.float64)), TypeError, "out: expected float32"),
])
def test_forward_rejects_bad_input(backend, mutate, exc, match):
    x, w, b = _ok()
    args = mutate(dict(x=x, w=w, b=b, stride=1, padding=0))
    out = args.pop("out", None)
    if out is not None and backend != "cpu":
        out = _base.to_device(out)
    if exc is None:
        conv2d(**args, out=out)
        return
    with pytest.raises(exc, match=match):
        conv2d(**args, out=out)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: dict(a, dy=np.zeros((2, 4, 4, 4), np.float32)), ValueError, r"dy: expected shape \(2, 4, 4, 3\)"),
    (lambda a: dict(a, dy=np.zeros((2, 4, 4), np.float32)), ValueError, "dy: expected a 4-D"),
    (lambda a: dict(a, dy=np.zeros((2, 4, 4, 3), np.int64)), TypeError, "dy: expected a floating-point"),
    (lambda a: dict(a, w=np.zeros((4, 2, 3, 3), np.float32)), ValueError, "w: expected C_in = 3"),
    (lambda a: dict(a, x=a["x"][None]), ValueError, "x: expected a 4-D"),
    (lambda a: dict(a, stride=(0, 1)), ValueError, "stride"),
    (lambda a: dict(a, padding=(-1, 0)), ValueError, "padding"),
    (lambda a: dict(a, w=np.zeros((4, 3, 3, 6), np.float32)), ValueError, "w: filter .* larger than the padded input"),
    (lambda a: dict(a, out=(None, None)), TypeError, "out: expected a tuple"),
    (lambda a: dict(a, out=(None, np.zeros((4, 3, 3, 2), np.float32), None)), ValueError, r"out\[1\] \(dw\)"),
    (lambda a: dict(a, out=(np.zeros((2, 3, 6, 5), np.float64), None, None)), TypeError, r"out\[0\] \(dx\)"),
    (lambda a: dict(a, out=(None, None, np.zeros(3, np.float32))), ValueError, r"out\[2\] \(db\)"),
])
def test_backward_rejects_bad_input(backend, mutate, exc, match):
    x, w, _ = _ok()
    args = mutate(dict(dy=np.zeros((2, 4, 4, 3), np.float32), x=x, w=w, stride=1, padding=0))
    out = args.pop("out", None)
    if out is not None and backend != "cpu":
        out = tuple(None if o is None else _base.to_device(o) for o in out)
    with pytest.raises(exc, match=match):
        conv2d_backward(**args, out=out)


def test_launchers_reject_bad_arrays(kernel_backend):
    k = _k()
    from numba import cuda

    x = cuda.to_device(np.zeros((1, 2, 5, 5), np.float32))
    w = cuda.to_device(np.zeros((3, 2, 3, 3), np.float32))
    y = cuda.device_array((1, 3, 3, 3), np.float32)
    with pytest.raises(TypeError, match="x: expected a device array"):
        k.conv2d_forward(np.zeros((1, 2, 5, 5), np.float32), w, None, y, (1, 1), (0, 0))
    with pytest.raises(ValueError, match="y: expected shape"):
        k.conv2d_forward(x, w, None, cuda.device_array((1, 3, 4, 3), np.float32), (1, 1), (0, 0))

    class TorchLike:  # a CUDA array that is not Numba's: np.dtype cannot read its dtype, no copy_to_host
        __cuda_array_interface__ = {}
        dtype, shape = "torch.float32", (1, 2, 5, 5)

    with pytest.raises(TypeError, match=r"x: expected a device array \(Numba's\), got TorchLike; wrap it with "
                                        r"numba.cuda.as_cuda_array"):
        k.conv2d_forward(TorchLike(), w, None, y, (1, 1), (0, 0))
    with pytest.raises(ValueError, match="b: expected shape"):
        k.conv2d_forward(x, w, cuda.device_array(2, np.float32), y, (1, 1), (0, 0), version="naive")
    with pytest.raises(TypeError, match="stride"):
        k.conv2d_forward(x, w, None, y, 1, (0, 0))
    with pytest.raises(ValueError, match="dy: expected shape"):
        k.conv2d_backward_weight(cuda.device_array((1, 3, 2, 3), np.float32), x,
                                 cuda.device_array((3, 2, 3, 3), np.float32), (1, 1), (0, 0))
    with pytest.raises(ValueError, match="db: expected shape"):
        k.conv2d_backward_bias(y, cuda.device_array(4, np.float32))
    with pytest.raises(ValueError, match="w: has 2 input channels"):
        k.conv2d_backward_input(y, w, cuda.device_array((1, 4, 5, 5), np.float32), (1, 1), (0, 0))
