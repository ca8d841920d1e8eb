"""Recorded steps (gpu_cnn.graph): launches recorded while a step runs, checked against a second step,
replayed on new inputs; a changing argument refuses, naming the kernel and the argument; host effects
run at every replay. Checked against NumPy under the simulator, on real (tiny) kernels."""
import collections
import warnings

import numpy as np
import pytest

import gpu_cnn
from gpu_cnn import graph
from gpu_cnn.ops import _base


def _relu_then_sgd(x, p, lr=0.5):
    """A two-launch 'step': y = relu(x) (into a planned buffer), then p -= lr * y."""
    from gpu_cnn.kernels import activation as KA
    from gpu_cnn.kernels import optim as KO

    y = _relu_then_sgd.buf
    KA.relu_naive(x.reshape(x.size) if x.ndim > 1 else x, y)  # a view of an input, as layers make them
    KO.sgd_step(p, y, None, lr)


@pytest.fixture
def step_buffers(kernel_backend):
    _relu_then_sgd.buf = _base.empty((7,))
    return _base.to_device(np.zeros(7, np.float32))


def _record(fn, *args):
    with graph.recording() as rec:
        fn(*args)
    return rec


def test_replay_runs_the_recorded_launches_on_new_inputs(step_buffers, rng):
    p = step_buffers
    xs = [rng.standard_normal(7).astype(np.float32) for _ in range(4)]
    # two input buffers (double-buffered batches), each read through a flattened view
    inputs = [_base.to_device(x.reshape(7, 1)) for x in xs[:2]]
    r1 = _record(_relu_then_sgd, inputs[0], p)
    r2 = _record(_relu_then_sgd, inputs[1], p)
    assert [L.name for L in r2.launches] == [L.name for L in r1.launches] and len(r1.launches) == 2
    plan = graph.StepPlan(r1, r2, (inputs[0],), (inputs[1],))
    want = -0.5 * (np.maximum(xs[0], 0) + np.maximum(xs[1], 0))
    np.testing.assert_allclose(p.copy_to_host(), want, rtol=1e-6)  # the recorded steps ran
    for k, x in enumerate(xs[2:]):  # replays, alternating the two input buffers
        inputs[k % 2].copy_to_device(x.reshape(7, 1))
        plan.replay((inputs[k % 2],))
        want = want - 0.5 * np.maximum(x, 0)
        np.testing.assert_allclose(p.copy_to_host(), want, rtol=1e-6, atol=1e-7)
    assert plan.launches == 2


def test_a_changing_scalar_refuses_naming_the_kernel_and_argument(step_buffers, rng):
    p = step_buffers
    x = _base.to_device(rng.standard_normal(7).astype(np.float32))
    r1 = _record(_relu_then_sgd, x, p, 0.5)
    r2 = _record(_relu_then_sgd, x, p, 0.25)  # a learning rate passed as a launch argument changed
    with pytest.raises(graph.PlanError, match=r"launch 2 \(sgd_naive_kernel\): argument 3 changes .*0\.5 then 0\.25"):
        graph.StepPlan(r1, r2, (x,), (x,))


def test_a_different_launch_sequence_refuses(step_buffers, rng):
    from gpu_cnn.kernels import optim as KO

    p = step_buffers
    x = _base.to_device(rng.standard_normal(7).astype(np.float32))
    r1 = _record(_relu_then_sgd, x, p)
    r2 = _record(lambda: KO.sgd_step(p, x, None, 0.5))
    with pytest.raises(graph.PlanError, match="made 2 and 1 launches"):
        graph.StepPlan(r1, r2, (x,), (x,))


def test_host_effects_run_at_every_replay(step_buffers, rng):
    p = step_buffers
    x = _base.to_device(rng.standard_normal(7).astype(np.float32))
    count = []

    def step():
        _relu_then_sgd(x, p)
        graph.host_effect(lambda: count.append(1))

    r1, r2 = _record(step), _record(step)
    assert len(count) == 2  # host_effect runs at once too
    plan = graph.StepPlan(r1, r2, (), ())
    plan.replay()
    plan.replay()
    assert len(count) == 4


def test_replay_refuses_inputs_of_another_shape(step_buffers, rng):
    p = step_buffers
    x = _base.to_device(rng.standard_normal(7).astype(np.float32))
    plan = graph.StepPlan(_record(_relu_then_sgd, x, p), _record(_relu_then_sgd, x, p), (x,), (x,))
    with pytest.raises(ValueError, match=r"inputs: .*shaped like the recorded ones"):
        plan.replay((_base.to_device(np.zeros(5, np.float32)),))


def test_planner_records_the_second_and_third_steps_then_replays(step_buffers, rng):
    p = step_buffers
    x = _base.to_device(rng.standard_normal(7).astype(np.float32))
    planner = graph.StepPlanner()
    modes = [planner.step(7, (x,), lambda: _relu_then_sgd(x, p), token=0.5) for _ in range(5)]
    assert modes == ["eager", "recorded", "recorded", "replay", "replay"]
    np.testing.assert_allclose(p.copy_to_host(), -0.5 * 5 * np.maximum(x.copy_to_host(), 0), rtol=1e-5)
    # a new token (the learning rate changed) drops the plan: warm-up and recording again
    assert planner.step(7, (x,), lambda: _relu_then_sgd(x, p), token=0.1) == "eager"
    assert planner.plan(7) is None


def test_planner_keeps_a_refused_size_eager_and_says_why(step_buffers, rng):
    p = step_buffers
    x = _base.to_device(rng.standard_normal(7).astype(np.float32))
    planner = graph.StepPlanner()
    lrs = iter([0.5, 0.4, 0.3, 0.2, 0.1])
    modes = [planner.step(7, (x,), lambda: _relu_then_sgd(x, p, next(lrs))) for _ in range(5)]
    assert modes == ["eager", "recorded", "recorded", "eager", "eager"]
    assert "sgd_naive_kernel" in planner.reason and "argument 3" in planner.reason


def test_a_host_array_argument_refuses(kernel_backend):
    with pytest.raises(graph.PlanError, match="host \\(NumPy\\) array"):
        graph._arg_key(np.zeros(3, np.float32))


# --- the planned step inside Trainer.fit (sim: real kernels, tiny shapes) ---------------------------

from gpu_cnn import nn  # noqa: E402
from gpu_cnn.trainer import Trainer, TrainingError  # noqa: E402


def _tiny(seed=0, norm=False, dropout=False):
    nn.manual_seed(seed)
    layers = [nn.Conv2d(1, 2, 3, padding=1)] + ([nn.BatchNorm2d(2)] if norm else []) + [nn.ReLU(), nn.MaxPool2d(2),
                                                                                      nn.Flatten()]
    layers += ([nn.Dropout(0.5, seed=3)] if dropout else []) + [nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _data(n=8):
    rng = np.random.default_rng(5)
    return rng.standard_normal((n, 1, 4, 4)).astype(np.float32), rng.integers(0, 3, n)


def _fit(backend, optimizer="sgd", norm=False, epochs=1, **kw):
    gpu_cnn.set_backend(backend)
    model = _tiny(norm=norm)
    trainer = Trainer(model, optimizer=optimizer, lr=0.05, batch_size=2, seed=0, progress=False, **kw)
    history = trainer.fit(_data(), epochs=epochs)  # 4 steps an epoch: 1 eager, 2 recorded, 1 replayed
    return trainer, history, model.state_dict()


# (not Adam with BatchNorm: the conv bias before it gets a gradient of rounding noise, which Adam's
# normalisation turns into full-size steps of either sign)
@pytest.mark.parametrize("optimizer, norm", [("sgd", True), ("adam", False)])
def test_planned_fit_replays_and_gives_the_cpu_weights(kernel_backend, optimizer, norm):
    trainer, hist_k, w_k = _fit(kernel_backend, optimizer, norm)
    assert trainer.planner.plan(2) is not None and trainer.planner.replays == 1, trainer.planner.reason
    _, hist_c, w_c = _fit("cpu", optimizer, norm)
    gpu_cnn.set_backend(kernel_backend)
    np.testing.assert_allclose(hist_k[0]["train_loss"], hist_c[0]["train_loss"], rtol=1e-5)
    assert hist_k[0]["train_acc"] == hist_c[0]["train_acc"]
    for k in w_c:  # weights, BatchNorm's running statistics and num_batches_tracked (4: replays count)
        np.testing.assert_allclose(w_k[k], w_c[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert trainer.optimizer.step_count == 4 and trainer.optimizer.state_dict()["step"] == 4
    if norm:
        assert int(w_k["1.num_batches_tracked"]) == 4


def test_nan_during_replay_stops_names_the_step_and_rolls_back(kernel_backend, poison_weight_before_step):
    trainer, _, _ = _fit(kernel_backend)
    model = trainer.model
    before = model.state_dict()
    # step 4 is replayed: the weight is written in place, into the buffer the plan reads
    poison_weight_before_step(trainer, 4)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2, step 4: training stopped"):
        trainer.fit(_data(), epochs=1)
    after = model.state_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


@pytest.fixture
def probe(kernel_backend):
    """Kernel bodies skipped (benchmarks.host's probe): for what the planner decides, not what it computes."""
    from benchmarks.host import HostProbe

    if kernel_backend != "sim":  # GPU_CNN_BACKEND=cuda: the probe patches the simulator only
        pytest.skip("benchmarks.host's probe counts simulator launches; these tests need sim")
    with HostProbe() as p:
        yield p


def test_dropout_is_not_replayed_and_says_why(probe):
    trainer = Trainer(_tiny(dropout=True), lr=0.05, batch_size=2, seed=0, progress=False, cuda_graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on sim, cuda_graph=True is accepted without a word
        trainer.fit(_data(10), epochs=1)
    assert trainer.planner.plan(2) is None and trainer.planner.replays == 0
    assert "dropout" in trainer.planner.reason and "changes from step to step" in trainer.planner.reason


def test_a_replayed_step_launches_what_an_eager_one_does(probe):
    trainer = Trainer(_tiny(), lr=0.05, batch_size=2, seed=0, progress=False)
    trainer.fit(_data(6), epochs=1)  # 3 steps: eager, recorded, recorded
    assert trainer.planner.plan(2) is not None
    eager = collections.Counter(trainer.planner.plan(2).kernels)
    probe.reset()
    trainer.fit(_data(10), epochs=1)  # 5 steps: 3 as above, then 2 replays
    assert trainer.planner.replays == 2
    assert dict(probe.kernels) == {k: 5 * n for k, n in eager.items()}


def test_planned_step_off_and_graph_options_are_checked(probe):
    trainer = Trainer(_tiny(), lr=0.05, batch_size=2, progress=False, planned_step=False)
    trainer.fit(_data(10), epochs=1)
    assert trainer.planner.replays == 0 and trainer.planner.plan(2) is None
    with pytest.raises(TypeError, match="cuda_graph: expected True, False or None"):
        Trainer(_tiny(), cuda_graph="yes")
    with pytest.raises(TypeError, match="planned_step: expected True or False"):
        Trainer(_tiny(), planned_step=1)


def test_batch_feeder_alternates_two_planned_slots(kernel_backend, rng):
    from gpu_cnn.memory import BatchFeeder

    feeder = BatchFeeder()
    batches = [(rng.standard_normal((3, 1, 2, 2)), rng.integers(0, 9, 3)) for _ in range(3)]
    batches.append((rng.standard_normal((2, 1, 2, 2)), rng.integers(0, 9, 2)))  # a last, partial batch
    tokens = []
    before = None
    for k, (x, y) in enumerate(batches):
        tok = feeder.put(x, y)
        if k == 2:
            assert _base.allocation_stats() == before  # the third batch reuses the first one's slot
        before = _base.allocation_stats()
        feeder.ready(tok)
        _, xd, yd = tok
        np.testing.assert_array_equal(xd.copy_to_host(), x.astype(np.float32))
        assert yd.copy_to_host().dtype == np.int32 and (yd.copy_to_host() == y).all()
        feeder.consumed(tok)
        tokens.append(tok)
    assert tokens[0][0] is tokens[2][0] and tokens[1][0] is tokens[3][0] and tokens[0][0] is not tokens[1][0]
    assert tokens[3][1].shape == (2, 1, 2, 2)  # a view of the slot's planned buffer
