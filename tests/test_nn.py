"""Layers and whole networks: forward/backward against an independent float64 NumPy network,
finite differences end to end, sim vs cpu, state_dict rules, planned memory."""
import numpy as np
import pytest

import gpu_cnn
from gpu_cnn import models, nn
from gpu_cnn.ops import _base
from netref import forward_backward

# A small network with every layer kind, sized for the simulator: 1×9×7 input (not a tile multiple).
SPEC = [("conv", 1, 1), ("relu",), ("pool", 2), ("conv", 1, 0), ("relu",), ("flatten",), ("linear",), ("relu",), ("linear",)]


def small_net(seed=3):
    nn.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, (2, 2)), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 3 * 2, 6), nn.ReLU(), nn.Linear(6, 5),
    )


def batch(rng, n=3):
    x = rng.standard_normal((n, 1, 9, 7)).astype(np.float32)
    y = rng.integers(0, 5, n)
    return x, y


def params_of(model):
    sd = model.state_dict()
    names = sorted({k.split(".")[0] for k in sd}, key=int)
    return [(sd[f"{i}.weight"].astype(np.float64), sd[f"{i}.bias"].astype(np.float64)) for i in names], names


def model_step(model, x, y):
    logits = model.forward(x)
    loss, probs = gpu_cnn.functional.softmax_cross_entropy(logits, y)
    dlogits = gpu_cnn.functional.softmax_cross_entropy_backward(probs, y)
    model.backward(dlogits)
    grads = {name: p.grad_numpy() for name, p in model.named_parameters()}
    return loss, logits, grads


def test_whole_network_matches_float64_reference(backend, rng):
    model = small_net()
    x, y = batch(rng)
    loss, logits, grads = model_step(model, x, y)
    params, names = params_of(model)
    ref_loss, ref_logits, ref_grads, _ = forward_backward(SPEC, params, x, y)
    assert np.abs(ref_logits).max() > 0.1  # the network computes something non-trivial
    # float32 through 5 layers with sums of <= 27 terms: agreement to ~1e-5 relative, atol for values near 0
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name, (dw, db) in zip(names, ref_grads):
        assert np.abs(dw).max() > 0, name  # every layer receives gradient
        np.testing.assert_allclose(grads[f"{name}.weight"], dw, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(grads[f"{name}.bias"], db, rtol=1e-4, atol=1e-5, err_msg=name)


def test_input_gradient_when_requested(cpu_backend, rng):
    model = small_net()
    model.requires_input_grad = True
    x, y = batch(rng)
    model.forward(x)
    _, probs = gpu_cnn.functional.softmax_cross_entropy(model.forward(x), y)
    dx = model.backward(gpu_cnn.functional.softmax_cross_entropy_backward(probs, y))
    params, _ = params_of(model)
    *_, ref_dx = forward_backward(SPEC, params, x, y)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-6)


def test_two_layer_model_finite_differences(backend, rng):
    """Conv -> Flatten -> Linear: every gradient entry vs central differences of the float64 loss."""
    nn.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    spec = [("conv", 2, 1), ("flatten",), ("linear",)]
    x = rng.standard_normal((2, 2, 5, 6)).astype(np.float32)
    y = np.array([2, 0])
    _, _, grads = model_step(model, x, y)
    params, names = params_of(model)
    eps = 1e-6
    for li, name in enumerate(names):
        for pj, kind in enumerate(("weight", "bias")):
            p = params[li][pj]
            fd = np.zeros_like(p)
            for idx in np.ndindex(p.shape):
                old = p[idx]
                p[idx] = old + eps
                lp = forward_backward(spec, params, x, y)[0]
                p[idx] = old - eps
                lm = forward_backward(spec, params, x, y)[0]
                p[idx] = old
                fd[idx] = (lp - lm) / (2 * eps)
            # model gradients are float32; central differences in float64 are exact to ~1e-9
            np.testing.assert_allclose(grads[f"{name}.{kind}"], fd, rtol=1e-3, atol=1e-5, err_msg=f"{name}.{kind}")


def test_one_training_step_sim_equals_cpu(rng):
    from gpu_cnn.optim import SGD

    x, y = batch(rng, 4)
    out = {}
    for be in ("cpu", "sim"):
        gpu_cnn.set_backend(be)
        model = small_net(11)
        opt = SGD([(p.data, p.grad) for p in model.parameters()], lr=0.1, momentum=0.9)
        loss, _, grads = model_step(model, x, y)
        opt.step()
        out[be] = (loss, grads, model.state_dict())
    gpu_cnn.set_backend("sim")
    np.testing.assert_allclose(out["sim"][0], out["cpu"][0], rtol=1e-5)
    for k in out["cpu"][1]:
        # the same float32 math summed in different orders: ~1e-6 relative
        np.testing.assert_allclose(out["sim"][1][k], out["cpu"][1][k], rtol=1e-4, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(out["sim"][2][k], out["cpu"][2][k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_training_steps_allocate_no_device_memory_after_the_first(kernel_backend, rng):
    from gpu_cnn import Trainer

    model = small_net()
    trainer = Trainer(model, optimizer="adam", lr=1e-3, batch_size=3, seed=0, progress=False)
    x, y = batch(rng, 5)  # batches of 3 then a partial batch of 2
    trainer.train_step(x[:3], y[:3])
    before = _base.allocation_stats()
    trainer.train_step(x[:3], y[:3])
    trainer.train_step(x[3:], y[3:])  # the last partial batch reuses the planned buffers
    assert _base.allocation_stats() == before
    assert before[0] > 0  # the counter does count: planning the first step allocated


def test_memory_report_lists_layers_and_total(cpu_backend, rng):
    model = small_net()
    x, y = batch(rng)
    model_step(model, x, y)
    report = model.memory_report()
    lines = report.splitlines()
    assert lines[0].split()[:1] == ["layer"] and lines[-1].startswith("total")
    assert "0: Conv2d" in report and "8: Linear" in report
    rows = dict(model.memory_rows())
    assert rows["0: Conv2d"]["parameters"] == (3 * 1 * 3 * 3 + 3) * 4
    assert rows["0: Conv2d"]["buffers"] == 3 * 3 * 9 * 7 * 4  # its output; no input grad for layer 0


def test_lenet5_state_dict_matches_pytorch_names_and_shapes(cpu_backend):
    sd = models.lenet5(num_classes=10, seed=0).state_dict()
    expected = {
        "0.weight": (6, 1, 5, 5), "0.bias": (6,), "3.weight": (16, 6, 5, 5), "3.bias": (16,),
        "7.weight": (120, 400), "7.bias": (120,), "9.weight": (84, 120), "9.bias": (84,),
        "11.weight": (10, 84), "11.bias": (10,),
    }
    assert {k: v.shape for k, v in sd.items()} == expected
    assert models.lenet5().output_shape((1, 28, 28)) == (10,)
    try:
        import torch
    except ImportError:
        return
    t = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(400, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(), torch.nn.Linear(84, 10))
    assert {k: tuple(v.shape) for k, v in t.state_dict().items()} == expected


def test_load_state_dict_rules(cpu_backend):
    a, b = small_net(1), small_net(2)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v)
    sd = a.state_dict()
    with pytest.raises(KeyError, match=r"missing \['8.bias'\]"):
        b.load_state_dict({k: v for k, v in sd.items() if k != "8.bias"})
    with pytest.raises(KeyError, match=r"unexpected \['9.weight'\]"):
        b.load_state_dict(dict(sd, **{"9.weight": np.zeros(3)}))
    with pytest.raises(ValueError, match=r"state_dict\['0.weight'\]: expected shape \(3, 1, 3, 3\)"):
        b.load_state_dict(dict(sd, **{"0.weight": np.zeros((3, 1, 2, 2))}))


def test_kaiming_init_is_seeded_and_scaled(cpu_backend):
    w1 = models.lenet5(seed=5).state_dict()["7.weight"]
    w2 = models.lenet5(seed=5).state_dict()["7.weight"]
    np.testing.assert_array_equal(w1, w2)
    assert not np.array_equal(w1, models.lenet5(seed=6).state_dict()["7.weight"])
    # He normal: std sqrt(2/400) = 0.0707; 48k samples estimate it within ~1%
    assert abs(w1.std() - np.sqrt(2 / 400)) < 0.003


def test_model_on_another_backend_is_a_clear_error(rng):
    gpu_cnn.set_backend("cpu")
    model = small_net()
    gpu_cnn.set_backend("sim")
    x, _ = batch(rng)
    with pytest.raises(RuntimeError, match="to_backend"):
        model.forward(x)
    model.to_backend()
    assert model.forward(x).shape == (3, 5)


def test_bad_layer_input_is_a_clear_error(cpu_backend):
    model = small_net()
    with pytest.raises(ValueError, match="input channels"):
        model.forward(np.zeros((2, 3, 9, 7), np.float32))
    with pytest.raises(TypeError, match="x: expected a floating-point batch"):
        model.forward(np.zeros((2, 1, 9, 7), np.int64))
    with pytest.raises(TypeError, match="layer 1"):
        nn.Sequential(nn.ReLU(), "relu")
