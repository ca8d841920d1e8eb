"""Trainer: learning, determinism, NaN handling, validation split."""

import numpy as np
import pytest

import gpu_cnn
from gpu_cnn import models
from gpu_cnn.trainer import Trainer, TrainingError


@pytest.fixture(scope="module")
def digits():
    from gpu_cnn.data import load_digits

    return load_digits()


def test_same_seed_gives_identical_training_on_cpu(cpu_backend, digits):
    train, _ = digits
    small = (train.images[:256], train.labels[:256])
    runs = []
    for _ in range(2):
        model = models.digits_cnn(seed=1)
        h = Trainer(model, optimizer="sgd", lr=0.05, batch_size=32, seed=4, progress=False).fit(small, epochs=2)
        runs.append((h, model.state_dict()))
    assert [r["train_loss"] for r in runs[0][0]] == [r["train_loss"] for r in runs[1][0]]
    for k, v in runs[0][1].items():
        np.testing.assert_array_equal(v, runs[1][1][k])
    model = models.digits_cnn(seed=1)
    other = Trainer(model, optimizer="sgd", lr=0.05, batch_size=32, seed=5, progress=False).fit(small, epochs=2)
    assert other[-1]["train_loss"] != runs[0][0][-1]["train_loss"]  # the seed drives the shuffling


def test_training_learns_digits_and_reports_history(cpu_backend, digits):
    train, test = digits
    model = models.digits_cnn(seed=0)
    trainer = Trainer(model, optimizer="adam", lr=3e-3, batch_size=32, seed=0, progress=False, val_split=0.1)
    history = trainer.fit(train, epochs=3)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "seconds"} <= set(history[-1])
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    m = trainer.evaluate(test)
    assert m["n"] == len(test.labels)
    assert m["accuracy"] > 0.85  # three epochs of Adam on 8×8 digits: far above chance (0.1)
    probs = trainer.predict(test.images[:5])
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(cpu_backend, tmp_path, digits):
    train, _ = digits
    good = (train.images[:160], train.labels[:160])  # 5 steps an epoch
    ckpt = tmp_path / "model.npz"
    model = models.digits_cnn(seed=0)
    trainer = Trainer(model, optimizer="sgd", lr=0.01, batch_size=32, progress=False, checkpoint_path=str(ckpt))
    trainer.fit(good, epochs=1)
    saved = gpu_cnn.load(ckpt).state_dict()
    before = model.state_dict()
    trainer.optimizer.lr = 1e9  # diverges within the epoch (NaN images are refused before any step)
    with np.errstate(all="ignore"), pytest.raises(
            TrainingError, match=r"loss became (nan|inf) at epoch 2, step [2-9].*last good checkpoint is kept at"):
        trainer.fit(good, epochs=1)
    after = model.state_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])  # restored to the last good weights
        np.testing.assert_array_equal(gpu_cnn.load(ckpt).state_dict()[k], saved[k])  # file untouched


def test_bad_arguments_are_clear_errors(cpu_backend):
    model = models.digits_cnn()
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(model, batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        Trainer(model, lr=-1)
    t = Trainer(model, progress=False)
    with pytest.raises(ValueError, match="train_data: 3 images but 2 labels"):
        t.fit((np.zeros((3, 1, 8, 8), np.float32), np.zeros(2, int)))
    with pytest.raises(TypeError, match="labels must be integer"):
        t.fit((np.zeros((2, 1, 8, 8), np.float32), np.zeros(2)))
    with pytest.raises(ValueError, match="epochs"):
        t.fit((np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, int)), epochs=0)


def _small(digits, n=64):
    train, _ = digits
    return train.images[:n], train.labels[:n]


def test_retry_after_divergence_restores_the_optimizer_too(cpu_backend, digits):
    """A NaN loss restores the model AND the optimizer state, so lowering lr and fitting again works."""
    x, y = _small(digits)
    trainer = Trainer(models.digits_cnn(seed=0), optimizer="sgd", lr=0.01, batch_size=16, progress=False)
    trainer.fit((x, y), epochs=1)
    momentum = [b.copy() for b in trainer.optimizer.state_dict()["momentum_buffer"]]
    steps = trainer.optimizer.step_count
    weights = trainer.model.state_dict()
    trainer.optimizer.lr = 1e6
    with np.errstate(all="ignore"), pytest.raises(TrainingError, match="model and the optimizer were restored"):
        trainer.fit((x, y), epochs=1)
    assert trainer.optimizer.step_count == steps
    for a, b in zip(trainer.optimizer.state_dict()["momentum_buffer"], momentum):
        np.testing.assert_array_equal(a, b)
    for k, v in weights.items():
        np.testing.assert_array_equal(trainer.model.state_dict()[k], v)
    trainer.optimizer.lr = 0.01
    history = trainer.fit((x, y), epochs=1)  # as the message suggests
    assert np.isfinite(history[-1]["train_loss"]) and len(history) == 2


def test_bad_data_is_refused_before_the_first_step(cpu_backend, digits, tmp_path):
    x, y = _small(digits)
    model = models.digits_cnn(seed=0)
    before = model.state_dict()
    trainer = Trainer(model, lr=0.1, batch_size=4, progress=False)
    bad = y.copy()
    bad[-1] = 12  # found only in the last batch if checked per batch
    with pytest.raises(ValueError, match=r"train_data: class ids must be in \[0, 10\).*found 12"):
        trainer.fit((x, bad))
    with pytest.raises(ValueError, match=r"val_data: images of shape \(8, 8\) do not fit the model"):
        trainer.fit((x, y), val_data=(x[:, 0], y))
    with pytest.raises(ValueError, match=r"train_data: images of shape \(1, 6, 6\) do not fit the model"):
        trainer.fit((x[:, :, :6, :6].copy(), y))
    nan = x.copy()
    nan[5, 0, 2, 2] = np.nan
    with pytest.raises(ValueError, match="train_data: 1 image.*NaN or infinite"):
        trainer.fit((nan, y))
    with pytest.raises(ValueError, match="train_data: labels must be 1-D"):
        trainer.fit((x, y[:, None]))
    with pytest.raises(ValueError, match="val_split: 0.5 of 1 samples leaves no training data"):
        Trainer(model, val_split=0.5, progress=False).fit((x[:1], y[:1]))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="checkpoint_path: cannot write to .*file is not a writable folder"):
        Trainer(model, checkpoint_path=str(tmp_path / "file" / "model.npz"))
    Trainer(model, checkpoint_path=str(tmp_path / "new" / "run" / "model.npz"))  # folders save will make
    assert trainer.history == [] and trainer.optimizer.step_count == 0
    for k, v in before.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)  # not one step was taken


def test_error_mid_epoch_restores_the_model(cpu_backend, digits, monkeypatch):
    x, y = _small(digits)
    model = models.digits_cnn(seed=0)
    trainer = Trainer(model, lr=0.1, batch_size=16, progress=False)
    before = model.state_dict()
    real_step, calls = trainer.train_step, []

    def failing_step(xb, yb):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(xb, yb)

    monkeypatch.setattr(trainer, "train_step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit((x, y), epochs=1)
    assert trainer.optimizer.step_count == 0 and trainer.history == []
    for k, v in before.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)


def test_divergence_in_the_first_epoch_names_no_checkpoint(cpu_backend, digits, tmp_path):
    x, y = _small(digits)
    ckpt = tmp_path / "model.npz"
    trainer = Trainer(models.digits_cnn(seed=0), lr=1e6, batch_size=16, progress=False, checkpoint_path=str(ckpt))
    with np.errstate(all="ignore"), pytest.raises(TrainingError) as info:
        trainer.fit((x, y), epochs=1)
    assert "checkpoint" not in str(info.value) and not ckpt.exists()


def test_argument_types(cpu_backend, digits):
    model = models.digits_cnn(seed=0)
    assert Trainer(model, optimizer="SGD", progress=False).optimizer.momentum == 0.9  # any case, same optimizer
    t = Trainer(model, batch_size=np.int64(8), lr=np.float32(0.01), seed=np.int64(2), progress=False)
    assert t.batch_size == 8 and isinstance(t.batch_size, int)
    for kw, match in [({"batch_size": True}, "batch_size"), ({"lr": float("nan")}, "lr"),
                      ({"val_split": "0.1"}, "val_split"), ({"seed": -1}, "seed"), ({"optimizer": "rmsprop"}, "optimizer")]:
        with pytest.raises(ValueError, match=match):
            Trainer(model, **kw)
    with pytest.raises(TypeError, match="model: expected a gpu_cnn.nn model"):
        Trainer(None)
    with pytest.raises(ValueError, match="metadata: key 'architecture' is reserved"):
        Trainer(model, metadata={"architecture": "lenet5"})  # at once, not at the first checkpoint
    with pytest.raises(ValueError, match="epochs"):
        t.fit(_small(digits, 8), epochs=True)


def test_predict_shapes(cpu_backend, digits):
    x, _ = _small(digits, 4)
    t = Trainer(models.digits_cnn(seed=0), progress=False)
    assert t.predict(x[:0]).shape == (0, 10)
    p = t.predict(x)
    np.testing.assert_allclose(t.predict(x[1][None])[0], p[1], rtol=1e-5, atol=1e-8)  # batch-1 BLAS rounding
    with pytest.raises(ValueError, match=r"x: images of shape \(8, 8\) do not fit the model \(one image: x\[None\]\)"):
        t.predict(x[1])
    with pytest.raises(TypeError, match="x: images must be floating point"):
        t.predict(x.astype(int))


def _tiny_model():
    from gpu_cnn import nn

    nn.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2 * 4 * 4, 10))


def test_device_batches_train_exactly_as_host_batches(kernel_backend, rng):
    """Images and labels already on the device are used in place and give the same steps as host ones."""
    from numba import cuda

    x = rng.standard_normal((1, 2, 1, 8, 8)).astype(np.float32)  # one step: forward, backward, update
    y = rng.integers(0, 10, (1, 2))
    results = []
    for on_device in (False, True):
        model = _tiny_model()
        trainer = Trainer(model, optimizer="sgd", lr=0.1, batch_size=2, progress=False)
        steps = []
        for xb, yb in zip(x, y):
            if on_device:
                xb, yb = cuda.to_device(xb), cuda.to_device(yb.astype(np.int32))
            steps.append(trainer.train_step(xb, yb))
        results.append((steps, model.state_dict()))
    (host_steps, host_state), (dev_steps, dev_state) = results
    assert dev_steps == host_steps
    assert all(np.isfinite(loss) and 0 <= ok <= 2 for loss, ok in dev_steps)
    for k, v in host_state.items():
        np.testing.assert_array_equal(dev_state[k], v)


def test_device_batch_errors_are_clear(kernel_backend, rng):
    from numba import cuda

    trainer = Trainer(_tiny_model(), optimizer="sgd", lr=0.1, batch_size=2, progress=False)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    with pytest.raises(TypeError, match="y: a device label array must be 1-D int32"):
        trainer.train_step(x, cuda.to_device(np.array([1, 2], np.int64)))
    with pytest.raises(TypeError, match="y: expected 1-D integer class ids"):
        trainer.train_step(x, np.array([1.0, 2.0]))
    gpu_cnn.set_backend("cpu")
    cpu_trainer = Trainer(_tiny_model(), optimizer="sgd", lr=0.1, batch_size=2, progress=False)
    with pytest.raises(TypeError, match="x: a device array needs the cuda"):
        cpu_trainer.train_step(cuda.to_device(x), np.array([1, 2]))


def test_models_that_take_flat_input_train_too(cpu_backend, digits):
    """The Trainer asks the model which input it takes: an MLP on flattened images trains, evaluates, predicts."""
    from gpu_cnn import nn

    x, y = _small(digits)
    flat = x.reshape(len(x), -1)
    nn.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    t = Trainer(mlp, optimizer="adam", lr=1e-2, batch_size=16, progress=False)
    history = t.fit((flat, y), epochs=3)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert t.evaluate((flat, y))["n"] == len(y) and t.predict(flat[:3]).shape == (3, 10)
    with pytest.raises(ValueError, match=r"train_data: images of shape \(1, 8, 8\) do not fit the model"):
        t.fit((x, y))


def test_train_step_checks_host_labels_before_the_int32_cast(cpu_backend, digits):
    x, _ = _small(digits, 2)
    t = Trainer(models.digits_cnn(seed=0), progress=False)
    with pytest.raises(ValueError, match=r"y: class ids must be in \[0, 10\), found 4294967297"):
        t.train_step(x, np.array([2**32 + 1, 0]))  # int32 would wrap it to class 1
    with pytest.raises(ValueError, match="found -1"):
        t.train_step(x, np.array([-1, 0]))
    assert t.optimizer.step_count == 0
