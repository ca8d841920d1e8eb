"""The implicit-GEMM convolution (forward, dX, split-K dW with db), the fused conv + bias + ReLU + 2x2
max-pool, and Sequential's automatic fusion, against float64 NumPy and finite differences.

Under the simulator the kernels run on their 16-thread tile (kernels.conv2d.IG_SIM_TILE, BM x BN = 16 x 8,
BK = 4); one test runs the GPU's tiles (128 x 64 and 64 x 64, BK = 8). Every shape is a multiple of no
tile: odd N, C_in, C_out (1, 3, 5, 7), odd H and W, filters 1/3/5/7, strides 1 and 2, padding 0/1/2, with
and without bias. The simulator costs ~10 µs per array access per thread, so the shapes stay tiny.
"""
import numpy as np
import pytest

import gpu_cnn
from gpu_cnn import fusion, nn
from gpu_cnn import functional as F
from gpu_cnn.ops import _base


def _k():
    from gpu_cnn.kernels import conv2d as kconv  # after the backend is chosen

    return kconv


# (N, C_in, H, W, C_out, (kH, kW), stride, padding, bias): together they cover every filter size,
# stride, padding and bias setting the issue names; none is a multiple of a tile
CASES = {
    "3x3-s1-p1": (1, 3, 5, 7, 5, (3, 3), (1, 1), (1, 1), True),
    "5x5-s2-p2-nobias": (3, 1, 7, 5, 3, (5, 5), (2, 2), (2, 2), False),
    "1x1-s21-p0": (1, 5, 5, 3, 7, (1, 1), (2, 1), (0, 0), True),
    "7x7-s1-p21": (1, 2, 5, 7, 1, (7, 7), (1, 1), (2, 1), True),
}
# float32 sums of <= 75 products of N(0, 1) values (dW: <= 105) against float64: a few ulps of ~10
TOL = dict(rtol=1e-5, atol=2e-5)


def _problem(rng, case):
    n, c, h, w, o, (kh, kw), s, p, bias = case
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c, kh, kw)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32) if bias else None
    ho, wo = (h + 2 * p[0] - kh) // s[0] + 1, (w + 2 * p[1] - kw) // s[1] + 1
    dy = rng.standard_normal((n, o, ho, wo)).astype(np.float32)
    return x, wt, b, dy, s, p


def _dev(a):
    return None if a is None else _base.to_device(a)


def _run_all(k, x, wt, b, dy, s, p, tile=None, splits=None):
    """forward, dX, dW + db through the implicit-GEMM launchers; host results."""
    from numba import cuda

    y = cuda.device_array(dy.shape, np.float32)
    k.conv2d_forward_implicit_gemm(_dev(x), _dev(wt), _dev(b), y, s, p, tile=tile)
    dx = cuda.device_array(x.shape, np.float32)
    k.conv2d_backward_input_implicit_gemm(_dev(dy), _dev(wt), dx, s, p, tile=tile)
    dw = cuda.device_array(wt.shape, np.float32)
    db = cuda.device_array(wt.shape[0], np.float32)
    k.conv2d_backward_weight_implicit_gemm(_dev(dy), _dev(x), dw, s, p, db=db, splits=splits,
                                           tile=None if tile is None else k.IG_GPU_TILES[3])
    return y.copy_to_host(), dx.copy_to_host(), dw.copy_to_host(), db.copy_to_host()


@pytest.mark.parametrize("case", list(CASES))
def test_forward_dx_dw_db_match_reference(kernel_backend, rng, case):
    k = _k()
    x, wt, b, dy, s, p = _problem(rng, CASES[case])
    y, dx, dw, db = _run_all(k, x, wt, b, dy, s, p, splits=2)
    np.testing.assert_allclose(y, k.conv2d_reference(x, wt, b, s, p), **TOL)
    dxr, dwr, dbr = k.conv2d_backward_reference(dy, x, wt, s, p)
    np.testing.assert_allclose(dx, dxr, **TOL)
    np.testing.assert_allclose(dw, dwr, **TOL)
    np.testing.assert_allclose(db, dbr, **TOL)
    assert np.abs(y).max() > 0.1 and np.abs(dx).max() > 0.1 and np.abs(dw).max() > 0.1


def test_gpu_tiles_under_the_simulator(kernel_backend, rng):
    """The GPU's own tiles (128 threads, 8x8 registers; dW 64 threads, two splits: the last block's sum
    spread over its threads) on partial tiles, one block each."""
    k = _k()
    x, wt, b, dy, s, p = _problem(rng, (1, 3, 5, 4, 5, (3, 3), (2, 1), (1, 2), True))
    y, dx, dw, db = _run_all(k, x, wt, b, dy, s, p, tile=k.IG_GPU_TILES[0], splits=2)
    np.testing.assert_allclose(y, k.conv2d_reference(x, wt, b, s, p), **TOL)
    dxr, dwr, dbr = k.conv2d_backward_reference(dy, x, wt, s, p)
    np.testing.assert_allclose(dx, dxr, **TOL)
    np.testing.assert_allclose(dw, dwr, **TOL)
    np.testing.assert_allclose(db, dbr, **TOL)


def test_gradients_match_finite_differences(kernel_backend, rng):
    """dx, dw, db of L = Σ dy * conv(x, w, b) against central differences of the float64 reference."""
    k = _k()
    x, wt, b, dy, s, p = _problem(rng, (1, 2, 4, 5, 3, (3, 3), (2, 1), (1, 1), True))
    _, dx, dw, db = _run_all(k, x, wt, b, dy, s, p, splits=2)

    def loss(x_, w_, b_):
        return float((dy.astype(np.float64) * k.conv2d_reference(x_, w_, b_, s, p)).sum())

    eps = 1e-3  # the loss is linear in each argument: central differences are exact up to rounding
    args = {"x": x.astype(np.float64), "w": wt.astype(np.float64), "b": b.astype(np.float64)}
    for name, grad in (("x", dx), ("w", dw), ("b", db)):
        for flat in rng.choice(args[name].size, size=min(args[name].size, 6), replace=False):
            plus, minus = dict(args), dict(args)
            plus[name], minus[name] = args[name].copy(), args[name].copy()
            plus[name].flat[flat] += eps
            minus[name].flat[flat] -= eps
            fd = (loss(plus["x"], plus["w"], plus["b"]) - loss(minus["x"], minus["w"], minus["b"])) / (2 * eps)
            assert grad.flat[flat] == pytest.approx(fd, rel=1e-4, abs=1e-4), (name, flat)


def test_wgrad_split_k_is_bit_identical_run_to_run(kernel_backend, rng):
    """Each split count gives the same bits on every run (the last block adds the partials in split
    order, whichever block it is), and the counts really split (1, 2 and 5 partial tiles of 13
    K-slices); the tickets are back at 0 after every launch (no clearing launch, graph-replayable)."""
    from numba import cuda

    k = _k()
    x, wt, b, dy, s, p = _problem(rng, (1, 1, 7, 7, 3, (3, 3), (1, 1), (1, 1), True))
    dwr, dbr = k.conv2d_backward_reference(dy, x, wt, s, p)[1:]
    dxd, dyd = _dev(x), _dev(dy)
    for splits in (1, 2, 5):
        assert k.wgrad_splits(wt.shape, dy.shape, 1, splits)[0] == splits
        runs = []
        for _ in range(2):
            dw = cuda.device_array(wt.shape, np.float32)
            db = cuda.device_array(3, np.float32)
            k.conv2d_backward_weight_implicit_gemm(dyd, dxd, dw, s, p, db=db, splits=splits)
            runs.append((dw.copy_to_host(), db.copy_to_host()))
            assert not k._IG_SCRATCH["tickets"].copy_to_host().any()
        assert runs[0][0].tobytes() == runs[1][0].tobytes() and runs[0][1].tobytes() == runs[1][1].tobytes()
        np.testing.assert_allclose(runs[0][0], dwr, **TOL)
        np.testing.assert_allclose(runs[0][1], dbr, **TOL)


FUSED_CASES = {
    "5x5-p2-odd": (2, 1, 7, 9, 3, (5, 5), (1, 1), (2, 2), True),  # conv 7x9 -> pooled 3x4
    "3x3-s2-nobias": (1, 3, 9, 7, 5, (3, 3), (2, 1), (0, 1), False),  # conv 4x7 -> pooled 2x3
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_matches_reference_and_the_unfused_ops(backend, rng, case):
    """y and idx of the fused op equal the float64 reference (idx exactly) and conv -> relu -> max_pool2d,
    on the kernel backend (one kernel) and on cpu (the three ops)."""
    from gpu_cnn.kernels.conv2d import conv2d_reference, conv2d_relu_maxpool_reference  # plain NumPy

    x, wt, b, _, s, p = _problem(rng, FUSED_CASES[case])
    y, idx = F.conv2d_relu_maxpool2d(x, wt, b, s, p)
    yr, ir = conv2d_relu_maxpool_reference(x, wt, b, s, p)
    pre = conv2d_reference(x, wt, b, s, p)
    assert (pre > 0).any() and (pre < 0).any()  # the ReLU has something to do
    np.testing.assert_allclose(y, yr, **TOL)
    np.testing.assert_array_equal(idx, ir)
    a = F.relu(F.conv2d(x, wt, b, s, p))
    yu, iu = F.max_pool2d(a, 2)
    np.testing.assert_allclose(y, yu, rtol=1e-6, atol=1e-6)  # same sums, maybe another order
    np.testing.assert_array_equal(idx, iu)


def test_fused_bad_input_is_a_clear_error(backend):
    x = np.zeros((1, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="smaller than the 2x2 pooling window"):
        F.conv2d_relu_maxpool2d(x, np.zeros((2, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="b: expected shape"):
        F.conv2d_relu_maxpool2d(x, np.zeros((2, 1, 2, 2), np.float32), np.zeros(3, np.float32))


def test_backward_versions_and_dispatch(kernel_backend, rng, monkeypatch):
    """F.conv2d_backward(version=...) runs each version; None picks implicit_gemm, and falls back to
    direct where the 32-bit kernels do not apply; a typo names the versions."""
    k = _k()
    x, wt, b, dy, s, p = _problem(rng, (1, 2, 5, 4, 3, (3, 2), (1, 2), (1, 0), True))
    dxr, dwr, dbr = k.conv2d_backward_reference(dy, x, wt, s, p)
    calls = []
    for name in ("conv2d_backward_weight_implicit_gemm", "conv2d_backward_weight_blocks"):
        real = getattr(k, name)
        monkeypatch.setattr(k, name, lambda *a, _r=real, _n=name, **kw: (calls.append(_n), _r(*a, **kw))[1])
    for version, expect in ((None, "conv2d_backward_weight_implicit_gemm"),
                            ("implicit_gemm", "conv2d_backward_weight_implicit_gemm"),
                            ("direct", "conv2d_backward_weight_blocks")):
        calls.clear()
        dx, dw, db = F.conv2d_backward(dy, x, wt, s, p, version=version)
        assert calls == [expect], (version, calls)
        np.testing.assert_allclose(dx, dxr, **TOL)
        np.testing.assert_allclose(dw, dwr, **TOL)
        np.testing.assert_allclose(db, dbr, **TOL)
    monkeypatch.setattr(k, "IG_MAX_ELEMENTS", 20)  # x has 40 elements: too many for "32-bit" offsets
    calls.clear()
    dx, dw, db = F.conv2d_backward(dy, x, wt, s, p)
    assert calls == ["conv2d_backward_weight_blocks"]
    np.testing.assert_allclose(dw, dwr, **TOL)
    with pytest.raises(ValueError, match=r"x: 40 elements is more than the 2\*\*31 - 1"):
        F.conv2d(x, wt, b, s, p, version="implicit_gemm")
    with pytest.raises(ValueError, match="version: unknown conv2d backward version 'fast'; expected one of direct, implicit_gemm"):
        F.conv2d_backward(dy, x, wt, s, p, version="fast")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="splits: expected a positive int"):
        k.conv2d_backward_weight_implicit_gemm(_dev(dy), _dev(x), _dev(wt), s, p, splits=0)


# --- backward through a fused ReLU (and 2x2 max pool): dy read through the mask (and the argmax) ------


def _route(dpool, y, idx, conv_shape):
    """float64 gradient of the conv output from the pooled gradient: to the argmax, where y > 0."""
    d = np.zeros(conv_shape)
    n, o, hp, wp = dpool.shape
    wo = conv_shape[3]
    for a, c, i, j in np.ndindex(n, o, hp, wp):
        if y[a, c, i, j] > 0:
            h, w = divmod(int(idx[a, c, i, j]), wo)
            d[a, c, h, w] += dpool[a, c, i, j]
    return d


@pytest.mark.parametrize("case", ["5x5-s2-p2-nobias"])
def test_dx_dw_db_through_a_relu_mask(kernel_backend, rng, case):
    """mask= (a ReLU's output, straddling 0 with exact zeros): dX and dW + db (2 splits) equal the float64
    gradients of dy * (mask > 0), on a stride-2 (stride-grid) dX; stride 1 runs in the pool test below."""
    from numba import cuda

    k = _k()
    x, wt, b, dy, s, p = _problem(rng, CASES[case])
    mask = np.maximum(rng.standard_normal(dy.shape), 0).astype(np.float32)
    assert (mask > 0).any() and (mask == 0).any()
    dxr, dwr, dbr = k.conv2d_backward_reference(np.where(mask > 0, dy, 0), x, wt, s, p)
    dx, dw, db = (cuda.device_array(v, np.float32) for v in (x.shape, wt.shape, wt.shape[0]))
    k.conv2d_backward_input_implicit_gemm(_dev(dy), _dev(wt), dx, s, p, mask=_dev(mask))
    k.conv2d_backward_weight_implicit_gemm(_dev(dy), _dev(x), dw, s, p, db=db, splits=2, mask=_dev(mask))
    for name, got, want in (("dx", dx, dxr), ("dw", dw, dwr), ("db", db, dbr)):
        np.testing.assert_allclose(got.copy_to_host(), want, err_msg=name, **TOL)


POOL_CASES = {
    "5x5-p2-odd": (1, 1, 7, 5, 3, (5, 5), (1, 1), (2, 2), True),  # conv 7x5 -> pooled 3x2
    "3x3-s2-nobias": FUSED_CASES["3x3-s2-nobias"],  # conv 4x7 -> pooled 2x3, dX on the stride grid
}


@pytest.mark.parametrize("case", list(POOL_CASES))
def test_dx_dw_db_through_relu_and_pool_equal_the_routed_reference(kernel_backend, rng, case):
    """pool_idx= with mask = the fused forward's pooled output: the pooled gradient routed through the
    argmax where the output is > 0 (odd conv sizes: the last row or column is in no window), then dX
    and dW + db (1 and 3 splits on the simulator's tile; 2 on the GPU's masked-dW tile) against float64."""
    from numba import cuda

    k = _k()
    x, wt, b, _, s, p = _problem(rng, POOL_CASES[case])
    y, idx = (a.copy_to_host() for a in k.conv2d_relu_maxpool_fused(
        _dev(x), _dev(wt), _dev(b), *(cuda.device_array(sh, dt) for sh, dt in (
            (k.fused_output_shape(x.shape, wt.shape, s, p), np.float32),
            (k.fused_output_shape(x.shape, wt.shape, s, p), np.int32))), s, p))
    assert (y > 0).any() and (y == 0).any()  # some windows are all-negative: the mask bites
    conv_shape = k._out_shape(x.shape, wt.shape, s, p)
    dpool = rng.standard_normal(y.shape).astype(np.float32)
    dxr, dwr, dbr = k.conv2d_backward_reference(_route(dpool, y, idx, conv_shape), x, wt, s, p)
    dx = cuda.device_array(x.shape, np.float32)
    k.conv2d_backward_input_implicit_gemm(_dev(dpool), _dev(wt), dx, s, p, mask=_dev(y), pool_idx=_dev(idx))
    np.testing.assert_allclose(dx.copy_to_host(), dxr, **TOL)
    runs = ((1, None), (3, None)) if case == "5x5-p2-odd" else ((2, k.IG_GPU_WGRAD_MASKED_TILE),)
    for splits, tile in runs:  # the simulator's tile; the GPU's masked-dW tile on the smaller case
        dw, db = cuda.device_array(wt.shape, np.float32), cuda.device_array(wt.shape[0], np.float32)
        k.conv2d_backward_weight_implicit_gemm(_dev(dpool), _dev(x), dw, s, p, db=db, splits=splits, mask=_dev(y),
                                               pool_idx=_dev(idx), tile=tile)
        np.testing.assert_allclose(dw.copy_to_host(), dwr, err_msg=str(splits), **TOL)
        np.testing.assert_allclose(db.copy_to_host(), dbr, err_msg=str(splits), **TOL)


def test_mask_and_pool_idx_are_checked(kernel_backend, rng):
    from numba import cuda

    k = _k()
    x, wt, b, dy, s, p = _problem(rng, CASES["3x3-s1-p1"])
    dx = cuda.device_array(x.shape, np.float32)
    with pytest.raises(ValueError, match="mask: expected shape"):
        k.conv2d_backward_input_implicit_gemm(_dev(dy), _dev(wt), dx, s, p, mask=_base.empty((1, 5, 2, 3)))
    pooled = (1, 5, dy.shape[2] // 2, dy.shape[3] // 2)
    with pytest.raises(ValueError, match="mask: pool_idx needs mask"):
        k.conv2d_backward_input_implicit_gemm(_base.empty(pooled), _dev(wt), dx, s, p,
                                              pool_idx=cuda.device_array(pooled, np.int32))
    with pytest.raises(ValueError, match="dy: expected the pooled gradient's shape"):
        k.conv2d_backward_weight_implicit_gemm(_dev(dy), _dev(x), _base.empty(wt.shape), s, p,
                                               mask=_dev(dy), pool_idx=cuda.device_array(dy.shape, np.int32))
    with pytest.raises(TypeError, match="pool_idx: expected dtype int32"):
        k.conv2d_backward_input_implicit_gemm(_base.empty(pooled), _dev(wt), dx, s, p, mask=_base.empty(pooled),
                                              pool_idx=_base.empty(pooled))


def _small_cnn(seed):
    nn.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 3 * 3, 5))


def test_sequential_fuses_and_agrees_with_the_unfused_layers(kernel_backend, rng, monkeypatch):
    """Conv -> ReLU -> MaxPool(2) and Conv -> ReLU runs are fused (planned as such), and logits, input
    and parameter gradients equal the unfused model's; the state_dict keys and shapes do not change (each
    fused run's backward reads dy through its ReLU, and its pool, inside the conv's GEMMs).
    A batch the 32-bit kernels cannot take runs the planned runs' layers unfused, with the same results."""
    x = rng.standard_normal((1, 1, 6, 6)).astype(np.float32)
    dlogits = rng.standard_normal((1, 5)).astype(np.float32)
    results = []
    try:
        for on, limit in ((False, None), (True, None), (True, 20)):
            fusion.set_enabled(on)
            if limit:
                monkeypatch.setattr(_k(), "IG_MAX_ELEMENTS", limit)
            model = _small_cnn(3)
            model.requires_input_grad = True
            runs = fusion.plan(model.layers)
            logits = model.forward(x)
            assert all(getattr(r, "_unfused", False) == bool(limit) for _, _, r in model._runs[:2] if on)
            dx = model.backward(dlogits)
            grads = {name: p.grad_numpy() for name, p in model.named_parameters()}
            results.append(([type(r).__name__ for _, _, r in runs], logits, dx, grads,
                            {n: v.shape for n, v in model.state_dict().items()}))
    finally:
        fusion.set_enabled(None)
    (plan0, l0, dx0, g0, sd0) = results[0]
    assert len(plan0) == 7
    for plan1, l1, dx1, g1, sd1 in results[1:]:
        assert plan1 == ["ConvReLUPool", "ConvReLU", "Flatten", "Linear"]
        assert sd0 == sd1
        np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-6)
        for name in g0:
            assert np.abs(g0[name]).max() > 0, name
            np.testing.assert_allclose(g1[name], g0[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_lenet_like_training_step_with_the_gpu_defaults_equals_cpu(rng, monkeypatch):
    """A training step of a LeNet-5-like model on sim with the GPU's defaults (implicit_gemm forward,
    dX and one-launch split-K dW, fused conv + ReLU + pool and Linear + ReLU, their backward through
    the masks and the argmax inside the GEMMs) gives cpu's loss and weights."""
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    y = np.array([0, 3])

    def model():
        nn.manual_seed(7)
        return nn.Sequential(nn.Conv2d(1, 3, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(3, 5, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))

    out = {}
    for be in ("cpu", "sim"):
        gpu_cnn.set_backend(be)
        if be == "sim":
            monkeypatch.setattr(_k(), "IG_FORWARD_DEFAULT", True)
            fusion.set_enabled(True)
        try:
            m = model()
            trainer = gpu_cnn.Trainer(m, optimizer="sgd", lr=0.1, batch_size=2, seed=0)
            loss, _ = trainer.train_step(x, y)
            assert be == "cpu" or [type(r).__name__ for _, _, r in fusion.plan(m.layers)] == [
                "ConvReLUPool", "ConvReLUPool", "Flatten", "LinearReLU", "Linear"]
            out[be] = (loss, m.state_dict())
        finally:
            fusion.set_enabled(None)
    gpu_cnn.set_backend("sim")
    assert out["sim"][0] == pytest.approx(out["cpu"][0], rel=1e-5)
    nn.manual_seed(7)
    for name, v in out["cpu"][1].items():
        np.testing.assert_allclose(out["sim"][1][name], v, rtol=1e-5, atol=1e-6, err_msg=name)


def test_representative_specialisations_are_registered():
    """The compile check (tests/test_compile.py) builds these for sm_80 and sm_90."""
    from gpu_cnn.kernels import _common

    k = _k()
    names = set(_common.KERNELS)
    for base in ("conv2d_forward_implicit_gemm_kernel", "conv2d_backward_data_implicit_gemm_kernel",
                 "conv2d_backward_weight_implicit_gemm_kernel", "conv2d_relu_maxpool_fused_kernel"):
        assert any(n.startswith(f"conv2d.{base}_k") for n in names), base
    for base in ("conv2d_backward_data_implicit_gemm_kernel_relupool_k5x5", "conv2d_backward_weight_implicit_gemm_kernel_relupool_k5x5",
                 "conv2d_backward_data_implicit_gemm_kernel_relu_k3x3", "conv2d_backward_weight_implicit_gemm_kernel_relu_k3x3"):
        assert any(n.startswith(f"conv2d.{base}") for n in names), base
    assert k.VERSIONS == ("naive", "tiled", "implicit_gemm") and k.BACKWARD_VERSIONS == ("direct", "implicit_gemm")


def test_fast_division_is_exact():
    """dW's multiply-shift division (for Ho*Wo and Wo) against //, over divisors and dividends < 2**31."""
    k = _k()
    r = np.random.default_rng(1)
    for d in list(range(1, 70)) + [784, 3136, 12544, 2**20 + 7, 2**30 - 1]:
        mul, shift = k._magic(d)
        n = np.concatenate([np.arange(0, 5000), r.integers(0, 2**31, 5000), [2**31 - 1, d - 1, d, d + 1]])
        n = n[n >= 0].astype(np.uint64)
        q = (((n * np.uint64(mul)) >> np.uint64(32)) + n) >> np.uint64(shift)
        np.testing.assert_array_equal(q, n // np.uint64(d), err_msg=str(d))
