"""BatchNorm2d, Dropout, Residual and train()/eval() against PyTorch float64 (tests/data/torch_layers.npz,
from tests/data/make_torch_layers.py) on cpu and on the kernel backend (the kernels of
gpu_cnn.kernels.norm under the simulator), plus finite differences for the residual block.

BatchNorm: three training steps, each checked for the output, dx, dweight, dbias and the running
statistics (momentum 0.1, and momentum=None, the cumulative average), then eval mode. Dropout: the
mask for a fixed (seed, step) is the one an independent pure-Python implementation of the documented
hash gives, on every backend, and the values and gradient are PyTorch's for that mask.
"""
from pathlib import Path

import numpy as np
import pytest

import gpu_cnn
from gpu_cnn import functional as F
from gpu_cnn import nn
from gpu_cnn.ops import norm as opnorm

TORCH = np.load(Path(__file__).parent / "data" / "torch_layers.npz")
STEPS = 3
# float32 statistics over 45 values per channel, normalised values ~1: a few ulps (~1e-6); dx combines
# three such sums
TOL = dict(rtol=1e-5, atol=1e-5)


def _bn(tag, key):
    return TORCH[f"bn/{tag}/{key}"]


@pytest.mark.parametrize("tag,kw", [("default", {}), ("mom-none", dict(momentum=None, eps=1e-3))])
def test_batchnorm_matches_pytorch_over_several_steps_and_in_eval(backend, tag, kw):
    c = _bn(tag, "weight").shape[0]
    bn = nn.BatchNorm2d(c, **kw)
    bn.load_state_dict({"weight": _bn(tag, "weight"), "bias": _bn(tag, "bias"), "running_mean": np.zeros(c, np.float32),
                        "running_var": np.ones(c, np.float32), "num_batches_tracked": np.array(0)})
    model = nn.Sequential(bn)
    model.requires_input_grad = True
    for step in range(STEPS):
        g = lambda k: _bn(tag, f"step{step}/{k}")  # noqa: E731
        np.testing.assert_allclose(model.forward(g("x")), g("y"), **TOL, err_msg=f"step {step}: y")
        np.testing.assert_allclose(model.backward(g("dy")), g("dx"), **TOL, err_msg=f"step {step}: dx")
        np.testing.assert_allclose(bn.weight.grad_numpy(), g("dweight"), **TOL)
        np.testing.assert_allclose(bn.bias.grad_numpy(), g("dbias"), **TOL)
        state = bn.state_dict()
        np.testing.assert_allclose(state["running_mean"], g("running_mean"), **TOL)
        np.testing.assert_allclose(state["running_var"], g("running_var"), **TOL)
        assert not np.allclose(state["running_mean"], 0)  # the statistics moved
    assert bn.state_dict()["num_batches_tracked"] == _bn(tag, "num_batches_tracked") == STEPS
    assert bn.state_dict()["num_batches_tracked"].dtype == np.int64
    model.eval()
    assert not bn.training
    np.testing.assert_allclose(model.forward(_bn(tag, "eval/x")), _bn(tag, "eval/y"), **TOL)
    np.testing.assert_allclose(model.backward(_bn(tag, "eval/dy")), _bn(tag, "eval/dx"), **TOL)
    assert bn.state_dict()["num_batches_tracked"] == STEPS  # eval does not count


def test_batchnorm_state_dict_keys_are_pytorchs(cpu_backend):
    bn = nn.BatchNorm2d(3)
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert list(nn.BatchNorm2d(3, affine=False, track_running_stats=False).state_dict()) == []
    assert list(nn.BatchNorm2d(3, affine=False).state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]


def test_batchnorm_without_affine_or_running_stats(backend, rng):
    """affine=False: no weight/bias (scale 1, shift 0); track_running_stats=False: batch statistics in
    eval too. Checked against the float64 formula."""
    x = (rng.standard_normal((2, 3, 4, 3)) * 2 + 1).astype(np.float32)
    bn = nn.BatchNorm2d(3, affine=False, track_running_stats=False).eval()
    y = nn.Sequential(bn).eval().forward(x)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(x64.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, **TOL)


def test_batchnorm_refuses_bad_arguments(cpu_backend):
    with pytest.raises(ValueError, match="momentum"):
        nn.BatchNorm2d(3, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        nn.BatchNorm2d(3, eps=0)
    with pytest.raises(ValueError, match="BatchNorm2d expects 3 channels"):
        nn.BatchNorm2d(3).forward(np.ones((2, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm2d(3).forward(np.ones((1, 3, 1, 1), np.float32))
    with pytest.raises(AttributeError, match="1-D batch normalisation are not supported"):
        nn.BatchNorm1d


DROPOUT = sorted({k.split("/")[1] for k in TORCH if k.startswith("dropout/")})


@pytest.mark.parametrize("name", DROPOUT)
def test_dropout_mask_and_values_match_the_documented_hash(backend, name):
    g = lambda k: TORCH[f"dropout/{name}/{k}"]  # noqa: E731
    seed, step = (int(v) for v in g("meta"))
    p = float(g("p"))
    mask = g("mask")
    assert 0 < mask.mean() < 1 and abs(mask.mean() - (1 - p)) < 0.2  # a real mask, about 1 - p kept
    y = F.dropout(g("x"), p, seed, step)
    np.testing.assert_array_equal(y != 0, mask)
    np.testing.assert_allclose(y, g("y"), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(F.dropout_backward(g("dy"), p, seed, step), g("dx"), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(opnorm.dropout_mask(seed, step, mask.shape, p), mask)


def test_dropout_kernel_reference_agrees_with_cpu_twin(kernel_backend):
    from gpu_cnn.kernels import norm as knorm

    for seed, step, p in ((0, 1, 0.5), (2**32 - 1, 9, 0.1)):
        np.testing.assert_array_equal(knorm.dropout_keep_reference(seed, step, 1000, p),
                                      opnorm.dropout_mask(seed, step, (1000,), p))


def test_dropout_layer_train_eval_and_steps(backend, rng):
    x = rng.standard_normal((4, 50)).astype(np.float32) + 3  # no zeros in x: a 0 in y is a drop
    layer = nn.Dropout(0.4, seed=11)
    model = nn.Sequential(layer)
    model.requires_input_grad = True
    y1, y2 = model.forward(x), model.forward(x)
    assert layer.step == 2
    np.testing.assert_array_equal(y1 != 0, opnorm.dropout_mask(11, 1, x.shape, 0.4))
    np.testing.assert_array_equal(y2 != 0, opnorm.dropout_mask(11, 2, x.shape, 0.4))
    assert (y1 != 0).sum() != (y2 != 0).sum() or not np.array_equal(y1 != 0, y2 != 0)  # a new mask each step
    dx = model.backward(np.ones_like(x))  # backward of the last forward (step 2)
    np.testing.assert_allclose(dx, opnorm.dropout_mask(11, 2, x.shape, 0.4) / 0.6, rtol=1e-6)
    model.eval()
    np.testing.assert_array_equal(model.forward(x), x)
    assert layer.step == 2
    with pytest.raises(ValueError, match="p: expected a number in"):
        nn.Dropout(1.5)


def test_train_eval_reach_every_module(cpu_backend):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Residual(nn.Sequential(nn.BatchNorm2d(2), nn.ReLU())),
                          nn.Dropout(0.5))
    assert all(m.training for m in model.modules())
    assert model.eval() is model
    assert len(model.modules()) == 7 and not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def _residual_model():
    block = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1))
    shortcut = nn.Sequential(nn.Conv2d(2, 3, 1, stride=2), nn.BatchNorm2d(3))
    return nn.Sequential(nn.Residual(block, shortcut), nn.ReLU(), nn.Residual(nn.Sequential(nn.Conv2d(3, 3, 1))),
                         nn.Flatten())


def test_residual_gradients_match_finite_differences(cpu_backend, rng):
    """Backward through both branches (a strided conv + BN shortcut, then an identity one) against
    central differences of L = Σ out * g, in eval mode so that BN is a fixed affine map and the loss a
    smooth function of each input and weight (float32 forward; step 1e-2, tolerance 2e-2)."""
    nn.manual_seed(3)
    model = _residual_model()
    model.requires_input_grad = True
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    model.forward(x)  # one training step moves the running statistics off (0, 1)
    model.eval()
    out = model.forward(x)
    g = rng.standard_normal(out.shape).astype(np.float32)
    dx = model.backward(g)
    params = dict(model.named_parameters())
    grads = {k: p.grad_numpy() for k, p in params.items()}
    assert set(grads) >= {"0.block.0.weight", "0.shortcut.0.weight", "0.shortcut.1.weight", "2.block.0.weight"}

    def loss():
        return float((model.forward(x).astype(np.float64) * g).sum())

    for i in [tuple(rng.integers(0, s) for s in x.shape) for _ in range(4)]:
        old = x[i]
        x[i] = old + 1e-2
        up = loss()
        x[i] = old - 1e-2
        down = loss()
        x[i] = old
        assert abs((up - down) / 2e-2 - dx[i]) < 2e-2
    for name in ("0.block.0.weight", "0.shortcut.0.weight", "0.shortcut.1.bias", "2.block.0.weight"):
        w = params[name].numpy()
        for i in [tuple(rng.integers(0, s) for s in w.shape) for _ in range(2)]:
            old = w[i]
            for sign, store in ((1, "up"), (-1, "down")):
                w2 = w.copy()
                w2[i] = old + sign * 1e-2
                params[name].assign(w2)
                if store == "up":
                    up = loss()
                else:
                    down = loss()
            params[name].assign(w)
            assert abs((up - down) / 2e-2 - grads[name][i]) < 2e-2, name


def test_residual_matches_between_cpu_and_kernels(kernel_backend, rng):
    """The same residual model on cpu and on the kernel backend: outputs, input gradient, every
    parameter gradient and the running statistics (training mode, one step)."""
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    results = []
    for be in ("cpu", kernel_backend):
        gpu_cnn.set_backend(be)
        nn.manual_seed(5)
        model = _residual_model()
        model.requires_input_grad = True
        y = model.forward(x)
        dx = model.backward(np.ones_like(y) * np.linspace(-1, 1, y.size).reshape(y.shape).astype(np.float32))
        results.append((y, dx, model.state_dict(), {k: p.grad_numpy() for k, p in model.named_parameters()}))
    (y0, dx0, s0, g0), (y1, dx1, s1, g1) = results
    np.testing.assert_allclose(y1, y0, **TOL)
    np.testing.assert_allclose(dx1, dx0, **TOL)
    for k in s0:
        np.testing.assert_allclose(s1[k], s0[k], **TOL, err_msg=k)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_residual_refuses_mismatched_branches(cpu_backend):
    res = nn.Residual(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)))
    with pytest.raises(ValueError, match="the block gives .* but the shortcut gives"):
        res.output_shape((2, 5, 5))
    with pytest.raises(TypeError, match="block"):
        nn.Residual("conv")


def test_add_kernel(kernel_backend, rng):
    a, b = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_array_equal(F.add(a, b), a + b)
    with pytest.raises(ValueError, match="b: expected the shape of a"):
        F.add(a, b[:2])
