"""Trainer.fit on the kernel backend keeps its metrics on the device (kernels/metrics.py) and reads them
only at progress refreshes and epoch ends: the results must equal the cpu backend's (which reads every
step), and a NaN mid-epoch must still stop training, name its step and roll the epoch back.
(That fit then copies nothing back per step is counted by tests/test_host_bench.py.)"""
import numpy as np
import pytest

import gpu_cnn
from gpu_cnn import nn
from gpu_cnn.trainer import Trainer, TrainingError


def _tiny(seed=0):
    nn.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))


def _data(n=10):
    rng = np.random.default_rng(3)
    return rng.standard_normal((n, 1, 4, 4)).astype(np.float32), rng.integers(0, 3, n)


def _fit(backend, progress, interval=0.5, epochs=2):
    gpu_cnn.set_backend(backend)
    model = _tiny()
    trainer = Trainer(model, optimizer="sgd", lr=0.1, batch_size=4, seed=0, progress=progress,
                      progress_interval=interval)
    history = trainer.fit(_data(), epochs=epochs)  # 10 samples: batches of 4, 4 and 2
    return history, model.state_dict()


def test_device_metrics_give_the_cpu_history_and_weights(kernel_backend):
    hist_k, w_k = _fit(kernel_backend, True, interval=1e-9)  # with the bar: a read after every step
    hist_c, w_c = _fit("cpu", False)
    gpu_cnn.set_backend(kernel_backend)
    for rk, rc in zip(hist_k, hist_c, strict=True):
        # float32 kernels vs NumPy on the same weights: ~1e-7 relative per op, a few ops deep, 2 epochs
        np.testing.assert_allclose(rk["train_loss"], rc["train_loss"], rtol=1e-5)
        assert rk["train_acc"] == rc["train_acc"]
    assert 0 < hist_c[-1]["train_acc"] < 1  # the count is exercised, not all right or all wrong
    for k in w_c:
        np.testing.assert_allclose(w_k[k], w_c[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_nan_mid_epoch_stops_names_the_step_and_rolls_back(kernel_backend, poison_weight_before_step):
    model = _tiny()
    trainer = Trainer(model, optimizer="sgd", lr=0.1, batch_size=4, seed=0, progress=False)
    trainer.fit(_data(), epochs=1)
    before = model.state_dict()
    poison_weight_before_step(trainer, 2)  # its loss is NaN
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2, step 2: training stopped"):
        trainer.fit(_data(), epochs=1)
    after = model.state_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert len(trainer.history) == 1


def test_progress_interval_is_checked(kernel_backend):
    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="progress_interval: expected a positive number of seconds"):
            Trainer(_tiny(), progress_interval=bad)
