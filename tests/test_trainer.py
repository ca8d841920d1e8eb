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
    good = (train.images[:64], train.labels[:64])
    ckpt = tmp_path / "model.npz"
    model = models.digits_cnn(seed=0)
    trainer = Trainer(model, optimizer="sgd", lr=0.01, batch_size=32, progress=False, checkpoint_path=str(ckpt))
    trainer.fit(good, epochs=1)
    saved = gpu_cnn.load(ckpt).state_dict()
    before = model.state_dict()
    bad_x = good[0].copy()
    bad_x[40] = np.nan  # poisons the second batch
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2.*last good checkpoint is kept at"):
        trainer.fit((bad_x, good[1]), epochs=1)
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
