"""An empty batch (N = 0) is one rule for every op that takes a batch: empty outputs, zero weight
gradients; softmax cross-entropy alone refuses it (the mean over no rows is undefined)."""
import numpy as np
import pytest

from gpu_cnn import functional as F


def test_every_op_takes_an_empty_batch(backend, rng):
    x = np.zeros((0, 2, 6, 6), np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    y = F.conv2d(x, w, b, stride=1, padding=1)
    assert y.shape == (0, 3, 6, 6)
    dx, dw, db = F.conv2d_backward(y, x, w, stride=1, padding=1)
    assert dx.shape == x.shape and not dw.any() and not db.any() and dw.shape == w.shape
    r = F.relu(y)
    assert r.shape == y.shape and F.relu_backward(r, y).shape == y.shape
    p, idx = F.max_pool2d(r, 2)
    assert p.shape == (0, 3, 3, 3) and idx.shape == p.shape
    assert F.max_pool2d_backward(p, idx, r.shape, 2).shape == r.shape
    h = p.reshape(0, 27)
    lw = rng.standard_normal((10, 27)).astype(np.float32)
    logits = F.linear(h, lw, np.zeros(10, np.float32))
    assert logits.shape == (0, 10)
    ldx, ldw, ldb = F.linear_backward(logits, h, lw)
    assert ldx.shape == (0, 27) and not ldw.any() and not ldb.any()
    with pytest.raises(ValueError, match="logits"):
        F.softmax_cross_entropy(logits, np.zeros(0, np.int64))
