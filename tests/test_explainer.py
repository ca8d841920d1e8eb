"""The explainer's worked example (gpu_cnn.explainer): the true feature map, worked out here by hand.

Each of the nine outputs is written below as the sum of its nine products, image value * filter value,
with the window read row by row (stride 1, no padding, cross-correlation). The explainer's own printed
map agrees with these only in its first two entries (0.3 and 2.8, the two it works by hand).
"""
import numpy as np
import pytest

from gpu_cnn import explainer
from gpu_cnn import functional as F

IMAGE = [[1, 2, 0, 3, 1],
         [4, 1, 1, 0, 0],
         [1, 2, 2, 4, 1],
         [3, 0, 1, 2, 3],
         [2, 3, 0, 1, 2]]
FILTER = [[0.2, -0.5, 0.3],
          [-0.1, 0.4, 0.7],
          [0.6, -0.2, 0.1]]

# out[r, c] = Σ_{i, j} IMAGE[r + i][c + j] * FILTER[i][j], by hand
BY_HAND = {
    (0, 0): 1*0.2 + 2*-0.5 + 0*0.3 + 4*-0.1 + 1*0.4 + 1*0.7 + 1*0.6 + 2*-0.2 + 2*0.1,  # = 0.3
    (0, 1): 2*0.2 + 0*-0.5 + 3*0.3 + 1*-0.1 + 1*0.4 + 0*0.7 + 2*0.6 + 2*-0.2 + 4*0.1,  # = 2.8
    (0, 2): 0*0.2 + 3*-0.5 + 1*0.3 + 1*-0.1 + 0*0.4 + 0*0.7 + 2*0.6 + 4*-0.2 + 1*0.1,  # = -0.8
    (1, 0): 4*0.2 + 1*-0.5 + 1*0.3 + 1*-0.1 + 2*0.4 + 2*0.7 + 3*0.6 + 0*-0.2 + 1*0.1,  # = 4.6
    (1, 1): 1*0.2 + 1*-0.5 + 0*0.3 + 2*-0.1 + 2*0.4 + 4*0.7 + 0*0.6 + 1*-0.2 + 2*0.1,  # = 3.1
    (1, 2): 1*0.2 + 0*-0.5 + 0*0.3 + 2*-0.1 + 4*0.4 + 1*0.7 + 1*0.6 + 2*-0.2 + 3*0.1,  # = 2.8
    (2, 0): 1*0.2 + 2*-0.5 + 2*0.3 + 3*-0.1 + 0*0.4 + 1*0.7 + 2*0.6 + 3*-0.2 + 0*0.1,  # = 0.8
    (2, 1): 2*0.2 + 2*-0.5 + 4*0.3 + 0*-0.1 + 1*0.4 + 2*0.7 + 3*0.6 + 0*-0.2 + 1*0.1,  # = 4.3
    (2, 2): 2*0.2 + 4*-0.5 + 1*0.3 + 1*-0.1 + 2*0.4 + 3*0.7 + 0*0.6 + 1*-0.2 + 2*0.1,  # = 1.5
}
TRUE_MAP = np.array([[BY_HAND[r, c] for c in range(3)] for r in range(3)])
PRINTED = [[0.3, 2.8, 2.2], [0.7, 1.0, 2.2], [2.2, 0.2, 2.6]]

# float32 products and sums of 9 terms of size <= 4: a few ulps of 4
ATOL = 1e-5


def test_constants_are_the_explainers():
    assert np.array_equal(np.asarray(explainer.IMAGE), IMAGE)
    assert np.array_equal(np.asarray(explainer.FILTER), FILTER)
    assert np.array_equal(np.asarray(explainer.PRINTED_MAP), PRINTED)


def test_hand_worked_values_are_the_ones_claimed():
    # the sums above, rounded, are the values written in their comments
    np.testing.assert_allclose(TRUE_MAP, [[0.3, 2.8, -0.8], [4.6, 3.1, 2.8], [0.8, 4.3, 1.5]], atol=1e-12)


def test_feature_map_on_every_backend(backend):
    got = explainer.feature_map()
    assert isinstance(got, np.ndarray) and got.shape == (3, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, TRUE_MAP, rtol=0, atol=ATOL)


def test_functional_conv2d_on_every_backend(backend):
    x = np.asarray(IMAGE, np.float32)[None, None]
    w = np.asarray(FILTER, np.float32)[None, None]
    y = F.conv2d(x, w, stride=1, padding=0)
    assert y.shape == (1, 1, 3, 3)
    np.testing.assert_allclose(y[0, 0], TRUE_MAP, rtol=0, atol=ATOL)


def test_printed_map_is_right_only_where_worked_by_hand(cpu_backend):
    wrong = np.abs(np.asarray(PRINTED) - TRUE_MAP) > 0.05
    assert not wrong[0, 0] and not wrong[0, 1]
    assert wrong.sum() == 7
    assert explainer.differing_entries() == [tuple(rc) for rc in np.argwhere(wrong)]


def test_products_spell_out_the_hand_worked_sums(cpu_backend):
    for (r, c), value in BY_HAND.items():
        text = explainer.products(r, c)
        assert text.count("*") == 9
        assert eval(text) == pytest.approx(value, abs=1e-12)  # the text is the sum itself


def test_text_shows_the_example_and_both_maps(cpu_backend):
    text = explainer.worked_example_text()
    for r, c in explainer.HAND_WORKED:
        assert explainer.products(r, c) in text
    for row in TRUE_MAP:  # the true map, row by row, one decimal
        assert " ".join(f"{v:4.1f}" for v in row) in text
    for row in PRINTED:
        assert " ".join(f"{v:4.1f}" for v in row) in text
    assert "printed" in text and "true" in text
    note = [line for line in text.splitlines() if line.startswith("Note:")]
    assert len(note) == 1 and "7 entries" in note[0] and "out[2, 2]" in note[0]
