"""Flat parameters: model.flatten_parameters() puts every parameter into one flat buffer and every gradient
into another, and an optimizer given them as ``flat=`` updates the whole model in one launch.

The per-param optimizer (checked against float64 formulas and PyTorch in test_optim.py) is the reference
here: the flat one applies the same formula to the same elements, so the results must be bit-identical,
not merely close. Odd sizes (a 3×5 conv-like weight, 7 and 1 elements) so no segment lines up with a warp,
block or ELEMS_PER_THREAD.
"""
import numpy as np
import pytest

import gpu_cnn
from gpu_cnn import nn
from gpu_cnn.optim import SGD, Adam, AdamW
from gpu_cnn.ops import _base

VARIANTS = [
    (SGD, dict(lr=0.1)),
    (SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=True)),
    (SGD, dict(lr=0.1, momentum=0.8, dampening=0.3)),
    (Adam, dict(lr=0.01, weight_decay=0.1)),
    (AdamW, dict(lr=0.01)),
]


def _model(seed):
    nn.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 1, bias=False))


def _host(a):
    return a.copy() if isinstance(a, np.ndarray) else a.copy_to_host()


def _write(a, host):
    if isinstance(a, np.ndarray):
        np.copyto(a, host)
    else:
        a.copy_to_device(host)


def test_flatten_keeps_values_and_makes_views(backend):
    model = _model(3)
    before = model.state_dict()
    data, grad = model.flatten_parameters()
    sizes = [int(np.prod(p.shape)) for p in model.parameters()]
    assert data.shape == (sum(sizes),) == grad.shape
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    assert not _host(grad).any()  # gradients start at zero
    # every param is a view: writing the flat buffer changes what the params (and state_dict) hold
    _write(data, np.arange(sum(sizes), dtype=np.float32))
    off = 0
    for (name, p), n in zip(model.named_parameters(), sizes):
        np.testing.assert_array_equal(p.numpy().ravel(), np.arange(off, off + n, dtype=np.float32), err_msg=name)
        np.testing.assert_array_equal(model.state_dict()[name].ravel(), np.arange(off, off + n), err_msg=name)
        off += n
    assert model.flatten_parameters()[0] is data  # a second call (a second Trainer) shares the buffers


@pytest.mark.parametrize("cls,kw", VARIANTS, ids=lambda v: getattr(v, "__name__", None) or "-".join(map(str, v.values())))
def test_flat_optimizer_is_bit_identical_to_one_launch_per_param(backend, cls, kw, monkeypatch):
    rng = np.random.default_rng(7)
    per, flat = _model(1), _model(1)
    flat_pair = flat.flatten_parameters()
    opt_per = cls(per.parameters(), **kw)
    opt_flat = cls(flat.parameters(), flat=flat_pair, **kw)
    launches = []
    if _backend_uses_kernels():
        from gpu_cnn.kernels import optim as K

        for name in ("sgd_step", "adam_step", "adam_counted"):
            real = getattr(K, name)
            monkeypatch.setattr(K, name, lambda *a, _real=real, **k: (launches.append(1), _real(*a, **k))[1])
    for step in range(4):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in per.parameters()]
        for model in (per, flat):
            for p, g in zip(model.parameters(), grads):
                _write(p.grad, g)
        launches.clear()
        opt_per.step()
        per_launches = len(launches)
        launches.clear()
        opt_flat.step()
        if _backend_uses_kernels():
            assert (per_launches, len(launches)) == (len(per.parameters()), 1)
        for k, v in per.state_dict().items():
            np.testing.assert_array_equal(flat.state_dict()[k], v, err_msg=f"step {step + 1}: {k}")
        if step == 1:
            opt_flat.lr = opt_per.lr = opt_per.lr / 2  # an lr schedule reaches the flat launch too
    sd_per, sd_flat = opt_per.state_dict(), opt_flat.state_dict()
    assert sd_per.keys() == sd_flat.keys()
    for name in cls.BUFFERS:
        if name in sd_per:
            assert [a.shape for a in sd_flat[name]] == [p.shape for p in flat.parameters()]
            for a, b in zip(sd_per[name], sd_flat[name]):
                np.testing.assert_array_equal(a, b)
    # a flat optimizer's state loads into a per-param one and vice versa, and zero_grad clears everything
    opt_per.load_state_dict(sd_flat)
    opt_flat.load_state_dict(sd_per)
    opt_flat.zero_grad()
    assert not _host(flat_pair[1]).any()


def _backend_uses_kernels():
    from gpu_cnn import backend

    return backend.uses_kernels()


def test_flat_that_does_not_hold_the_params_is_refused(backend):
    model = _model(2)
    data, grad = model.flatten_parameters()
    params = model.parameters()
    with pytest.raises(ValueError, match="flat: the buffers hold"):
        SGD(params[:-1], lr=0.1, flat=(data, grad))
    with pytest.raises(ValueError, match=r"flat: params\[0\] param is not the view of the flat params at element 0"):
        SGD(params[::-1], lr=0.1, flat=(data, grad))
    other = _model(2)
    with pytest.raises(ValueError, match=r"flat: params\[0\] param is not the view"):
        SGD(other.parameters(), lr=0.1, flat=(data, grad))
    with pytest.raises(TypeError, match="flat: expected a"):
        SGD(params, lr=0.1, flat=data)
    with pytest.raises(ValueError, match="1-D float32"):
        SGD(params, lr=0.1, flat=(data, _base.zeros((1, data.shape[0]))))


def test_trainer_steps_one_optimizer_launch_and_matches_per_param_training(backend, monkeypatch):
    """A Trainer flattens its model: after two steps it holds the same weights as the same model
    trained by hand with one optimizer launch per param."""
    from gpu_cnn import functional as F

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y = np.array([0, 0, 0, 0, 0, 0])
    nn.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    nn.manual_seed(4)
    ref = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    trainer = gpu_cnn.Trainer(model, optimizer="adam", lr=0.01, batch_size=6, seed=0, progress=False)
    assert trainer.optimizer._flat is not None
    opt = Adam(ref.parameters(), lr=0.01)
    for _ in range(2):
        trainer.train_step(x, y)
        logits = ref.forward(x)
        _, probs = F.softmax_cross_entropy(logits, y)
        ref.backward(F.softmax_cross_entropy_backward(probs, y))
        opt.step()
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[k], v, err_msg=k)


def test_to_backend_keeps_a_flat_model_flat(kernel_backend):
    model = _model(5)
    model.flatten_parameters()
    before = model.state_dict()
    gpu_cnn.set_backend("cpu")
    model.to_backend()
    data, grad = model.flat_parameters
    assert isinstance(data, np.ndarray) and data.shape == (sum(int(np.prod(p.shape)) for p in model.parameters()),)
    assert all(np.shares_memory(p.data, data) for p in model.parameters())
    for k, v in before.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)
