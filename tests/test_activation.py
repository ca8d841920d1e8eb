"""ReLU, its gradient and the fused bias + ReLU (gpu_cnn.ops.activation) against float64 NumPy and
finite differences, on the cpu backend and the kernel backend (the CUDA simulator by default).

Shapes are odd (7, 13, 19, 210 and 285 elements: below, and not a multiple of, the 256-thread block) and
every input straddles zero. Under the simulator a thread costs ~150 µs, so arrays stay at a few hundred
elements.
"""
import numpy as np
import pytest

from gpu_cnn.ops import _base
from gpu_cnn.ops.activation import bias_relu, relu, relu_backward

SHAPES = [(7,), (3, 13), (2, 3, 5, 7), (3, 5, 19)]


def _k():
    from gpu_cnn.kernels import activation as ka  # after the backend is chosen

    return ka


def _straddling(rng, shape):
    """Standard normal float32 with no value within 1e-3 of zero (so x > 0 is unambiguous)."""
    x = rng.standard_normal(shape)
    x = np.where(np.abs(x) < 1e-3, 0.5, x).astype(np.float32)
    assert (x > 0).any() and (x < 0).any()  # the test exercises both sides of the kink
    return x


def _on_backend(backend, a):
    """The array where the backend computes: NumPy on cpu, a device array on sim/cuda."""
    return a if backend == "cpu" else _base.to_device(np.ascontiguousarray(a))


def _host(a):
    return a if isinstance(a, np.ndarray) else a.copy_to_host()


# --- forward and backward against the float64 reference -------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_relu_matches_reference(backend, rng, shape):
    x = _straddling(rng, shape)
    y = relu(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == shape
    ref = np.maximum(x.astype(np.float64), 0.0)
    np.testing.assert_array_equal(y, ref)  # max(x, 0) of a float32 is exact
    assert (y == 0).any() and (y > 0).any()


@pytest.mark.parametrize("shape", SHAPES)
def test_relu_backward_matches_reference(backend, rng, shape):
    x = _straddling(rng, shape)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx = relu_backward(dy, x)
    assert isinstance(dx, np.ndarray) and dx.dtype == np.float32 and dx.shape == shape
    np.testing.assert_array_equal(dx, np.where(x > 0, dy, 0.0))  # a selection: exact
    assert (dx == 0).any() and (dx != 0).any()


def test_reference_functions_agree(kernel_backend, rng):
    ka = _k()
    x = _straddling(rng, (2, 3, 4, 5))
    b = rng.standard_normal(3)
    np.testing.assert_array_equal(ka.relu_reference(x), np.maximum(x, 0))
    np.testing.assert_array_equal(ka.relu_backward_reference(x, x), np.where(x > 0, x, 0))
    np.testing.assert_allclose(ka.bias_relu_reference(x, b), np.maximum(x + b[None, :, None, None], 0), rtol=1e-15)


def test_relu_of_nan_is_nan_and_its_gradient_zero(backend):
    x = np.array([np.nan, -1.0, 0.0, 2.0, -np.inf, np.inf], np.float32)
    np.testing.assert_array_equal(relu(x), [np.nan, 0.0, 0.0, 2.0, 0.0, np.inf])  # as np.maximum / PyTorch
    np.testing.assert_array_equal(relu_backward(np.ones(6, np.float32), x), [0, 0, 0, 1, 0, 1])


def test_float64_input_is_computed_in_float32(backend, rng):
    x = _straddling(rng, (3, 7)).astype(np.float64) + 1e-12  # float64 digits beyond float32 are dropped
    y = relu(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.maximum(x.astype(np.float32), 0))


# --- finite differences ---------------------------------------------------------------------------

FD_EPS = 1e-6


def test_relu_backward_matches_finite_differences(backend, rng):
    x = rng.standard_normal((2, 3, 5)) * 2
    x = np.where(np.abs(x) < 0.05, 0.5, x)  # away from the kink, so ±eps stays on one side
    assert (x > 0).any() and (x < 0).any()
    g = rng.standard_normal(x.shape)  # L = Σ g ⊙ relu(x), so dL/dy = g
    num = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + FD_EPS
        up = (g * np.maximum(x, 0)).sum()
        x[i] = old - FD_EPS
        down = (g * np.maximum(x, 0)).sum()
        x[i] = old
        num[i] = (up - down) / (2 * FD_EPS)
    dx = relu_backward(g.astype(np.float32), x.astype(np.float32))
    # dx is g rounded to float32 (1e-7 relative) or 0; the central difference of a piecewise-linear
    # function is exact up to float64 cancellation (~1e-9)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)


# --- fused bias + ReLU ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 5, 3, 19), (5, 13), (3, 300)], ids=["nchw", "nchw-19", "nf", "nf-300"])
def test_bias_relu_matches_reference(backend, rng, shape):
    x = _straddling(rng, shape)
    b = rng.standard_normal(shape[1]).astype(np.float32)
    y = bias_relu(x, b)
    bshape = (1, -1) + (1,) * (len(shape) - 2)
    pre = x.astype(np.float64) + b.astype(np.float64).reshape(bshape)
    assert (pre > 0).any() and (pre < 0).any()
    # the bias decides some outputs: x < 0 < x + b somewhere, or x > 0 > x + b
    assert ((x < 0) & (pre > 0)).any() or ((x > 0) & (pre < 0)).any()
    assert y.dtype == np.float32 and y.shape == shape
    np.testing.assert_allclose(y, np.maximum(pre, 0), rtol=1e-6, atol=1e-7)  # one float32 addition


def test_bias_relu_bias_is_per_channel_dim1(backend):
    x = np.zeros((2, 3, 2, 2), np.float32)
    b = np.array([1.0, -1.0, 2.0], np.float32)
    y = bias_relu(x, b)
    np.testing.assert_array_equal(y[:, 0], 1.0)
    np.testing.assert_array_equal(y[:, 1], 0.0)
    np.testing.assert_array_equal(y[:, 2], 2.0)
    y2 = bias_relu(np.zeros((4, 3), np.float32), b)  # (N, F): per feature
    np.testing.assert_array_equal(y2, np.tile([1.0, 0.0, 2.0], (4, 1)))


def test_relu_backward_on_the_output_gives_the_same_gradient(backend, rng):
    """After a fused bias + ReLU only y is kept: y > 0 exactly where x + b > 0, so the masks agree."""
    x = _straddling(rng, (2, 3, 4, 5))
    b = rng.standard_normal(3).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y = bias_relu(x, b)
    pre = x + b[None, :, None, None]
    np.testing.assert_array_equal(relu_backward(dy, y), relu_backward(dy, pre))
    np.testing.assert_array_equal(relu_backward(dy, relu(x)), relu_backward(dy, x))


# --- in place, out=, device arrays ----------------------------------------------------------------


def test_relu_in_place(backend, rng):
    x = _straddling(rng, (3, 5, 19))
    xb = _on_backend(backend, x.copy())
    relu(xb, out=xb)
    np.testing.assert_array_equal(_host(xb), np.maximum(x, 0))


def test_relu_backward_in_place(backend, rng):
    x = _straddling(rng, (4, 7))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dyb, xb = _on_backend(backend, dy.copy()), _on_backend(backend, x)
    relu_backward(dyb, xb, out=dyb)
    np.testing.assert_array_equal(_host(dyb), np.where(x > 0, dy, 0))


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (5, 13)], ids=["nchw", "nf"])
def test_bias_relu_in_place(backend, rng, shape):
    x = _straddling(rng, shape)
    b = rng.standard_normal(shape[1]).astype(np.float32)
    ref = np.maximum(x + b.reshape((1, -1) + (1,) * (len(shape) - 2)), 0)
    xb = _on_backend(backend, x.copy())
    bias_relu(xb, _on_backend(backend, b), out=xb)
    np.testing.assert_allclose(_host(xb), ref, rtol=1e-6, atol=1e-7)


def test_device_arrays_with_out_make_no_allocation(kernel_backend, rng):
    x = _straddling(rng, (2, 3, 5, 7))
    b = rng.standard_normal(3).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    xd, bd, dyd = _base.to_device(x), _base.to_device(b), _base.to_device(dy)
    y, dx = _base.empty(x.shape), _base.empty(x.shape)
    before = _base.allocation_stats()
    out = relu(xd, out=y)
    relu_backward(dyd, xd, out=dx)
    bias_relu(xd, bd, out=y)
    assert _base.allocation_stats() == before
    assert not isinstance(out, np.ndarray)  # device in, device out
    np.testing.assert_array_equal(dx.copy_to_host(), np.where(x > 0, dy, 0))
    np.testing.assert_allclose(y.copy_to_host(), np.maximum(x + b[None, :, None, None], 0), rtol=1e-6, atol=1e-7)


# --- bad inputs -----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(backend):
    x = np.ones((2, 3, 4, 5), np.float32)
    with pytest.raises(TypeError, match="x"):
        relu(np.ones((3, 4), np.int32))
    with pytest.raises(TypeError, match="x"):
        relu(None)
    with pytest.raises(ValueError, match="out"):
        relu(x, out=_base.empty((2, 3, 4, 4)))
    with pytest.raises(TypeError, match="out"):
        relu(x, out=np.ones((2, 3, 4, 5), np.float64))
    with pytest.raises(ValueError, match="x"):
        relu_backward(x, np.ones((2, 3, 4, 4), np.float32))
    with pytest.raises(TypeError, match="dy"):
        relu_backward(np.ones((2, 3, 4, 5), bool), x)
    with pytest.raises(TypeError, match="x"):
        relu_backward(x, np.ones((2, 3, 4, 5), np.int64))
    with pytest.raises(ValueError, match="x"):
        bias_relu(np.ones((2, 3, 4), np.float32), np.ones(3, np.float32))  # rank 3
    with pytest.raises(ValueError, match="b"):
        bias_relu(x, np.ones(4, np.float32))  # not C
    with pytest.raises(ValueError, match="b"):
        bias_relu(x, np.ones((3, 1), np.float32))  # not 1-D
    with pytest.raises(TypeError, match="b"):
        bias_relu(x, np.ones(3, np.int32))
    with pytest.raises(ValueError, match="out"):
        bias_relu(x, np.ones(3, np.float32), out=_base.empty((2, 3, 4, 4)))


def test_kernel_launchers_check_their_arguments(kernel_backend):
    ka = _k()
    xd = _base.to_device(np.ones((2, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="version.*naive"):
        ka.relu_forward(xd, _base.empty(xd.shape), version="fast")
    with pytest.raises(TypeError, match="x"):
        ka.relu_forward(np.ones(3, np.float32), _base.empty((3,)))
    with pytest.raises(ValueError, match="y"):
        ka.relu_forward(xd, _base.empty((2, 3, 4, 4)))
    with pytest.raises(TypeError, match="dx"):
        ka.relu_backward(xd, xd, _base.empty(xd.shape, np.int32))
    with pytest.raises(ValueError, match="b"):
        ka.bias_relu(xd, _base.empty((4,)), _base.empty(xd.shape))
    with pytest.raises(ValueError, match="x"):
        ka.bias_relu(_base.empty((2, 3, 4)), _base.empty((3,)), _base.empty((2, 3, 4)))


def test_out_that_cannot_be_written_is_named(backend, rng):
    """A read-only NumPy out (cpu) or a non-contiguous device out is refused as `out`, before any work."""
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    if backend == "cpu":
        out = np.empty_like(x)
        out.flags.writeable = False
        match = "out: the array is read-only"
    else:
        out = _base.to_device(np.empty((2, 3, 4, 8), np.float32))[:, :, :, ::2]
        match = "out: device arrays must be C-contiguous"
    with pytest.raises(ValueError, match=match):
        relu(x, out=out)


def test_zero_dimensional_input_keeps_its_shape(backend):
    y = relu(np.float32(-1.5))
    assert y.shape == () and y == 0
    assert relu(np.array(2.5)).shape == () and relu(np.array(2.5)) == np.float32(2.5)
    dx = relu_backward(np.float32(3.0), np.float32(1.0))
    assert dx.shape == () and dx == 3
