"""The CNN explainer's worked convolution example, as data and as printable text.

A 5×5 image and a 3×3 filter, stride 1, no padding, cross-correlation (the filter is not flipped):

    out[r, c] = Σ_{i, j} IMAGE[r + i][c + j] * FILTER[i][j]

The explainer works the top-left output by hand (0.3) and the next one (2.8), then prints a 3×3 feature
map, :data:`PRINTED_MAP`, whose first row starts 0.3, 2.8 but whose other seven entries do not follow
from its own image and filter. :func:`feature_map` computes the true map with the project's
``conv2d`` on the current backend; :func:`worked_example_text` prints both side by side. The
``gpu-cnn demo`` command prints that text.
"""
import numpy as np

IMAGE = (
    (1, 2, 0, 3, 1),
    (4, 1, 1, 0, 0),
    (1, 2, 2, 4, 1),
    (3, 0, 1, 2, 3),
    (2, 3, 0, 1, 2),
)

FILTER = (
    (0.2, -0.5, 0.3),
    (-0.1, 0.4, 0.7),
    (0.6, -0.2, 0.1),
)

STRIDE = 1
PADDING = 0

# The feature map as the explainer printed it (only its first two entries are right).
PRINTED_MAP = (
    (0.3, 2.8, 2.2),
    (0.7, 1.0, 2.2),
    (2.2, 0.2, 2.6),
)

# The entries the explainer works out by hand: (row, column) of the output.
HAND_WORKED = ((0, 0), (0, 1))


def feature_map():
    """The true 3×3 feature map, (3, 3) float32 NumPy, computed by ``gpu_cnn.functional.conv2d`` on the
    current backend (float32, so values carry float32 rounding: 0.3 comes out as 0.29999998...)."""
    from . import functional as F

    x = np.asarray(IMAGE, np.float32)[None, None]  # (1, 1, 5, 5)
    w = np.asarray(FILTER, np.float32)[None, None]  # (1, 1, 3, 3)
    return np.asarray(F.conv2d(x, w, stride=STRIDE, padding=PADDING))[0, 0]


def _num(v):
    """A filter or image value as written in a product: 0.2, -0.5, 3."""
    v = float(v)
    return f"{v:g}"


def _fmt(v):
    """One decimal, never "-0.0"."""
    s = f"{float(v):.1f}"
    return "0.0" if s == "-0.0" else s


def products(r, c):
    """The nine products of output (r, c) written out: "1*0.2 + 2*-0.5 + ..." (image value * filter value)."""
    terms = []
    for i in range(len(FILTER)):
        for j in range(len(FILTER[0])):
            terms.append(f"{_num(IMAGE[r + i][c + j])}*{_num(FILTER[i][j])}")
    return " + ".join(terms)


def _grid(rows, fmt, width):
    return ["[" + " ".join(f"{fmt(v):>{width}}" for v in row) + " ]" for row in rows]


def differing_entries(true_map=None):
    """(row, column) of every entry where the printed map differs from the true one (at 0.05)."""
    true_map = feature_map() if true_map is None else np.asarray(true_map)
    printed = np.asarray(PRINTED_MAP, np.float64)
    bad = np.abs(true_map.astype(np.float64) - printed) > 0.05
    return [tuple(int(v) for v in rc) for rc in np.argwhere(bad)]


def worked_example_text():
    """A printable text: the image, the filter, the two hand-worked entries as sums of nine products, the
    true feature map beside the printed one, and a note on which entries differ."""
    true_map = feature_map()
    lines = [
        "The CNN explainer's worked example: a 5x5 image, a 3x3 filter, stride 1, no padding",
        "(cross-correlation: out[r, c] = sum over i, j of image[r + i, c + j] * filter[i, j]).",
        "",
        "image:",
        *("  " + g for g in _grid(IMAGE, lambda v: str(v), 2)),
        "",
        "filter:",
        *("  " + g for g in _grid(FILTER, _num, 4)),
        "",
        "worked by hand:",
    ]
    for r, c in HAND_WORKED:
        lines.append(f"  out[{r}, {c}] = {products(r, c)}")
        lines.append(f"            = {_fmt(true_map[r, c])}")
    true_rows = _grid(true_map, _fmt, 4)
    printed_rows = _grid(PRINTED_MAP, _fmt, 4)
    width = max(len(t) for t in true_rows)
    lines += ["", f"  {'true feature map (computed)':<{max(width, 28)}}   as the explainer printed it"]
    for t, p in zip(true_rows, printed_rows):
        lines.append(f"  {t:<{max(width, 28)}}   {p}")
    diff = differing_entries(true_map)
    same = [rc for rc in np.ndindex(true_map.shape) if rc not in diff]
    lines += [
        "",
        f"Note: the printed map matches only {', '.join(f'out{list(rc)}' for rc in same)} (the two worked by "
        f"hand); the other {len(diff)} entries ({', '.join(f'out{list(rc)}' for rc in diff)}) do not follow "
        "from this image and filter.",
    ]
    return "\n".join(lines)


__all__ = [
    "IMAGE", "FILTER", "STRIDE", "PADDING", "PRINTED_MAP", "HAND_WORKED",
    "feature_map", "products", "differing_entries", "worked_example_text",
]
