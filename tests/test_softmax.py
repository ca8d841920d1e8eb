"""Softmax + cross-entropy (gpu_cnn.ops.softmax) against float64 NumPy and finite differences.

Rows of length 1, 7, 10 and 1000 (shorter than, and several times longer than, the SM_TPB threads of
a row's block: 128 on a GPU, 8 under the simulator; the GPU's 128 also run once under the simulator), logits of magnitude 1e4, and every bad label.
On the kernel backend the simulator costs ~150 µs per thread, so batches stay at a few rows.
"""
import numpy as np
import pytest

from gpu_cnn.ops import _base
from gpu_cnn.ops.softmax import softmax_cross_entropy, softmax_cross_entropy_backward


def _ref():
    from gpu_cnn.kernels import softmax as ks  # after the backend is chosen

    return ks


def _reference(logits, labels):
    """float64 (loss, probs), written out here so the tests do not import numba on the cpu backend."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    rows = lse - z[np.arange(len(labels)), labels]
    return float(rows.mean()), np.exp(z - lse[:, None])


def _problem(rng, n, c, scale=3.0):
    logits = (rng.standard_normal((n, c)) * scale).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    return logits, labels


def test_reference_in_kernel_module_agrees(kernel_backend, rng):
    logits, labels = _problem(rng, 4, 9)
    loss, probs, rows = _ref().softmax_cross_entropy_reference(logits, labels)
    ref_loss, ref_probs = _reference(logits, labels)
    assert loss == pytest.approx(ref_loss, rel=1e-12) and rows.shape == (4,)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-12)


@pytest.mark.parametrize("c", [1, 7, 10, 1000])
def test_forward_matches_float64_reference(backend, rng, c):
    logits, labels = _problem(rng, 3, c)
    loss, probs = softmax_cross_entropy(logits, labels)
    ref_loss, ref_probs = _reference(logits, labels)
    assert isinstance(loss, float) and isinstance(probs, np.ndarray) and probs.dtype == np.float32
    # float32 exp/log and a C-term sum: a few ulps relative (1000 terms: ~1e-6)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)
    # the probabilities of a row sum to one (float32 rounding of up to 1000 terms)
    np.testing.assert_allclose(probs.astype(np.float64).sum(axis=1), 1.0, rtol=0, atol=1e-5)
    if c > 1:
        assert loss > 0 and probs.min() < probs.max()  # a real distribution, not a constant


def test_huge_logits_give_a_finite_accurate_loss(backend, rng):
    logits, labels = _problem(rng, 4, 10, scale=1e4)  # exp(1e4) overflows float32 and float64
    logits[0, 3] = -1e4
    labels[0] = 3  # p[label] = exp(-~2e4) underflows to 0: -log(p) would be inf
    loss, probs = softmax_cross_entropy(logits, labels)
    ref_loss, ref_probs = _reference(logits, labels)
    assert np.isfinite(loss) and np.all(np.isfinite(probs))
    assert ref_loss > 1e3 and probs[0, 3] == 0.0  # the case is the one claimed
    # the loss is (log-sum-exp) - (z_label - max): a difference of float32 values of size 1e4, so
    # float32 rounding of the logits' spacing (1e-3 at 1e4) bounds the error: ~1e-7 relative
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)


def test_loss_is_not_log_of_a_rounded_probability(backend):
    logits = np.array([[0.0, 200.0]], np.float32)  # p[0] = exp(-200): 0 in float32
    loss, probs = softmax_cross_entropy(logits, np.array([0]))
    assert probs[0, 0] == 0.0
    assert loss == pytest.approx(200.0, rel=1e-6)  # log(1 + e^-200) - (0 - 200) = 200


def test_backward_matches_reference(backend, rng):
    logits, labels = _problem(rng, 5, 7)
    _, probs = softmax_cross_entropy(logits, labels)
    d = softmax_cross_entropy_backward(probs, labels)
    ref = probs.astype(np.float64)
    ref[np.arange(5), labels] -= 1.0
    np.testing.assert_allclose(d, ref / 5, rtol=1e-6, atol=1e-8)  # one float32 subtraction and division
    assert (d < 0).sum() == 5 and (d > 0).sum() == 30  # the label column is the only negative one


def test_backward_matches_finite_differences(backend, rng):
    logits, labels = _problem(rng, 3, 6)
    z = logits.astype(np.float64)
    eps = 1e-6
    num = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        old = z[i]
        z[i] = old + eps
        up = _reference(z, labels)[0]
        z[i] = old - eps
        down = _reference(z, labels)[0]
        z[i] = old
        num[i] = (up - down) / (2 * eps)
    _, probs = softmax_cross_entropy(logits, labels)
    d = softmax_cross_entropy_backward(probs, labels)
    # float32 probabilities (1e-7 relative) against float64 central differences (~1e-10)
    np.testing.assert_allclose(d, num, rtol=1e-5, atol=1e-7)


def test_labels_of_any_integer_dtype(backend, rng):
    logits, labels = _problem(rng, 3, 4)
    a, _ = softmax_cross_entropy(logits, labels.astype(np.int64))
    b, _ = softmax_cross_entropy(logits, labels.astype(np.uint8))
    assert a == b


# --- bad input ----------------------------------------------------------------------------------------


def test_bad_labels_raise_clear_errors(backend, rng):
    logits, labels = _problem(rng, 3, 4)
    with pytest.raises(ValueError, match=r"labels: class ids must be in \[0, 4\), found 4"):
        softmax_cross_entropy(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="labels: class ids .* found -1"):
        softmax_cross_entropy(logits, np.array([0, -1, 1]))
    with pytest.raises(TypeError, match="labels: expected integer class ids"):
        softmax_cross_entropy(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"labels: expected shape \(3,\)"):
        softmax_cross_entropy(logits, labels[:2])
    with pytest.raises(ValueError, match=r"labels: expected shape \(3,\)"):
        softmax_cross_entropy(logits, labels[:, None])
    probs = np.full((3, 4), 0.25, np.float32)
    with pytest.raises(ValueError, match="labels: class ids"):
        softmax_cross_entropy_backward(probs, np.array([0, 1, 7]))
    with pytest.raises(TypeError, match="labels: expected integer"):
        softmax_cross_entropy_backward(probs, np.array([0.0, 1.0, 2.0]))


def test_bad_logits_raise_clear_errors(backend, rng):
    logits, labels = _problem(rng, 3, 4)
    with pytest.raises(ValueError, match="logits: expected a 2-D"):
        softmax_cross_entropy(logits[0], labels)
    with pytest.raises(ValueError, match="logits: expected at least one row"):
        softmax_cross_entropy(np.zeros((0, 4), np.float32), labels[:0])
    with pytest.raises(TypeError, match="logits: expected a floating-point"):
        softmax_cross_entropy(logits.astype(np.int32), labels)
    with pytest.raises(ValueError, match="probs: expected a 2-D"):
        softmax_cross_entropy_backward(logits[0], labels)
    with pytest.raises(ValueError, match=r"out \(probs\): expected shape"):
        softmax_cross_entropy(logits, labels, out=_base.empty((3, 5)))
    with pytest.raises(ValueError, match=r"out \(loss_buf\): expected shape \(4,\)"):
        softmax_cross_entropy(logits, labels, out=(_base.empty((3, 4)), _base.empty((3,))))
    with pytest.raises(ValueError, match="out: expected shape"):
        softmax_cross_entropy_backward(logits, labels, out=_base.empty((4, 4)))


def test_launcher_rejects_bad_arguments(kernel_backend, rng):
    ks = _ref()
    logits, labels = _problem(rng, 2, 3)
    z, probs = _base.to_device(logits), _base.empty((2, 3))
    rows, loss = _base.empty((2,)), _base.empty((1,))
    with pytest.raises(TypeError, match="labels: expected dtype int32"):
        ks.softmax_cross_entropy_forward(z, _base.to_device(labels.astype(np.int64)), probs, rows, loss)
    with pytest.raises(TypeError, match="logits: expected a device array"):
        ks.softmax_cross_entropy_forward(logits, _base.to_device(labels), probs, rows, loss)
    with pytest.raises(ValueError, match="row_loss: expected shape"):
        ks.softmax_cross_entropy_forward(z, _base.to_device(labels), probs, loss, loss)
    with pytest.raises(ValueError, match="version: unknown softmax version"):
        ks.softmax_cross_entropy_forward(z, _base.to_device(labels), probs, rows, loss, version="online")


# --- device arrays, out=, no allocation -------------------------------------------------------------


def test_device_input_gives_device_probs_and_a_float_loss(kernel_backend, rng):
    logits, labels = _problem(rng, 2, 5)
    loss, probs = softmax_cross_entropy(_base.to_device(logits), _base.to_device(labels))
    assert isinstance(loss, float) and not isinstance(probs, np.ndarray)
    ref_loss, ref_probs = _reference(logits, labels)
    assert loss == pytest.approx(ref_loss, rel=1e-5)  # float32 math, few ulps
    np.testing.assert_allclose(probs.copy_to_host(), ref_probs, rtol=1e-5, atol=1e-7)


class _TorchLikeLabels:
    """Stands in for a PyTorch tensor: a CUDA array whose ``dtype`` NumPy cannot read (torch.int32)."""

    dtype = "torch.int32"  # np.dtype("torch.int32") raises TypeError, as np.dtype(torch.int32) does
    __cuda_array_interface__ = {}

    def __init__(self, dev):
        self.dev = dev


def test_labels_from_a_framework_tensor_use_the_converted_arrays_dtype(kernel_backend, rng, monkeypatch):
    logits, labels = _problem(rng, 3, 4)
    convert = _base._as_cuda_array
    monkeypatch.setattr(_base, "_as_cuda_array", lambda a: a.dev if isinstance(a, _TorchLikeLabels) else convert(a))
    dev = _base.to_device(labels)
    assert _base.as_labels("labels", _TorchLikeLabels(dev), 3, 4) is dev  # int32 on the device: used in place
    loss, _ = softmax_cross_entropy(logits, _TorchLikeLabels(dev))
    assert loss == pytest.approx(_reference(logits, labels)[0], rel=1e-5)


def test_out_makes_no_allocation(kernel_backend, rng):
    logits, labels = _problem(rng, 3, 5)
    z, lab = _base.to_device(logits), _base.to_device(labels)
    probs, loss_buf, d = _base.empty((3, 5)), _base.empty((4,)), _base.empty((3, 5))
    ref_loss, _ = _reference(logits, labels)

    before = _base.allocation_stats()
    loss, p = softmax_cross_entropy(z, lab, out=(probs, loss_buf))
    got = softmax_cross_entropy_backward(probs, lab, out=d)
    assert _base.allocation_stats() == before
    assert p is probs and got is d
    host = loss_buf.copy_to_host()
    assert loss == pytest.approx(ref_loss, rel=1e-5) and host[3] == pytest.approx(loss, rel=1e-6)
    assert host[:3].mean() == pytest.approx(loss, rel=1e-5)  # the per-row losses come first

    # out=probs alone: the op's reusable scratch is allocated at most once, then reused
    softmax_cross_entropy(z, lab, out=probs)
    before = _base.allocation_stats()
    loss2, _ = softmax_cross_entropy(z, lab, out=probs)
    softmax_cross_entropy(z[:2], lab[:2], out=probs[:2])  # a smaller (last, partial) batch
    softmax_cross_entropy_backward(probs, lab, out=probs)  # in place
    assert _base.allocation_stats() == before
    assert loss2 == pytest.approx(loss, rel=1e-6)


def test_backward_in_place_on_cpu(cpu_backend, rng):
    logits, labels = _problem(rng, 3, 5)
    _, probs = softmax_cross_entropy(logits, labels)
    expected = softmax_cross_entropy_backward(probs, labels)
    assert softmax_cross_entropy_backward(probs, labels, out=probs) is probs
    np.testing.assert_array_equal(probs, expected)


def test_forward_in_place_on_the_logits(backend, rng):
    """out=logits: the probabilities overwrite the logits, and the loss still reads the label's logit
    (labels on column 0, where the row's first thread writes, and elsewhere)."""
    logits, _ = _problem(rng, 4, 10)
    labels = np.array([0, 0, 3, 9], np.int32)
    ref_loss, ref_probs = _reference(logits, labels)
    z = logits.copy() if backend == "cpu" else _base.to_device(logits)
    loss, probs = softmax_cross_entropy(z, labels, out=z)
    assert probs is z
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    host = z if backend == "cpu" else z.copy_to_host()
    np.testing.assert_allclose(host, ref_probs, rtol=1e-5, atol=1e-7)


def test_gpu_block_size_under_the_simulator(kernel_backend, rng, monkeypatch):
    """The GPU's 128-thread blocks (the suite otherwise runs 8 under the simulator): rows shorter and
    longer than the block, the same trees."""
    ks = _ref()
    monkeypatch.setattr(ks, "SM_TPB", 128)  # the simulator reads module globals when a kernel runs
    logits, labels = _problem(rng, 2, 300)
    logits[1, :] = logits[1, :5].repeat(60)  # repeated maxima
    for c in (5, 300):
        z, lab = np.ascontiguousarray(logits[:, :c]), labels % c
        loss, probs = softmax_cross_entropy(z, lab)
        ref_loss, ref_probs = _reference(z, lab)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)
