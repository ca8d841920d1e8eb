"""GEMM kernels and the dense layer (gpu_cnn.ops.dense) against float64 NumPy and finite differences.

Every GEMM version runs every layout (op(A) = A or Aᵀ, op(B) = B or Bᵀ) under the simulator on shapes
that are no multiple of any tile (TILE = 16, register tile 128 x 128 x 8), including one-row and
one-column products; the cpu path runs bigger shapes. The simulator costs ~150 µs per thread, so the
kernel-backend shapes stay tiny.
"""
import numpy as np
import pytest

from gpu_cnn.ops import _base
from gpu_cnn.ops.dense import linear, linear_backward

VERSIONS = ("naive", "tiled", "blocktiled", "register_tiled", "split_k", "split_k_ticket")
# The rungs that run the whole layout x shape matrix below; register_tiled and split_k (256 threads and
# several K-steps a block: ~1-2 s a launch under the simulator) run every layout on one odd shape that
# spans several K-steps (and, for split_k, several K-slices) instead.
SMALL_VERSIONS = ("naive", "tiled", "blocktiled")
FAST_VERSIONS = ("register_tiled", "split_k", "split_k_ticket")
LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]
# (M, N, K): odd sizes (K spans two TILEs); a single output row with K = 1; a single output column;
# and a grid of several partial tiles (only two layouts: it costs 6 simulated blocks per launch).
SHAPES = [(13, 7, 19), (1, 5, 1), (3, 1, 21), (33, 17, 1)]
LAYOUT_IDS = {(False, False): "NN", (False, True): "NT", (True, False): "TN", (True, True): "TT"}
CASES = [
    pytest.param(ta, tb, s, id=f"{LAYOUT_IDS[ta, tb]}-{'x'.join(map(str, s))}")
    for s in SHAPES for ta, tb in LAYOUTS if s != (33, 17, 1) or ta == tb
]

# float32 products of K <= 21 terms of size ~1 against float64: a few ulps of the largest partial sum
RTOL, ATOL = 1e-5, 1e-5


def _gemm():
    from gpu_cnn.kernels import gemm  # imported after the backend is chosen (numba.cuda fixes the simulator)

    return gemm


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _stored(rng, rows, cols, trans):
    """A random operand whose op() is (rows, cols): stored transposed when trans is set."""
    return _f32(rng, cols, rows) if trans else _f32(rng, rows, cols)


def test_versions_are_the_ones_tested(kernel_backend):
    assert _gemm().VERSIONS == VERSIONS


# --- the raw GEMM, every version and layout ----------------------------------------------------------


@pytest.mark.parametrize("trans_a,trans_b,shape", CASES)
@pytest.mark.parametrize("version", SMALL_VERSIONS)
def test_gemm_matches_float64_reference(kernel_backend, rng, version, trans_a, trans_b, shape):
    gemm = _gemm()
    m, n, k = shape
    a = _stored(rng, m, k, trans_a)
    b = _stored(rng, k, n, trans_b)
    c = _base.to_device(np.full((m, n), np.nan, np.float32))  # beta = 0: C is never read, NaN must vanish
    gemm.gemm(_base.to_device(a), _base.to_device(b), c, trans_a=trans_a, trans_b=trans_b, version=version)
    got = c.copy_to_host()
    ref = gemm.gemm_reference(a, b, trans_a=trans_a, trans_b=trans_b)
    assert np.all(ref != 0)  # every output is a real sum, so an unwritten element would show
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("version, trans_a, trans_b", [
    pytest.param(v, ta, tb, id=f"{v}-{'T' if ta else 'N'}{'T' if tb else 'N'}")
    for v in FAST_VERSIONS for ta, tb in ((False, False), (True, True))
    if v != "split_k_ticket" or ta])  # split_k_ticket's NN, TN and NT run in its own tests below
def test_fast_gemm_matches_float64_reference(kernel_backend, rng, version, trans_a, trans_b):
    """37 x 29 x 53: no multiple of any tile (128 x 128 x 8, 64 x 64 x 16), 7 (4) K-steps, so both
    shared buffers are used in turn; split_k cuts K into 2 slices here (SK_TARGET_BLOCKS under the sim).
    NN and TT between them take both load paths of each operand (trans_a and trans_b are independent);
    NT and TN run in the linear tests below (forward x·wᵀ, dw = dyᵀ·x) and the multi-block test."""
    gemm = _gemm()
    m, n, k = 37, 29, 53
    if version in ("split_k", "split_k_ticket"):
        assert gemm.split_k_slices(m, n, k)[0] == 2
    a, b = _stored(rng, m, k, trans_a), _stored(rng, k, n, trans_b)
    c = _base.to_device(np.full((m, n), np.nan, np.float32))
    gemm.gemm(_base.to_device(a), _base.to_device(b), c, trans_a=trans_a, trans_b=trans_b, version=version)
    ref = gemm.gemm_reference(a, b, trans_a=trans_a, trans_b=trans_b)
    # K = 53 float32 terms of size ~1 (sums ~7): a few ulps of the largest partial sum
    np.testing.assert_allclose(c.copy_to_host(), ref, rtol=2e-5, atol=2e-5)


def test_split_k_workspace_is_checked_and_used(kernel_backend, rng):
    gemm = _gemm()
    a, b = _base.to_device(_f32(rng, 4, 40)), _base.to_device(_f32(rng, 40, 3))
    c = _base.empty((4, 3))
    need = gemm.split_k_workspace_size(4, 3, 40)
    with pytest.raises(ValueError, match=f"workspace: expected a 1-D float32 array of at least {need}"):
        gemm.gemm(a, b, c, version="split_k", workspace=_base.empty((need - 1,)))
    ws = _base.empty((need,))
    before = _base.allocation_stats()
    gemm.gemm(a, b, c, version="split_k", workspace=ws)
    assert _base.allocation_stats() == before
    np.testing.assert_allclose(c.copy_to_host(), a.copy_to_host().astype(np.float64) @ b.copy_to_host(),
                               rtol=1e-5, atol=1e-5)


def test_dispatcher_picks_split_k_ticket_for_the_dense_layers_and_register_tiled_for_big_products(kernel_backend):
    gemm = _gemm()
    for m, n, k in ((128, 120, 400), (128, 84, 120), (128, 10, 84),  # LeNet-5's dense layers, batch 128
                    (128, 400, 120), (120, 400, 128), (84, 120, 128)):  # their dx and dw
        assert gemm.pick_version(m, n, k) == "split_k_ticket", (m, n, k)
    assert gemm.pick_version(4096, 4096, 4096) == "register_tiled"


# --- split_k_ticket: one launch, the last block of a tile sums the slices; its epilogues ------------


def _slices(gemm, monkeypatch, m, n, k, want):
    monkeypatch.setattr(gemm, "SK_TARGET_BLOCKS", want)
    monkeypatch.setattr(gemm, "SK_MIN_STEPS", 1)
    assert gemm.split_k_slices(m, n, k)[0] == want


def test_split_k_versions_are_bit_identical_run_to_run_at_several_split_counts(kernel_backend, rng, monkeypatch):
    """Both split-K versions sum the partial tiles in slice order: at 2 and 3 K-slices (K = 40 = 2 full
    16-steps + 8, so the last slice is short) two runs of split_k_ticket give the same bits, and at 3
    split_k's two launches give those bits too (whichever block arrives last), each equal
    to the float64 product; the tickets are back at 0 after every launch (reusable, and replayable in
    a CUDA graph, with no clearing launch). One slice is in the epilogue test below."""
    gemm = _gemm()
    m, n, k = 5, 3, 40
    a, b = _f32(rng, m, k), _f32(rng, n, k)
    ref = gemm.gemm_reference(a, b, trans_b=True)
    da, db = _base.to_device(a), _base.to_device(b)
    for slices, versions in ((2, ("split_k_ticket",) * 2), (3, ("split_k_ticket",) * 2 + ("split_k",))):
        _slices(gemm, monkeypatch, m, n, k, slices)
        runs = []
        for version in versions:
            c = _base.to_device(np.full((m, n), np.nan, np.float32))
            gemm.gemm(da, db, c, trans_b=True, version=version)
            runs.append(c.copy_to_host().tobytes())
            assert not gemm._tickets["buf"].copy_to_host().any()
        assert len(set(runs)) == 1, slices
        np.testing.assert_allclose(np.frombuffer(runs[0], np.float32).reshape(m, n), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("trans_a, shape, slices", [(False, (6, 5, 35), 2), (True, (7, 9, 33), 3)],
                         ids=["dx-layout-2-slices", "dw-layout-3-slices"])
def test_split_k_ticket_epilogues_match_float64(kernel_backend, rng, monkeypatch, trans_a, shape, slices):
    """bias + ReLU, op(A) read through a mask (> 0; the mask straddles 0 and has exact zeros), and op(A)'s
    row sums as an extra column, on a linear layer's dx layout (dy · w) and dw layout (dyᵀ · x), with
    several K-slices (one slice: the linear layer tests, where these shapes run as one)."""
    gemm = _gemm()
    m, n, k = shape
    _slices(gemm, monkeypatch, m, n + 1, k, slices)
    a, b = _stored(rng, m, k, trans_a), _f32(rng, k, n)
    mask = _f32(rng, *a.shape)
    mask[0, :2] = 0.0  # exactly 0: masked, like a ReLU output of 0
    bias = _f32(rng, n)
    assert (mask > 0).any() and (mask <= 0).any()
    c = _base.to_device(np.full((m, n), np.nan, np.float32))
    rs = _base.to_device(np.full(m, np.nan, np.float32))
    gemm.gemm_split_k_ticket(*(_base.to_device(v) for v in (a, b)), c, trans_a=trans_a, bias=_base.to_device(bias),
                             relu=True, mask=_base.to_device(mask), rowsum=rs)
    am = np.where(mask > 0, a, 0.0)
    opa = (am.T if trans_a else am).astype(np.float64)
    want = np.maximum(opa @ b + bias, 0.0)
    assert (want == 0).any() and (want > 0).any()  # the ReLU bites
    np.testing.assert_allclose(c.copy_to_host(), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(rs.copy_to_host(), opa.sum(axis=1), rtol=2e-5, atol=2e-5)


def test_split_k_ticket_extras_are_refused_on_other_versions_and_checked(kernel_backend, rng):
    gemm = _gemm()
    a, b, c = _base.to_device(_f32(rng, 4, 5)), _base.to_device(_f32(rng, 5, 3)), _base.empty((4, 3))
    with pytest.raises(ValueError, match="mask: only version 'split_k_ticket'"):
        gemm.linear_backward(a[:, :3], b, _base.to_device(_f32(rng, 3, 3)), None, _base.empty((3, 3)), None,
                             version="tiled", mask=_base.empty((4, 3)))
    with pytest.raises(ValueError, match="mask: expected shape"):
        gemm.gemm_split_k_ticket(a, b, c, mask=_base.empty((5, 4)))
    with pytest.raises(ValueError, match="rowsum: expected shape"):
        gemm.gemm_split_k_ticket(a, b, c, rowsum=_base.empty((3,)))
    # relu on another version: a second launch (kernels.activation), the same result as the epilogue's
    w = _f32(rng, 3, 5)
    want = np.maximum(a.copy_to_host().astype(np.float64) @ w.T, 0.0)
    assert (want == 0).any() and (want > 0).any()
    for version in ("tiled", None):
        gemm.linear_forward(a, _base.to_device(w), None, c, version=version, relu=True)
        np.testing.assert_allclose(c.copy_to_host(), want, rtol=RTOL, atol=ATOL, err_msg=str(version))


def test_linear_relu_and_its_backward_match_float64_in_four_launches(kernel_backend, rng):
    """The fused Linear -> ReLU ops (gpu_cnn.fusion's): y = max(x·wᵀ + b, 0) in one launch; dx, dw and db
    of the ReLU'd output through the stored y in two (db as dw's extra column); against float64."""
    from gpu_cnn.kernels import gemm
    from gpu_cnn.ops import dense

    n, fin, fout = 9, 11, 6
    x, w, b, dy = (_base.to_device(v) for v in (_f32(rng, n, fin), _f32(rng, fout, fin), _f32(rng, fout), _f32(rng, n, fout)))
    y, dx, dw, db = (_base.to_device(np.full(s, np.nan, np.float32)) for s in ((n, fout), (n, fin), (fout, fin), (fout,)))
    calls = []
    real = gemm.gemm_split_k_ticket_kernel
    gemm.gemm_split_k_ticket_kernel = type("Count", (), {"__getitem__": lambda self, cfg: (calls.append(cfg), real[cfg])[1]})()
    try:
        dense.linear_relu(x, w, b, y)
        dense.linear_relu_backward(dy, x, w, y, dx, dw, db)
    finally:
        gemm.gemm_split_k_ticket_kernel = real
    assert len(calls) == 3
    xh, wh, bh, dyh = (v.copy_to_host().astype(np.float64) for v in (x, w, b, dy))
    pre = xh @ wh.T + bh
    assert (pre > 0).any() and (pre < 0).any()
    np.testing.assert_allclose(y.copy_to_host(), np.maximum(pre, 0), rtol=RTOL, atol=ATOL)
    g = np.where(pre > 0, dyh, 0.0)
    for name, got, want in (("dx", dx, g @ wh), ("dw", dw, g.T @ xh), ("db", db, g.sum(axis=0))):
        np.testing.assert_allclose(got.copy_to_host(), want, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("trans_a,trans_b,shape", [(True, False, (130, 3, 2)), (False, True, (3, 130, 2))],
                         ids=["TN-130x3x2", "NT-3x130x2"])
def test_register_tiled_spans_several_blocks(kernel_backend, rng, trans_a, trans_b, shape):
    """Two 128 x 128 block tiles along M, then along N (the shapes above fit in one)."""
    gemm = _gemm()
    m, n, k = shape
    a, b = _stored(rng, m, k, trans_a), _stored(rng, k, n, trans_b)
    c = _base.to_device(np.full((m, n), np.nan, np.float32))
    gemm.gemm(_base.to_device(a), _base.to_device(b), c, trans_a=trans_a, trans_b=trans_b, version="register_tiled")
    ref = gemm.gemm_reference(a, b, trans_a=trans_a, trans_b=trans_b)
    np.testing.assert_allclose(c.copy_to_host(), ref, rtol=RTOL, atol=ATOL)  # K = 2: one rounding each


@pytest.mark.parametrize("version", VERSIONS)
def test_gemm_alpha_beta_bias(kernel_backend, rng, version):
    gemm = _gemm()
    m, n, k = 9, 11, 5
    a, b, c0, bias = _f32(rng, k, m), _f32(rng, n, k), _f32(rng, m, n), _f32(rng, n)
    c = _base.to_device(c0)
    gemm.gemm(_base.to_device(a), _base.to_device(b), c, trans_a=True, trans_b=True, alpha=0.5, beta=-2.0,
              bias=_base.to_device(bias), version=version)
    ref = gemm.gemm_reference(a, b, c0, trans_a=True, trans_b=True, alpha=0.5, beta=-2.0, bias=bias)
    np.testing.assert_allclose(c.copy_to_host(), ref, rtol=RTOL, atol=ATOL)  # a few float32 ulps


def test_bias_grad_kernel_sums_columns(kernel_backend, rng):
    gemm = _gemm()
    dy = _f32(rng, 19, 37)  # more rows than DB_ROWS, more columns than DB_COLS, neither a multiple
    db = _base.to_device(np.full(37, np.nan, np.float32))
    gemm.bias_grad(_base.to_device(dy), db)
    # 19 float32 terms summed in a different order than float64
    np.testing.assert_allclose(db.copy_to_host(), dy.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)


def test_gemm_launcher_rejects_bad_arguments(kernel_backend, rng):
    gemm = _gemm()
    a = _base.to_device(_f32(rng, 4, 3))
    b = _base.to_device(_f32(rng, 5, 2))
    c = _base.to_device(_f32(rng, 4, 2))
    with pytest.raises(ValueError, match="inner dimensions"):
        gemm.gemm(a, b, c)  # 4x3 times 5x2
    with pytest.raises(ValueError, match="c: expected shape"):
        gemm.gemm(a, _base.to_device(_f32(rng, 3, 5)), c)
    with pytest.raises(TypeError, match="a: expected a device array"):
        gemm.gemm(_f32(rng, 4, 5), b, c)
    with pytest.raises(TypeError, match="b: expected dtype float32"):
        gemm.gemm(a, _base.to_device(np.zeros((3, 2), np.float64)), c)
    with pytest.raises(ValueError, match="bias"):
        gemm.gemm(a, _base.to_device(_f32(rng, 3, 2)), c, bias=_base.to_device(_f32(rng, 3)))
    with pytest.raises(ValueError, match="version.*naive, tiled, blocktiled, register_tiled, split_k"):
        gemm.gemm(a, _base.to_device(_f32(rng, 3, 2)), c, version="cublas")


@pytest.mark.parametrize("version", VERSIONS)
def test_gemm_refuses_more_row_blocks_than_a_gpu_grid_holds(kernel_backend, rng, monkeypatch, version):
    """Rows of c run along grid.y (at most 65535 blocks on a GPU; the simulator has no such limit)."""
    gemm = _gemm()
    monkeypatch.setattr(gemm, "MAX_GRID_Y", 1)
    rows = {"blocktiled": gemm.RT_BM, "register_tiled": gemm.RT_BM, "split_k": gemm.SK_BM,
            "split_k_ticket": gemm.SK_BM}.get(version, gemm.TILE) + 1
    # (+ 1: two row blocks)
    a, b = _base.to_device(_f32(rng, rows, 3)), _base.to_device(_f32(rng, 3, 2))
    c = _base.to_device(np.full((rows, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match=f"c: {rows} rows need 2 row blocks.*at most 1"):
        gemm.gemm(a, b, c, version=version)
    monkeypatch.setattr(gemm, "MAX_GRID_Y", 2)  # exactly at the limit: runs
    gemm.gemm(a, b, c, version=version)
    np.testing.assert_allclose(c.copy_to_host(), a.copy_to_host() @ b.copy_to_host(), rtol=1e-5, atol=1e-6)


# --- the dense layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS + (None,))
def test_linear_forward_and_backward_every_version(kernel_backend, rng, version):
    x, w, b, dy = _f32(rng, 5, 13), _f32(rng, 7, 13), _f32(rng, 7), _f32(rng, 5, 7)
    from gpu_cnn.kernels.gemm import linear_backward_reference, linear_forward_reference

    y = linear(x, w, b, version=version)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32  # host in, host out
    np.testing.assert_allclose(y, linear_forward_reference(x, w, b), rtol=RTOL, atol=ATOL)
    dx, dw, db = linear_backward(dy, x, w, version=version)
    for name, got, ref in zip(("dx", "dw", "db"), (dx, dw, db), linear_backward_reference(dy, x, w)):
        assert np.abs(ref).max() > 0.1, name
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("n,fin,fout", [(1, 9, 1), (6, 1, 3)])
@pytest.mark.parametrize("version", SMALL_VERSIONS + (None,))  # None: split_k_ticket, by shape
def test_linear_thin_shapes(kernel_backend, rng, version, n, fin, fout):
    """Batch 1, one input feature, one output feature: grids of a single partial tile."""
    from gpu_cnn.kernels.gemm import linear_backward_reference, linear_forward_reference

    x, w, b, dy = _f32(rng, n, fin), _f32(rng, fout, fin), _f32(rng, fout), _f32(rng, n, fout)
    np.testing.assert_allclose(linear(x, w, b, version=version), linear_forward_reference(x, w, b), rtol=RTOL, atol=ATOL)
    got = linear_backward(dy, x, w, version=version)
    for name, g, r in zip(("dx", "dw", "db"), got, linear_backward_reference(dy, x, w)):
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=ATOL, err_msg=name)


def test_linear_cpu_bigger_shapes(cpu_backend, rng):
    from gpu_cnn.kernels.gemm import linear_backward_reference, linear_forward_reference

    x, w, b, dy = _f32(rng, 128, 400), _f32(rng, 120, 400), _f32(rng, 120), _f32(rng, 128, 120)
    # K = 400 float32 terms of size ~1: sums of ~20, error a few ulps of that
    np.testing.assert_allclose(linear(x, w, b), linear_forward_reference(x, w, b), rtol=1e-4, atol=1e-4)
    for name, g, r in zip(("dx", "dw", "db"), linear_backward(dy, x, w), linear_backward_reference(dy, x, w)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=name)


def test_linear_without_bias(backend, rng):
    x, w, dy = _f32(rng, 3, 6), _f32(rng, 5, 6), _f32(rng, 3, 5)
    np.testing.assert_allclose(linear(x, w), x.astype(np.float64) @ w.T, rtol=RTOL, atol=ATOL)
    dx, dw, db = linear_backward(dy, x, w, bias=False, need_dx=False)
    assert dx is None and db is None
    np.testing.assert_allclose(dw, dy.astype(np.float64).T @ x, rtol=RTOL, atol=ATOL)


def test_linear_float64_host_input_is_computed_in_float32(backend, rng):
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    y = linear(x, w)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)  # float32 rounding of the inputs


# --- finite differences: each gradient on its own ------------------------------------------------------

FD_EPS = 1e-6


def _fd_setup(rng):
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    g = rng.standard_normal((3, 4))  # L = Σ g ⊙ y, so dL/dy = g
    return x, w, b, g


def _loss64(x, w, b, g):
    return float((g * (x @ w.T + b)).sum())


def _numgrad(f, p):
    grad = np.zeros_like(p)
    for i in np.ndindex(p.shape):
        old = p[i]
        p[i] = old + FD_EPS
        up = f()
        p[i] = old - FD_EPS
        down = f()
        p[i] = old
        grad[i] = (up - down) / (2 * FD_EPS)
    return grad


# The op computes in float32 on float32-rounded inputs; central differences in float64 are exact to
# ~1e-9, so the gap is float32 rounding of sums of ~5 terms of size ~1: 1e-5 relative is ample.
def test_linear_dx_matches_finite_differences(backend, rng):
    x, w, b, g = _fd_setup(rng)
    num = _numgrad(lambda: _loss64(x, w, b, g), x)
    dx, _, _ = linear_backward(g.astype(np.float32), x.astype(np.float32), w.astype(np.float32))
    np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-5)


def test_linear_dw_matches_finite_differences(backend, rng):
    x, w, b, g = _fd_setup(rng)
    num = _numgrad(lambda: _loss64(x, w, b, g), w)
    _, dw, _ = linear_backward(g.astype(np.float32), x.astype(np.float32), w.astype(np.float32), need_dx=False)
    np.testing.assert_allclose(dw, num, rtol=1e-5, atol=1e-5)


def test_linear_db_matches_finite_differences(backend, rng):
    x, w, b, g = _fd_setup(rng)
    num = _numgrad(lambda: _loss64(x, w, b, g), b)
    _, _, db = linear_backward(g.astype(np.float32), x.astype(np.float32), w.astype(np.float32), need_dx=False)
    np.testing.assert_allclose(db, num, rtol=1e-5, atol=1e-5)


# --- device arrays, out=, no allocation -------------------------------------------------------------


def test_linear_with_out_makes_no_allocation(kernel_backend, rng):
    """With out= and a workspace (the default version here is split_k_ticket, whose split-K needs
    scratch) nothing is allocated; without the workspace the op's own scratch is allocated once, then
    reused."""
    from gpu_cnn.kernels import gemm
    from gpu_cnn.ops import dense

    assert gemm.pick_version(5, 3, 6) == "split_k_ticket"
    x, w, b, dy = (_base.to_device(a) for a in (_f32(rng, 5, 6), _f32(rng, 3, 6), _f32(rng, 3), _f32(rng, 5, 3)))
    y, dx, dw, db = (_base.empty(s) for s in ((5, 3), (5, 6), (3, 6), (3,)))
    ws = _base.empty((gemm.linear_workspace_size(5, 6, 3),))
    before = _base.allocation_stats()
    got = linear(x, w, b, out=y, workspace=ws)
    grads = linear_backward(dy, x, w, out=(dx, dw, db), workspace=ws)
    none_dx = linear_backward(dy, x, w, out=(None, dw, None), bias=False, need_dx=False, workspace=ws)
    assert _base.allocation_stats() == before
    dense._scratch["buf"] = None
    linear(x, w, b, out=y)  # allocates the op's scratch
    before = _base.allocation_stats()
    linear(x, w, b, out=y)
    linear_backward(dy, x, w, out=(dx, dw, db))
    assert _base.allocation_stats() == before
    assert got is y and all(g is o for g, o in zip(grads, (dx, dw, db)))  # device in, device out
    assert none_dx[0] is None and none_dx[1] is dw and none_dx[2] is None
    xh, wh, bh, dyh = (a.copy_to_host() for a in (x, w, b, dy))
    np.testing.assert_allclose(y.copy_to_host(), xh.astype(np.float64) @ wh.T + bh, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dx.copy_to_host(), dyh.astype(np.float64) @ wh, rtol=RTOL, atol=ATOL)


def test_linear_with_out_on_cpu_writes_in_place(cpu_backend, rng):
    x, w, b, dy = _f32(rng, 5, 6), _f32(rng, 3, 6), _f32(rng, 3), _f32(rng, 5, 3)
    y = np.empty((5, 3), np.float32)
    outs = (np.empty((5, 6), np.float32), np.empty((3, 6), np.float32), np.empty(3, np.float32))
    assert linear(x, w, b, out=y) is y
    got = linear_backward(dy, x, w, out=outs)
    assert all(g is o for g, o in zip(got, outs))


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(), (2, 3), (1, 2, 1)], ids=["1-D", "2x3", "1x2x1"])
def test_linear_any_leading_dims(backend, rng, lead):
    """x (..., in): the product runs on every leading position; dw and db sum over all of them
    (as PyTorch's F.linear and its autograd do)."""
    fin, fout = 5, 3
    x, w, b = _f32(rng, *lead, fin), _f32(rng, fout, fin), _f32(rng, fout)
    dy = _f32(rng, *lead, fout)
    y = linear(x, w, b)
    assert y.shape == lead + (fout,)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    np.testing.assert_allclose(y, x64 @ w.T.astype(np.float64) + b, rtol=RTOL, atol=ATOL)
    dx, dw, db = linear_backward(dy, x, w)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    np.testing.assert_allclose(dx, dy64 @ w.astype(np.float64), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dw, dy64.reshape(-1, fout).T @ x64.reshape(-1, fin), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(db, dy64.reshape(-1, fout).sum(axis=0), rtol=RTOL, atol=ATOL)


def test_linear_rejects_bad_input(backend, rng):
    x, w = _f32(rng, 4, 6), _f32(rng, 3, 6)
    with pytest.raises(ValueError, match=r"x: expected an array of shape \(\.\.\., in_features\), got a 0-D"):
        linear(np.float32(1.0), w)
    with pytest.raises(ValueError, match=r"w: expected in_features = 5 \(x is \(5,\)\)"):
        linear(x[0, :5], w)  # 1-D x is fine (no leading dims); its length must match w
    with pytest.raises(ValueError, match="w: expected a 2-D"):
        linear(x, w[0])
    with pytest.raises(ValueError, match="w: expected in_features = 6"):
        linear(x, _f32(rng, 3, 5))
    with pytest.raises(ValueError, match="b: expected shape"):
        linear(x, w, _f32(rng, 4))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        linear(x.astype(np.int32), w)
    with pytest.raises(ValueError, match="out: expected shape"):
        linear(x, w, out=_base.empty((4, 4)))
    with pytest.raises(TypeError, match="version"):
        linear(x, w, version=2)


def test_linear_backward_rejects_bad_input(backend, rng):
    x, w, dy = _f32(rng, 4, 6), _f32(rng, 3, 6), _f32(rng, 4, 3)
    with pytest.raises(ValueError, match=r"x: expected shape \(3, 6\)"):
        linear_backward(_f32(rng, 3, 3), x, w)  # leading dims of dy and x differ
    with pytest.raises(ValueError, match="dy: expected an array of shape"):
        linear_backward(np.float32(0.0), x, w)
    with pytest.raises(ValueError, match="w: expected out_features = 3"):
        linear_backward(dy, x, _f32(rng, 2, 6))
    with pytest.raises(ValueError, match="x: expected shape"):
        linear_backward(dy, _f32(rng, 5, 6), w)
    with pytest.raises(TypeError, match="out: expected a tuple"):
        linear_backward(dy, x, w, out=_base.empty((4, 6)))
    with pytest.raises(ValueError, match="dw"):
        linear_backward(dy, x, w, out=(None, _base.empty((6, 3)), None))


def test_unknown_version_is_rejected(backend, rng):
    """On cpu too, where the versions do not apply: a typo must not wait for a GPU to show."""
    x, w, dy = _f32(rng, 2, 3), _f32(rng, 4, 3), _f32(rng, 2, 4)
    with pytest.raises(ValueError, match="version: unknown GEMM version 'fast'"):
        linear(x, w, version="fast")
    with pytest.raises(ValueError, match="version: unknown GEMM version 'fast'"):
        linear_backward(dy, x, w, version="fast")
    with pytest.raises(TypeError, match="version: expected a version name"):
        linear(x, w, version=2)


def test_op_versions_are_the_kernel_versions(kernel_backend):
    from gpu_cnn.ops.dense import VERSIONS as OP_VERSIONS

    assert OP_VERSIONS == _gemm().VERSIONS == VERSIONS
