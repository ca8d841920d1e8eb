"""Recorded steps (gpu_cnn.graph): launches recorded while a step runs, checked against a second step,
replayed on new inputs; a changing argument refuses, naming the kernel and the argument; host effects
run at every replay. Checked against NumPy under the simulator, on real (tiny) kernels."""
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
    KA.relu_naive(x, y)
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
    inputs = [_base.to_device(x) for x in xs[:2]]  # two input buffers: double-buffered batches
    r1 = _record(_relu_then_sgd, inputs[0], p)
    r2 = _record(_relu_then_sgd, inputs[1], p)
    assert [L.name for L in r2.launches] == [L.name for L in r1.launches] and len(r1.launches) == 2
    plan = graph.StepPlan(r1, r2, (inputs[0],), (inputs[1],))
    want = -0.5 * (np.maximum(xs[0], 0) + np.maximum(xs[1], 0))
    np.testing.assert_allclose(p.copy_to_host(), want, rtol=1e-6)  # the recorded steps ran
    for k, x in enumerate(xs[2:]):  # replays, alternating the two input buffers
        inputs[k % 2].copy_to_device(x)
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
