"""conv2d's PyTorch arguments (dilation, groups incl. depthwise and channel multipliers, 'same' with its
asymmetric padding, 'valid', unbatched input) against PyTorch float64 (tests/data/torch_layers.npz,
written by tests/data/make_torch_layers.py), forward and every gradient, on cpu and on the kernel
backend (the ``general`` kernels under the simulator: the fixture's shapes are tiny and odd), plus
nn.Conv2d with the same arguments and the refusals of what gpu-cnn does not support.
"""
from pathlib import Path

import numpy as np
import pytest

import gpu_cnn
from gpu_cnn import functional as F
from gpu_cnn import nn

DATA = np.load(Path(__file__).parent / "data" / "torch_layers.npz")
CASES = sorted({k.split("/")[1] for k in DATA if k.startswith("conv/")})
# the cases each run the sim kernels on (the dW kernel costs one simulated block per weight element)
SIM_CASES = ["dil21-s2", "depthwise-mult2", "same-even-k", "same-dil", "unbatched"]
KW = {"dil2": dict(stride=1, padding=1, dilation=2),
      "dil21-s2": dict(stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
      "groups2": dict(stride=1, padding=1, groups=2),
      "depthwise": dict(stride=2, padding=1, groups=3),
      "depthwise-mult2": dict(stride=1, padding=(1, 0), groups=3),
      "same-odd": dict(padding="same"), "same-even-k": dict(padding="same"),
      "same-dil": dict(padding="same", dilation=(2, 3), groups=2),
      "valid": dict(padding="valid", stride=(1, 2)), "unbatched": dict(padding=1, stride=2)}
# float32 sums of at most ~100 products (forward, dx) or N*Ho*Wo <= 150 (dw, db) of N(0, 1) values
# against PyTorch float64: a few float32 ulps of sums of size ~10
TOL = dict(rtol=1e-5, atol=2e-5)


def _case(name):
    return {k.split("/")[2]: DATA[k] for k in DATA if k.startswith(f"conv/{name}/")}


def test_fixture_covers_every_argument():
    assert set(CASES) == set(KW)
    assert _case("unbatched")["x"].ndim == 3 and _case("unbatched")["y"].ndim == 3
    assert _case("depthwise")["w"].shape[1] == 1 and _case("depthwise-mult2")["w"].shape[0] == 6
    # 'same' with an even filter pads asymmetrically: the output keeps H, W
    c = _case("same-even-k")
    assert c["y"].shape[2:] == c["x"].shape[2:] and c["w"].shape[2] % 2 == 0


def _run(name):
    c = _case(name)
    y = F.conv2d(c["x"], c["w"], c["b"], **KW[name])
    dx, dw, db = F.conv2d_backward(c["dy"], c["x"], c["w"], **KW[name])
    for got, key in ((y, "y"), (dx, "dx"), (dw, "dw"), (db, "db")):
        assert got.shape == c[key].shape, key
        np.testing.assert_allclose(got, c[key], **TOL, err_msg=f"{name}: {key}")


@pytest.mark.parametrize("name", CASES)
def test_cpu_matches_pytorch(cpu_backend, name):
    _run(name)


@pytest.mark.parametrize("name", SIM_CASES)
def test_kernels_match_pytorch(kernel_backend, name):
    _run(name)


def test_general_kernels_match_float64_reference_on_a_larger_odd_shape(kernel_backend, rng):
    """The launchers directly, against the kernel module's own float64 reference (groups, dilation,
    asymmetric padding, stride); the reference itself is checked against PyTorch below."""
    from gpu_cnn.kernels import conv2d as k
    from gpu_cnn.ops import _base

    x = rng.standard_normal((1, 4, 9, 7)).astype(np.float32)
    w = rng.standard_normal((2, 2, 2, 3)).astype(np.float32)
    args = ((2, 1), (1, 2, 0, 1), (2, 2), 2)
    shape = k.general_output_shape(x.shape, w.shape, *args)
    y = _base.to_device(np.zeros(shape, np.float32))
    k.conv2d_forward_general(_base.to_device(x), _base.to_device(w), None, y, *args)
    np.testing.assert_allclose(y.copy_to_host(), k.conv2d_general_reference(x, w, None, *args), **TOL)


def test_reference_matches_pytorch():
    from gpu_cnn.kernels import conv2d as k

    c = _case("same-dil")  # filter 3x2, dilation (2, 3): totals 4, 3 -> (top, bottom, left, right) = (2, 2, 1, 2)
    np.testing.assert_allclose(k.conv2d_general_reference(c["x"], c["w"], c["b"], (1, 1), (2, 2, 1, 2), (2, 3), 2),
                               c["y"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["groups2", "same-even-k"])
def test_layer_matches_pytorch(cpu_backend, name):
    c = _case(name)
    kw = KW[name]
    o, cg, kh, kw_ = c["w"].shape
    layer = nn.Conv2d(c["x"].shape[1], o, (kh, kw_), **kw)
    assert layer.weight.shape == (o, c["x"].shape[1] // kw.get("groups", 1), kh, kw_)
    layer.load_state_dict({"weight": c["w"], "bias": c["b"]})
    model = nn.Sequential(layer)
    model.requires_input_grad = True
    y = model.forward(c["x"])
    np.testing.assert_allclose(y, c["y"], **TOL)
    assert layer.output_shape(c["x"].shape[1:]) == c["y"].shape[1:]
    dx = model.backward(c["dy"])
    np.testing.assert_allclose(dx, c["dx"], **TOL)
    np.testing.assert_allclose(layer.weight.grad_numpy(), c["dw"], **TOL)
    spec = layer.spec()
    again = nn.from_spec(spec)
    assert again.spec() == spec


def test_finite_differences_depthwise_dilated(cpu_backend, rng):
    """One more independent check: dx, dw of a dilated depthwise conv with 'same' padding by central
    differences of L = Σ y * g (float64 arithmetic on float32 values; step 1e-2, tolerance 2e-2)."""
    x = rng.standard_normal((1, 2, 5, 6)).astype(np.float32)
    w = rng.standard_normal((4, 1, 2, 3)).astype(np.float32)
    kw = dict(padding="same", dilation=(2, 1), groups=2)
    g = rng.standard_normal(F.conv2d(x, w, **kw).shape).astype(np.float32)
    dx, dw, _ = F.conv2d_backward(g, x, w, bias=False, **kw)
    for arr, grad in ((x, dx), (w, dw)):
        for idx in [tuple(rng.integers(0, s) for s in arr.shape) for _ in range(4)]:
            old = arr[idx]
            arr[idx] = old + 1e-2
            up = float((F.conv2d(x, w, **kw).astype(np.float64) * g).sum())
            arr[idx] = old - 1e-2
            down = float((F.conv2d(x, w, **kw).astype(np.float64) * g).sum())
            arr[idx] = old
            assert abs((up - down) / 2e-2 - grad[idx]) < 2e-2


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, w: F.conv2d(x, w, groups=4), ValueError, "groups: C_in = 3"),
    (lambda x, w: F.conv2d(x, w, groups=0), ValueError, "groups: expected a positive int"),
    (lambda x, w: F.conv2d(x, w, dilation=0), ValueError, "dilation: expected values >= 1"),
    (lambda x, w: F.conv2d(x, w, padding="full"), ValueError, "padding: expected an int, a pair, 'same' or 'valid'"),
    (lambda x, w: F.conv2d(x, w, stride=2, padding="same"), ValueError, "'same' is not supported for strided"),
    (lambda x, w: F.conv2d(x, w, dilation=5), ValueError, "dilation"),
    (lambda x, w: F.conv2d(x[0, 0], w), ValueError, "1-D convolutions .* not supported"),
    (lambda x, w: F.conv2d(x[None], w), ValueError, "3-D convolutions .* not supported"),
    (lambda x, w: nn.Conv2d(3, 2, 3, padding_mode="reflect"), ValueError, "padding_mode: only 'zeros' is supported"),
    (lambda x, w: nn.Conv2d(3, 2, 3, groups=2), ValueError, "groups: in_channels"),
    (lambda x, w: nn.ConvTranspose2d, AttributeError, "transposed convolutions are not supported"),
    (lambda x, w: nn.Conv1d, AttributeError, "1-D convolutions"),
    (lambda x, w: nn.Conv3d, AttributeError, "3-D convolutions are not supported"),
])
def test_refusals_name_the_argument(cpu_backend, call, exc, match):
    x = np.zeros((1, 3, 5, 5), np.float32)
    w = np.zeros((2, 3, 3, 3), np.float32)
    with pytest.raises(exc, match=match):
        call(x, w)


def test_refusal_also_on_kernel_backend(kernel_backend):
    x = np.zeros((1, 3, 5, 5), np.float32)
    w = np.zeros((2, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="groups: C_out = 2 .* not divisible by groups = 3"):
        F.conv2d(x, w, groups=3)
    gpu_cnn.set_backend("cpu")
