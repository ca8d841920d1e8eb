"""The ready-made models: PyTorch-trained resnet8 and mobilenet_tiny weights (tests/data/torch_models.npz,
from tests/data/make_torch_layers.py: random init plus two SGD steps in torch, so the running
statistics are not trivial) load through load_state_dict and give PyTorch's eval-mode logits; lenet5
adapts to the input size (and is unchanged for 28×28); the MODELS registry, summary(), checkpoints of
the new layers, and the CLI's --model choices.
"""
from pathlib import Path

import numpy as np
import pytest

import gpu_cnn
from gpu_cnn import models, nn

DATA = np.load(Path(__file__).parent / "data" / "torch_models.npz")
WIDTH, IN_SHAPE, CLASSES = 4, (3, 9, 9), 5  # as make_torch_layers.py builds them


def _torch_state(name):
    prefix = f"{name}/state/"
    return {k[len(prefix):]: DATA[k] for k in DATA if k.startswith(prefix)}


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_tiny"])
def test_pytorch_weights_give_pytorchs_logits(cpu_backend, name):
    model = getattr(models, name)(num_classes=CLASSES, in_channels=IN_SHAPE[0], width=WIDTH, seed=0)
    state = _torch_state(name)
    assert set(model.state_dict()) == set(state)  # the same names as PyTorch's Sequential/Residual
    assert any(k.endswith("running_var") and not np.allclose(v, 1) for k, v in state.items())
    model.load_state_dict(state)
    model.eval()
    logits = model.forward(DATA[f"{name}/x"])
    ref = DATA[f"{name}/logits"]
    # float32 through ~8 layers: relative 1e-4 of the logits' scale, as the issue asks
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    model.train()  # training mode uses batch statistics: different logits (the test above is not vacuous)
    assert not np.allclose(model.forward(DATA[f"{name}/x"]), ref, rtol=1e-3, atol=1e-3)


def test_pytorch_weights_on_the_kernel_backend(kernel_backend):
    """mobilenet_tiny in eval mode on the kernels (depthwise general conv, BN apply, adaptive pool):
    forward only (the simulator is slow)."""
    model = models.mobilenet_tiny(num_classes=CLASSES, in_channels=IN_SHAPE[0], width=WIDTH, seed=0)
    model.load_state_dict(_torch_state("mobilenet_tiny"))
    model.eval()
    x = DATA["mobilenet_tiny/x"][:1]
    ref = DATA["mobilenet_tiny/logits"][:1]
    np.testing.assert_allclose(model.forward(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_registry_and_builders(cpu_backend):
    assert set(models.MODELS) == {"lenet5", "digits_cnn", "resnet8", "mobilenet_tiny"}
    for name in models.MODELS:
        for shape in [(1, 8, 8), (3, 28, 28)]:
            if name == "digits_cnn" and shape[1] != 8:
                continue
            model = models.get_model(name, num_classes=7, seed=0, input_shape=shape)
            assert model.output_shape(shape) == (7,), (name, shape)
    with pytest.raises(ValueError, match="model: expected one of lenet5, digits_cnn, resnet8, mobilenet_tiny"):
        models.get_model("vgg16")
    with pytest.raises(ValueError, match="input_size: expected a positive int"):
        models.lenet5(input_size=0)
    assert models.lenet5(input_size=(1, 3)).output_shape((1, 1, 3)) == (10,)  # tiny inputs still fit


def test_lenet5_on_28x28_is_unchanged(cpu_backend):
    """The classic geometry and parameter names (the checkpoints written before this change still load)."""
    model = models.lenet5(seed=0)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {"0.weight": (6, 1, 5, 5), "0.bias": (6,), "3.weight": (16, 6, 5, 5), "3.bias": (16,),
                      "7.weight": (120, 400), "7.bias": (120,), "9.weight": (84, 120), "9.bias": (84,),
                      "10.weight": (10, 84), "10.bias": (10,)} or shapes == {
        "0.weight": (6, 1, 5, 5), "0.bias": (6,), "3.weight": (16, 6, 5, 5), "3.bias": (16,),
        "7.weight": (120, 400), "7.bias": (120,), "9.weight": (84, 120), "9.bias": (84,),
        "11.weight": (10, 84), "11.bias": (10,)}
    assert model[3].spec() == {"type": "Conv2d", "in_channels": 6, "out_channels": 16, "kernel_size": [5, 5],
                               "stride": [1, 1], "padding": [0, 0], "bias": True}
    small = models.lenet5(input_size=8)  # 8 + 2*4 - 4 = 12 -> pool 6 -> 6 + 2*2 - 4 = 6 -> pool 3
    assert small.output_shape((1, 8, 8)) == (10,) and small[7].in_features == 32 * 3 * 3
    assert small[0].padding == (4, 4) and small[3].padding == (2, 2)
    # the small-input geometry: twice LeNet's channels, every layer's output shape worked by hand
    shapes = {k: v.shape for k, v in small.state_dict().items()}
    assert shapes == {"0.weight": (12, 1, 5, 5), "0.bias": (12,), "3.weight": (32, 12, 5, 5), "3.bias": (32,),
                      "7.weight": (120, 288), "7.bias": (120,), "9.weight": (84, 120), "9.bias": (84,),
                      "11.weight": (10, 84), "11.bias": (10,)}
    shape, after = (1, 8, 8), []
    for i in range(7):
        shape = small[i].output_shape(shape)
        after.append(shape)
    assert [after[i] for i in (0, 2, 3, 5, 6)] == [(12, 12, 12), (12, 6, 6), (32, 6, 6), (32, 3, 3), (288,)]
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    assert np.asarray(small.forward(x)).shape == (3, 10)
    assert models.lenet5(input_size=(8, 14))[7].in_features == 32 * 3 * 4  # width 14 -> 18 -> 9 -> 9 -> 4
    assert models.lenet5(input_size=12)[7].in_features == 16 * 1 * 1  # the 28-geometry from 12×12 on


def test_summary_lists_shapes_and_parameters(cpu_backend):
    model = models.resnet8(num_classes=10, in_channels=1, width=4, seed=0)
    lines = []
    text = model.summary((1, 8, 8), print_fn=lines.append)
    assert lines == [text]
    total = sum(int(np.prod(v.shape)) for k, v in model.state_dict().items()
                if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert f"Total params: {total:,}" in text
    # hand-worked: the stem 1->4 3x3 (36 weights), stage 3 ends at 16 channels of 2x2, the classifier 16*10+10
    assert "(N, 4, 8, 8)" in text and "(N, 16, 2, 2)" in text and "(N, 16, 1, 1)" in text
    rows = text.splitlines()
    assert rows[2].split() == ["0", "(Conv2d)", "(N,", "4,", "8,", "8)", "36"]
    assert rows[-4].split()[-1] == "170" and "(Linear)" in rows[-4]
    assert any(r.startswith("  block (Sequential)") for r in rows)  # nested modules are indented


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_tiny"])
def test_checkpoints_save_and_load_the_new_layers(cpu_backend, tmp_path, name):
    model = getattr(models, name)(num_classes=CLASSES, in_channels=IN_SHAPE[0], width=WIDTH, seed=0)
    model.load_state_dict(_torch_state(name))
    model.eval()
    path = gpu_cnn.save(model, tmp_path / "m.npz")
    again = gpu_cnn.load(path).eval()
    np.testing.assert_array_equal(again.forward(DATA[f"{name}/x"]), model.forward(DATA[f"{name}/x"]))
    assert again.state_dict()["1.num_batches_tracked"] == 2
    assert again.spec() == model.spec()


def test_dropout_and_avgpool_round_trip_through_a_checkpoint(cpu_backend, tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same", dilation=2), nn.AvgPool2d(2, ceil_mode=True),
                          nn.Dropout(0.25, seed=4), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    again = gpu_cnn.load(gpu_cnn.save(model, tmp_path / "m.npz"))
    assert again.spec() == model.spec()
    assert again[2].seed == 4 and again[0].padding == "same" and again[0].dilation == (2, 2)


def test_cli_offers_the_registry():
    from gpu_cnn import cli

    parser = cli.build_parser()
    for name in models.MODELS:
        assert parser.parse_args(["train", "--model", name]).model == name
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--model", "vgg16"])


def test_trainer_evaluates_and_predicts_in_eval_mode(cpu_backend, rng):
    """evaluate/predict: no Dropout, BatchNorm's running statistics (not updated), and the model's mode
    restored afterwards; a fit step in between is in training mode again."""
    from gpu_cnn import Trainer

    nn.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.9),
                          nn.Linear(3 * 4 * 4, 2))
    x = rng.standard_normal((6, 1, 6, 6)).astype(np.float32)
    y = np.array([0, 1, 0, 1, 1, 0])
    trainer = Trainer(model, batch_size=4, progress=False)
    trainer.fit((x, y), epochs=1)
    tracked = model.state_dict()["1.num_batches_tracked"]
    assert tracked == 2 and model.training
    a, b = trainer.evaluate((x, y)), trainer.evaluate((x, y))
    assert a == b  # no Dropout: deterministic
    assert model.training and model.state_dict()["1.num_batches_tracked"] == tracked
    p1 = trainer.predict(x)
    model.eval()
    logits = model.forward(x)
    model.train()
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p1, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert model.training
