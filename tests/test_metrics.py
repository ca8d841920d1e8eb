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
    assert tuple(got[2:]) == (0.0, K.NO_STEP, 0.0, 3.0)  # three batches counted by the device


def test_single_class_rows_are_always_correct(kernel_backend, rng):
    acc = K.reset(cuda.device_array(K.SLOTS, np.float64))
    row_loss, probs, labels = np.zeros(9, np.float32), np.ones((9, 1), np.float32), np.zeros(9, np.int32)
    K.accumulate(*_dev(row_loss, probs, labels), acc, 0)
    np.testing.assert_array_equal(acc.copy_to_host(), [0.0, 9.0, 0.0, K.NO_STEP, 0.0, 1.0])


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
    with pytest.raises(ValueError, match="step: expected an int >= 0 or None"):
        K.accumulate(row_loss, probs, labels, acc, -1)
    with pytest.raises(ValueError, match="version: expected one of block"):
        K.accumulate(row_loss, probs, labels, acc, 0, version="atomic")


def test_without_a_host_step_the_device_numbers_the_batches(kernel_backend, rng):
    """step=None: the batch's number is acc[5] + 1 (1-based since the reset), kept on the device; the bad
    batch is the third, so acc[3] is 3, and acc[5] counts all four."""
    acc = K.reset(cuda.device_array(K.SLOTS, np.float64))
    batches = [(None, *_batch(rng, 9, 3)), (None, *_batch(rng, 9, 3)),
               (None, *_batch(rng, 9, 3, bad=[(4, np.nan)])), (None, *_batch(rng, 2, 3, bad=[(1, np.inf)]))]
    for step, row_loss, probs, labels in batches:
        K.accumulate(*_dev(row_loss, probs, labels), acc)
    got, want = acc.copy_to_host(), K.epoch_metrics_reference(batches)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    assert np.isnan(got[4]) and np.isnan(want[4])
    assert (got[2], got[3], got[5]) == (2.0, 3.0, 4.0) and tuple(want[[2, 3, 5]]) == (2.0, 3.0, 4.0)


# --- train_loss_step: softmax cross-entropy, its gradient and the metrics in one launch ---------------


def _logits(rng, n, c):
    z = rng.standard_normal((n, c)).astype(np.float32) * 3
    y = rng.integers(0, c, n).astype(np.int32)
    y[: n // 2] = z[: n // 2].argmax(axis=1)  # half right for certain
    return z, y


@pytest.mark.parametrize("n, c", [(1, 1), (5, 7), (37, 10), (11, 33)])
def test_train_loss_step_matches_float64(kernel_backend, rng, n, c):
    """dlogits = (softmax - onehot) / N against float64; the loss sum, the correct count and the batch
    count against the reference accumulator (float64 probabilities of float64 logits: no ties drawn)."""
    z, y = _logits(rng, n, c)
    acc = K.reset(cuda.device_array(K.SLOTS, np.float64))
    d = cuda.device_array((n, c), np.float32)
    K.train_loss_step(*_dev(z, y), d, acc)
    rows, probs, want_d = K.train_loss_step_reference(z, y)
    # float32 p carries a few roundings of its size (<= 1): ~3e-7 absolute, divided by N; p - 1 cancels,
    # so the label's entry is held to that absolute bound, the others (p alone) to 2e-6 relative too
    np.testing.assert_allclose(d.copy_to_host(), want_d, rtol=2e-6, atol=3e-7 / n)
    got, want = acc.copy_to_host(), K.epoch_metrics_reference([(None, rows, probs, y)])
    assert c == 1 or 0 < want[1] < n or n == 1  # the correct count is exercised
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)  # float32 row losses summed in float64
    np.testing.assert_array_equal(got[1:], want[1:])


def test_train_loss_step_equals_the_unfused_kernels(kernel_backend, rng):
    """Same dlogits as softmax forward + backward (to float32 rounding), same metrics as accumulate, and
    in place (dlogits = logits) gives the same bits as a separate buffer."""
    from gpu_cnn.kernels import softmax as S

    n, c = 13, 6
    z, y = _logits(rng, n, c)
    zd, yd = _dev(z, y)
    probs, rows, loss = (cuda.device_array(s, np.float32) for s in ((n, c), (n,), (1,)))
    S.softmax_cross_entropy_forward(zd, yd, probs, rows, loss)
    d_ref = cuda.device_array((n, c), np.float32)
    S.softmax_cross_entropy_backward(probs, yd, d_ref)
    acc_ref = K.accumulate(rows, probs, yd, K.reset(cuda.device_array(K.SLOTS, np.float64)))
    acc = K.reset(cuda.device_array(K.SLOTS, np.float64))
    d = cuda.device_array((n, c), np.float32)
    K.train_loss_step(zd, yd, d, acc)
    # p rounded in a different order (one thread vs a warp): ~3e-7 absolute over N, as above
    np.testing.assert_allclose(d.copy_to_host(), d_ref.copy_to_host(), rtol=1e-6, atol=3e-7 / n)
    np.testing.assert_allclose(acc.copy_to_host(), acc_ref.copy_to_host(), rtol=1e-6)
    inplace = cuda.to_device(z)
    K.train_loss_step(inplace, yd, inplace, K.reset(cuda.device_array(K.SLOTS, np.float64)))
    assert inplace.copy_to_host().tobytes() == d.copy_to_host().tobytes()


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the simulator's NumPy on inf - inf
def test_train_loss_step_flags_the_first_bad_batch_by_the_device_count(kernel_backend, rng):
    """A NaN logit in the second batch and an inf one in the third: both rows count as non-finite, the
    first bad step is 2 (the device's numbering: no host step goes in) and its loss NaN; the finite rows'
    losses still sum."""
    acc = K.reset(cuda.device_array(K.SLOTS, np.float64))
    batches = []
    for b in range(3):
        z, y = _logits(rng, 9, 4)
        if b == 1:
            z[3, 2] = np.nan
        if b == 2:
            z[0, 1] = np.inf
        d = cuda.device_array((9, 4), np.float32)
        K.train_loss_step(*_dev(z, y), d, acc)
        with np.errstate(invalid="ignore", over="ignore"):
            rows, probs, _ = K.train_loss_step_reference(z, y)
        batches.append((None, rows, np.nan_to_num(probs, nan=-1.0), y))
    got, want = acc.copy_to_host(), K.epoch_metrics_reference(batches)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert (got[2], got[3], got[5]) == (2.0, 2.0, 3.0) == tuple(want[[2, 3, 5]])
    assert np.isnan(got[4])


def test_train_loss_step_same_bits_every_run(kernel_backend, rng):
    zd, yd = _dev(*_logits(rng, 37, 5))
    runs = []
    for _ in range(2):
        acc = K.reset(cuda.device_array(K.SLOTS, np.float64))
        d = cuda.device_array((37, 5), np.float32)
        K.train_loss_step(zd, yd, d, acc)
        runs.append(acc.copy_to_host().tobytes() + d.copy_to_host().tobytes())
    assert runs[0] == runs[1]


def test_train_loss_step_bad_arguments_are_named(kernel_backend, rng):
    zd, yd = _dev(*_logits(rng, 5, 3))
    acc = K.reset(cuda.device_array(K.SLOTS, np.float64))
    d = cuda.device_array((5, 3), np.float32)
    with pytest.raises(ValueError, match="logits: expected a non-empty"):
        K.train_loss_step(cuda.device_array((0, 3), np.float32), yd, d, acc)
    with pytest.raises(ValueError, match="labels: expected shape"):
        K.train_loss_step(zd, cuda.to_device(np.zeros(4, np.int32)), d, acc)
    with pytest.raises(ValueError, match="dlogits: expected shape"):
        K.train_loss_step(zd, yd, cuda.device_array((5, 4), np.float32), acc)
    with pytest.raises(TypeError, match="acc: expected dtype float64"):
        K.train_loss_step(zd, yd, d, cuda.device_array(K.SLOTS, np.float32))
