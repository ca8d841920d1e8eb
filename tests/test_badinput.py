"""Issue 14: bad input never gives a wrong answer, and an error says what was wrong.

Each test is written against one item of the issue (numbered as there) and fails on the code before
it: a silent wrong answer (aliased outputs, float32 overflow, a diverging run overwriting a good
checkpoint, NaN probabilities) or an error that does not name the argument. Ops run on cpu and on the
kernel backend (sim: tiny shapes) through the ``backend`` fixture; the rest runs on cpu.
"""
import json
import re
import os
import stat
import zipfile

import numpy as np
import pytest

import gpu_cnn
from gpu_cnn import functional as F
from gpu_cnn import models, nn
from gpu_cnn import checkpoint
from gpu_cnn.checkpoint import META_KEY, CheckpointError
from gpu_cnn.ops import _base
from gpu_cnn.trainer import Trainer, TrainingError


def _dev(a):
    """`a` as an array of the backend's kind (a NumPy copy on cpu, a device array otherwise)."""
    a = np.ascontiguousarray(a, np.float32)
    if gpu_cnn.get_backend() == "cpu":
        return a.copy()
    from numba import cuda

    return cuda.to_device(a)


def _host(a):
    return a if isinstance(a, np.ndarray) else a.copy_to_host()


# -- 1. outputs that overlap inputs ----------------------------------------------------------------

def test_linear_backward_refuses_dx_aliasing_dy(backend, rng):
    dy = _dev(rng.standard_normal((3, 4)))
    x = _dev(rng.standard_normal((3, 4)))
    w = _dev(rng.standard_normal((4, 4)))
    before = _host(dy).copy()
    with pytest.raises(ValueError, match=r"out\[0\] \(dx\): shares memory with the input dy"):
        F.linear_backward(dy, x, w, out=(dy, None, None))
    np.testing.assert_array_equal(_host(dy), before)  # refused before anything was written
    with pytest.raises(ValueError, match=r"out\[1\] \(dw\): shares memory with the input w"):
        F.linear_backward(dy, x, w, out=(None, w, None))
    buf = _dev(np.zeros((4, 4)))
    dy4 = _dev(rng.standard_normal((4, 4)))
    with pytest.raises(ValueError, match=r"out\[0\] \(dx\): shares memory with the output out\[1\] \(dw\)"):
        F.linear_backward(dy4, _dev(rng.standard_normal((4, 4))), w, out=(buf, buf, None))


def test_conv2d_and_its_backward_refuse_aliased_outputs(backend, rng):
    x = _dev(rng.standard_normal((1, 2, 3, 3)))
    w = _dev(rng.standard_normal((2, 2, 1, 1)))  # 1×1 filter: y has x's shape
    with pytest.raises(ValueError, match=r"out: shares memory with the input x"):
        F.conv2d(x, w, out=x)
    dy = _dev(rng.standard_normal((1, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"out\[0\] \(dx\): shares memory with the input dy"):
        F.conv2d_backward(dy, x, w, out=(dy, None, None))
    with pytest.raises(ValueError, match=r"out\[1\] \(dw\): shares memory with the input w"):
        F.conv2d_backward(dy, x, w, out=(None, w, None))


def test_pool_and_softmax_refuse_aliased_outputs(backend, rng):
    x = _dev(rng.standard_normal((1, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"out\[0\] \(y\): shares memory with the input x"):
        F.max_pool2d(x, 1, 1, out=(x, _idx_like(np.zeros((1, 1, 3, 3), np.int32))))
    dy = _dev(rng.standard_normal((1, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"out: shares memory with the input dy"):
        F.max_pool2d_backward(dy, np.arange(9, dtype=np.int32).reshape(1, 1, 3, 3), (1, 1, 3, 3), 1, 1, out=dy)
    labels = np.array([0, 2])
    flat = _dev(rng.standard_normal(8))  # logits (2, 3) on its first 6 floats
    with pytest.raises(ValueError, match=r"out \(loss_buf\): shares memory with the input logits"):
        F.softmax_cross_entropy(flat[:6].reshape(2, 3), labels, out=(None, flat[5:8]))
    with pytest.raises(ValueError, match=r"out \(probs\): shares memory with the input logits.*in place"):
        F.softmax_cross_entropy(flat[:6].reshape(2, 3), labels, out=flat[2:8].reshape(2, 3))  # shifted


def _idx_like(host_idx):
    if gpu_cnn.get_backend() == "cpu":
        return np.zeros_like(host_idx)
    from numba import cuda

    return cuda.to_device(np.zeros_like(host_idx))


def test_documented_in_place_ops_stay_correct_and_partial_overlap_is_refused(backend, rng):
    x_host = np.array([[-1.5, 0.0, 2.0, -0.25, 3.0, 1.0]], np.float32)
    x = _dev(x_host)
    y = F.relu(x, out=x)  # documented in place: exactly the same view
    np.testing.assert_array_equal(_host(x), [[0, 0, 2, 0, 3, 1]])
    del y
    dy = _dev(np.arange(1, 7, dtype=np.float32)[None])
    xr = _dev(x_host)
    F.relu_backward(dy, xr, out=dy)
    np.testing.assert_array_equal(_host(dy), [[0, 0, 3, 0, 5, 6]])  # hand-worked: dy where x > 0
    # a shifted view of the input is not in place: ReLU would read cells it already wrote
    flat = _dev(np.array([-1, 2, -3, 4, -5], np.float32))
    with pytest.raises(ValueError, match=r"out: shares memory with the input x.*itself \(in place\)"):
        F.relu(flat[1:], out=flat[:4])
    z = _dev(np.array([[0.0, np.log(2.0)], [0.0, 0.0]]))
    loss, _ = F.softmax_cross_entropy(z, np.array([1, 0]), out=z)  # documented in place
    np.testing.assert_allclose(_host(z), [[1 / 3, 2 / 3], [0.5, 0.5]], rtol=1e-6)
    assert loss == pytest.approx((np.log(1.5) + np.log(2.0)) / 2, rel=1e-6)  # hand-worked: -log p of the labels
    probs = _dev(np.full((2, 3), 1 / 3))
    d = F.softmax_cross_entropy_backward(probs, np.array([0, 1]), out=probs)  # documented in place
    np.testing.assert_allclose(_host(probs), [[-1 / 3, 1 / 6, 1 / 6], [1 / 6, -1 / 3, 1 / 6]], rtol=1e-6)
    del d


def test_overlap_check_compares_byte_ranges():
    """The mechanism itself: disjoint views of one buffer pass, overlapping ones (also reversed or
    transposed views) are caught, empty arrays never overlap."""
    buf = np.zeros((4, 6), np.float32)
    _base.check_no_overlap([("out", buf[:2])], [("x", buf[2:])])  # rows 0-1 vs 2-3: disjoint
    for view in (buf[1:3], buf[::-1], buf.T, buf[:, ::2]):
        with pytest.raises(ValueError, match="out: shares memory with the input x"):
            _base.check_no_overlap([("out", buf[:2])], [("x", view)])
    _base.check_no_overlap([("out", buf[:0])], [("x", buf)])
    assert _base._extent(buf[:, ::-1]) == _base._extent(buf)


# -- 2. float32 overflow, and the NaN/Inf policy ---------------------------------------------------

@pytest.mark.parametrize("value", [1e39, 1e300, -3.5e38])
def test_finite_input_beyond_float32_is_refused_naming_argument_and_magnitude(backend, value):
    with pytest.raises(ValueError, match=f"x: holds a finite value of magnitude {re.escape(f'{abs(value):.6g}')}"):
        F.relu([1.0, value])
    with pytest.raises(ValueError, match=f"w: holds a finite value of magnitude {re.escape(f'{abs(value):.6g}')}"):
        F.linear(np.ones((1, 2)), np.array([[1.0, value]]))
    with pytest.raises(ValueError, match=f"logits: holds a finite value of magnitude {re.escape(f'{abs(value):.6g}')}"):
        F.softmax_cross_entropy(np.array([[0.0, value]]), np.array([0]))


def test_largest_float32_and_explicit_inf_are_accepted(backend):
    fmax = float(np.finfo(np.float32).max)
    np.testing.assert_array_equal(F.relu(np.array([fmax, -1.0])), [np.float32(fmax), 0])
    y = F.relu(np.array([np.inf, np.nan, -np.inf]))  # NaN/Inf input: IEEE arithmetic, every backend
    assert y[0] == np.inf and np.isnan(y[1]) and y[2] == 0


def test_nan_inf_policy_is_the_same_on_every_backend(backend):
    """NaN propagates through conv/linear/softmax alike; the per-op rules hold (pool: NaN wins)."""
    x = np.zeros((1, 1, 3, 3), np.float32)
    x[0, 0, 1, 1] = np.nan
    y = F.conv2d(x, np.ones((1, 1, 2, 2), np.float32))
    assert np.isnan(y).all()  # every 2×2 window holds the centre
    yp, _ = F.max_pool2d(x, 3, 1)
    assert np.isnan(yp).all()
    loss, probs = F.softmax_cross_entropy(np.array([[0.0, np.nan], [1.0, 2.0]]), np.array([0, 1]))
    assert np.isnan(loss) and np.isnan(probs[0]).all() and np.isfinite(probs[1]).all()


# -- 3. relu_backward: one rule for NaN/Inf dy --------------------------------------------------------

def test_relu_backward_is_zero_where_x_is_not_positive_whatever_dy(backend):
    dy = np.array([np.nan, np.inf, -np.inf, np.nan, 2.0], np.float32)
    x = np.array([-1.0, 0.0, -2.0, np.nan, 1.0], np.float32)
    dx = F.relu_backward(dy, x)
    np.testing.assert_array_equal(dx, [0, 0, 0, 0, 2.0])  # the docstring's rule, on cpu as on the kernels


# -- 4. divergence, last and best checkpoints -------------------------------------------------------

@pytest.fixture(scope="module")
def small_digits():
    from gpu_cnn import data

    train, test = data.load_dataset("digits")
    return (train.images[:96], train.labels[:96]), (test.images[:48], test.labels[:48])


def test_adam_divergence_without_nan_stops_and_keeps_the_good_checkpoints(cpu_backend, tmp_path, small_digits):
    train, val = small_digits
    ckpt = tmp_path / "model.npz"
    trainer = Trainer(models.digits_cnn(seed=0), optimizer="adam", lr=1e-3, batch_size=32, progress=False,
                      checkpoint_path=str(ckpt))
    trainer.fit(train, epochs=1, val_data=val)
    good = trainer.model.state_dict()
    saved = ckpt.read_bytes()
    trainer.optimizer.lr = 1e6  # losses of ~1e28 with finite weights: no NaN ever shows
    with np.errstate(all="ignore"), pytest.raises(TrainingError, match=r"divergence_factor=100 times"):
        trainer.fit(train, epochs=1, val_data=val)
    for k, v in good.items():
        np.testing.assert_array_equal(trainer.model.state_dict()[k], v)  # restored to the last good epoch
    assert ckpt.read_bytes() == saved  # never overwritten by the diverged model
    assert len(trainer.history) == 1


def test_divergence_factor_is_settable_and_documented_default(cpu_backend, small_digits):
    from gpu_cnn.trainer import DIVERGENCE_FACTOR

    assert DIVERGENCE_FACTOR == 100.0
    train, _ = small_digits
    with pytest.raises(ValueError, match="divergence_factor: expected a finite number > 1 or None"):
        Trainer(models.digits_cnn(seed=0), divergence_factor=0.5)
    # off: the same run goes on (its loss stays finite), as before this rule
    t = Trainer(models.digits_cnn(seed=0), optimizer="adam", lr=1e6, batch_size=32, progress=False,
                divergence_factor=None)
    with np.errstate(all="ignore"):
        h = t.fit(train, epochs=1)
    assert np.isfinite(h[-1]["train_loss"]) and h[-1]["train_loss"] > 1e6


def test_non_finite_weights_stop_training(cpu_backend, small_digits, monkeypatch):
    train, _ = small_digits
    t = Trainer(models.digits_cnn(seed=0), lr=1e-3, batch_size=32, progress=False)
    start = t.model.state_dict()
    real_step = t.optimizer.step

    calls = [0]

    def poisoned_step():  # the last step of the epoch (96 images, batch 32) makes a weight inf: no loss sees it
        real_step()
        calls[0] += 1
        if calls[0] == 3:
            t.model.parameters()[0].data[0, 0, 0, 0] = np.inf

    monkeypatch.setattr(t.optimizer, "step", poisoned_step)
    with np.errstate(all="ignore"), pytest.raises(TrainingError, match=r"weight '0\.weight' became NaN or infinite"):
        t.fit(train, epochs=1)
    assert calls[0] == 3
    for k, v in start.items():
        np.testing.assert_array_equal(t.model.state_dict()[k], v)


def test_last_and_best_checkpoints(cpu_backend, tmp_path, small_digits):
    train, val = small_digits
    ckpt = tmp_path / "model.npz"
    trainer = Trainer(models.digits_cnn(seed=0), optimizer="adam", lr=3e-3, batch_size=32, progress=False,
                      checkpoint_path=str(ckpt))
    history = trainer.fit(train, epochs=4, val_data=val)
    assert checkpoint.best_path(ckpt) == str(tmp_path / "model.best.npz")
    last = gpu_cnn.load(ckpt).checkpoint_metadata
    best = gpu_cnn.load(checkpoint.best_path(ckpt)).checkpoint_metadata
    assert last["checkpoint"] == "last" and last["epoch"] == 4
    best_epoch = 1 + int(np.argmin([r["val_loss"] for r in history]))  # chosen here from the history
    assert best["checkpoint"] == "best" and best["selected_by"] == "val_loss" and best["epoch"] == best_epoch
    # and the best file holds that epoch's model: its validation loss is the history's minimum
    m = Trainer(gpu_cnn.load(checkpoint.best_path(ckpt)), batch_size=32, progress=False).evaluate(val)
    assert m["loss"] == pytest.approx(min(r["val_loss"] for r in history), rel=1e-5)


def test_cli_evaluate_and_predict_take_last_or_best(cpu_backend, tmp_path, small_digits, capsys):
    from gpu_cnn.cli import main

    train, _ = small_digits
    ckpt = tmp_path / "model.npz"
    Trainer(models.digits_cnn(seed=0), lr=1e-3, batch_size=32, progress=False, checkpoint_path=str(ckpt),
            metadata={"dataset": "digits", "input_shape": [1, 8, 8]}).fit(train, epochs=2)
    for which in ("last", "best"):
        assert main(["evaluate", str(tmp_path), "--which", which, "--backend", "cpu", "--json"]) == 0
        assert "test_accuracy" in capsys.readouterr().out
    np.save(tmp_path / "img.npy", train[0][0, 0])
    assert main(["predict", str(ckpt), str(tmp_path / "img.npy"), "--which", "best", "--backend", "cpu"]) == 0
    assert "class" in capsys.readouterr().out
    os.unlink(checkpoint.best_path(ckpt))
    assert main(["evaluate", str(ckpt), "--which", "best", "--backend", "cpu"]) == 2
    assert "no best checkpoint" in capsys.readouterr().err


# -- 5. checkpoints: NaN weights, file mode, zip members' declared sizes ------------------------------

def _tiny():
    nn.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def test_load_refuses_nonfinite_weights_unless_allowed(cpu_backend, tmp_path):
    model = _tiny()
    model.layers[1].weight.data[1, 2] = np.nan
    path = gpu_cnn.save(model, tmp_path / "nan.npz")
    with pytest.raises(CheckpointError, match=r"tensor '1\.weight' holds 1 NaN or infinite"):
        gpu_cnn.load(path)
    loaded = gpu_cnn.load(path, allow_nonfinite=True)
    assert np.isnan(loaded.state_dict()["1.weight"][1, 2])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_files_honour_the_umask(cpu_backend, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = gpu_cnn.save(_tiny(), tmp_path / "m.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_zip_member_whose_declared_size_is_wrong_is_refused_before_reading(cpu_backend, tmp_path, monkeypatch):
    """A member whose .npy header says (3, 4) float32 (128 + 48 bytes) but which declares and holds
    8 MiB: refused from the header, having decompressed a few hundred bytes of it."""
    model = _tiny()
    path = tmp_path / "bomb.npz"
    gpu_cnn.save(model, path)
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    w = members["1.weight.npy"]
    members["1.weight.npy"] = w + b"\0" * (8 << 20)  # zeros compress to ~8 KiB
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    read = [0]
    real_read = zipfile.ZipExtFile.read

    def counting_read(self, n=-1):
        out = real_read(self, n)
        read[0] += len(out)
        return out

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    with pytest.raises(CheckpointError, match=r"entry '1\.weight' declares 8388784 bytes, but its header .* needs 176"):
        gpu_cnn.load(path)
    assert read[0] < 64 << 10, read[0]


# -- 6. predict, train_step, load_state_dict: the same rules as fit and load ------------------------

def test_predict_and_train_step_follow_fits_rules(cpu_backend):
    model = models.digits_cnn(seed=0)
    t = Trainer(model, batch_size=4, progress=False)
    x = np.zeros((2, 1, 8, 8), np.float32)
    x[1, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"x: 1 image\(s\) hold NaN or infinite values"):
        t.predict(x)
    with pytest.raises(TypeError, match="x: images must be floating point, got int64"):
        t.train_step(np.zeros((2, 1, 8, 8), np.int64), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"x: 1 image\(s\) hold NaN"):
        t.train_step(x, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"x: holds a finite value of magnitude 1e\+39"):
        t.train_step(np.full((2, 1, 8, 8), 1e39), np.array([0, 1]))
    assert t.optimizer.step_count == 0


@pytest.mark.parametrize("value, message", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                                            (1e39, "magnitude 1e\\+39")])
def test_load_state_dict_refuses_nonfinite_and_out_of_range(cpu_backend, value, message):
    model = _tiny()
    before = model.state_dict()
    sd = {k: v.astype(np.float64) for k, v in before.items()}
    sd["1.bias"][0] = value
    with pytest.raises(ValueError, match=rf"state_dict\['1\.bias'\]: .*{message}"):
        model.load_state_dict(sd)
    for k, v in before.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)  # nothing copied


# -- 7. CLI predict: 16-bit PNGs scaled, std 0 refused -----------------------------------------------

@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory, small_digits):
    gpu_cnn.set_backend("cpu")
    train, _ = small_digits
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "model.npz"
    Trainer(models.digits_cnn(seed=0), lr=3e-3, batch_size=32, progress=False, checkpoint_path=str(path),
            metadata={"dataset": "digits", "input_shape": [1, 8, 8],
                      "normalization": {"mean": 0.0, "std": 1.0}}).fit(train, epochs=1)
    return path


def _save_meta(src, dst, **changes):
    model = gpu_cnn.load(src)
    meta = {k: v for k, v in model.checkpoint_metadata.items() if k not in ("format", "format_version", "architecture")}
    meta.update(changes)
    return gpu_cnn.save(model, dst, metadata=meta)


def test_16_bit_png_gives_the_8_bit_answer(cpu_backend, cli_checkpoint, tmp_path, capsys):
    from PIL import Image

    from gpu_cnn.cli import main

    img8 = (np.arange(64).reshape(8, 8) * 4 % 256).astype(np.uint8)
    Image.fromarray(img8).save(tmp_path / "a8.png")
    Image.fromarray(img8.astype(np.uint16) * 257).save(tmp_path / "a16.png")  # 257 * v / 65535 = v / 255
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    outs = []
    for name in ("a8.png", "a16.png"):
        assert main(["predict", str(cli_checkpoint), str(tmp_path / name), "--backend", "cpu"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("norm, message", [({"mean": 0.0, "std": 0.0}, "std must be > 0"),
                                           ({"mean": "abc", "std": 1.0}, "mean is not a number"),
                                           ({"mean": 0.0, "std": [float("nan")]}, "std must be finite")])
def test_cli_refuses_a_bad_normalisation(cpu_backend, cli_checkpoint, tmp_path, capsys, norm, message):
    from gpu_cnn.cli import main

    bad = _save_meta(cli_checkpoint, tmp_path / "bad.npz", normalization=norm)
    np.save(tmp_path / "img.npy", np.zeros((8, 8), np.float32))
    assert main(["predict", str(bad), str(tmp_path / "img.npy"), "--backend", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "nan" not in capsys.readouterr().out


# -- 8. sizes that cannot be allocated; one bound on stride/padding/kernel_size -----------------------

def test_allocations_too_large_are_refused_with_the_figure(backend):
    with pytest.raises(ValueError, match=r"shape \(1, 1, 2000002, 2000002\) of float32 needs 14\.6 TiB \(16000032000016 bytes\), more than"):
        F.conv2d(np.ones((1, 1, 2, 2), np.float32), np.ones((1, 1, 1, 1), np.float32), padding=10**6)
    with pytest.raises(ValueError, match=r"Linear weight: shape \(10000000, 10000000\) of float64 needs 727\.6 TiB"):
        nn.Linear(10**7, 10**7)


@pytest.mark.parametrize("call", [
    lambda: F.max_pool2d(np.ones((1, 1, 4, 4), np.float32), 2, stride=2**63),
    lambda: F.conv2d(np.ones((1, 1, 4, 4), np.float32), np.ones((1, 1, 2, 2), np.float32), stride=2**63),
    lambda: F.conv2d(np.ones((1, 1, 4, 4), np.float32), np.ones((1, 1, 2, 2), np.float32), padding=2**31),
    lambda: F.max_pool2d_backward(np.ones((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 1), np.int32),
                                  (1, 1, 4, 4), 2**40),
    lambda: nn.MaxPool2d(2, stride=2**63),
    lambda: nn.Conv2d(1, 1, 3, padding=2**63),
])
def test_one_integer_bound_for_every_op(backend, call):
    with pytest.raises(ValueError, match=r"(stride|padding|kernel_size): expected values <= 2147483647"):
        call()


# -- 9. ragged lists, 0-d model input, zero-width images ----------------------------------------------

def test_ragged_lists_name_the_argument(backend):
    with pytest.raises(TypeError, match=r"^x: expected an array of floats, got a list NumPy cannot convert"):
        F.relu([[1.0], [1.0, 2.0]])
    with pytest.raises(TypeError, match=r"^w: expected an array of floats"):
        F.linear(np.ones((1, 2)), [[1.0, 2.0], [3.0]])


def test_model_input_0d_and_zero_width(cpu_backend):
    model = models.digits_cnn(seed=0)
    with pytest.raises(ValueError, match=r"x: expected a batch \(N, \.\.\.\).*0-d"):
        model.forward(np.float32(1.0))
    with pytest.raises(ValueError, match=r"\(C, H, W\) with C, H, W >= 1, got \(1, 8, 0\)") as info:
        model.output_shape((1, 8, 0))
    assert "kernel_size" not in str(info.value)
    with pytest.raises(ValueError, match=r"train_data: images of shape \(1, 8, 0\) do not fit") as info:
        Trainer(model, progress=False).fit((np.zeros((2, 1, 8, 0), np.float32), np.array([0, 1])))
    assert "kernel_size" not in str(info.value)


# -- 10. clear errors ------------------------------------------------------------------------------------

def test_load_state_dict_mismatch_is_a_value_error(cpu_backend):
    with pytest.raises(ValueError, match=r"^state_dict does not match the model: missing \['1\.bias'\]") as info:
        _tiny().load_state_dict({"1.weight": np.zeros((3, 4))})
    assert not isinstance(info.value, KeyError)


def test_trainer_metadata_must_be_a_mapping(cpu_backend):
    with pytest.raises(TypeError, match=r"metadata: expected a dict, got list"):
        Trainer(_tiny(), metadata=[1, 2])


def test_string_format_version_says_what_it_got(cpu_backend, tmp_path):
    model = _tiny()
    arrays = model.state_dict()
    arrays[META_KEY] = np.array(json.dumps({"format": "gpu-cnn-checkpoint", "format_version": "1",
                                            "architecture": model.spec()}))
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"format version '1' \(str\) is not supported \(this gpu-cnn "
                                              r"reads format version 1, an int\)"):
        gpu_cnn.load(tmp_path / "s.npz")


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs POSIX")
def test_load_of_a_fifo_or_device_is_not_a_regular_file(cpu_backend, tmp_path):
    os.mkfifo(tmp_path / "fifo.npz")
    for path in (tmp_path / "fifo.npz", "/dev/zero"):
        with pytest.raises(CheckpointError, match="not a regular file"):
            gpu_cnn.load(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        gpu_cnn.load(tmp_path / "missing.npz")


def test_cli_errors_say_what_is_wrong(cpu_backend, cli_checkpoint, tmp_path, capsys):
    from gpu_cnn.cli import main

    (tmp_path / "afile").write_text("x")
    assert main(["evaluate", str(cli_checkpoint), "--dataset", "mnist", "--data-dir", str(tmp_path / "afile"),
                 "--backend", "cpu"]) == 2
    assert "--data-dir: " in (err := capsys.readouterr().err) and "is a file, not a folder" in err
    assert main(["predict", str(cli_checkpoint), str(tmp_path), "--backend", "cpu"]) == 2
    assert "a folder, not an image file" in capsys.readouterr().err


def test_divergence_is_caught_on_the_kernel_backend_too(kernel_backend, small_digits):
    """fit on the kernels reads the loss back only at epoch ends: the reference comes from one read
    after the first step, and the epoch test is the same as on cpu (a tiny MLP keeps the simulator quick)."""
    (x, y), _ = small_digits
    nn.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    t = Trainer(model, optimizer="adam", lr=1e6, batch_size=8, progress=False)
    start = model.state_dict()
    with np.errstate(all="ignore"), pytest.raises(TrainingError, match=r"divergence_factor=100 times the reference"):
        t.fit((x[:16], y[:16]), epochs=1)  # two steps: the second's loss is ~1e6 times the first's
    assert t._loss_ref >= np.log(10)  # set from the first step (or the uniform guess's loss)
    for k, v in start.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)
