"""Data sets: a small ``Dataset`` container, and loaders that never download anything.

    from gpu_cnn import data
    train, test = data.load_digits()                       # scikit-learn's bundled 8×8 digits, offline
    train, test = data.load_mnist("~/data/mnist")          # the four IDX files (raw or .gz) in a folder
    train, test = data.load_mnist(d, kind="fashion-mnist")
    train, test = data.load_dataset("synthetic", n=2000)   # stroke-drawn 10×10 digits, like the explainer's "2"
    for x, y in train.batches(32, shuffle=True, seed=0):   # x: (B, C, H, W) float32, y: (B,) int64
        ...

Every loader returns ``(train, test)`` Datasets whose images are float32 NCHW, already normalised as
``(pixel - mean) / std`` with pixels scaled to [0, 1]; ``Dataset.mean`` and ``Dataset.std`` record the
constants (one per channel) so that new images can be normalised the same way.

IDX is the format of the MNIST files: a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the values in C order (big-endian for multi-byte types). ``read_idx`` and
``write_idx`` handle any IDX file; ``load_mnist`` also checks that the files are the MNIST ones.

Pure NumPy: nothing here touches Numba or a GPU.
"""
import gzip as _gzip
import math
import os
import struct
import zlib

import numpy as np

__all__ = [
    "Dataset", "DATASETS", "load_dataset", "load_digits", "load_mnist", "load_synthetic",
    "read_idx", "write_idx", "IDXError", "digit_two", "synthetic_digits", "DIGIT_STROKES",
    "MNIST_FILES", "NORMALIZATION",
]

DATASETS = ("digits", "mnist", "fashion-mnist", "synthetic")

DIGIT_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# The usual published per-pixel statistics of the training sets, pixels scaled to [0, 1].
NORMALIZATION = {
    "mnist": (0.1307, 0.3081),
    "fashion-mnist": (0.2860, 0.3530),
}


# ---------------------------------------------------------------------------------------------------
# Dataset


class Dataset:
    """Images and labels that belong together, with what is needed to interpret them.

    images:      (N, C, H, W) float32, normalised: ``(pixel - mean[c]) / std[c]`` with pixels in [0, 1]
    labels:      (N,) int64 class ids in ``[0, num_classes)``
    num_classes: int (default: ``len(classes)``, else ``labels.max() + 1``)
    name:        str, e.g. ``"digits"``
    classes:     tuple of class names (default ``"0"``, ``"1"``, ...)
    mean, std:   (C,) float32, the constants the images were normalised with (0 and 1: not normalised)

    ``len(ds)`` is N. ``ds[i]`` with an integer gives one ``(image (C, H, W), label int)`` pair;
    a slice, an integer array or a boolean mask gives a Dataset (a slice shares memory with ``ds``).
    Iterating gives ``(image, label)`` pairs. ``split`` and ``batches`` are the usual helpers.
    """

    def __init__(self, images, labels, num_classes=None, name="dataset", classes=None, mean=0.0, std=1.0):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4:
            raise ValueError(f"Dataset: images must be (N, C, H, W), got shape {images.shape}")
        if not np.issubdtype(images.dtype, np.floating):
            raise TypeError(f"Dataset: images must be floating point (normalised), got {images.dtype}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"Dataset: labels must be ({images.shape[0]},) to match the images, got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"Dataset: labels must be integer class ids, got {labels.dtype}")
        self.images = images if images.dtype == np.float32 else images.astype(np.float32)
        self.labels = labels if labels.dtype == np.int64 else labels.astype(np.int64)
        if num_classes is None:
            num_classes = len(classes) if classes is not None else (int(self.labels.max()) + 1 if labels.size else 0)
        self.num_classes = int(num_classes)
        self.classes = tuple(classes) if classes is not None else tuple(str(i) for i in range(self.num_classes))
        if len(self.classes) != self.num_classes:
            raise ValueError(f"Dataset: {len(self.classes)} class names for {self.num_classes} classes")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(f"Dataset: labels must lie in [0, {self.num_classes}), "
                             f"got values from {self.labels.min()} to {self.labels.max()}")
        self.name = str(name)
        c = images.shape[1]
        self.mean = np.broadcast_to(np.asarray(mean, np.float32).reshape(-1), (c,)).copy()
        self.std = np.broadcast_to(np.asarray(std, np.float32).reshape(-1), (c,)).copy()

    # -- container ----------------------------------------------------------------------------------

    def __len__(self):
        return self.labels.shape[0]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.images[index], int(self.labels[index])
        if isinstance(index, slice):
            return self._like(self.images[index], self.labels[index])
        index = np.asarray(index)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise IndexError(f"boolean mask of shape {index.shape} for a Dataset of {len(self)} samples")
        elif not np.issubdtype(index.dtype, np.integer) and index.size:
            raise IndexError(f"Dataset indices must be integers, a slice or a boolean mask, got {index.dtype}")
        return self.subset(index)

    def __iter__(self):
        for i in range(len(self)):
            yield self.images[i], int(self.labels[i])

    def __repr__(self):
        n, c, h, w = self.images.shape
        return f"Dataset({self.name!r}, {n} images of {c}×{h}×{w}, {self.num_classes} classes)"

    @property
    def shape(self):
        """The shape of one image, (C, H, W)."""
        return tuple(self.images.shape[1:])

    def subset(self, indices):
        """A Dataset of the samples at ``indices`` (an integer array or a boolean mask; copies)."""
        idx = np.asarray(indices)
        if idx.dtype != bool:
            idx = idx.astype(np.intp, copy=False)
        return self._like(self.images[idx], self.labels[idx])

    def _like(self, images, labels):
        return Dataset(images, labels, num_classes=self.num_classes, name=self.name, classes=self.classes,
                       mean=self.mean, std=self.std)

    def class_counts(self):
        """(num_classes,) int64: how many samples each class has."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def denormalize(self, images=None):
        """Images back in pixel units [0, 1] (the dataset's own images when none are given)."""
        x = self.images if images is None else np.asarray(images, np.float32)
        shape = (-1, 1, 1) if x.ndim == 3 else (1, -1, 1, 1)
        return x * self.std.reshape(shape) + self.mean.reshape(shape)

    # -- splitting and batching ----------------------------------------------------------------------

    def split(self, fraction, seed=0, stratify=True):
        """Split into ``(a, b)`` with ``round(fraction * N)`` samples in ``b`` and the rest in ``a``.

        The same seed always gives the same split. ``stratify=True`` (default) draws ``b`` class by
        class, so each class keeps its share in both parts (to within one sample: the per-class counts
        ``fraction * n_c`` are rounded by largest remainder so that they add up to the total);
        ``stratify=False`` draws ``b`` uniformly at random. Both parts keep the original order of
        the samples, and the normalisation constants of this Dataset.
        """
        n = len(self)
        fraction = float(fraction)
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"split: fraction must lie strictly between 0 and 1, got {fraction}")
        n_b = int(round(fraction * n))
        if n_b == 0 or n_b == n:
            raise ValueError(f"split: a fraction of {fraction} of {n} samples leaves one part empty")
        rng = np.random.default_rng(seed)
        in_b = np.zeros(n, dtype=bool)
        if stratify:
            classes, inverse, counts = np.unique(self.labels, return_inverse=True, return_counts=True)
            quota = counts * fraction
            take = np.floor(quota).astype(np.int64)
            extra = n_b - int(take.sum())
            # Largest remainders first; ties go to the earlier class (stable sort), so no randomness here.
            take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
            for k in range(len(classes)):
                members = np.flatnonzero(inverse == k)
                in_b[rng.permutation(members)[:take[k]]] = True
        else:
            in_b[rng.permutation(n)[:n_b]] = True
        return self.subset(np.flatnonzero(~in_b)), self.subset(np.flatnonzero(in_b))

    def num_batches(self, batch_size, drop_last=False):
        """How many batches ``batches(batch_size, drop_last=...)`` yields."""
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(self, batch_size, shuffle=False, seed=None, rng=None, drop_last=False):
        """Iterate over ``(x, y)`` batches: x (B, C, H, W) float32, y (B,) int64.

        Every sample appears exactly once per pass; the last batch is smaller when ``batch_size``
        does not divide N (left out with ``drop_last=True``). With ``shuffle=True`` the order is a
        permutation drawn from ``rng`` (a ``np.random.Generator``, advanced by the draw, so calling
        again with the same generator gives the next epoch's order) or from a fresh
        ``np.random.default_rng(seed)`` (the same seed gives the same order). Unshuffled batches are
        views of ``images``/``labels``; shuffled ones are copies.
        """
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batches: batch_size must be at least 1, got {batch_size}")
        if rng is not None and seed is not None:
            raise ValueError("batches: give either seed or rng, not both")
        order = None
        if shuffle:
            gen = rng if rng is not None else np.random.default_rng(seed)
            order = gen.permutation(len(self))
        return self._batches(batch_size, order, drop_last)

    def _batches(self, batch_size, order, drop_last):
        n = len(self)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if drop_last and stop - start < batch_size:
                return
            sel = slice(start, stop) if order is None else order[start:stop]
            yield self.images[sel], self.labels[sel]


def _normalized(x, mean, std):
    return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------
# scikit-learn's 8×8 digits


def load_digits(test_fraction=0.2, seed=0):
    """scikit-learn's bundled handwritten digits (1797 images, 8×8, no download) as ``(train, test)``.

    Pixels 0..16 are scaled to [0, 1], then normalised with the mean and standard deviation of the
    training part (one scalar each, over all its pixels) — the same constants for both parts, so
    the training images have mean 0 and std 1. Images are (N, 1, 8, 8) float32; labels int64.
    The split is stratified and fixed by ``seed`` (see ``Dataset.split``).
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = (np.asarray(bunch.images, np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, np.int64)
    train, test = Dataset(x, y, num_classes=10, name="digits", classes=DIGIT_CLASSES).split(test_fraction, seed=seed)
    mean = float(train.images.mean(dtype=np.float64))
    std = float(train.images.std(dtype=np.float64))
    return tuple(Dataset(_normalized(d.images, mean, std), d.labels, num_classes=10, name="digits",
                         classes=DIGIT_CLASSES, mean=mean, std=std) for d in (train, test))


# ---------------------------------------------------------------------------------------------------
# IDX files


class IDXError(ValueError):
    """An IDX file is unreadable, truncated, or not what was expected. The message names the file."""


# IDX type byte -> big-endian NumPy dtype
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_TYPES.items()}

IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions (N, rows, cols)
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension (N,)


def _read_bytes(path):
    """The file's bytes, gunzipped when it is gzip (by its name ending in .gz, or by its first bytes)."""
    with open(path, "rb") as f:
        raw = f.read()
    if str(path).endswith(".gz") or raw[:2] == b"\x1f\x8b":
        try:
            return _gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise IDXError(f"{path}: corrupt or truncated gzip file ({exc}); "
                           f"download it again or use the uncompressed file") from None
    return raw


def _read_idx(path, expect_magic=None, what=None):
    """(magic, array) from an IDX file, with every check that names the file on failure."""
    path = os.fspath(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXError(f"{path}: truncated: {len(data)} bytes, too short for the 4-byte IDX magic number")
    zero, code, ndim = struct.unpack_from(">HBB", data, 0)
    magic = (code << 8) | ndim
    if expect_magic is not None and magic != expect_magic:
        raise IDXError(f"{path}: magic number 0x{magic:08X}, expected 0x{expect_magic:08X} ({what}); "
                       f"is this the right file?")
    if zero != 0 or code not in _IDX_TYPES:
        raise IDXError(f"{path}: not an IDX file: magic number 0x{struct.unpack_from('>I', data, 0)[0]:08X} "
                       f"(expected 0x0000TTDD with type TT in "
                       f"{', '.join(f'0x{c:02X}' for c in _IDX_TYPES)} and DD dimensions)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: truncated header: {ndim} dimensions need {header} bytes, the file has {len(data)}")
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    dtype = _IDX_TYPES[code]
    expected = math.prod(dims) * dtype.itemsize  # Python ints: a corrupt header cannot overflow this
    actual = len(data) - header
    if actual < expected:
        raise IDXError(f"{path}: truncated: shape {dims} of {dtype.newbyteorder('=').name} needs {expected} bytes "
                       f"after the {header}-byte header, the file has {actual}")
    if actual > expected:
        raise IDXError(f"{path}: {actual - expected} unexpected bytes after the data: shape {dims} needs "
                       f"{expected} bytes after the {header}-byte header, the file has {actual}")
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return magic, array.reshape(dims).astype(dtype.newbyteorder("="))  # native byte order, writable copy


def read_idx(path):
    """Read an IDX file (raw or gzip) into a NumPy array in native byte order.

    Raises ``IDXError`` (a ValueError) naming the file when the magic number is not IDX, the payload
    is shorter or longer than the header's dimensions say, or the gzip stream is corrupt.
    """
    return _read_idx(path)[1]


def write_idx(path, array, gzip=False):
    """Write ``array`` as an IDX file (gzip-compressed when ``gzip=True``); returns ``path``.

    The dtype must be one IDX can hold: uint8, int8, int16, int32, float32 or float64 (cast first,
    e.g. ``labels.astype(np.uint8)`` for MNIST). Compressed files are byte-for-byte reproducible.
    """
    a = np.asarray(array)
    dtype = a.dtype.newbyteorder("=") if a.dtype.byteorder not in ("=", "|") else a.dtype
    code = _IDX_CODES.get(dtype)
    if code is None:
        raise TypeError(f"write_idx: IDX cannot hold {a.dtype}; use one of "
                        f"{', '.join(dt.name for dt in _IDX_CODES)}")
    if not 1 <= a.ndim <= 255:
        raise ValueError(f"write_idx: IDX needs 1 to 255 dimensions, got {a.ndim}")
    if any(s >= 2**32 for s in a.shape):
        raise ValueError(f"write_idx: dimension too large for IDX: {a.shape}")
    payload = np.ascontiguousarray(a, dtype=_IDX_TYPES[code]).tobytes()
    data = struct.pack(f">HBB{a.ndim}I", 0, code, a.ndim, *a.shape) + payload
    if gzip:
        data = _gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ---------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_SOURCES = {
    "mnist": "https://yann.lecun.com/exdb/mnist/ (or a mirror such as "
             "https://ossci-datasets.s3.amazonaws.com/mnist/)",
    "fashion-mnist": "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)",
}
# Layouts other tools leave behind, looked in after data_dir itself.
_SUBDIRS = {"mnist": ("mnist", os.path.join("MNIST", "raw")),
            "fashion-mnist": ("fashion-mnist", "fashion", os.path.join("FashionMNIST", "raw"))}


def _find_idx(data_dir, name, kind):
    """The path of ``name`` or ``name.gz`` in data_dir (or a usual subfolder of it); raw wins."""
    folders = [data_dir] + [os.path.join(data_dir, s) for s in _SUBDIRS[kind]]
    for folder in folders:
        for candidate in (name, name + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    files = ", ".join(MNIST_FILES.values())
    raise FileNotFoundError(
        f"{name} (or {name}.gz) not found in {data_dir} (also looked in its subfolders "
        f"{', '.join(_SUBDIRS[kind])}). gpu-cnn never downloads data: put the four {kind} IDX files "
        f"{files} (raw or .gz) in that folder. They are available from {_SOURCES[kind]}.")


def _read_mnist_pair(data_dir, kind, which):
    img_path = _find_idx(data_dir, MNIST_FILES[which + "_images"], kind)
    lbl_path = _find_idx(data_dir, MNIST_FILES[which + "_labels"], kind)
    _, images = _read_idx(img_path, IMAGES_MAGIC, "uint8 images, 3 dimensions")
    _, labels = _read_idx(lbl_path, LABELS_MAGIC, "uint8 labels, 1 dimension")
    if images.shape[1:] != (28, 28):
        raise IDXError(f"{img_path}: images are {images.shape[1]}×{images.shape[2]}, expected 28×28 for {kind}")
    if images.shape[0] != labels.shape[0]:
        raise IDXError(f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels")
    if labels.size and labels.max() >= 10:
        bad = int(np.argmax(labels >= 10))
        raise IDXError(f"{lbl_path}: label {int(labels[bad])} at index {bad} is out of range (expected 0..9)")
    return images, labels


def load_mnist(data_dir, kind="mnist", normalize="standard"):
    """MNIST or Fashion-MNIST as ``(train, test)`` from the four standard IDX files in ``data_dir``.

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte``, each raw or with ``.gz`` (raw preferred), in ``data_dir`` and
    then in the subfolders other tools use (``mnist/``, ``MNIST/raw/``, ``fashion-mnist/``,
    ``FashionMNIST/raw/``). Nothing is downloaded: a missing file is a FileNotFoundError that says
    which files to put where. Every file is checked (magic number, 28×28 images, exact size, image
    and label counts agree, labels 0..9); a problem is an ``IDXError`` (ValueError) naming the file.

    Pixels 0..255 are scaled to [0, 1], then normalised as ``(x - mean) / std`` with
    ``normalize="standard"`` (default): the published training-set constants in ``NORMALIZATION``
    (MNIST 0.1307/0.3081, Fashion-MNIST 0.2860/0.3530), the same however many images the files hold;
    ``"train"``: the mean and std of the training images actually loaded; ``"none"``: left in [0, 1].
    Images are (N, 1, 28, 28) float32, labels int64.
    """
    kind = str(kind).strip().lower().replace("_", "-")
    if kind not in NORMALIZATION:
        raise ValueError(f"load_mnist: kind must be one of {', '.join(NORMALIZATION)}, got {kind!r}")
    if normalize not in ("standard", "train", "none", None):
        raise ValueError(f"load_mnist: normalize must be 'standard', 'train' or 'none', got {normalize!r}")
    if data_dir is None:
        raise ValueError(f"{kind} needs data_dir: a folder holding {', '.join(MNIST_FILES.values())} "
                         f"(raw or .gz); gpu-cnn never downloads data. Get them from {_SOURCES[kind]}")
    data_dir = os.path.expanduser(os.fspath(data_dir))
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{kind} data folder {data_dir} does not exist; gpu-cnn never downloads data: "
                                f"put {', '.join(MNIST_FILES.values())} (raw or .gz) there. "
                                f"They are available from {_SOURCES[kind]}.")
    train_x, train_y = _read_mnist_pair(data_dir, kind, "train")
    test_x, test_y = _read_mnist_pair(data_dir, kind, "test")
    scale = np.float32(1.0 / 255.0)
    train_x = train_x.astype(np.float32)[:, None] * scale
    test_x = test_x.astype(np.float32)[:, None] * scale
    if normalize == "standard":
        mean, std = NORMALIZATION[kind]
    elif normalize == "train":
        mean, std = float(train_x.mean(dtype=np.float64)), float(train_x.std(dtype=np.float64))
    else:
        mean, std = 0.0, 1.0
    classes = DIGIT_CLASSES if kind == "mnist" else FASHION_CLASSES
    return tuple(Dataset(_normalized(x, mean, std), y, num_classes=10, name=kind, classes=classes, mean=mean, std=std)
                 for x, y in ((train_x, train_y), (test_x, test_y)))


# ---------------------------------------------------------------------------------------------------
# Synthetic stroke-drawn digits

# Each digit as straight strokes ((x0, y0), (x1, y1)) in a unit box: x to the right, y downwards.
# Seven-segment-like, except 1 (a centred stem with a flag), 2 (the explainer's diagonal) and 7.
_T, _M, _B, _L, _R = 0.0, 0.5, 1.0, 0.0, 1.0
DIGIT_STROKES = {
    0: (((_L, _T), (_R, _T)), ((_R, _T), (_R, _B)), ((_R, _B), (_L, _B)), ((_L, _B), (_L, _T))),
    1: (((0.6, _T), (0.6, _B)), ((0.25, 0.25), (0.6, _T))),
    2: (((_L, _T), (_R, _T)), ((_R, _T), (_R, 0.4)), ((_R, 0.4), (_L, _B)), ((_L, _B), (_R, _B))),
    3: (((_L, _T), (_R, _T)), ((_R, _T), (_R, _B)), ((0.2, _M), (_R, _M)), ((_L, _B), (_R, _B))),
    4: (((_L, _T), (_L, _M)), ((_L, _M), (_R, _M)), ((_R, _T), (_R, _B))),
    5: (((_R, _T), (_L, _T)), ((_L, _T), (_L, _M)), ((_L, _M), (_R, _M)), ((_R, _M), (_R, _B)), ((_R, _B), (_L, _B))),
    6: (((_R, _T), (_L, _T)), ((_L, _T), (_L, _B)), ((_L, _B), (_R, _B)), ((_R, _B), (_R, _M)), ((_R, _M), (_L, _M))),
    7: (((_L, _T), (_R, _T)), ((_R, _T), (0.3, _B))),
    8: (((_L, _T), (_R, _T)), ((_R, _T), (_R, _B)), ((_R, _B), (_L, _B)), ((_L, _B), (_L, _T)), ((_L, _M), (_R, _M))),
    9: (((_R, _M), (_L, _M)), ((_L, _M), (_L, _T)), ((_L, _T), (_R, _T)), ((_R, _T), (_R, _B)), ((_R, _B), (_L, _B))),
}

# Where the glyph's unit box lies in a size×size image, in fractions of the size (pixel i spans [i, i+1)).
_BOX_X = (0.25, 0.75)
_BOX_Y = (0.15, 0.85)


def _render(strokes, size, x0, x1, y0, y1, thickness, shear=0.0):
    """Anti-aliased strokes: each pixel is 1 within thickness/2 of a stroke, fading to 0 one pixel further."""
    seg = np.asarray(strokes, np.float64)                        # (S, 2 ends, 2 coords) in the unit box
    yu = seg[..., 1]
    xu = seg[..., 0] + shear * (yu - 0.5)                        # slant: the bottom moves right for shear > 0
    p = np.stack([x0 + xu * (x1 - x0), y0 + yu * (y1 - y0)], axis=-1)
    a, d = p[:, 0], p[:, 1] - p[:, 0]                            # (S, 2) start and direction
    c = np.arange(size) + 0.5                                    # pixel centres
    q = np.stack(np.meshgrid(c, c, indexing="xy"), axis=-1).reshape(-1, 1, 2)   # (P, 1, 2) as (x, y)
    t = np.clip(((q - a) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0.0, 1.0)
    dist = np.linalg.norm(q - (a + t[..., None] * d), axis=-1).min(axis=1)      # (P,)
    return np.clip(thickness / 2 + 0.5 - dist, 0.0, 1.0).reshape(size, size)


def _box(size):
    return (_BOX_X[0] * size, _BOX_X[1] * size, _BOX_Y[0] * size, _BOX_Y[1] * size)


def digit_two(size=10):
    """A clean "2" like the explainer's 10×10 input: (size, size) float32 in [0, 1], 0 background.

    Top bar, a short stroke down the right side, a diagonal to the bottom left, and a bottom bar,
    drawn one pixel thick (``size / 10`` pixels at other sizes) with anti-aliased edges. At 10×10
    the bars are rows 1 and 8, from column 2 to column 7.
    """
    size = int(size)
    if size < 5:
        raise ValueError(f"digit_two: size must be at least 5 to draw a 2, got {size}")
    # Snap the box to pixel centres so that the bars are crisp: each runs along one row of pixels.
    x0, x1, y0, y1 = (np.floor(v) + 0.5 for v in _box(size))
    img = _render(DIGIT_STROKES[2], size, x0, x1, y0, y1, thickness=max(1.0, size / 10))
    return img.astype(np.float32)


def synthetic_digits(n, size=10, seed=0, noise=0.05):
    """``n`` stroke-drawn digits 0-9 in ``size×size`` images, as a Dataset (``name="synthetic"``).

    Classes are balanced (counts differ by at most one) and shuffled. Each image draws its digit's
    strokes (``DIGIT_STROKES``: seven-segment-like, with the explainer's diagonal "2") with a random
    sub-pixel shift (up to ±size/10 pixels across, ±0.06·size down), scale (0.85-1.05), slant, stroke thickness
    (0.8-1.6 × size/10 pixels) and Gaussian pixel noise of std ``noise``, clipped to [0, 1].
    Images are (n, 1, size, size) float32 in [0, 1] and are not normalised (mean 0, std 1 recorded).
    The same ``(n, size, seed, noise)`` always gives the same data.
    """
    n, size = int(n), int(size)
    if n < 1:
        raise ValueError(f"synthetic_digits: n must be at least 1, got {n}")
    if size < 7:
        raise ValueError(f"synthetic_digits: size must be at least 7, got {size}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    unit = size / 10.0
    shift = rng.uniform(-1.0, 1.0, size=(n, 2)) * (unit, 0.6 * unit)   # less room vertically
    scale = rng.uniform(0.85, 1.05, size=n)
    shear = rng.uniform(-0.2, 0.2, size=n)
    thickness = rng.uniform(0.8, 1.6, size=n) * unit
    pixel_noise = rng.normal(0.0, noise, size=(n, size, size)) if noise > 0 else np.zeros((n, size, size))
    bx0, bx1, by0, by1 = _box(size)
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    hw, hh = (bx1 - bx0 - 1) / 2, (by1 - by0 - 1) / 2
    images = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        x, y = cx + shift[i, 0], cy + shift[i, 1]
        w, h = hw * scale[i], hh * scale[i]
        img = _render(DIGIT_STROKES[int(labels[i])], size, x - w, x + w, y - h, y + h, thickness[i], shear[i])
        images[i, 0] = np.clip(img + pixel_noise[i], 0.0, 1.0)
    return Dataset(images, labels, num_classes=10, name="synthetic", classes=DIGIT_CLASSES, mean=0.0, std=1.0)


def load_synthetic(n=2000, size=10, seed=0, test_fraction=0.2, noise=0.05):
    """``synthetic_digits(n, size, seed, noise)`` split into stratified ``(train, test)`` with the same seed."""
    return synthetic_digits(n, size=size, seed=seed, noise=noise).split(test_fraction, seed=seed)


# ---------------------------------------------------------------------------------------------------
# By name


def load_dataset(name, data_dir=None, **kw):
    """``(train, test)`` for a data set named in ``DATASETS``.

    "digits":        ``load_digits(**kw)`` (test_fraction, seed); bundled with scikit-learn.
    "mnist", "fashion-mnist": ``load_mnist(data_dir, kind=name, **kw)`` (normalize); needs data_dir.
    "synthetic":     ``load_synthetic(**kw)`` (n, size, seed, test_fraction, noise).
    """
    key = str(name).strip().lower().replace("_", "-")
    if key in ("mnist", "fashion-mnist"):
        return load_mnist(data_dir, kind=key, **kw)
    if key in ("digits", "synthetic"):
        if data_dir is not None:
            raise ValueError(f"data set {name!r} is generated or bundled and takes no data_dir "
                             f"(data_dir is for mnist and fashion-mnist)")
        return load_digits(**kw) if key == "digits" else load_synthetic(**kw)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
