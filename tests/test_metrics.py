"""kernels/metrics.py: the device-side epoch accumulator (loss sum, correct predictions, non-finite
losses and where the first one came) against a float64 NumPy reference, under the simulator.

Batches of 1, 5 and 37 rows (the simulator's block is 8 threads: shorter and longer than a block, not a
multiple of it), 1 and 7 classes; probabilities drawn without ties so argmax is unambiguous; the labels
hit the argmax for some rows and miss it for others (asserted), so 'correct' is neither 0 nor N.
"""
import numpy as np
import pytest
from numba import cuda

from gpu_cnn.kernels import metrics as K


def _batch(rng, n, c, bad=()):
    probs = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    labels[: n // 2] = probs[: n // 2].argmax(axis=1)  # half of them right, for certain
    row_loss = rng.uniform(0.0, 3.0, n).astype(np.float32)
    for i, v in bad:
        row_loss[i] = v
    return row_loss, probs, labels


def _dev(*arrays):
    return [cuda.to_device(a) for a in arrays]


def test_accumulates_batches_like_the_reference(kernel_backend, rng):
    acc = K.reset(cuda.device_array(K.SLOTS, np.float64))
    batches = [(0, *_batch(rng, 37, 7)), (1, *_batch(rng, 5, 7)), (2, *_batch(rng, 1, 7))]
    for step, row_loss, probs, labels in batches:
        K.accumulate(*_dev(row_loss, probs, labels), acc, step)
    got, want = acc.copy_to_host(), K.epoch_metrics_reference(batches)
    assert 0 < want[1] < 43  # the correct count is exercised both ways
    # float64 sums of 43 float32 losses: the block's tree and NumPy's pairwise order differ by ~1e-15
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_array_equal(got[1:], want[1:])
    assert tuple(got[2:]) == (0.0, K.NO_STEP, 0.0)


def test_single_class_rows_are_always_correct(kernel_backend, rng):
    acc = K.reset(cuda.device_array(K.SLOTS, np.float64))
    row_loss, probs, labels = np.zeros(9, np.float32), np.ones((9, 1), np.float32), np.zeros(9, np.int32)
    K.accumulate(*_dev(row_loss, probs, labels), acc, 0)
    np.testing.assert_array_equal(acc.copy_to_host(), [0.0, 9.0, 0.0, K.NO_STEP, 0.0])


def test_non_finite_losses_are_counted_and_the_first_one_kept(kernel_backend, rng):
    """A NaN in the third step's batch (rows 30 and 12: the first by row order is 12's +inf), another in
    the fourth: the finite losses still sum, every bad row counts, and the step and value kept are the
    first batch's first."""
    acc = K.reset(cuda.device_array(K.SLOTS, np.float64))
    batches = [(0, *_batch(rng, 37, 7)), (1, *_batch(rng, 37, 7)),
               (2, *_batch(rng, 37, 7, bad=[(30, np.nan), (12, np.inf)])),
               (3, *_batch(rng, 5, 7, bad=[(0, -np.inf)]))]
    for step, row_loss, probs, labels in batches:
        K.accumulate(*_dev(row_loss, probs, labels), acc, step)
    got, want = acc.copy_to_host(), K.epoch_metrics_reference(batches)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    assert tuple(got[1:4]) == tuple(want[1:4]) and got[2] == 3 and got[3] == 2
    assert got[4] == np.inf == want[4]


def test_same_bits_every_run(kernel_backend, rng):
    row_loss, probs, labels = _dev(*_batch(rng, 37, 7))
    runs = []
    for _ in range(3):
        acc = K.reset(cuda.device_array(K.SLOTS, np.float64))
        K.accumulate(row_loss, probs, labels, acc, 0)
        runs.append(acc.copy_to_host().tobytes())
    assert runs[0] == runs[1] == runs[2]


def test_bad_arguments_are_named(kernel_backend, rng):
    row_loss, probs, labels = _dev(*_batch(rng, 5, 3))
    acc = K.reset(cuda.device_array(K.SLOTS, np.float64))
    with pytest.raises(ValueError, match="row_loss: expected shape"):
        K.accumulate(cuda.to_device(np.zeros(4, np.float32)), probs, labels, acc, 0)
    with pytest.raises(TypeError, match="labels: expected dtype int32"):
        K.accumulate(row_loss, probs, cuda.to_device(np.zeros(5, np.int64)), acc, 0)
    with pytest.raises(ValueError, match="acc: expected shape"):
        K.accumulate(row_loss, probs, labels, cuda.device_array(3, np.float64), 0)
    with pytest.raises(ValueError, match="step: expected an int >= 0"):
        K.accumulate(row_loss, probs, labels, acc, -1)
    with pytest.raises(ValueError, match="version: expected one of block"):
        K.accumulate(row_loss, probs, labels, acc, 0, version="atomic")
