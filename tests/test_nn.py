"""Layers and whole networks: forward/backward against an independent float64 NumPy network,
finite differences end to end, sim vs cpu, state_dict rules, planned memory."""
import re

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
    with pytest.raises(nn.StateDictError, match=r"missing \['8.bias'\]") as info:  # a ValueError, not KeyError
        b.load_state_dict({k: v for k, v in sd.items() if k != "8.bias"})
    assert isinstance(info.value, ValueError) and not isinstance(info.value, KeyError)
    assert str(info.value).startswith("state_dict does not match")  # the message as it was, not KeyError's quoted repr
    with pytest.raises(ValueError, match=r"unexpected \['9.weight'\]"):
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


# ---------------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, never a crash deep inside NumPy or Python


def digits_batch(rng, n=2):
    return rng.standard_normal((n, 1, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("shape", [(2, 8, 8), (1, 8, 8), (8, 8), (1, 2, 1, 8, 8)])
def test_model_rejects_a_batch_of_the_wrong_rank(cpu_backend, shape):
    model = models.digits_cnn(seed=0)
    msg = re.escape(f"x: expected a 4-D batch (N, C, H, W), got shape {shape}")
    with pytest.raises(ValueError, match=msg):
        model.forward(np.zeros(shape, np.float32))


def test_single_image_needs_a_batch_axis(cpu_backend, rng):
    model = models.digits_cnn(seed=0)
    x = digits_batch(rng)
    with pytest.raises(ValueError, match=re.escape("x: expected a 4-D batch (N, C, H, W), got shape (1, 8, 8)")):
        model.forward(x[0])
    assert model.forward(x[:1]).shape == (1, 10)  # the same image with its batch axis is fine


def test_layers_say_which_rank_they_take(cpu_backend):
    with pytest.raises(ValueError, match=re.escape("x: expected a 4-D batch (N, C, H, W), got shape (1, 3, 3)")):
        nn.Conv2d(1, 2, 3)(np.zeros((1, 3, 3), np.float32))
    with pytest.raises(ValueError, match=re.escape("x: expected a 4-D batch (N, C, H, W), got shape (4, 4)")):
        nn.MaxPool2d(2)(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=re.escape("x: expected a 2-D batch (N, in_features), got shape (1, 1, 3, 3)")):
        nn.Linear(9, 2)(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match=re.escape("x: expected a batch of at least 2 dimensions (N, ...), got shape (3,)")):
        nn.Flatten()(np.zeros(3, np.float32))
    # ReLU takes any rank: the Linear after it names itself and what fed it
    with pytest.raises(ValueError, match=re.escape("layer 1 (Linear): its input from layer 0 (ReLU): expected a 2-D "
                                                   "batch (N, in_features), got shape (2, 1, 3, 3)")):
        nn.Sequential(nn.ReLU(), nn.Linear(9, 2)).forward(np.zeros((2, 1, 3, 3), np.float32))


def test_a_missing_flatten_names_the_layer(cpu_backend):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"layer 2 \(Linear\): its input from layer 1 \(ReLU\): expected a 2-D batch "
                                         r"\(N, in_features\), got shape \(2, 2, 2, 2\); is an nn.Flatten\(\) missing"):
        model.forward(np.zeros((2, 1, 4, 4), np.float32))


def test_non_array_batch_is_a_type_error(cpu_backend):
    model = models.digits_cnn(seed=0)
    with pytest.raises(TypeError, match="x: expected an array of floats, got a str"):
        model.forward("abc")
    with pytest.raises(TypeError, match="x: expected an array of floats, got a NoneType"):
        model.forward(None)


def test_device_batch_of_the_wrong_rank_is_a_clear_error(kernel_backend):
    """Device input takes the same check (a tiny layer: the simulator is slow)."""
    model = nn.Sequential(nn.Conv2d(1, 1, 1))
    bad = _base.to_device(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match=re.escape("x: expected a 4-D batch (N, C, H, W), got shape (2, 3, 3)")):
        model.forward(bad)


def test_filter_or_window_larger_than_the_input(cpu_backend):
    x = np.zeros((1, 1, 3, 3), np.float32)
    msg = "kernel_size: Conv2d's filter (5, 5) is larger than the padded input (3, 3) (input (3, 3), padding (0, 0))"
    with pytest.raises(ValueError, match=re.escape(msg)):
        nn.Conv2d(1, 2, 5)(x)
    with pytest.raises(ValueError, match=re.escape("Conv2d's filter (5, 5) is larger than the padded input (5, 3)")):
        nn.Conv2d(1, 2, 5, padding=(1, 0))(x)
    assert nn.Conv2d(1, 2, 5, padding=1)(x).shape == (1, 2, 1, 1)  # padding makes it fit
    msg = "kernel_size: MaxPool2d's window (4, 4) is larger than the padded input (3, 3) (input (3, 3), padding (0, 0))"
    with pytest.raises(ValueError, match=re.escape(msg)):
        nn.MaxPool2d(4)(x)
    # the static check says where in the model the shapes stop fitting (lenet5 needs 28×28, not 8×8)
    with pytest.raises(ValueError, match=r"layer 3 \(Conv2d\), input \(6, 4, 4\): kernel_size: Conv2d's filter \(5, 5\) "
                                         r"is larger than the padded input \(4, 4\)"):
        models.lenet5().output_shape((1, 8, 8))
    with pytest.raises(ValueError, match=re.escape("Conv2d expects samples of shape (C, H, W) (batches (N, C, H, W)), got (8, 8)")):
        models.digits_cnn().output_shape((8, 8))


@pytest.mark.parametrize("make, exc, msg", [
    (lambda: nn.Conv2d(0, 4, 3), ValueError, "in_channels: expected a positive int, got 0"),
    (lambda: nn.Conv2d(1, -4, 3), ValueError, "out_channels: expected a positive int, got -4"),
    (lambda: nn.Conv2d(1, 0, 3), ValueError, "out_channels: expected a positive int, got 0"),
    (lambda: nn.Conv2d(1.5, 4, 3), TypeError, "in_channels: expected a positive int, got 1.5"),
    (lambda: nn.Conv2d("3", 4, 3), TypeError, "in_channels: expected a positive int, got '3'"),
    (lambda: nn.Conv2d(True, 4, 3), TypeError, "in_channels: expected a positive int, got True"),
    (lambda: nn.Conv2d(1, 4, 0), ValueError, r"kernel_size: expected values >= 1, got \(0, 0\)"),
    (lambda: nn.Conv2d(1, 4, (3, 3, 3)), TypeError, "kernel_size: expected an int or a pair of ints"),
    (lambda: nn.Conv2d(1, 4, 3, stride=0), ValueError, r"stride: expected values >= 1, got \(0, 0\)"),
    (lambda: nn.Conv2d(1, 4, 3, stride=1.5), TypeError, "stride: expected an int or a pair of ints, got 1.5"),
    (lambda: nn.Conv2d(1, 4, 3, padding=-1), ValueError, r"padding: expected values >= 0, got \(-1, -1\)"),
    (lambda: nn.Conv2d(1, 4, 3, padding=True), TypeError, "padding: expected an int or a pair of ints, got True"),
    (lambda: nn.Conv2d(1, 4, 3, bias="no"), TypeError, "bias: expected True or False, got 'no'"),
    (lambda: nn.Linear(0, 10), ValueError, "in_features: expected a positive int, got 0"),
    (lambda: nn.Linear(-1, 10), ValueError, "in_features: expected a positive int, got -1"),
    (lambda: nn.Linear(10, 0), ValueError, "out_features: expected a positive int, got 0"),
    (lambda: nn.Linear(10.7, 3), TypeError, "in_features: expected a positive int, got 10.7"),
    (lambda: nn.Linear(10, False), TypeError, "out_features: expected a positive int, got False"),
    (lambda: nn.MaxPool2d(0), ValueError, r"kernel_size: expected values >= 1, got \(0, 0\)"),
    (lambda: nn.MaxPool2d(2, stride=0), ValueError, r"stride: expected values >= 1, got \(0, 0\)"),
    (lambda: nn.MaxPool2d(2, padding=3), ValueError,
     r"padding: must be at most kernel_size // 2 = \(1, 1\) per axis .* got \(3, 3\) with kernel_size \(2, 2\)"),
    (lambda: nn.MaxPool2d((3, 2), padding=(0, 2)), ValueError, r"padding: must be at most kernel_size // 2 = \(1, 1\) .* got \(0, 2\)"),
    (lambda: models.lenet5(num_classes=-1), ValueError, "num_classes: expected a positive int, got -1"),
    (lambda: models.lenet5(num_classes=0), ValueError, "num_classes: expected a positive int, got 0"),
    (lambda: models.lenet5(num_classes=1.5), TypeError, "num_classes: expected a positive int, got 1.5"),
    (lambda: models.digits_cnn(num_classes=True), TypeError, "num_classes: expected a positive int, got True"),
    (lambda: models.get_model("digits_cnn", num_classes="10"), TypeError, "num_classes: expected a positive int, got '10'"),
    (lambda: models.digits_cnn(seed=-1), ValueError, "seed: expected a non-negative int, got -1"),
    (lambda: models.digits_cnn(seed="abc"), TypeError, "seed: expected a non-negative int, got 'abc'"),
])
def test_constructors_validate_their_arguments(cpu_backend, make, exc, msg):
    with pytest.raises(exc, match=msg):
        make()


def test_constructors_accept_numpy_integers(cpu_backend):
    conv = nn.Conv2d(np.int64(2), np.int32(3), np.int64(3), stride=np.int64(1), padding=np.int16(1))
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (2, 3, (3, 3), (1, 1))
    assert type(conv.in_channels) is int  # stored as Python ints, so spec() stays JSON-able
    lin = nn.Linear(np.int64(4), np.uint8(2))
    assert (lin.in_features, lin.out_features) == (4, 2)
    assert models.digits_cnn(num_classes=np.int64(3), seed=np.int64(0)).output_shape((1, 8, 8)) == (3,)
    assert nn.MaxPool2d(3, padding=1).padding == (1, 1)  # padding == kernel_size // 2 is allowed


def test_from_spec_goes_through_the_constructor_checks(cpu_backend):
    """Checkpoints rebuild models with from_spec, so a bad architecture gets the same clear errors."""
    with pytest.raises(ValueError, match="in_features: expected a positive int, got 0"):
        nn.from_spec({"type": "Sequential", "layers": [{"type": "Flatten"},
                                                       {"type": "Linear", "in_features": 0, "out_features": 2}]})
    with pytest.raises(TypeError, match="out_channels: expected a positive int, got 2.5"):
        nn.from_spec({"type": "Conv2d", "in_channels": 1, "out_channels": 2.5, "kernel_size": [3, 3]})
    spec = models.digits_cnn().spec()
    assert nn.from_spec(spec).spec() == spec


@pytest.mark.parametrize("layer", [nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 2)],
                         ids=lambda layer: type(layer).__name__)
def test_backward_before_forward_names_the_layer(cpu_backend, layer):
    name = type(layer).__name__
    with pytest.raises(RuntimeError, match=rf"{name}: backward\(\) called before forward\(\)"):
        layer.backward(np.ones((2, 2), np.float32))


def test_model_backward_before_forward(cpu_backend, rng):
    model = models.digits_cnn(seed=0)
    with pytest.raises(RuntimeError, match=r"Sequential: backward\(\) called before forward\(\)"):
        model.backward(np.ones((2, 10), np.float32))
    # a forward that failed does not count: its stale caches must not be used
    model.forward(digits_batch(rng))
    with pytest.raises(ValueError, match="input channels"):
        model.forward(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\) \(or after a forward that failed\)"):
        model.backward(np.ones((2, 10), np.float32))


def test_model_backward_checks_dy(cpu_backend, rng):
    model = models.digits_cnn(seed=0)
    model.forward(digits_batch(rng))
    with pytest.raises(TypeError, match="dy: expected a floating-point array, got dtype int64"):
        model.backward(np.ones((2, 10), np.int64))
    with pytest.raises(TypeError, match="dy: expected a floating-point array, got dtype bool"):
        model.backward(np.ones((2, 10), bool))
    with pytest.raises(TypeError, match="dy: expected an array of floats, got a str"):
        model.backward("abc")
    with pytest.raises(TypeError, match="dy: expected an array of floats, got a NoneType"):
        model.backward(None)
    with pytest.raises(TypeError, match="dy: expected an array of floats, got a list NumPy cannot convert"):
        model.backward([[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match=re.escape("dy: expected shape (2, 10) (the model's output), got (2, 9)")):
        model.backward(np.ones((2, 9), np.float32))
    with pytest.raises(ValueError, match=re.escape("dy: expected shape (2, 10) (the model's output), got (3, 10)")):
        model.backward(np.ones((3, 10), np.float32))
    # after all those refusals a good dy (float64 and lists are converted, as the ops do) still works
    _base.fill(model[0].weight.grad, 0.0)  # so the assertion below sees the backward that follows
    model.backward(np.ones((2, 10)).tolist())
    assert np.abs(model[0].weight.grad_numpy()).max() > 0


def test_layer_backward_checks_dy_against_its_output(cpu_backend):
    lin = nn.Linear(3, 2)
    lin(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match=re.escape("dy: expected shape (4, 2) (the output of Linear), got (4, 9)")):
        lin.backward(np.ones((4, 9), np.float32))
    with pytest.raises(TypeError, match="dy: expected a floating-point array, got dtype int64"):
        lin.backward(np.ones((4, 2), np.int64))
    assert lin.backward(np.ones((4, 2), np.float32)).shape == (4, 3)


@pytest.mark.parametrize("state", [None, [1, 2], "0.weight", 3.0])
def test_load_state_dict_needs_a_mapping(cpu_backend, state):
    with pytest.raises(TypeError, match="state: expected a dict of arrays"):
        small_net().load_state_dict(state)


def test_load_state_dict_rejects_non_float_values(cpu_backend):
    sd = small_net().state_dict()
    with pytest.raises(TypeError, match=r"state_dict\['0.weight'\]: expected floating values"):
        small_net().load_state_dict(dict(sd, **{"0.weight": "abc"}))


def test_rank_is_checked_by_the_layer_that_takes_it(cpu_backend):
    """A Sequential does not guess the rank up front: a nested Sequential that starts with Flatten, or a
    layer of the user's own that reshapes, takes the batch as it comes; the first layer with a rank
    still refuses a wrong one with a clear message."""

    class ToFlat(nn.Module):  # a user's reshape layer: no declared rank
        def forward(self, x):
            self._shape = x.shape
            self._y_shape = (x.shape[0], int(np.prod(x.shape[1:])))
            return x.reshape(self._y_shape)

        def backward(self, dy):
            return dy.reshape(self._shape)

        def output_shape(self, in_shape):
            return (int(np.prod(in_shape)),)

    x = np.ones((2, 1, 4, 4), np.float32)
    nested = nn.Sequential(nn.Sequential(nn.Flatten()), nn.Linear(16, 3))
    assert nested.forward(x).shape == (2, 3)
    custom = nn.Sequential(ToFlat(), nn.Linear(16, 3))
    assert custom.forward(x).shape == (2, 3)
    with pytest.raises(ValueError, match=re.escape("x: expected a 2-D batch (N, in_features), got shape (2, 1, 4, 4)")):
        nn.Sequential(nn.Linear(16, 3)).forward(x)
