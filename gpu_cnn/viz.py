"""Figures for the explainer, the notebooks and training: images, filters, feature maps, curves.

    from gpu_cnn import viz
    fig = viz.show_image(img, "input")                       # small grids get every value written in
    fig = viz.filter_bank(w, titles=["vertical", ...])       # w: (C_out, C_in, kH, kW)
    fig = viz.feature_maps(y[0], titles=[...])               # (C, H, W): one panel per channel
    fig = viz.before_after([("conv", y), ("ReLU", r), ("max-pool", p)])
    fig = viz.training_curves(trainer.history)
    fig = viz.confusion_matrix(y_true, y_pred, class_names=test.classes)
    fig = viz.misclassified(images, y_true, y_pred, probs)
    viz.save_figure(fig, "figs/x.png")                       # or save="figs/x.png" on any of the above

Headless by construction: figures are plain ``matplotlib.figure.Figure`` objects drawn by the Agg canvas,
never registered with pyplot, so nothing opens a window and nothing accumulates in pyplot's figure list.
Every function returns its Figure; in Jupyter a Figure left as a cell's last value is shown as a PNG,
whatever the backend (``MPLBACKEND=Agg`` included).
"""
import io
import os

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = [
    "show_image", "filter_bank", "feature_maps", "before_after", "training_curves",
    "confusion_matrix", "misclassified", "prediction", "save_figure", "new_figure", "value_format",
]

DPI = 120
ANNOTATE_MAX = 10          # grids up to this many cells a side get their values written in
FILTER_ANNOTATE_MAX = 5    # filters up to 5×5 get their weights written in
IMAGE_CMAP = "gray"
MAP_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"  # blue negative, white zero, red positive


# ---------------------------------------------------------------------------------------------------
# helpers


def save_figure(fig, path, dpi=DPI):
    """Write `fig` as a PNG at `path` (parent folders created), cropped to its content. Returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    return path


class VizFigure(Figure):
    """A Figure that Jupyter shows as a PNG whatever the matplotlib backend (also under ``MPLBACKEND=Agg``)."""

    def _repr_png_(self):
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
        return buf.getvalue()


def new_figure(width, height):
    """A headless Figure (constrained layout, Agg canvas) of width×height inches, for composing panels."""
    fig = VizFigure(figsize=(width, height), layout="constrained", facecolor="white")
    FigureCanvasAgg(fig)  # attaches itself to the figure: savefig and the notebook's PNG display work
    return fig


def _root(fig):
    """The top-level Figure of a Figure or a SubFigure."""
    return fig.get_figure(root=True) if isinstance(getattr(fig, "figure", None), Figure) else fig


def _size_in(fig):
    """(width, height) in inches of a Figure or SubFigure."""
    root = _root(fig)
    if fig is root:
        return root.get_figwidth(), root.get_figheight()
    root.canvas.draw()  # a subfigure's box is known once the layout ran once
    return fig.bbox.width / root.dpi, fig.bbox.height / root.dpi


def _target(fig, width, height):
    """Draw into `fig` (a Figure or SubFigure) when given, else into a new width×height-inch figure."""
    return new_figure(width, height) if fig is None else fig


def _draw(fig):
    _root(fig).canvas.draw()  # settle the constrained layout, so font sizes match the final cell sizes


def _finish(fig, save):
    fig = _root(fig)
    if save is not None:
        save_figure(fig, save)
    return fig


def _host(a):
    """A NumPy array from NumPy input, lists, or a device array (copied to the host)."""
    if hasattr(a, "copy_to_host"):
        a = a.copy_to_host()
    elif hasattr(a, "get") and not isinstance(a, np.ndarray):   # CuPy
        a = a.get()
    elif hasattr(a, "detach"):                                   # PyTorch
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _as_2d(name, a):
    """(H, W) from (H, W), (1, H, W) or (1, 1, H, W)."""
    a = _host(a)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D image (H, W) (leading axes of size 1 allowed), got shape {a.shape}")
    return a


def _as_stack(name, a):
    """(C, H, W) from (H, W), (C, H, W) or (1, C, H, W)."""
    a = _host(a)
    if a.ndim == 2:
        return a[None]
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{name}: expected maps (C, H, W), (1, C, H, W) or (H, W), got shape {a.shape}")
    return a


def _panel_side(n, annotate):
    """Inches per panel: room for the written values of an n×n map, else a compact thumbnail."""
    return max(2.2, 0.36 * n + 0.5) if annotate else 2.0


def _grid(n, max_cols):
    cols = min(n, max_cols)
    return (n + cols - 1) // cols, cols


def value_format(a):
    """The format :func:`show_image` and friends write values with: "{:.0f}" for integers, "{:.1f}" for
    values given to one decimal (or 10 and up), else "{:.2f}"."""
    a = np.asarray(a, dtype=np.float64)
    if a.size and np.all(np.isfinite(a)) and np.allclose(a, np.round(a), atol=1e-6):
        return "{:.0f}"
    if a.size and np.all(np.isfinite(a)) and np.allclose(a * 10, np.round(a * 10), atol=1e-4):
        return "{:.1f}"   # values given to one decimal (0.3, 2.8) stay that way
    big = np.nanmax(np.abs(a)) if a.size else 0.0
    return "{:.1f}" if big >= 10 else "{:.2f}"


def _annotate(ax, im, a, fmt=None, fontsize=None):
    """Write each cell's value into an image plot, dark text on light cells and light on dark.

    With the automatic format, exact integers are written without decimals ("0", "1"); with a given
    `fmt`, only exact zeros are (the zeros after ReLU read best as "0").
    """
    a = np.asarray(a, dtype=np.float64)
    short = (lambda v: v == np.round(v)) if fmt is None else (lambda v: v == 0)
    fmt = fmt or value_format(a)
    h, w = a.shape
    if fontsize is None:
        fontsize = _cell_fontsize(ax, a, fmt)
    for i in range(h):
        for j in range(w):
            v = a[i, j]
            # Exact integers (the zeros after ReLU, 0/1 pixels) read best without decimals.
            text = f"{v:.0f}" if np.isfinite(v) and short(v) else fmt.format(v)
            if text in ("-0", "-0.0", "-0.00"):
                text = text[1:]
            r, g, b, _ = im.cmap(im.norm(v))
            light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="black" if light else "white")


def _cell_fontsize(ax, a, fmt):
    """A font size that fits the widest value into one cell of `ax` (between 5 and 13 points)."""
    fig = _root(ax.figure)
    bbox = ax.get_position()   # in root-figure fractions
    w_in = bbox.width * fig.get_figwidth()
    h_in = bbox.height * fig.get_figheight()
    cell_pt = 72 * min(w_in / a.shape[1], h_in / a.shape[0])
    chars = max(len(fmt.format(v)) for v in a.ravel()) if a.size else 1
    return float(np.clip(cell_pt * 0.85 / (0.62 * max(chars, 2)), 5, 13))


def _shared_colorbar(fig, im, axes, label):
    """One slim colour bar (about 0.2 inch wide, at most 4 inches tall) for a group of panels."""
    width, fig_height = _size_in(fig)
    height = min(4.0, 0.85 * fig_height)
    fig.colorbar(im, ax=axes, label=label, fraction=0.2 / width, aspect=height / 0.2,
                 shrink=min(1.0, height / max(fig_height - 0.6, 1.0)))


def _label_outer(axes):
    """"row"/"column" axis labels on the panels at the left edge and the bottom of a grid of maps."""
    for ax in axes:
        spec = ax.get_subplotspec()
        if spec is None:
            continue
        below = spec.rowspan.stop < spec.get_gridspec().nrows and any(
            o.get_subplotspec().rowspan.start == spec.rowspan.stop and o.get_subplotspec().colspan == spec.colspan
            for o in axes if o.get_subplotspec() is not None)
        if not below:
            ax.set_xlabel("column", fontsize=8)
        if spec.is_first_col():
            ax.set_ylabel("row", fontsize=8)


def _plain_axes(ax, h, w):
    """Ticks at every row and column of a small grid (labelled 0..n-1), none on big ones."""
    if max(h, w) <= ANNOTATE_MAX:
        ax.set_xticks(range(w))
        ax.set_yticks(range(h))
        ax.tick_params(labelsize=7, length=0)
        ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
        ax.grid(which="minor", color="0.6", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    else:
        ax.set_xticks([])
        ax.set_yticks([])


def _limits(arrays, symmetric=False):
    lo = min(float(np.nanmin(a)) for a in arrays)
    hi = max(float(np.nanmax(a)) for a in arrays)
    if symmetric:
        m = max(abs(lo), abs(hi)) or 1.0
        return -m, m
    if hi == lo:
        hi, lo = hi + 0.5, lo - 0.5
    return lo, hi


def _shape_str(a):
    return "×".join(str(s) for s in a.shape)


# ---------------------------------------------------------------------------------------------------
# images, filters, feature maps


def show_image(img, title, ax=None, annotate=None, cmap=IMAGE_CMAP, vmin=None, vmax=None, colorbar=None,
               fmt=None, highlight=None, save=None):
    """Draw one 2-D image (H, W) (leading axes of size 1 are dropped) with its title.

    annotate: write each cell's value in it (default: when the image is at most 10×10).
    colorbar: add a colour bar (default: when the values are not written in).
    ax:       draw into this Axes instead of a new figure (its figure is returned; save works too).
    highlight: optional (H, W) boolean mask; those cells get a red outline (e.g. "these values differ").
    cmap/vmin/vmax: as for imshow; fmt: a format like "{:.1f}" for the written values.
    """
    a = _as_2d("show_image: img", img)
    h, w = a.shape
    if ax is None:
        side = min(max(2.8, 0.45 * max(h, w)), 6.0)
        fig = new_figure(side + 0.6, side * h / w + 0.5)
        ax = fig.add_subplot()
    fig = ax.figure   # a Figure or SubFigure
    if annotate is None:
        annotate = max(h, w) <= ANNOTATE_MAX
    if colorbar is None:
        colorbar = not annotate
    im = ax.imshow(a, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title)
    _plain_axes(ax, h, w)
    if max(h, w) <= ANNOTATE_MAX:
        ax.set_xlabel("column")
        ax.set_ylabel("row")
    if colorbar:
        fig.colorbar(im, ax=ax, shrink=0.8, label="value")
    if highlight is not None:
        mask = np.asarray(_host(highlight), dtype=bool).reshape(a.shape)
        for i, j in zip(*np.nonzero(mask)):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    if annotate:
        _draw(fig)
        _annotate(ax, im, a, fmt=fmt)
    return _finish(fig, save)


def filter_bank(w, titles=None, annotate=None, max_cols=6, suptitle="Filters", fig=None, save=None):
    """One panel per filter of conv weights `w` (C_out, C_in, kH, kW); (kH, kW) and (C_out, kH, kW) work too.

    A diverging colour map centred at 0 (blue negative, white zero, red positive), the same scale for
    every filter, and one colour bar. Weights are written in when the filters are at most 5×5.
    With C_in > 1 there is one row per output filter and one column per input channel.
    fig: draw into this Figure or SubFigure (e.g. one half of ``Figure.subfigures``) instead of a new one.
    """
    w = _host(w)
    if w.ndim == 2:
        w = w[None, None]
    elif w.ndim == 3:
        w = w[:, None]
    if w.ndim != 4:
        raise ValueError(f"filter_bank: w must be (C_out, C_in, kH, kW), got shape {w.shape}")
    c_out, c_in, kh, kw = w.shape
    if titles is not None and len(titles) != c_out:
        raise ValueError(f"filter_bank: {len(titles)} titles for {c_out} filters")
    if annotate is None:
        annotate = max(kh, kw) <= FILTER_ANNOTATE_MAX
    panels = [(o, i) for o in range(c_out) for i in range(c_in)]
    rows, cols = (c_out, c_in) if c_in > 1 else _grid(c_out, max_cols)
    side = 1.9 if annotate else 1.4
    fig = _target(fig, cols * side + 0.9, rows * (side + 0.35) + 0.5)
    vmin, vmax = _limits([w], symmetric=True)
    norm = mcolors.Normalize(vmin=vmin, vmax=vmax)
    axes, im = [], None
    for k, (o, i) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        im = ax.imshow(w[o, i], cmap=DIVERGING_CMAP, norm=norm, interpolation="nearest")
        name = titles[o] if titles is not None else f"filter {o}"
        ax.set_title(name if c_in == 1 else f"{name}, input channel {i}", fontsize=10)
        _plain_axes(ax, kh, kw)
        axes.append((ax, im, w[o, i]))
    _label_outer([a for a, _, _ in axes])
    if suptitle:
        fig.suptitle(f"{suptitle} ({kh}×{kw}, shared colour scale)")
    _shared_colorbar(fig, im, [a for a, _, _ in axes], "weight")
    if annotate:
        _draw(fig)
        fmt = value_format(w)
        for ax, im_, a in axes:
            _annotate(ax, im_, a, fmt=fmt)
    return _finish(fig, save)


def feature_maps(maps, titles=None, shared_scale=True, annotate=None, cmap=MAP_CMAP, max_cols=None,
                 suptitle="Feature maps", fig=None, save=None):
    """One panel per channel of `maps` (C, H, W) (or (1, C, H, W), or one (H, W) map).

    shared_scale=True: every panel uses the same colour scale, with ONE colour bar, so equal colours
    mean equal values across channels; False: each panel has its own scale and colour bar.
    Values are written in when the maps are at most 10×10 (annotate=None).
    fig: draw into this Figure or SubFigure instead of a new one.
    """
    m = _as_stack("feature_maps: maps", maps)
    c, h, w = m.shape
    if titles is not None and len(titles) != c:
        raise ValueError(f"feature_maps: {len(titles)} titles for {c} maps")
    if annotate is None:
        annotate = max(h, w) <= ANNOTATE_MAX
    if max_cols is None:   # big annotated panels wrap sooner, so the figure stays about 12 inches wide
        max_cols = 3 if annotate and max(h, w) > 5 else 5
    rows, cols = _grid(c, max_cols)
    side = _panel_side(max(h, w), annotate)
    fig = _target(fig, cols * side + (0.9 if shared_scale else 0.6 * cols), rows * (side + 0.3) + 0.5)
    norm = mcolors.Normalize(*_limits([m])) if shared_scale else None
    axes = []
    for k in range(c):
        ax = fig.add_subplot(rows, cols, k + 1)
        n = norm if shared_scale else mcolors.Normalize(*_limits([m[k]]))
        im = ax.imshow(m[k], cmap=cmap, norm=n, interpolation="nearest")
        ax.set_title(titles[k] if titles is not None else f"channel {k}", fontsize=10)
        _plain_axes(ax, h, w)
        if not shared_scale:
            fig.colorbar(im, ax=ax, shrink=0.8)
        axes.append((ax, im, m[k]))
    if shared_scale:
        _shared_colorbar(fig, axes[-1][1], [a for a, _, _ in axes], "value (shared scale)")
    _label_outer([a for a, _, _ in axes])
    if suptitle:
        fig.suptitle(f"{suptitle} ({c} × {h}×{w})")
    if annotate:
        _draw(fig)
        for ax, im, a in axes:
            _annotate(ax, im, a)
    return _finish(fig, save)


def before_after(stages, row_names=None, annotate=None, cmap=MAP_CMAP, shared_scale=True,
                 suptitle=None, fig=None, save=None):
    """Panels left to right for the stages of a pipeline, e.g. conv -> ReLU -> pool.

    stages: list of (name, array). Arrays are 2-D maps (leading axes of size 1 dropped), or (C, H, W)
            stacks with the same C for every stage: then one row per channel (named by row_names).
    One colour scale for all panels (shared_scale=True, one colour bar), so a value has the same colour
    before and after. Values are written in on maps at most 10×10 (annotate=None).
    suptitle: the figure's title (default "Step by step: name → name → ...").
    fig: draw into this Figure or SubFigure instead of a new one.
    """
    if not stages:
        raise ValueError("before_after: give at least one (name, array) stage")
    names = [str(n) for n, _ in stages]
    arrays = [_as_stack(f"before_after: stage {n!r}", a) for n, a in stages]
    c = arrays[0].shape[0]
    if any(a.shape[0] != c for a in arrays):
        raise ValueError(f"before_after: every stage needs the same number of channels, got "
                         f"{[a.shape[0] for a in arrays]}")
    if row_names is not None and len(row_names) != c:
        raise ValueError(f"before_after: {len(row_names)} row names for {c} channels")
    big = max(max(a.shape[1:]) for a in arrays)
    if annotate is None:
        annotate = big <= ANNOTATE_MAX
    s = len(arrays)
    side = _panel_side(big, annotate)
    fig = _target(fig, s * side + 1.0, c * (side + 0.3) + 0.5)
    norm = mcolors.Normalize(*_limits(arrays)) if shared_scale else None
    axes = []
    for r in range(c):
        for k, a in enumerate(arrays):
            ax = fig.add_subplot(c, s, r * s + k + 1)
            m = a[r]
            n = norm if shared_scale else mcolors.Normalize(*_limits([m]))
            im = ax.imshow(m, cmap=cmap, norm=n, interpolation="nearest")
            title = f"{names[k]} ({_shape_str(m)})"
            if c > 1 and row_names is not None:
                title = f"{row_names[r]}: {title}"
            elif c > 1:
                title = f"channel {r}: {title}"
            ax.set_title(title, fontsize=10)
            _plain_axes(ax, *m.shape)
            if not shared_scale:
                fig.colorbar(im, ax=ax, shrink=0.8)
            axes.append((ax, im, m))
    if shared_scale:
        _shared_colorbar(fig, axes[-1][1], [a for a, _, _ in axes], "value (shared scale)")
    _label_outer([a for a, _, _ in axes])
    fig.suptitle(suptitle if suptitle is not None else "Step by step: " + " → ".join(names))
    if annotate:
        _draw(fig)
        for ax, im, m in axes:
            _annotate(ax, im, m)
    return _finish(fig, save)


# ---------------------------------------------------------------------------------------------------
# training and evaluation


def training_curves(history, title="Training", save=None):
    """Loss and accuracy per epoch, train and validation, from ``Trainer.fit``'s history.

    history: list of per-epoch dicts with keys among "epoch", "train_loss", "train_acc", "val_loss",
    "val_acc" (missing keys, and None values, are skipped; epochs default to 1, 2, ...).
    Two axes: loss (left) and accuracy (right).
    """
    history = list(history)
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    fig = new_figure(9.0, 3.6)
    ax_loss, ax_acc = fig.subplots(1, 2)
    series = [
        (ax_loss, "train_loss", "train", "C0", "o-"),
        (ax_loss, "val_loss", "validation", "C1", "s--"),
        (ax_acc, "train_acc", "train", "C0", "o-"),
        (ax_acc, "val_acc", "validation", "C1", "s--"),
    ]
    for ax, key, label, color, style in series:
        pts = [(e, row[key]) for e, row in zip(epochs, history) if row.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, color=color, label=label, markersize=4)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_title(name.capitalize())
        ax.set_xlabel("epoch")
        ax.set_ylabel(name if name == "accuracy" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {name} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if len(set(epochs)) == 1:  # one point: tick just its epoch (not 0.96, 0.98, ... around it)
            ax.set_xticks(sorted(set(epochs)))
    if any(row.get(k) is not None for row in history for k in ("train_acc", "val_acc")):
        ax_acc.set_ylim(top=min(1.02, ax_acc.get_ylim()[1] + 0.02))
    fig.suptitle(title)
    return _finish(fig, save)


def confusion_matrix(y_true, y_pred, class_names=None, normalize=False, title="Confusion matrix", save=None):
    """Counts of (true class, predicted class) pairs, every cell written in; rows are the true classes.

    normalize=True shows each row as fractions of that true class (rows add up to 1).
    """
    y_true = np.asarray(_host(y_true)).astype(np.int64).ravel()
    y_pred = np.asarray(_host(y_pred)).astype(np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"confusion_matrix: y_true has {y_true.size} labels, y_pred {y_pred.size}")
    n = len(class_names) if class_names is not None else int(max(y_true.max(initial=-1), y_pred.max(initial=-1)) + 1)
    n = max(n, 1)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    shown = cm.astype(np.float64)
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        shown = np.divide(shown, rows, out=np.zeros_like(shown), where=rows > 0)
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(n)]
    side = min(max(3.5, 0.5 * n + 1.5), 10.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="Blues", interpolation="nearest", vmin=0, vmax=1 if normalize else None)
    ax.set_xticks(range(n), names, rotation=45 if max(map(len, names)) > 2 else 0,
                  ha="right" if max(map(len, names)) > 2 else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    acc = np.trace(cm) / cm.sum() if cm.sum() else float("nan")
    ax.set_title(f"{title}{' (row-normalised)' if normalize else ''}: accuracy {acc:.1%} of {cm.sum()}")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of true class" if normalize else "count")
    if n <= 30:
        fig.canvas.draw()
        _annotate(ax, im, shown, fmt="{:.2f}" if normalize else "{:.0f}")
    return _finish(fig, save)


def misclassified(images, y_true, y_pred, probs=None, max_n=16, class_names=None, max_cols=8,
                  title="Misclassified", save=None):
    """A grid of the first `max_n` images whose prediction is wrong, titled "true 3 / pred 5".

    images: (N, 1, H, W), (N, H, W) or (N, H, W, 3); probs (N, num_classes) adds the predicted class's
    probability to each title. When nothing is wrong the figure says so.
    """
    images = _host(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    elif images.ndim == 4 and images.shape[1] == 3:
        images = np.moveaxis(images, 1, -1)
    y_true = np.asarray(_host(y_true)).astype(np.int64).ravel()
    y_pred = np.asarray(_host(y_pred)).astype(np.int64).ravel()
    if not (len(images) == len(y_true) == len(y_pred)):
        raise ValueError(f"misclassified: {len(images)} images, {len(y_true)} true labels, {len(y_pred)} predictions")
    probs = None if probs is None else _host(probs)
    wrong = np.flatnonzero(y_true != y_pred)
    show = wrong[:max_n]

    def name(k):
        return str(class_names[k]) if class_names is not None else str(k)

    if len(show) == 0:
        fig = new_figure(4.0, 1.6)
        ax = fig.add_subplot()
        ax.axis("off")
        ax.set_title(title)
        ax.text(0.5, 0.5, f"no misclassified images (of {len(y_true)})", ha="center", va="center",
                transform=ax.transAxes)
        return _finish(fig, save)
    rows, cols = _grid(len(show), max_cols)
    fig = new_figure(cols * 1.45, rows * 1.65 + 0.5)
    for k, i in enumerate(show):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(images[i], cmap=IMAGE_CMAP, interpolation="nearest")
        t = f"true {name(y_true[i])} / pred {name(y_pred[i])}"
        if probs is not None:
            t += f"\nP(pred) = {float(probs[i, y_pred[i]]):.2f}"
        ax.set_title(t, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: {len(show)} shown of {len(wrong)} wrong (of {len(y_true)})")
    return _finish(fig, save)


def prediction(image, probs, title="Prediction", class_names=None, notes=(), save=None):
    """The input exactly as the model sees it (after inversion, resizing and normalisation) beside a bar
    chart of the class probabilities, the predicted class highlighted. ``gpu-cnn predict --show FILE``.

    image: (1, H, W) or (H, W) (the model's input); probs: (num_classes,); notes: lines printed under the
    image (what was done to it)."""
    image = _host(image)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    image = _as_2d("image", image)
    probs = np.asarray(_host(probs), dtype=np.float64).ravel()
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(len(probs))]
    best = int(probs.argmax())
    fig = new_figure(8.0, 3.6)
    ax_img, ax_bar = fig.subplots(1, 2, width_ratios=[1, 1.4])
    im = ax_img.imshow(image, cmap=IMAGE_CMAP, interpolation="nearest")
    h, w = image.shape
    ax_img.set_title(f"model input ({h}×{w}, normalised)", fontsize=10)
    ax_img.set_xticks([])
    ax_img.set_yticks([])
    fig.colorbar(im, ax=ax_img, shrink=0.8)
    if notes:
        import textwrap

        text = "\n".join(textwrap.fill(n, 48) for n in notes)
        ax_img.set_xlabel(text, fontsize=7)
    colors_ = ["C1" if i == best else "C0" for i in range(len(probs))]
    ax_bar.bar(range(len(probs)), probs, color=colors_)
    ax_bar.set_xticks(range(len(probs)), names)
    ax_bar.set_ylim(0, 1.05)
    ax_bar.set_xlabel("class")
    ax_bar.set_ylabel("probability")
    ax_bar.set_title(f"predicted {names[best]} (p = {probs[best]:.2f})", fontsize=10)
    ax_bar.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return _finish(fig, save)
