"""The explainer's worked example and the 10×10 "2", computed with the project's ops and drawn.

    from gpu_cnn.demo import run_demo
    paths = run_demo("figs")        # prints the worked example; writes the figures of notebooks 01 and 02

    ``gpu-cnn demo --out figs`` does the same from the command line.

The pieces are public so that the notebooks draw exactly what the demo writes:

* :func:`worked_example` — the 5×5 image, the 3×3 filter, the true feature map (``F.conv2d``), the map
  the explainer printed, ReLU, and 2×2 max-pooling with stride 1;
* :func:`digit_filters` — the bank of 3×3 filters for the "2" (four edge directions and a seeded random one);
* :func:`digit_two_example` — the "2" through that bank: 8×8 maps, ReLU, 2×2 max-pooling (4×4);
* ``*_figure`` functions that turn those into figures (see :mod:`gpu_cnn.viz`).
"""
import os

import numpy as np

from . import viz

__all__ = [
    "DIGIT_FILTER_NAMES", "digit_filters", "worked_example", "digit_two_example",
    "worked_example_figure", "relu_pool_figure", "digit_two_filters_figure",
    "digit_two_feature_maps_figure", "digit_two_relu_pool_figure", "run_demo",
]

DIGIT_FILTER_NAMES = ("vertical edge", "horizontal edge", "diagonal edge \\", "diagonal edge /", "random (seed 0)")


def digit_filters(seed=0):
    """(5, 1, 3, 3) float32: Prewitt-style edge filters (vertical, horizontal, both diagonals) and a random one.

    Convolution here is cross-correlation (as in PyTorch): a filter responds most where the patch under
    it looks like the filter. Each edge filter has +1 on one side of its line, -1 on the other and 0 on
    the line; the random filter draws N(0, 0.5²) weights from ``np.random.default_rng(seed)``, rounded to
    one decimal so that its values read easily.
    """
    vertical = [[1, 0, -1], [1, 0, -1], [1, 0, -1]]
    horizontal = [[1, 1, 1], [0, 0, 0], [-1, -1, -1]]
    diag_back = [[0, 1, 1], [-1, 0, 1], [-1, -1, 0]]      # zero along "\", + above it, - below
    diag_fwd = [[1, 1, 0], [1, 0, -1], [0, -1, -1]]       # zero along "/", + above it, - below
    rnd = np.round(np.random.default_rng(seed).normal(0.0, 0.5, size=(3, 3)), 1)
    w = np.stack([np.asarray(f, np.float64) for f in (vertical, horizontal, diag_back, diag_fwd)] + [rnd])
    return w[:, None].astype(np.float32)


def worked_example():
    """The explainer's 5×5 example through conv, ReLU and 2×2/stride-1 max-pooling, with ``gpu_cnn.functional``.

    Returns a dict of NumPy arrays: ``image`` (5, 5), ``filter`` (3, 3), ``feature_map`` (3, 3, computed
    by ``F.conv2d``), ``printed_map`` (3, 3, as the explainer printed it), ``relu`` (3, 3),
    ``pool`` (2, 2) and ``pool_idx`` (the argmax indices ``F.max_pool2d`` returns for backward).
    """
    from . import explainer
    from . import functional as F

    image = np.asarray(explainer.IMAGE, np.float32)
    filt = np.asarray(explainer.FILTER, np.float32)
    fmap = np.asarray(F.conv2d(image[None, None], filt[None, None]))
    relu = np.asarray(F.relu(fmap))
    pool, idx = F.max_pool2d(relu, kernel_size=2, stride=1)
    return {
        "image": image, "filter": filt, "feature_map": fmap[0, 0],
        "printed_map": np.asarray(explainer.PRINTED_MAP, np.float32),
        "relu": relu[0, 0], "pool": np.asarray(pool)[0, 0], "pool_idx": np.asarray(idx),
    }


def digit_two_example(seed=0):
    """The 10×10 "2" through :func:`digit_filters`: conv (8×8 maps), ReLU, 2×2 max-pooling (4×4).

    Returns a dict: ``image`` (10, 10), ``weights`` (5, 1, 3, 3), ``names``, ``maps`` (5, 8, 8),
    ``relu`` (5, 8, 8), ``pool`` (5, 4, 4) — NumPy arrays computed with ``gpu_cnn.functional``.
    """
    from . import data
    from . import functional as F

    image = np.asarray(data.digit_two(), np.float32)
    w = digit_filters(seed)
    maps = np.asarray(F.conv2d(image[None, None], w))            # (1, 5, 8, 8): 10 - 3 + 1 = 8
    relu = np.asarray(F.relu(maps))
    pool, _ = F.max_pool2d(relu, kernel_size=2, stride=2)       # (1, 5, 4, 4)
    return {"image": image, "weights": w, "names": list(DIGIT_FILTER_NAMES),
            "maps": maps[0], "relu": relu[0], "pool": np.asarray(pool)[0]}


# ---------------------------------------------------------------------------------------------------
# figures


def worked_example_figure(ex=None, save=None):
    """Image, filter, the true feature map and the map the explainer printed (differing cells outlined in red)."""
    ex = worked_example() if ex is None else ex
    fmap, printed = ex["feature_map"], ex["printed_map"]
    differs = ~np.isclose(fmap, printed, atol=1e-4)
    fig = viz.new_figure(13.0, 3.8)
    axes = fig.subplots(1, 4, width_ratios=[5, 3, 3, 3])
    viz.show_image(ex["image"], "input image (5×5)", ax=axes[0])
    m = float(np.abs(ex["filter"]).max()) or 1.0
    viz.show_image(ex["filter"], "filter (3×3)", ax=axes[1], cmap=viz.DIVERGING_CMAP, vmin=-m, vmax=m)
    lo = float(min(fmap.min(), printed.min()))
    hi = float(max(fmap.max(), printed.max()))
    fmt = viz.value_format(np.concatenate([fmap.ravel(), printed.ravel()]))   # one format for both maps
    viz.show_image(fmap, "true feature map\n(computed by F.conv2d)", ax=axes[2], cmap=viz.MAP_CMAP,
                   vmin=lo, vmax=hi, fmt=fmt)
    viz.show_image(printed, "map as the explainer printed it\n(red: differs from the true map)", ax=axes[3],
                   cmap=viz.MAP_CMAP, vmin=lo, vmax=hi, fmt=fmt, highlight=differs)
    fig.suptitle("Convolution: slide the 3×3 filter over the 5×5 image; each output is a sum of 9 products")
    if save is not None:
        viz.save_figure(fig, save)
    return fig


def relu_pool_figure(ex=None, save=None):
    """Feature map -> ReLU -> 2×2 max-pooling with stride 1, one shared colour scale."""
    ex = worked_example() if ex is None else ex
    return viz.before_after(
        [("feature map", ex["feature_map"]), ("ReLU: max(0, x)", ex["relu"]),
         ("max-pool 2×2, stride 1", ex["pool"])],
        suptitle="Feature map → ReLU (negatives become 0) → max-pool (largest of each 2×2 window)", save=save)


def digit_two_filters_figure(ex=None, save=None):
    """The 10×10 "2" next to the bank of 3×3 filters."""
    ex = digit_two_example() if ex is None else ex
    fig = viz.new_figure(15.0, 4.6)
    left, right = fig.subfigures(1, 2, width_ratios=[1, 2.6])
    viz.show_image(ex["image"], 'input: a 10×10 "2" (pixels in [0, 1])', ax=left.add_subplot(), fmt="{:.1f}")
    viz.filter_bank(ex["weights"], titles=ex["names"], max_cols=3, fig=right,
                    suptitle="3×3 filters: blue negative, red positive")
    if save is not None:
        viz.save_figure(fig, save)
    return fig


def digit_two_feature_maps_figure(ex=None, save=None):
    """The five 8×8 feature maps of the "2" (10 - 3 + 1 = 8), on one colour scale."""
    ex = digit_two_example() if ex is None else ex
    return viz.feature_maps(ex["maps"], titles=ex["names"],
                            suptitle='Feature maps of the "2": yellow = strong match, purple = the same edge reversed', save=save)


def digit_two_relu_pool_figure(ex=None, save=None):
    """Each filter's map after ReLU (8×8) and after 2×2 max-pooling with stride 2 (4×4)."""
    ex = digit_two_example() if ex is None else ex
    return viz.before_after([("after ReLU", ex["relu"]), ("after 2×2 max-pool", ex["pool"])],
                            row_names=ex["names"],
                            suptitle='The "2" per filter: after ReLU → after 2×2 max-pooling', save=save)


# ---------------------------------------------------------------------------------------------------
# demo


def run_demo(out_dir=None, stream=print):
    """Print the explainer's worked example; with `out_dir`, also write its figures as PNGs there.

    Writes ``01_worked_example.png``, ``02_relu_pool.png``, ``03_digit_two_filters.png``,
    ``04_digit_two_feature_maps.png`` and ``05_digit_two_relu_pool.png`` (the figures of notebooks 01
    and 02). Returns the list of paths written (empty without `out_dir`). An `out_dir` that exists and is
    not a folder raises ValueError before anything is printed or written.
    """
    from . import explainer

    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir: {os.fspath(out_dir)!r} exists and is not a folder")
    stream(explainer.worked_example_text())
    if out_dir is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    ex, two = worked_example(), digit_two_example()
    figures = [
        ("01_worked_example.png", worked_example_figure, ex),
        ("02_relu_pool.png", relu_pool_figure, ex),
        ("03_digit_two_filters.png", digit_two_filters_figure, two),
        ("04_digit_two_feature_maps.png", digit_two_feature_maps_figure, two),
        ("05_digit_two_relu_pool.png", digit_two_relu_pool_figure, two),
    ]
    paths = []
    for name, make, arg in figures:
        paths.append(viz.save_figure(make(arg), os.path.join(out_dir, name)))
    return paths
