"""Max pooling (gpu_cnn.ops.pool) against float64 NumPy, hand-worked examples and finite differences,
on the cpu backend and the kernel backend (the CUDA simulator by default).

Covered: 2×2 stride 2 (exact fit and cropped), 2×2 stride 1 (overlapping windows: the explainer's worked
example), 3×3 stride 2 padding 1, rectangular 2×3 windows, ties (the first maximum in row-major window
order wins), padding that never wins, NaN, and every bad argument. Both backward versions (``gather``,
the default, and ``atomic``) run on the kernel backend. Under the simulator a thread costs ~150 µs, so
kernel shapes stay at a few hundred elements; larger shapes run on cpu only.
"""
import numpy as np
import pytest
from conftest import KERNEL_BACKEND

import gpu_cnn
from gpu_cnn.ops import _base
from gpu_cnn.ops.pool import max_pool2d, max_pool2d_backward

BACKWARD_VERSIONS = ("gather", "atomic")

# (x shape, kernel_size, stride, padding)
CONFIGS = [
    ((2, 3, 6, 8), 2, None, 0),            # 2×2 stride 2, exact fit (the cpu reshape fast path)
    ((1, 2, 7, 9), 2, 2, 0),               # 2×2 stride 2, odd sizes: last row and column dropped
    ((1, 2, 5, 7), 2, 1, 0),               # 2×2 stride 1: overlapping windows
    ((1, 2, 7, 6), 3, 2, 1),               # 3×3 stride 2 padding 1 (overlapping, padded)
    ((2, 1, 5, 7), (2, 3), (1, 2), (1, 1)),  # rectangular, padded, overlapping in both axes
    ((1, 1, 7, 5), (2, 3), None, 0),       # rectangular, non-overlapping, cropped
    ((1, 1, 1, 3), 3, 1, 1),               # window larger than the image: only padding makes it fit
    ((1, 2, 4, 2), (2, 3), 1, (1, 1)),     # window wider than the image (kw > W)
]
IDS = ["2x2s2", "2x2s2-odd", "2x2s1", "3x3s2p1", "2x3s(1,2)p1", "2x3s(2,3)", "3x3p1-tiny", "2x3p1-narrow"]


def _k():
    from gpu_cnn.kernels import pool as kp  # after the backend is chosen

    return kp


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _norm(k, s, p):
    k = _pair(k)
    return k, k if s is None else _pair(s), _pair(p)


def reference(x, k, s, p):
    """float64 (y, idx) by loops over the windows, written here so cpu tests do not import numba.cuda.

    Padding cells are skipped; the first strict maximum in row-major order wins.
    """
    (kh, kw), (sh, sw), (ph, pw) = _norm(k, s, p)
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y, idx = np.empty((n, c, ho, wo)), np.empty((n, c, ho, wo), np.int64)
    for a, b, i, j in np.ndindex(n, c, ho, wo):
        cells = [(r, q) for r in range(i * sh - ph, i * sh - ph + kh) for q in range(j * sw - pw, j * sw - pw + kw)
                 if 0 <= r < h and 0 <= q < w]
        best = max(range(len(cells)), key=lambda t: (x[a, b][cells[t]], -t))  # first maximum wins
        y[a, b, i, j] = x[a, b][cells[best]]
        idx[a, b, i, j] = cells[best][0] * w + cells[best][1]
    return y, idx


def backward_reference(dy, idx, x_shape):
    dx = np.zeros(x_shape).reshape(x_shape[0], x_shape[1], -1)
    for a, b, i, j in np.ndindex(dy.shape):
        dx[a, b, idx[a, b, i, j]] += dy[a, b, i, j]
    return dx.reshape(x_shape)


def _distinct(rng, shape, gap=1e-2):
    """Values that are all distinct (at least `gap` apart), of both signs: no ties anywhere."""
    x = (rng.permutation(int(np.prod(shape))) - np.prod(shape) / 2) * gap
    x = x.reshape(shape).astype(np.float32)
    assert len(np.unique(x)) == x.size
    return x


def _on_backend(backend, a):
    return a if backend == "cpu" else _base.to_device(np.ascontiguousarray(a))


def _host(a):
    return a if isinstance(a, np.ndarray) else a.copy_to_host()


@pytest.fixture(params=[("cpu", None)] + [(KERNEL_BACKEND, v) for v in BACKWARD_VERSIONS],
                ids=["cpu"] + [f"{KERNEL_BACKEND}-{v}" for v in BACKWARD_VERSIONS])
def backend_version(request):
    """(backend, backward version): cpu once (it has no kernel versions), every version on the kernels."""
    gpu_cnn.set_backend(request.param[0])
    yield request.param
    gpu_cnn.set_backend(KERNEL_BACKEND)


# --- forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,k,s,p", CONFIGS, ids=IDS)
def test_forward_matches_reference(backend, rng, shape, k, s, p):
    x = rng.standard_normal(shape).astype(np.float32)
    assert len(np.unique(x)) == x.size  # no ties: the argmax is unambiguous
    y, idx = max_pool2d(x, k, s, p)
    ry, ridx = reference(x, k, s, p)
    assert isinstance(y, np.ndarray) and isinstance(idx, np.ndarray)  # host in, host out
    assert y.dtype == np.float32 and idx.dtype == np.int32 and y.shape == idx.shape == ry.shape
    np.testing.assert_array_equal(y, ry)  # a selection of float32 values: exact
    np.testing.assert_array_equal(idx, ridx)
    assert (y != 0).all()


def test_kernel_module_reference_agrees(kernel_backend, rng):
    kp = _k()
    for shape, k, s, p in CONFIGS:
        x = rng.standard_normal(shape)
        ky, kidx = kp.max_pool2d_reference(x, *_norm(k, s, p))
        ry, ridx = reference(x, k, s, p)
        np.testing.assert_array_equal(ky, ry)
        np.testing.assert_array_equal(kidx, ridx)
        dy = rng.standard_normal(ry.shape)
        np.testing.assert_allclose(kp.max_pool2d_backward_reference(dy, ridx, shape),
                                   backward_reference(dy, ridx, shape), rtol=1e-15)


@pytest.mark.parametrize("shape,k,s,p", [((16, 6, 28, 28), 2, None, 0), ((4, 5, 21, 19), 3, 2, 1),
                                         ((3, 4, 13, 17), (2, 3), 1, (1, 0))], ids=["lenet1", "3x3s2p1", "2x3s1"])
def test_cpu_forward_and_backward_on_larger_shapes(cpu_backend, rng, shape, k, s, p):
    x = rng.standard_normal(shape).astype(np.float32)
    y, idx = max_pool2d(x, k, s, p)
    ry, ridx = reference(x, k, s, p)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(idx, ridx)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = max_pool2d_backward(dy, idx, shape, k, s, p)
    # sums of at most ceil(k/s)^2 float32 values in a different order than float64
    np.testing.assert_allclose(dx, backward_reference(dy, ridx, shape), rtol=1e-6, atol=1e-6)


# --- the explainer -----------------------------------------------------------------------------------


def test_explainer_conv_relu_then_2x2_stride1_pooling(backend):
    # The explainer's 5×5 image and 3×3 filter; the 3×3 feature map (cross-correlation, stride 1, no
    # padding), each entry the sum of nine products written out by hand.
    image = np.array([[1, 2, 0, 3, 1], [4, 1, 1, 0, 0], [1, 2, 2, 4, 1], [3, 0, 1, 2, 3], [2, 3, 0, 1, 2]], np.float64)
    kern = np.array([[0.2, -0.5, 0.3], [-0.1, 0.4, 0.7], [0.6, -0.2, 0.1]])
    m00 = 1*0.2 + 2*(-0.5) + 0*0.3 + 4*(-0.1) + 1*0.4 + 1*0.7 + 1*0.6 + 2*(-0.2) + 2*0.1  # noqa: E226
    m01 = 2*0.2 + 0*(-0.5) + 3*0.3 + 1*(-0.1) + 1*0.4 + 0*0.7 + 2*0.6 + 2*(-0.2) + 4*0.1  # noqa: E226
    m02 = 0*0.2 + 3*(-0.5) + 1*0.3 + 1*(-0.1) + 0*0.4 + 0*0.7 + 2*0.6 + 4*(-0.2) + 1*0.1  # noqa: E226
    m10 = 4*0.2 + 1*(-0.5) + 1*0.3 + 1*(-0.1) + 2*0.4 + 2*0.7 + 3*0.6 + 0*(-0.2) + 1*0.1  # noqa: E226
    m11 = 1*0.2 + 1*(-0.5) + 0*0.3 + 2*(-0.1) + 2*0.4 + 4*0.7 + 0*0.6 + 1*(-0.2) + 2*0.1  # noqa: E226
    m12 = 1*0.2 + 0*(-0.5) + 0*0.3 + 2*(-0.1) + 4*0.4 + 1*0.7 + 1*0.6 + 2*(-0.2) + 3*0.1  # noqa: E226
    m20 = 1*0.2 + 2*(-0.5) + 2*0.3 + 3*(-0.1) + 0*0.4 + 1*0.7 + 2*0.6 + 3*(-0.2) + 0*0.1  # noqa: E226
    m21 = 2*0.2 + 2*(-0.5) + 4*0.3 + 0*(-0.1) + 1*0.4 + 2*0.7 + 3*0.6 + 0*(-0.2) + 1*0.1  # noqa: E226
    m22 = 2*0.2 + 4*(-0.5) + 1*0.3 + 1*(-0.1) + 2*0.4 + 3*0.7 + 0*0.6 + 1*(-0.2) + 2*0.1  # noqa: E226
    fmap = np.array([[m00, m01, m02], [m10, m11, m12], [m20, m21, m22]])
    # the sums by hand agree with a sliding-window cross-correlation, and read as the explainer prints them
    windows = np.lib.stride_tricks.sliding_window_view(image, (3, 3))
    np.testing.assert_allclose(fmap, np.einsum("ijkl,kl->ij", windows, kern), rtol=1e-12)
    np.testing.assert_allclose(fmap, [[0.3, 2.8, -0.8], [4.6, 3.1, 2.8], [0.8, 4.3, 1.5]], atol=1e-12)

    from gpu_cnn.ops.activation import relu

    r = relu(fmap[None, None])  # (1, 1, 3, 3) float32
    r00, r01, r02 = max(m00, 0), max(m01, 0), max(m02, 0)
    r10, r11, r12 = max(m10, 0), max(m11, 0), max(m12, 0)
    r20, r21, r22 = max(m20, 0), max(m21, 0), max(m22, 0)
    assert m02 < 0 and r02 == 0  # ReLU clears the one negative entry
    np.testing.assert_allclose(r[0, 0], [[r00, r01, r02], [r10, r11, r12], [r20, r21, r22]], rtol=1e-7)

    pool, idx = max_pool2d(r, kernel_size=2, stride=1)
    expected = np.array([[max(r00, r01, r10, r11), max(r01, r02, r11, r12)],
                         [max(r10, r11, r20, r21), max(r11, r12, r21, r22)]])
    np.testing.assert_allclose(expected, [[4.6, 3.1], [4.6, 4.3]], atol=1e-12)
    np.testing.assert_allclose(pool[0, 0], expected, rtol=1e-7)  # float32 rounding of the map
    # where each maximum sits in the 3×3 map: 4.6 at (1, 0) wins two windows, 3.1 at (1, 1), 4.3 at (2, 1)
    np.testing.assert_array_equal(idx[0, 0], [[1 * 3 + 0, 1 * 3 + 1], [1 * 3 + 0, 2 * 3 + 1]])

    # backward: the two windows that share 4.6 both route their gradient to (1, 0)
    dpool = np.array([[[[1.0, 2.0], [4.0, 8.0]]]], np.float32)
    dr = max_pool2d_backward(dpool, idx, r.shape, kernel_size=2, stride=1)
    np.testing.assert_array_equal(dr[0, 0], [[0, 0, 0], [1 + 4, 2, 0], [0, 8, 0]])


def _explainer_max_pool(fmap, size=2, stride=2):
    """The explainer's pooling code: slide a size×size window with the given stride, keep the max."""
    rows = (fmap.shape[0] - size) // stride + 1
    cols = (fmap.shape[1] - size) // stride + 1
    out = np.zeros((rows, cols))
    for i in range(rows):
        for j in range(cols):
            out[i, j] = np.max(fmap[i * stride:i * stride + size, j * stride:j * stride + size])
    return out


def test_explainer_code_2x2_stride2(backend, rng):
    # five 8×8 maps after ReLU (the digit "2" notebook): pooling halves them to 4×4
    maps = np.maximum(_distinct(rng, (1, 5, 8, 8)), 0)
    pool, idx = max_pool2d(maps, kernel_size=2, stride=2)
    assert pool.shape == (1, 5, 4, 4)
    for c in range(5):
        np.testing.assert_array_equal(pool[0, c], _explainer_max_pool(maps[0, c]))
        # idx points at the value it reports
        np.testing.assert_array_equal(maps[0, c].reshape(-1)[idx[0, c]], pool[0, c])
    assert (pool > 0).any()


# --- ties, padding, NaN ----------------------------------------------------------------------------


def test_ties_first_row_major_maximum_wins(backend):
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 0:2, 0:2] = [[5, 5], [5, 5]]  # all four tie: (0, 0)
    x[0, 0, 0:2, 2:4] = [[1, 3], [3, 2]]  # (0, 3) and (1, 2) tie: (0, 3) comes first
    x[0, 0, 2:4, 0:2] = [[0, 0], [7, 7]]  # (3, 0) and (3, 1) tie: (3, 0)
    x[0, 0, 2:4, 2:4] = [[-1, -2], [-3, -1]]  # (2, 2) and (3, 3) tie: (2, 2)
    y, idx = max_pool2d(x, 2)
    np.testing.assert_array_equal(y[0, 0], [[5, 3], [7, -1]])
    np.testing.assert_array_equal(idx[0, 0], [[0 * 4 + 0, 0 * 4 + 3], [3 * 4 + 0, 2 * 4 + 2]])
    dx = max_pool2d_backward(np.ones((1, 1, 2, 2), np.float32), idx, x.shape, 2)
    assert dx.sum() == 4 and dx[0, 0, 0, 0] == dx[0, 0, 0, 3] == dx[0, 0, 3, 0] == dx[0, 0, 2, 2] == 1


def test_ties_in_overlapping_and_padded_windows(backend):
    x = np.full((1, 1, 3, 4), 2.0, np.float32)  # every cell ties
    y, idx = max_pool2d(x, 2, 1)
    # each window's top-left cell: (i, j) -> i*4 + j
    np.testing.assert_array_equal(idx[0, 0], [[0, 1, 2], [4, 5, 6]])
    y, idx = max_pool2d(x, 3, 2, 1)
    # padded windows start at row/col -1: their first REAL cell is (max(2i-1, 0), max(2j-1, 0))
    np.testing.assert_array_equal(idx[0, 0], [[0 * 4 + 0, 0 * 4 + 1], [1 * 4 + 0, 1 * 4 + 1]])
    np.testing.assert_array_equal(y, 2.0)


def test_padding_never_wins(backend, rng):
    # all negative: were padding a 0, every padded window would return 0
    x = -(np.abs(_distinct(rng, (2, 2, 5, 6))) + 0.5)
    assert (x < 0).all()
    y, idx = max_pool2d(x, 3, 2, 1)
    ry, ridx = reference(x, 3, 2, 1)
    assert (y < 0).all()
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(idx, ridx)
    assert idx.min() >= 0 and idx.max() < 5 * 6


def test_minus_infinity_beside_padding_points_at_a_real_cell(backend):
    x = np.full((1, 1, 3, 3), -np.inf, np.float32)
    x[0, 0, 2, 2] = -1.0
    y, idx = max_pool2d(x, 3, 2, 1)  # 2×2 windows of 3×3 starting at -1
    np.testing.assert_array_equal(y[0, 0], [[-np.inf, -np.inf], [-np.inf, -1.0]])
    np.testing.assert_array_equal(idx[0, 0], [[0, 1], [3, 8]])  # each window's first real cell, else the max
    y, idx = max_pool2d(np.full((1, 1, 3, 1), -np.inf, np.float32), 3, 1, 1)  # window wider than the image
    np.testing.assert_array_equal(idx[0, 0, :, 0], [0, 0, 1])  # rows h-1 .. h+1: first real row max(h-1, 0)


def test_nan_wins_its_window(backend):
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 1, 0] = np.nan
    x[0, 0, 0, 3] = np.nan
    x[0, 0, 1, 2] = np.nan  # a second NaN in the same window: the first one wins
    y, idx = max_pool2d(x, 2)
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[0, 0, 0, 1])
    np.testing.assert_array_equal(y[0, 0, 1], [13, 15])
    np.testing.assert_array_equal(idx[0, 0], [[1 * 4 + 0, 0 * 4 + 3], [3 * 4 + 1, 3 * 4 + 3]])


def test_nan_in_a_padded_window(backend, rng):
    x = _distinct(rng, (1, 2, 3, 3))
    x[0, 1, 2, 2] = np.nan  # only the bottom-right window of 3×3 stride 2 padding 1 holds (2, 2)
    y, idx = max_pool2d(x, 3, 2, 1)
    assert np.isnan(y[0, 1, 1, 1]) and idx[0, 1, 1, 1] == 2 * 3 + 2
    ry, ridx = reference(np.nan_to_num(x, nan=-np.inf), 3, 2, 1)
    keep = ~np.isnan(y)
    np.testing.assert_array_equal(y[keep], ry[keep])
    np.testing.assert_array_equal(idx[keep], ridx[keep])


# --- backward ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,k,s,p", CONFIGS, ids=IDS)
def test_backward_matches_reference(backend_version, rng, shape, k, s, p):
    backend, version = backend_version
    x = _distinct(rng, shape)
    _, idx = max_pool2d(x, k, s, p)
    dy = rng.standard_normal(idx.shape).astype(np.float32)
    dx = max_pool2d_backward(dy, idx, shape, k, s, p, version=version)
    assert isinstance(dx, np.ndarray) and dx.dtype == np.float32 and dx.shape == shape
    # float32 sums of at most ceil(k/s)^2 terms against float64
    np.testing.assert_allclose(dx, backward_reference(dy, idx, shape), rtol=1e-6, atol=1e-6)
    assert (dx == 0).any() and (dx != 0).any()


def test_backward_writes_dx_in_full(backend_version, rng):
    """out starts as NaN: every element must be written, 0 where no window's maximum sits."""
    backend, version = backend_version
    shape = (1, 2, 5, 7)
    for k, s, p in [(2, 2, 0), (3, 2, 1)]:
        x = _distinct(rng, shape)
        _, idx = max_pool2d(x, k, s, p)
        dy = rng.standard_normal(idx.shape).astype(np.float32)
        dx = _on_backend(backend, np.full(shape, np.nan, np.float32))
        max_pool2d_backward(dy, _on_backend(backend, idx), shape, k, s, p, out=dx, version=version)
        dx = _host(dx)
        assert not np.isnan(dx).any()
        np.testing.assert_allclose(dx, backward_reference(dy, idx, shape), rtol=1e-6, atol=1e-6)


FD_EPS = 1e-6


@pytest.mark.parametrize("k,s,p", [(2, 1, 0), (3, 2, 1), ((2, 3), (2, 1), (1, 1))], ids=["2x2s1", "3x3s2p1", "2x3"])
def test_backward_matches_finite_differences(backend_version, rng, k, s, p):
    backend, version = backend_version
    shape = (1, 2, 5, 6)
    x = _distinct(rng, shape).astype(np.float64)  # values 1e-2 apart >> eps: no argmax flips
    g = rng.standard_normal(reference(x, k, s, p)[0].shape)  # L = Σ g ⊙ pool(x)
    num = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + FD_EPS
        up = (g * reference(x, k, s, p)[0]).sum()
        x[i] = old - FD_EPS
        down = (g * reference(x, k, s, p)[0]).sum()
        x[i] = old
        num[i] = (up - down) / (2 * FD_EPS)
    _, idx = max_pool2d(x.astype(np.float32), k, s, p)
    dx = max_pool2d_backward(g.astype(np.float32), idx, shape, k, s, p, version=version)
    # dx: float32 sums of a few g (1e-7 relative); the central difference of a locally linear function
    # is exact up to float64 cancellation (~1e-9)
    np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-6)
    assert (num != 0).any() and (num == 0).any()


def test_backward_accepts_host_indices_of_any_integer_dtype(backend, rng):
    x = _distinct(rng, (1, 2, 4, 6))
    _, idx = max_pool2d(x, 2)
    dy = rng.standard_normal(idx.shape).astype(np.float32)
    a = max_pool2d_backward(dy, idx, x.shape, 2)
    b = max_pool2d_backward(dy, idx.astype(np.int64), x.shape, 2)
    np.testing.assert_array_equal(a, b)


# --- out=, device arrays -----------------------------------------------------------------------------


def test_device_arrays_with_out_make_no_allocation(kernel_backend, rng):
    shape = (2, 3, 5, 7)
    x = _distinct(rng, shape)
    xd = _base.to_device(x)
    y, idx = _base.empty((2, 3, 2, 3)), _base.empty((2, 3, 2, 3), np.int32)
    dx = _base.empty(shape)
    before = _base.allocation_stats()
    ry, ridx = max_pool2d(xd, 2, out=(y, idx))
    for version in BACKWARD_VERSIONS:
        out = max_pool2d_backward(y, idx, shape, 2, out=dx, version=version)  # dy = y, any float32 will do
    assert _base.allocation_stats() == before
    assert ry is y and ridx is idx and out is dx  # device in, device out
    ey, eidx = reference(x, 2, None, 0)
    np.testing.assert_array_equal(y.copy_to_host(), ey)
    np.testing.assert_array_equal(idx.copy_to_host(), eidx)
    np.testing.assert_allclose(dx.copy_to_host(), backward_reference(ey, eidx, shape), rtol=1e-6)


def test_out_on_the_host(cpu_backend, rng):
    x = _distinct(rng, (2, 3, 6, 6))
    y, idx = np.empty((2, 3, 2, 2), np.float32), np.empty((2, 3, 2, 2), np.int32)
    ry, ridx = max_pool2d(x, 3, out=(y, idx))
    assert ry is y and ridx is idx
    dx = np.empty(x.shape, np.float32)
    assert max_pool2d_backward(y, idx, x.shape, 3, out=dx) is dx
    np.testing.assert_allclose(dx, backward_reference(y, idx, x.shape), rtol=1e-6)


# --- bad inputs --------------------------------------------------------------------------------------


def test_forward_bad_inputs_raise_clear_errors(backend):
    x = np.ones((1, 2, 5, 5), np.float32)
    with pytest.raises(ValueError, match="x"):
        max_pool2d(np.ones((5, 5), np.float32))  # rank 2 (rank 3 is an unbatched (C, H, W) image)
    with pytest.raises(TypeError, match="x"):
        max_pool2d(np.ones((1, 2, 5, 5), np.int32))
    with pytest.raises(ValueError, match="kernel_size"):
        max_pool2d(x, 0)
    with pytest.raises(ValueError, match="kernel_size"):
        max_pool2d(x, (2, 0))
    with pytest.raises(TypeError, match="kernel_size"):
        max_pool2d(x, (2, 2, 2))
    with pytest.raises(TypeError, match="kernel_size"):
        max_pool2d(x, 2.0)
    with pytest.raises(ValueError, match="stride"):
        max_pool2d(x, 2, 0)
    with pytest.raises(ValueError, match="padding"):
        max_pool2d(x, 2, 1, -1)
    with pytest.raises(ValueError, match="padding"):
        max_pool2d(x, 3, 1, 2)  # more than kernel_size // 2
    with pytest.raises(ValueError, match="padding"):
        max_pool2d(x, (2, 3), 1, (1, 2))
    with pytest.raises(ValueError, match="kernel_size"):
        max_pool2d(x, 6)  # window larger than the input
    with pytest.raises(ValueError, match="kernel_size"):
        max_pool2d(np.ones((1, 1, 1, 5), np.float32), (4, 2), 1, (1, 0))  # larger than the padded input (3 rows)
    y, idx = _base.empty((1, 2, 2, 2)), _base.empty((1, 2, 2, 2), np.int32)
    with pytest.raises(TypeError, match="out"):
        max_pool2d(x, 2, out=y)  # not a tuple
    with pytest.raises(TypeError, match="idx"):
        max_pool2d(x, 2, out=(y, _base.empty((1, 2, 2, 2))))  # float32 indices
    with pytest.raises(ValueError, match="idx"):
        max_pool2d(x, 2, out=(y, _base.empty((1, 2, 2, 3), np.int32)))
    with pytest.raises(ValueError, match="y"):
        max_pool2d(x, 2, out=(_base.empty((1, 2, 3, 2)), idx))


def test_backward_bad_inputs_raise_clear_errors(backend):
    shape = (1, 2, 5, 5)
    dy = np.ones((1, 2, 2, 2), np.float32)
    idx = np.zeros((1, 2, 2, 2), np.int32)
    with pytest.raises(ValueError, match="dy"):
        max_pool2d_backward(np.ones((1, 2, 2, 3), np.float32), idx, shape, 2)
    with pytest.raises(ValueError, match="dy"):
        max_pool2d_backward(dy, idx, shape, 2, 1)  # stride 1 implies a 4×4 output
    with pytest.raises(ValueError, match="dy"):
        max_pool2d_backward(np.ones((2, 2, 2), np.float32), idx, shape, 2)  # rank 3
    with pytest.raises(TypeError, match="dy"):
        max_pool2d_backward(dy.astype(np.int32), idx, shape, 2)
    with pytest.raises(ValueError, match="idx"):
        max_pool2d_backward(dy, np.zeros((1, 2, 3, 2), np.int32), shape, 2)
    with pytest.raises(TypeError, match="idx"):
        max_pool2d_backward(dy, idx.astype(np.float32), shape, 2)
    with pytest.raises(TypeError, match="idx"):
        max_pool2d_backward(dy, None, shape, 2)
    with pytest.raises(TypeError, match="x_shape"):
        max_pool2d_backward(dy, idx, (5, 5), 2)  # (C, H, W) is an unbatched image; 2 entries are nothing
    with pytest.raises(ValueError, match="x_shape"):
        max_pool2d_backward(dy, idx, (1, 2, 0, 5), 2)
    with pytest.raises(ValueError, match="kernel_size"):
        max_pool2d_backward(dy, idx, shape, 0)
    with pytest.raises(ValueError, match="stride"):
        max_pool2d_backward(dy, idx, shape, 2, 0)
    with pytest.raises(ValueError, match="padding"):
        max_pool2d_backward(dy, idx, shape, 2, 2, -1)
    with pytest.raises(ValueError, match="padding"):
        max_pool2d_backward(dy, idx, shape, 2, 2, 2)
    with pytest.raises(ValueError, match="kernel_size"):
        max_pool2d_backward(dy, idx, shape, 6)
    with pytest.raises(ValueError, match="out"):
        max_pool2d_backward(dy, idx, shape, 2, out=_base.empty((1, 2, 5, 4)))
    with pytest.raises(TypeError, match="version"):
        max_pool2d_backward(dy, idx, shape, 2, version=1)


def test_backward_rejects_out_of_range_indices_on_cpu(cpu_backend):
    dy = np.ones((1, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="idx"):
        max_pool2d_backward(dy, np.full((1, 1, 2, 2), 16, np.int32), (1, 1, 4, 4), 2)
    with pytest.raises(ValueError, match="idx"):
        max_pool2d_backward(dy, np.full((1, 1, 2, 2), -1, np.int32), (1, 1, 4, 4), 2)


def test_kernel_dispatcher_and_launchers_check_their_arguments(kernel_backend):
    kp = _k()
    dy = _base.to_device(np.ones((1, 2, 2, 2), np.float32))
    idx = _base.to_device(np.zeros((1, 2, 2, 2), np.int32))
    dx = _base.empty((1, 2, 4, 4))
    with pytest.raises(ValueError, match="version.*gather.*atomic"):
        kp.max_pool2d_backward(dy, idx, dx, (2, 2), (2, 2), (0, 0), version="scatter")
    with pytest.raises(ValueError, match="version"):
        max_pool2d_backward(dy, idx, (1, 2, 4, 4), 2, version="scatter")
    with pytest.raises(TypeError, match="idx"):
        kp.max_pool2d_backward(dy, dy, dx, (2, 2), (2, 2), (0, 0))  # float32 indices
    with pytest.raises(TypeError, match="idx"):
        max_pool2d_backward(dy, dy, (1, 2, 4, 4), 2)  # float32 device indices through the op
    with pytest.raises(ValueError, match="dy"):
        kp.max_pool2d_backward(dy, idx, dx, (2, 2), (1, 1), (0, 0))
    with pytest.raises(ValueError, match="padding"):
        kp.max_pool2d_forward(dx, _base.empty((1, 2, 2, 2)), idx, (2, 2), (2, 2), (2, 2))
    with pytest.raises(TypeError, match="x"):
        kp.max_pool2d_forward(np.ones((1, 2, 4, 4), np.float32), _base.empty((1, 2, 2, 2)), idx, (2, 2), (2, 2), (0, 0))
    with pytest.raises(TypeError, match="idx"):
        kp.max_pool2d_forward(dx, _base.empty((1, 2, 2, 2)), dy, (2, 2), (2, 2), (0, 0))


def test_backward_checks_host_indices_against_their_windows_on_every_backend(backend, rng):
    """Host idx are checked before the cast to int32 and before any kernel: out of range, outside its own
    window, or wrapping in the int32 cast, each is refused on cpu and on the kernels alike."""
    x = _distinct(rng, (1, 2, 4, 6))
    _, idx = max_pool2d(x, 2)
    dy = rng.standard_normal(idx.shape).astype(np.float32)
    for bad, match in [(np.full_like(idx, 99), r"idx: indices must lie in \[0, H\*W\) = \[0, 24\), found 99"),
                       (np.full_like(idx, -1), "found -1"),
                       (idx.astype(np.int64) + 2**32, r"found 4294967"),
                       (np.zeros_like(idx), r"idx\[0, 0, 0, 1\] = 0 \(row 0, column 0\) is outside that output's "
                                            r"window \(rows 0..1, columns 2..3\)")]:
        for version in ("gather", "atomic"):
            with pytest.raises(ValueError, match=match):
                max_pool2d_backward(dy, bad, x.shape, 2, version=version)
    with pytest.raises(ValueError, match="version: unknown max-pool backward version 'scater'"):
        max_pool2d_backward(dy, idx, x.shape, 2, version="scater")  # on cpu too, where versions do not apply


def test_op_versions_are_the_kernel_versions(kernel_backend):
    from gpu_cnn.ops.pool import BACKWARD_VERSIONS as OP_VERSIONS

    assert OP_VERSIONS == _k().VERSIONS == BACKWARD_VERSIONS


def test_check_idx_false_skips_only_the_window_pass(cpu_backend, rng):
    """check_idx=False (what nn.MaxPool2d passes for its own idx) gives the same dx for valid idx; the
    range check stays (before the int32 cast, which could wrap int64 indices)."""
    x = _distinct(rng, (2, 3, 6, 6))
    _, idx = max_pool2d(x, 3, 2, 1)
    dy = rng.standard_normal(idx.shape).astype(np.float32)
    np.testing.assert_array_equal(max_pool2d_backward(dy, idx, x.shape, 3, 2, 1, check_idx=False),
                                  max_pool2d_backward(dy, idx, x.shape, 3, 2, 1))
    with pytest.raises(ValueError, match="found 4294967"):
        max_pool2d_backward(dy, idx.astype(np.int64) + 2**32, x.shape, 3, 2, 1, check_idx=False)
    with pytest.raises(ValueError, match="found -1"):
        max_pool2d_backward(dy, np.full_like(idx, -1), x.shape, 3, 2, 1, check_idx=False)


# --- PyTorch's other pooling arguments: dilation, ceil_mode, avg_pool2d, adaptive_avg_pool2d, unbatched ----
# Against PyTorch float64 (tests/data/torch_layers.npz, from tests/data/make_torch_layers.py), forward
# and backward, on cpu and on the kernel backend (shapes tiny and odd: every window kind once).

from pathlib import Path  # noqa: E402

from gpu_cnn import nn  # noqa: E402
from gpu_cnn.ops.pool import (  # noqa: E402
    adaptive_avg_pool2d, adaptive_avg_pool2d_backward, avg_pool2d, avg_pool2d_backward,
)

TORCH = np.load(Path(__file__).parent / "data" / "torch_layers.npz")
MAXPOOL_KW = {
    "dil2": dict(kernel_size=3, stride=2, padding=1, dilation=2),
    "ceil": dict(kernel_size=2, stride=2, ceil_mode=True),
    "ceil-pad-s2": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    "dil-ceil": dict(kernel_size=(2, 3), stride=(2, 3), padding=(1, 0), dilation=(2, 1), ceil_mode=True),
    "unbatched": dict(kernel_size=3, stride=1, padding=1),
}
AVGPOOL_KW = {
    "k3s2p1": dict(kernel_size=3, stride=2, padding=1),
    "k3s2p1-nopad": dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
    "ceil": dict(kernel_size=2, stride=2, ceil_mode=True),
    "ceil-pad": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    "ceil-pad-nopad": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    "rect": dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1)),
    "unbatched": dict(kernel_size=2),
}
ADAPTIVE_SIZE = {"global": 1, "3x2": (3, 2), "upsample": (5, 4), "none-axis": (4, None), "unbatched": (2, 4)}
# sums of at most 9 float32 values against float64
POOL_TOL = dict(rtol=1e-6, atol=1e-6)


def _torch(kind, name):
    return {k.split("/")[2]: TORCH[k] for k in TORCH if k.startswith(f"{kind}/{name}/")}


def test_torch_cases_are_what_they_claim():
    assert set(MAXPOOL_KW) == {k.split("/")[1] for k in TORCH if k.startswith("maxpool/")}
    assert set(AVGPOOL_KW) == {k.split("/")[1] for k in TORCH if k.startswith("avgpool/")}
    assert set(ADAPTIVE_SIZE) == {k.split("/")[1] for k in TORCH if k.startswith("adaptive/")}
    # ceil_mode adds a partial window in these cases (else they would test nothing new)
    for kind, kw_of in (("maxpool", MAXPOOL_KW), ("avgpool", AVGPOOL_KW)):
        for name, kw in kw_of.items():
            if kw.get("ceil_mode"):
                c = _torch(kind, name)
                k, s, p = (pair(kw.get(a, d)) for a, d in (("kernel_size", 1), ("stride", kw["kernel_size"]),
                                                           ("padding", 0)))
                d = pair(kw.get("dilation", 1))
                floor = [(c["x"].shape[2 + a] + 2 * p[a] - d[a] * (k[a] - 1) - 1) // s[a] + 1 for a in (0, 1)]
                assert list(c["y"].shape[2:]) != floor, (kind, name)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize("name", sorted(MAXPOOL_KW))
def test_max_pool_dilation_ceil_unbatched_match_pytorch(backend, name):
    c, kw = _torch("maxpool", name), MAXPOOL_KW[name]
    y, idx = max_pool2d(c["x"], **kw)
    np.testing.assert_array_equal(y, c["y"].astype(np.float32))  # a max is exact
    np.testing.assert_array_equal(idx, c["idx"])  # PyTorch's flat h*W + w in the plane, as ours
    dx = max_pool2d_backward(c["dy"], idx, c["x"].shape, **kw)
    np.testing.assert_allclose(dx, c["dx"], **POOL_TOL)


@pytest.mark.parametrize("name", sorted(AVGPOOL_KW))
def test_avg_pool_matches_pytorch(backend, name):
    c, kw = _torch("avgpool", name), AVGPOOL_KW[name]
    y = avg_pool2d(c["x"], **kw)
    np.testing.assert_allclose(y, c["y"], **POOL_TOL)
    dx = avg_pool2d_backward(c["dy"], c["x"].shape, **kw)
    np.testing.assert_allclose(dx, c["dx"], **POOL_TOL)


@pytest.mark.parametrize("name", sorted(ADAPTIVE_SIZE))
def test_adaptive_avg_pool_matches_pytorch(backend, name):
    c = _torch("adaptive", name)
    y = adaptive_avg_pool2d(c["x"], ADAPTIVE_SIZE[name])
    np.testing.assert_allclose(y, c["y"], **POOL_TOL)
    dx = adaptive_avg_pool2d_backward(c["dy"], c["x"].shape)
    np.testing.assert_allclose(dx, c["dx"], **POOL_TOL)


def test_pool_layers_match_pytorch(backend):
    c, kw = _torch("avgpool", "ceil-pad-nopad"), AVGPOOL_KW["ceil-pad-nopad"]
    for layer, case in ((nn.AvgPool2d(**kw), c), (nn.AdaptiveAvgPool2d((3, 2)), _torch("adaptive", "3x2")),
                        (nn.MaxPool2d(**MAXPOOL_KW["dil-ceil"]), _torch("maxpool", "dil-ceil"))):
        model = nn.Sequential(layer)
        model.requires_input_grad = True
        np.testing.assert_allclose(model.forward(case["x"]), case["y"], **POOL_TOL)
        assert layer.output_shape(case["x"].shape[1:]) == case["y"].shape[1:]
        np.testing.assert_allclose(model.backward(case["dy"]), case["dx"], **POOL_TOL)
        assert nn.from_spec(layer.spec()).spec() == layer.spec()


def test_new_pool_arguments_refused_clearly(cpu_backend):
    x = np.ones((1, 2, 5, 5), np.float32)
    with pytest.raises(ValueError, match="dilation"):
        max_pool2d(x, 2, dilation=0)
    with pytest.raises(TypeError, match="ceil_mode"):
        max_pool2d(x, 2, ceil_mode=1)
    with pytest.raises(ValueError, match="kernel_size: window .* with dilation"):
        max_pool2d(x, 3, dilation=3)
    with pytest.raises(ValueError, match="divisor_override: not supported"):
        avg_pool2d(x, 2, divisor_override=3)
    with pytest.raises(ValueError, match="padding"):
        avg_pool2d(x, 2, padding=2)
    with pytest.raises(ValueError, match="output_size"):
        adaptive_avg_pool2d(x, 0)
    with pytest.raises(ValueError, match="3-D pooling"):
        avg_pool2d(x[None], 2)
    with pytest.raises(AttributeError, match="3-D pooling are not supported"):
        nn.MaxPool3d
    with pytest.raises(ValueError, match="return_indices: not supported"):
        nn.MaxPool2d(2, return_indices=True)
    with pytest.raises(ValueError, match="idx"):  # a dilated window holds every other cell only
        max_pool2d_backward(np.ones((1, 2, 1, 1), np.float32), np.full((1, 2, 1, 1), 1, np.int32), (1, 2, 3, 3),
                            2, 1, 0, dilation=2)
