"""Data: the Dataset container, scikit-learn digits, IDX files and MNIST loading, synthetic digits.

IDX files are built here two ways: with ``write_idx`` and, independently, byte by byte with
``struct`` (big-endian header, then the payload), so the reader is not only checked against its own
writer.
"""
import gzip
import os
import re
import struct

import numpy as np
import pytest

from gpu_cnn import data
from gpu_cnn.data import Dataset, IDXError, read_idx, write_idx


# ---------------------------------------------------------------------------------------------------
# helpers


def idx_bytes(array, code=0x08):
    """An IDX file built by hand: 0x00 0x00 <type> <ndim>, big-endian uint32 dims, big-endian payload."""
    fmt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    a = np.asarray(array)
    header = bytes([0, 0, code, a.ndim]) + b"".join(struct.pack(">I", s) for s in a.shape)
    return header + a.astype(fmt).tobytes()


def put(path, raw, gz=False):
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)
    return str(path)


def tiny_mnist(rng, n):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


@pytest.fixture
def mnist_dir(tmp_path):
    """A folder with 20 training and 12 test 28×28 images: train files raw, test files gzipped."""
    rng = np.random.default_rng(7)
    tr_x, tr_y = tiny_mnist(rng, 20)
    te_x, te_y = tiny_mnist(rng, 12)
    put(tmp_path / "train-images-idx3-ubyte", idx_bytes(tr_x))
    put(tmp_path / "train-labels-idx1-ubyte", idx_bytes(tr_y))
    put(tmp_path / "t10k-images-idx3-ubyte.gz", idx_bytes(te_x), gz=True)
    put(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(te_y), gz=True)
    return tmp_path, (tr_x, tr_y, te_x, te_y)


def raises_naming(exc, path):
    """pytest.raises whose message must contain the file's name."""
    return pytest.raises(exc, match=re.escape(os.path.basename(str(path))))


# ---------------------------------------------------------------------------------------------------
# scikit-learn digits


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def test_digits_shapes_dtypes_and_train_normalisation(digits):
    train, test = digits
    assert len(train) + len(test) == 1797
    assert len(test) == round(0.2 * 1797)
    for d in (train, test):
        assert d.images.shape[1:] == (1, 8, 8) and d.images.dtype == np.float32
        assert d.labels.dtype == np.int64 and d.labels.shape == (len(d),)
        assert d.num_classes == 10 and d.classes == tuple("0123456789") and d.name == "digits"
        assert d.images.flags.c_contiguous
    # Train statistics define the normalisation: mean 0, std 1 on train (float32 round-off).
    assert abs(float(train.images.mean(dtype=np.float64))) < 1e-5
    assert abs(float(train.images.std(dtype=np.float64)) - 1) < 1e-5
    # The test part uses the same constants, so its statistics are close but not exact.
    np.testing.assert_array_equal(test.mean, train.mean)
    np.testing.assert_array_equal(test.std, train.std)
    assert abs(float(test.images.mean())) < 0.1 and abs(float(test.images.std()) - 1) < 0.1
    # Undoing the normalisation gives the original pixels: multiples of 1/16 in [0, 1].
    pixels = test.denormalize() * 16  # atol: float32 normalise/denormalise round-off
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-4)
    assert pixels.min() > -1e-4 and pixels.max() < 16 + 1e-4 and pixels.max() > 15


def test_digits_split_is_seeded_and_stratified(digits):
    train, test = digits
    again_train, again_test = data.load_digits(seed=0)
    np.testing.assert_array_equal(train.images, again_train.images)
    np.testing.assert_array_equal(test.labels, again_test.labels)
    other_train, other_test = data.load_digits(seed=1)
    assert not np.array_equal(test.labels, other_test.labels) or not np.array_equal(test.images, other_test.images)
    # Stratified: every class keeps its share of the whole set in the test part, within one sample.
    whole = np.bincount(np.concatenate([train.labels, test.labels]), minlength=10)
    assert np.all(np.abs(test.class_counts() - 0.2 * whole) <= 1)
    small_train, small_test = data.load_digits(test_fraction=0.5, seed=3)
    assert abs(len(small_test) - 1797 / 2) <= 1


# ---------------------------------------------------------------------------------------------------
# Dataset


def make_ds(n=23, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2, 4, 5)).astype(np.float32)
    y = np.arange(n) % classes
    return Dataset(x, y, num_classes=classes, name="toy", mean=[0.5, 0.25], std=2.0)


def test_dataset_container_indexing_and_validation():
    ds = make_ds()
    assert len(ds) == 23 and ds.shape == (2, 4, 5) and ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.mean, [0.5, 0.25])
    np.testing.assert_array_equal(ds.std, [2.0, 2.0])
    assert "toy" in repr(ds) and "23" in repr(ds)
    x, y = ds[4]
    assert x.shape == (2, 4, 5) and y == 1 and isinstance(y, int)
    part = ds[3:10]
    assert isinstance(part, Dataset) and len(part) == 7 and part.name == "toy" and part.num_classes == 3
    assert np.shares_memory(part.images, ds.images)  # slices are views
    picked = ds[np.array([5, 1, 5])]
    np.testing.assert_array_equal(picked.labels, ds.labels[[5, 1, 5]])
    masked = ds[ds.labels == 2]
    assert len(masked) == 7 and set(masked.labels) == {2}
    np.testing.assert_array_equal(masked.mean, ds.mean)
    assert sum(1 for _ in ds) == 23
    np.testing.assert_allclose(ds.denormalize(ds.images[:1]), ds.images[:1] * 2 + np.array([0.5, 0.25]).reshape(1, 2, 1, 1),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="N, C, H, W"):
        Dataset(np.zeros((3, 8, 8), np.float32), np.zeros(3, int))
    with pytest.raises(TypeError, match="floating"):
        Dataset(np.zeros((3, 1, 8, 8), np.uint8), np.zeros(3, int))
    with pytest.raises(ValueError, match="labels"):
        Dataset(np.zeros((3, 1, 8, 8), np.float32), np.zeros(4, int))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        Dataset(np.zeros((3, 1, 8, 8), np.float32), np.array([0, 1, 2]), num_classes=2)


def test_split_is_reproducible_stratified_or_plain():
    ds = make_ds(n=100, classes=4)
    a, b = ds.split(0.25, seed=5)
    a2, b2 = ds.split(0.25, seed=5)
    np.testing.assert_array_equal(b.images, b2.images)
    np.testing.assert_array_equal(a.labels, a2.labels)
    _, b3 = ds.split(0.25, seed=6)
    assert not np.array_equal(b.images, b3.images)
    assert len(a) == 75 and len(b) == 25
    # Every sample lands in exactly one part.
    flat = lambda d: {row.tobytes() for row in d.images.reshape(len(d), -1)}  # noqa: E731
    assert flat(a) | flat(b) == flat(ds) and not flat(a) & flat(b)
    # Stratified: 25 per class, 1/4 of each in b (6 or 7: the largest-remainder rounding adds to 25).
    counts = b.class_counts()
    assert counts.sum() == 25 and set(counts) <= {6, 7}
    plain_a, plain_b = ds.split(0.25, seed=5, stratify=False)
    assert len(plain_b) == 25 and len(plain_a) == 75
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            ds.split(bad)
    with pytest.raises(ValueError, match="empty"):
        make_ds(n=3).split(0.1)


def test_batches_cover_every_sample_once_with_a_partial_last_batch():
    ds = make_ds(n=23)
    ids = ds.images[:, 0, 0, 0]  # distinct random values identify the samples
    batches = list(ds.batches(5))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3] == [len(x) for x, _ in batches]
    assert ds.num_batches(5) == 5 and ds.num_batches(5, drop_last=True) == 4
    np.testing.assert_array_equal(np.concatenate([x[:, 0, 0, 0] for x, _ in batches]), ids)  # in order
    for x, y in batches:
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape[1:] == (2, 4, 5)

    def epoch(**kw):
        xs, ys = zip(*ds.batches(5, shuffle=True, **kw))
        return np.concatenate(xs)[:, 0, 0, 0], np.concatenate(ys)

    seen, labels = epoch(seed=3)
    assert sorted(seen) == sorted(ids) and not np.array_equal(seen, ids)  # a permutation, once each
    np.testing.assert_array_equal(labels, ds.labels[[list(ids).index(v) for v in seen]])  # pairs kept
    np.testing.assert_array_equal(epoch(seed=3)[0], seen)
    assert not np.array_equal(epoch(seed=4)[0], seen)
    rng = np.random.default_rng(3)
    first, second = epoch(rng=rng)[0], epoch(rng=rng)[0]
    np.testing.assert_array_equal(first, seen)
    assert sorted(second) == sorted(ids) and not np.array_equal(first, second)  # the generator moves on
    assert [len(y) for _, y in ds.batches(5, drop_last=True)] == [5, 5, 5, 5]
    assert [len(y) for _, y in ds.batches(100)] == [23]
    with pytest.raises(ValueError, match="batch_size"):
        ds.batches(0)
    with pytest.raises(ValueError, match="seed or rng"):
        ds.batches(4, shuffle=True, seed=1, rng=np.random.default_rng())


# ---------------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_writer_matches_hand_built_bytes_and_reads_back(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 5, 4), dtype=np.uint8)
    path = tmp_path / ("a.idx" + (".gz" if gz else ""))
    assert write_idx(path, images, gzip=gz) == path
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    assert raw == idx_bytes(images)
    assert raw[:4] == b"\x00\x00\x08\x03" and struct.unpack(">3I", raw[4:16]) == (3, 5, 4)
    got = read_idx(path)
    assert got.dtype == np.uint8 and got.flags.writeable
    np.testing.assert_array_equal(got, images)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
                                        (0x0D, np.float32), (0x0E, np.float64)])
def test_read_idx_of_hand_built_files_every_type(tmp_path, code, dtype, gz):
    rng = np.random.default_rng(code)
    a = (rng.standard_normal((2, 3, 7)) * 60).astype(dtype) if dtype in (np.float32, np.float64) else \
        rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, size=(2, 3, 7), endpoint=True).astype(dtype)
    path = put(tmp_path / ("h.idx" + (".gz" if gz else "")), idx_bytes(a, code), gz=gz)
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, a)
    # And the writer produces the same bytes for the same array.
    write_idx(tmp_path / "w.idx", a)
    assert (tmp_path / "w.idx").read_bytes() == idx_bytes(a, code)


def test_read_idx_sniffs_gzip_without_the_suffix_and_writer_rejects_bad_dtypes(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    path = put(tmp_path / "labels", idx_bytes(labels), gz=True)
    np.testing.assert_array_equal(read_idx(path), labels)
    a = write_idx(tmp_path / "g.gz", labels, gzip=True)
    b = write_idx(tmp_path / "h.gz", labels, gzip=True)
    assert open(a, "rb").read() == open(b, "rb").read()  # reproducible gzip (no timestamp)
    with pytest.raises(TypeError, match="int64"):
        write_idx(tmp_path / "x", np.arange(3, dtype=np.int64))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x", np.float32(1.0))


def test_read_idx_broken_files_name_the_file(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    good = idx_bytes(a)
    cases = {
        "truncated-payload": (good[:-5], r"truncated.*24 bytes.*19"),
        "trailing-bytes": (good + b"\x00\x00", r"2 unexpected bytes"),
        "short-header": (good[:9], r"truncated header"),
        "tiny": (b"\x00\x00", r"truncated"),
        "not-idx": (b"\x12\x34\x08\x03" + good[4:], r"not an IDX file.*0x12340803"),
        "bad-type": (b"\x00\x00\x07\x03" + good[4:], r"not an IDX file"),
        "huge-dims": (b"\x00\x00\x08\x05" + struct.pack(">5I", *[2**32 - 1] * 5), r"truncated.*needs \d{40,} bytes"),
    }
    for name, (raw, pattern) in cases.items():
        path = put(tmp_path / name, raw)
        with raises_naming(IDXError, path):
            read_idx(path)
        with pytest.raises(ValueError, match=pattern):
            read_idx(path)
    corrupt = put(tmp_path / "corrupt.gz", b"this is not gzip data at all")
    truncated_gz = put(tmp_path / "cut.gz", gzip.compress(good)[:-12])
    flipped = bytearray(gzip.compress(good))
    flipped[-6] ^= 0xFF  # CRC/size trailer damaged
    bad_crc = put(tmp_path / "crc.gz", bytes(flipped))
    for path in (corrupt, truncated_gz, bad_crc):
        with raises_naming(IDXError, path):
            read_idx(path)
        with pytest.raises(ValueError, match="corrupt or truncated gzip"):
            read_idx(path)


# ---------------------------------------------------------------------------------------------------
# MNIST


def test_load_mnist_from_tiny_idx_files(mnist_dir):
    folder, (tr_x, tr_y, te_x, te_y) = mnist_dir
    train, test = data.load_mnist(folder)
    assert len(train) == 20 and len(test) == 12
    for d, x, y in ((train, tr_x, tr_y), (test, te_x, te_y)):
        assert d.images.shape == (len(x), 1, 28, 28) and d.images.dtype == np.float32
        assert d.labels.dtype == np.int64
        np.testing.assert_array_equal(d.labels, y)
        # Standard constants: (x / 255 - 0.1307) / 0.3081. rtol/atol: float32 arithmetic.
        np.testing.assert_allclose(d.images[:, 0], (x / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)
        assert d.name == "mnist" and d.classes == tuple("0123456789")
        np.testing.assert_allclose(d.mean, [0.1307])
        np.testing.assert_allclose(d.std, [0.3081])
    tr, _ = data.load_mnist(str(folder), normalize="train")
    assert abs(float(tr.images.mean(dtype=np.float64))) < 1e-5 and abs(float(tr.images.std(dtype=np.float64)) - 1) < 1e-5
    tr, te = data.load_mnist(folder, normalize="none")
    np.testing.assert_allclose(te.images[:, 0], te_x / 255.0, rtol=1e-6)
    assert tr.mean[0] == 0 and tr.std[0] == 1
    tr, _ = data.load_mnist(folder, kind="fashion-mnist")
    assert tr.name == "fashion-mnist" and tr.classes[9] == "Ankle boot"
    np.testing.assert_allclose(tr.images[:, 0], (tr_x / 255.0 - 0.2860) / 0.3530, rtol=1e-5, atol=1e-5)
    via_name, _ = data.load_dataset("mnist", data_dir=folder)
    np.testing.assert_array_equal(via_name.images, train.images)


def test_load_mnist_finds_files_in_torchvision_layout_and_prefers_raw(tmp_path, mnist_dir):
    folder, (tr_x, tr_y, te_x, te_y) = mnist_dir
    sub = tmp_path / "root" / "MNIST" / "raw"
    sub.mkdir(parents=True)
    for f in os.listdir(folder):
        if os.path.isfile(folder / f):
            (sub / f).write_bytes((folder / f).read_bytes())
    # A broken .gz next to a good raw file is never opened: raw wins.
    put(sub / "train-images-idx3-ubyte.gz", b"garbage")
    train, _ = data.load_mnist(tmp_path / "root")
    np.testing.assert_array_equal(train.labels, tr_y)


@pytest.mark.parametrize("missing", list(data.MNIST_FILES.values()))
def test_missing_mnist_file_is_a_clear_error(mnist_dir, missing):
    folder, _ = mnist_dir
    for suffix in ("", ".gz"):
        if (folder / (missing + suffix)).exists():
            (folder / (missing + suffix)).unlink()
    with pytest.raises(FileNotFoundError) as err:
        data.load_mnist(folder)
    msg = str(err.value)
    assert missing in msg and str(folder) in msg and "never downloads" in msg
    for name in data.MNIST_FILES.values():  # tells the user every file to put there
        assert name in msg


def test_mnist_folder_missing_or_not_given(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        data.load_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        data.load_mnist(None)
    with pytest.raises(ValueError, match="kind"):
        data.load_mnist(tmp_path, kind="cifar")
    with pytest.raises(ValueError, match="normalize"):
        data.load_mnist(tmp_path, normalize="zscore")


def _break(folder, name, raw, gz=False):
    for suffix in ("", ".gz"):
        if (folder / (name + suffix)).exists():
            (folder / (name + suffix)).unlink()
    return put(folder / (name + (".gz" if gz else "")), raw, gz=gz)


def test_mnist_wrong_magic(mnist_dir):
    folder, (tr_x, tr_y, _, _) = mnist_dir
    path = _break(folder, "train-images-idx3-ubyte", idx_bytes(tr_x.reshape(20, 784)))  # 0x00000802
    with raises_naming(IDXError, path):
        data.load_mnist(folder)
    with pytest.raises(IDXError, match="0x00000802, expected 0x00000803"):
        data.load_mnist(folder)
    _break(folder, "train-images-idx3-ubyte", idx_bytes(tr_x))
    data.load_mnist(folder)  # repaired
    path = _break(folder, "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(12, np.int32), code=0x0C), gz=True)
    with pytest.raises(IDXError, match=re.escape(os.path.basename(path)) + ".*0x00000C01, expected 0x00000801"):
        data.load_mnist(folder)


def test_mnist_wrong_dims(mnist_dir):
    folder, _ = mnist_dir
    path = _break(folder, "t10k-images-idx3-ubyte", idx_bytes(np.zeros((12, 27, 28), np.uint8)), gz=True)
    with pytest.raises(IDXError, match=re.escape(os.path.basename(path)) + ".*27×28, expected 28×28"):
        data.load_mnist(folder)


def test_mnist_truncated_payload(mnist_dir):
    folder, (tr_x, _, _, _) = mnist_dir
    path = _break(folder, "train-images-idx3-ubyte", idx_bytes(tr_x)[:-100])
    expected, actual = 20 * 784, 20 * 784 - 100
    with pytest.raises(IDXError, match=re.escape(os.path.basename(path)) + f".*truncated.*{expected}.*{actual}"):
        data.load_mnist(folder)


def test_mnist_corrupt_gzip(mnist_dir):
    folder, _ = mnist_dir
    good = (folder / "t10k-images-idx3-ubyte.gz").read_bytes()
    path = _break(folder, "t10k-images-idx3-ubyte.gz", good[: len(good) // 2])
    with pytest.raises(IDXError, match=re.escape(os.path.basename(path)) + ".*corrupt or truncated gzip"):
        data.load_mnist(folder)


def test_mnist_count_mismatch(mnist_dir):
    folder, (_, tr_y, _, _) = mnist_dir
    path = _break(folder, "train-labels-idx1-ubyte", idx_bytes(tr_y[:19]))
    with pytest.raises(IDXError, match=r"train-images-idx3-ubyte has 20 images but .*train-labels-idx1-ubyte has 19"):
        data.load_mnist(folder)
    with raises_naming(IDXError, path):
        data.load_mnist(folder)


def test_mnist_label_out_of_range(mnist_dir):
    folder, (_, tr_y, _, _) = mnist_dir
    bad = tr_y.copy()
    bad[13] = 10
    path = _break(folder, "train-labels-idx1-ubyte", idx_bytes(bad))
    with pytest.raises(IDXError, match=re.escape(os.path.basename(path)) + r".*label 10 at index 13"):
        data.load_mnist(folder)


# ---------------------------------------------------------------------------------------------------
# load_dataset


def test_load_dataset_dispatch_and_errors(tmp_path):
    assert data.DATASETS == ("digits", "mnist", "fashion-mnist", "synthetic")
    train, test = data.load_dataset("digits")
    assert train.images.shape[1:] == (1, 8, 8)
    train, test = data.load_dataset("Synthetic", n=200, size=12, seed=1)
    assert train.images.shape[1:] == (1, 12, 12) and len(train) + len(test) == 200
    assert np.all(test.class_counts() == 4)
    with pytest.raises(ValueError, match="digits, mnist, fashion-mnist, synthetic") as err:
        data.load_dataset("cifar10")
    assert "cifar10" in str(err.value)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_dataset("fashion-mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match="data_dir"):
        data.load_dataset("digits", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------
# synthetic digits


def test_digit_two_looks_like_a_two():
    two = data.digit_two()
    assert two.shape == (10, 10) and two.dtype == np.float32
    assert two.min() == 0 and two.max() == 1
    np.testing.assert_array_equal(two[1, 2:8], 1)       # top bar
    np.testing.assert_array_equal(two[8, 2:8], 1)       # bottom bar
    np.testing.assert_array_equal(two[1:4, 7], 1)       # right stroke down from the top bar
    assert two[6, 4] > 0.5 and two[5, 5] > 0.5          # centre of the diagonal
    assert two[7, 3] > 0.5 and two[4, 7] > 0.5          # its ends meet the bottom bar and the right stroke
    # Empty regions: the frame, the left side under the top bar, the right side above the bottom bar.
    for r, c in [(0, 0), (0, 9), (9, 0), (9, 9), (2, 2), (3, 2), (4, 2), (6, 7), (7, 7), (2, 5), (4, 3)]:
        assert two[r, c] == 0, (r, c)
    assert np.all(two[0] == 0) and np.all(two[9] == 0) and np.all(two[:, :2] == 0) and np.all(two[:, 8:] == 0)
    big = data.digit_two(28)
    assert big.shape == (28, 28) and big[4, 14] == 1 and big[23, 14] == 1 and big[0, 0] == 0
    with pytest.raises(ValueError, match="size"):
        data.digit_two(3)


def test_synthetic_digits_reproducible_balanced_in_range():
    a = data.synthetic_digits(103, size=10, seed=4)
    b = data.synthetic_digits(103, size=10, seed=4)
    c = data.synthetic_digits(103, size=10, seed=5)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (103, 1, 10, 10) and a.images.dtype == np.float32 and a.labels.dtype == np.int64
    assert a.images.min() >= 0 and a.images.max() <= 1
    counts = a.class_counts()
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103
    assert not np.array_equal(a.labels[:10], np.arange(10))  # shuffled
    assert a.name == "synthetic" and a.mean[0] == 0 and a.std[0] == 1
    # Without noise: every image has a drawn digit (a stroke's worth of ink, some of it bright)
    # on a mostly empty background.
    clean = data.synthetic_digits(103, seed=4, noise=0).images[:, 0]
    assert np.all(clean.sum(axis=(1, 2)) > 5) and np.all(clean.max(axis=(1, 2)) > 0.5)
    assert np.all((clean == 0).mean(axis=(1, 2)) > 0.35)
    assert clean[:, :, [0, -1]].max() < 0.5  # at most a faint edge of a stroke reaches the side columns


def test_synthetic_digits_are_learnable():
    # A linear least-squares classifier on raw pixels already separates the classes well; the
    # shifts, slants and noise make it imperfect, which is the point.
    train, test = data.load_synthetic(n=2000, seed=0)
    def features(d):
        return np.hstack([d.images.reshape(len(d), -1), np.ones((len(d), 1), np.float32)])
    w, *_ = np.linalg.lstsq(features(train), np.eye(10)[train.labels], rcond=None)
    accuracy = float((features(test) @ w).argmax(1).__eq__(test.labels).mean())
    assert accuracy > 0.8, accuracy
