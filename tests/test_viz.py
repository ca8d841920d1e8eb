"""Figures: every viz function returns a Figure with the panels, titles and labels it promises, and
writes a PNG that is not blank. Also the demo that writes the explainer's figures."""
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg
from matplotlib.figure import Figure

from gpu_cnn import viz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    """A real PNG with something drawn in it (not one flat colour)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    pixels = mpimg.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.std() > 0, f"{path} is blank"


def panels(fig):
    """The axes that show data (colour bars left out)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def cell_texts(ax):
    return [t.get_text() for t in ax.texts]


def test_show_image_small_is_annotated(tmp_path, rng):
    img = rng.normal(size=(5, 5)).astype(np.float32)
    img[0, 0] = 0.0
    fig = viz.show_image(img, "five by five", save=tmp_path / "img.png")
    assert isinstance(fig, Figure)
    (ax,) = panels(fig)
    assert ax.get_title() == "five by five"
    assert ax.get_xlabel() == "column" and ax.get_ylabel() == "row"
    texts = cell_texts(ax)
    assert len(texts) == 25                      # one value per cell
    assert texts[0] == "0"                       # exact zeros read as 0
    assert f"{img[2, 3]:.2f}" in texts
    assert not colorbars(fig)                    # the values are written in: no colour bar needed
    assert_png(tmp_path / "img.png")


def test_show_image_large_has_colorbar_and_no_numbers(tmp_path, rng):
    fig = viz.show_image(rng.random((1, 1, 28, 28)), "big", save=tmp_path / "big.png")
    (ax,) = panels(fig)
    assert not ax.texts
    assert len(colorbars(fig)) == 1
    assert_png(tmp_path / "big.png")


def test_show_image_into_axes_and_highlight(tmp_path):
    fig = viz.new_figure(6, 3)
    a, b = fig.subplots(1, 2)
    mask = np.zeros((3, 3), bool)
    mask[1:, 0] = True
    out = viz.show_image(np.arange(9.0).reshape(3, 3), "left", ax=a)
    out2 = viz.show_image(np.ones((3, 3)), "right", ax=b, highlight=mask, save=tmp_path / "two.png")
    assert out is fig and out2 is fig
    assert len(b.patches) == 2                   # one red outline per highlighted cell
    assert [ax.get_title() for ax in panels(fig)] == ["left", "right"]
    assert_png(tmp_path / "two.png")


def test_show_image_rejects_stacks():
    with pytest.raises(ValueError, match="2-D"):
        viz.show_image(np.zeros((3, 4, 4)), "x")


def test_filter_bank(tmp_path, rng):
    w = rng.normal(size=(5, 1, 3, 3)).astype(np.float32)
    names = ["a", "b", "c", "d", "e"]
    fig = viz.filter_bank(w, titles=names, save=tmp_path / "filters.png")
    ps = panels(fig)
    assert [ax.get_title() for ax in ps] == names
    assert len(colorbars(fig)) == 1              # one shared scale
    assert all(len(ax.texts) == 9 for ax in ps)  # 3×3 weights written in
    im = ps[0].images[0]
    lo, hi = im.norm.vmin, im.norm.vmax
    assert lo == pytest.approx(-hi)              # diverging scale centred at 0
    assert hi == pytest.approx(np.abs(w).max())
    assert fig._suptitle is not None and "Filters" in fig._suptitle.get_text()
    assert_png(tmp_path / "filters.png")


def test_filter_bank_multichannel_and_large(rng):
    fig = viz.filter_bank(rng.normal(size=(2, 3, 7, 7)))
    ps = panels(fig)
    assert len(ps) == 6                          # one row per filter, one column per input channel
    assert ps[4].get_title() == "filter 1, input channel 1"
    assert not any(ax.texts for ax in ps)        # 7×7: no numbers
    with pytest.raises(ValueError, match="titles"):
        viz.filter_bank(rng.normal(size=(2, 1, 3, 3)), titles=["only one"])


def test_filter_bank_into_subfigure(tmp_path, rng):
    fig = viz.new_figure(10, 3)
    left, right = fig.subfigures(1, 2)
    viz.show_image(rng.random((6, 6)), "image", ax=left.add_subplot())
    out = viz.filter_bank(rng.normal(size=(3, 1, 3, 3)), fig=right, save=tmp_path / "sub.png")
    assert out is fig
    assert len(panels(fig)) == 4
    assert_png(tmp_path / "sub.png")


def test_feature_maps_shared_scale(tmp_path, rng):
    maps = rng.normal(size=(1, 5, 8, 8)).astype(np.float32)
    fig = viz.feature_maps(maps, titles=list("vhdDr"), save=tmp_path / "maps.png")
    ps = panels(fig)
    assert [ax.get_title() for ax in ps] == list("vhdDr")
    assert len(colorbars(fig)) == 1              # ONE colour bar when the scale is shared
    norms = {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in ps}
    assert norms == {(float(maps.min()), float(maps.max()))}
    assert all(len(ax.texts) == 64 for ax in ps)
    assert_png(tmp_path / "maps.png")


def test_feature_maps_own_scales(rng):
    maps = rng.normal(size=(3, 12, 12)) * np.array([1, 10, 100])[:, None, None]
    fig = viz.feature_maps(maps, shared_scale=False)
    ps = panels(fig)
    assert [ax.get_title() for ax in ps] == ["channel 0", "channel 1", "channel 2"]
    assert len(colorbars(fig)) == 3              # one per panel
    assert not any(ax.texts for ax in ps)        # 12×12: no numbers
    assert ps[2].images[0].norm.vmax == pytest.approx(maps[2].max())


def test_before_after(tmp_path, rng):
    fmap = rng.normal(size=(3, 3)).astype(np.float32)
    relu = np.maximum(fmap, 0)
    pool = np.array([[relu[:2, :2].max(), relu[:2, 1:].max()], [relu[1:, :2].max(), relu[1:, 1:].max()]])
    fig = viz.before_after([("conv", fmap), ("ReLU", relu), ("pool", pool)], save=tmp_path / "ba.png")
    ps = panels(fig)
    assert [ax.get_title() for ax in ps] == ["conv (3×3)", "ReLU (3×3)", "pool (2×2)"]
    assert len(colorbars(fig)) == 1
    assert [len(ax.texts) for ax in ps] == [9, 9, 4]
    assert "conv → ReLU → pool" in fig._suptitle.get_text()
    assert_png(tmp_path / "ba.png")


def test_before_after_rows(rng):
    maps = rng.normal(size=(3, 8, 8))
    fig = viz.before_after([("ReLU", np.maximum(maps, 0)), ("pool", maps[:, ::2, ::2])], row_names=["x", "y", "z"])
    ps = panels(fig)
    assert len(ps) == 6 and len(colorbars(fig)) == 1
    assert ps[3].get_title() == "y: pool (4×4)"
    with pytest.raises(ValueError, match="channels"):
        viz.before_after([("a", maps), ("b", maps[:2])])


def test_training_curves(tmp_path):
    history = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 1 - 0.5 / e, "val_loss": 2.2 / e,
                "val_acc": 1 - 0.6 / e, "seconds": 0.1} for e in range(1, 6)]
    fig = viz.training_curves(history, save=tmp_path / "curves.png")
    loss, acc = panels(fig)
    assert loss.get_title() == "Loss" and acc.get_title() == "Accuracy"
    assert loss.get_xlabel() == "epoch" and "loss" in loss.get_ylabel() and acc.get_ylabel() == "accuracy"
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["train", "validation"]
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["train", "validation"]
    np.testing.assert_allclose(loss.lines[0].get_ydata(), [2.0 / e for e in range(1, 6)])
    assert_png(tmp_path / "curves.png")


def test_training_curves_missing_keys(tmp_path):
    fig = viz.training_curves([{"train_loss": 1.0}, {"train_loss": 0.5}], save=tmp_path / "c.png")
    loss, acc = panels(fig)
    assert len(loss.lines) == 1 and list(loss.lines[0].get_xdata()) == [1, 2]
    assert not acc.lines and acc.texts              # "no accuracy recorded"
    assert_png(tmp_path / "c.png")


def test_confusion_matrix(tmp_path):
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 2, 2, 0, 2])
    fig = viz.confusion_matrix(y_true, y_pred, class_names=["zero", "one", "two"], save=tmp_path / "cm.png")
    (ax,) = panels(fig)
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["zero", "one", "two"]
    assert cell_texts(ax) == ["2", "1", "0", "0", "2", "0", "1", "0", "3"]   # row by row
    assert "accuracy" in ax.get_title() and len(colorbars(fig)) == 1
    assert_png(tmp_path / "cm.png")

    fig = viz.confusion_matrix(y_true, y_pred, normalize=True)
    (ax,) = panels(fig)
    np.testing.assert_allclose(ax.images[0].get_array().sum(axis=1), 1.0)
    assert "0.67" in cell_texts(ax) and "row-normalised" in ax.get_title()


def test_misclassified(tmp_path, rng):
    n = 40
    images = rng.random((n, 1, 8, 8)).astype(np.float32)
    y_true = rng.integers(0, 10, n)
    y_pred = y_true.copy()
    wrong = [3, 7, 11, 20, 33]
    y_pred[wrong] = (y_true[wrong] + 1) % 10
    probs = rng.dirichlet(np.ones(10), n)
    fig = viz.misclassified(images, y_true, y_pred, probs=probs, save=tmp_path / "mis.png")
    ps = panels(fig)
    assert len(ps) == 5
    assert ps[0].get_title().startswith(f"true {y_true[3]} / pred {y_pred[3]}")
    assert f"{probs[3, y_pred[3]]:.2f}" in ps[0].get_title()
    assert_png(tmp_path / "mis.png")

    assert len(panels(viz.misclassified(images, y_true, y_pred, max_n=2))) == 2
    fig = viz.misclassified(images, y_true, y_true, save=tmp_path / "none.png")
    assert "no misclassified" in panels(fig)[0].texts[0].get_text()
    assert_png(tmp_path / "none.png")


def test_save_figure_makes_folders(tmp_path):
    fig = viz.show_image(np.eye(4), "eye")
    path = viz.save_figure(fig, tmp_path / "a" / "b" / "eye.png")
    assert path.endswith("eye.png")
    assert_png(tmp_path / "a" / "b" / "eye.png")


# ---------------------------------------------------------------------------------------------------
# the demo


def test_run_demo_writes_the_figures(tmp_path, cpu_backend):
    from gpu_cnn import explainer
    from gpu_cnn.demo import run_demo

    lines = []
    paths = run_demo(tmp_path / "figs", stream=lines.append)
    text = "\n".join(lines)
    names = sorted(p.name for p in (tmp_path / "figs").glob("*.png"))
    assert len(paths) >= 5 and len(names) == len(paths)
    for name in ("01_worked_example.png", "02_relu_pool.png", "03_digit_two_filters.png",
                 "04_digit_two_feature_maps.png", "05_digit_two_relu_pool.png"):
        assert name in names
    for p in paths:
        assert_png(Path(p))
    # The printed text carries the true feature map, value by value.
    for v in np.asarray(explainer.feature_map(), np.float64).ravel():
        assert f"{v:.1f}" in text, f"true map value {v:.1f} missing from the printed example"


def test_run_demo_without_out_dir_only_prints(cpu_backend):
    from gpu_cnn.demo import run_demo

    lines = []
    assert run_demo(stream=lines.append) == []
    assert lines and lines[0].strip()


def test_demo_numbers_match_the_ops(cpu_backend):
    from gpu_cnn import explainer
    from gpu_cnn.demo import digit_two_example, worked_example

    ex = worked_example()
    np.testing.assert_allclose(ex["feature_map"], explainer.feature_map(), rtol=1e-5, atol=1e-6)
    assert ex["feature_map"].shape == (3, 3) and ex["pool"].shape == (2, 2)
    two = digit_two_example()
    assert two["maps"].shape == (5, 8, 8) and two["pool"].shape == (5, 4, 4)
    assert (two["relu"] >= 0).all() and (two["maps"] < 0).any()      # ReLU really clipped something


def test_one_epoch_curves_tick_only_that_epoch():
    fig = viz.training_curves([{"epoch": 1, "train_loss": 2.4, "train_acc": 0.1, "val_loss": 2.3, "val_acc": 0.2}])
    for ax in fig.axes[:2]:
        assert list(ax.get_xticks()) == [1]  # not 0.96, 0.98, ... around the single point


def test_prediction_figure_has_the_input_and_one_bar_per_class():
    probs = np.array([0.1, 0.7, 0.2])
    fig = viz.prediction(np.zeros((1, 8, 8), np.float32), probs, title="t", notes=["inverted"])
    ax_img, ax_bar = fig.axes[0], fig.axes[1]
    assert ax_img.images[0].get_array().shape == (8, 8)
    heights = [p.get_height() for p in ax_bar.patches]
    np.testing.assert_allclose(heights, probs)
    assert "predicted 1" in ax_bar.get_title() and "inverted" in ax_img.get_xlabel()
