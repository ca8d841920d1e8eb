"""Optimizers (gpu_cnn.optim and the kernels of gpu_cnn.kernels.optim) against PyTorch's formulas.

The formulas are written out here in float64, and torch.optim's own trajectories are compared too
(recorded in tests/data/torch_optim.json; re-run live where torch is installed). Every variant runs several steps with a different gradient each step, on odd-sized
params (7 and 3×5: not multiples of a warp, a block or ELEMS_PER_THREAD), on cpu and on every kernel
version under the simulator.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import gpu_cnn
from gpu_cnn.ops import _base
from gpu_cnn.optim import SGD, Adam, AdamW, make_optimizer

SHAPES = [(7,), (3, 5)]
STEPS = 5
# A schedule: lr changes after step 3, through the settable attribute.
LRS = [0.1, 0.1, 0.1, 0.04, 0.04]

# float32 arithmetic (~6e-8 relative per operation) on values of order 1, over 5 steps: errors stay
# around 1e-6 absolute; a wrong formula (a missing term, a wrong bias correction) is off by > 1e-3.
RTOL, ATOL = 1e-5, 1e-6

SGD_VARIANTS = {
    "plain": dict(),
    "weight_decay": dict(weight_decay=0.05),
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "dampening": dict(momentum=0.8, dampening=0.3),
    "momentum_weight_decay": dict(momentum=0.9, weight_decay=0.05, nesterov=True),
}
ADAM_VARIANTS = {
    "adam": dict(),
    "adam_weight_decay": dict(weight_decay=0.1),
    "adam_betas_eps": dict(betas=(0.8, 0.99), eps=1e-3),
    "adamw": dict(weight_decay=0.1, decoupled=True),
}


# ---------------------------------------------------------------------------------------------------
# the formulas, float64, written out (PyTorch's torch.optim.SGD / Adam / AdamW documentation)


def sgd_formula(p0, grads, lrs, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """Trajectory [(p, buf)] after each step."""
    p, buf, out = p0.astype(np.float64), None, []
    for g, lr in zip(grads, lrs):
        d = g.astype(np.float64) + weight_decay * p
        if momentum != 0:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
        out.append((p, buf))
    return out


def adam_formula(p0, grads, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    """Trajectory [(p, m, v)] after each step."""
    b1, b2 = betas
    p, m, v, out = p0.astype(np.float64), 0.0, 0.0, []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.astype(np.float64)
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append((p, m, v))
    return out


# ---------------------------------------------------------------------------------------------------
# helpers


def problem(rng, shapes=SHAPES, steps=STEPS):
    """Float32 params straddling zero and a different gradient for every step (some of them small)."""
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[(rng.standard_normal(s) * rng.choice([0.01, 1.0, 3.0], size=s)).astype(np.float32) for s in shapes]
             for _ in range(steps)]
    return params, grads


def on_backend(host):
    host = np.ascontiguousarray(host, dtype=np.float32)
    return _base.to_device(host) if gpu_cnn.backend.uses_kernels() else host.copy()


def host(a):
    return a.copy() if isinstance(a, np.ndarray) else a.copy_to_host()


def set_grad(g, values):
    if isinstance(g, np.ndarray):
        np.copyto(g, values)
    else:
        g.copy_to_device(np.ascontiguousarray(values, dtype=np.float32))


def versions(backend):
    if backend == "cpu":
        return [None]  # the cpu path has no kernel versions
    from gpu_cnn.kernels.optim import VERSIONS

    return list(VERSIONS)


def make(kind, pairs, lr, version, kw):
    if kind == "sgd":
        return SGD(pairs, lr, version=version, **kw)
    return Adam(pairs, lr, version=version, **kw)


def run_steps(opt, grads_dev, grads, lrs, on_step=None):
    for t, (gs, lr) in enumerate(zip(grads, lrs)):
        for gd, g in zip(grads_dev, gs):
            set_grad(gd, g)
        opt.lr = lr
        opt.step()
        if on_step is not None:
            on_step(t)


# ---------------------------------------------------------------------------------------------------
# the formulas themselves


def test_kernel_module_references_match_the_formulas(rng):
    from gpu_cnn.kernels import optim as K

    (p0,), grads = problem(rng, shapes=[(6,)])
    gs = [g[0] for g in grads]
    for kw in SGD_VARIANTS.values():
        traj = sgd_formula(p0, gs, LRS, **kw)
        p, buf = p0.astype(np.float64), None
        for t, (g, lr) in enumerate(zip(gs, LRS)):
            p, buf = K.sgd_reference(p, g, buf, lr, first_step=t == 0, **kw)
            np.testing.assert_allclose(p, traj[t][0], rtol=1e-13, atol=1e-15)  # same float64 math
    for kw in ADAM_VARIANTS.values():
        kw = dict(kw)
        b1, b2 = kw.pop("betas", (0.9, 0.999))
        traj = adam_formula(p0, gs, LRS, betas=(b1, b2), **kw)
        p, m, v = p0.astype(np.float64), 0.0, 0.0
        for t, (g, lr) in enumerate(zip(gs, LRS), start=1):
            p, m, v = K.adam_reference(p, g, m, v, t, lr, b1, b2, **kw)
            np.testing.assert_allclose(p, traj[t - 1][0], rtol=1e-13, atol=1e-15)


def test_variants_are_really_different(rng):
    """Each hyperparameter the tests set changes the trajectory by far more than the tolerance."""
    (p0,), grads = problem(rng, shapes=[(7,)])
    gs = [g[0] for g in grads]
    final = {k: sgd_formula(p0, gs, LRS, **kw)[-1][0] for k, kw in SGD_VARIANTS.items()}
    final.update({k: adam_formula(p0, gs, LRS, **kw)[-1][0] for k, kw in ADAM_VARIANTS.items()})
    names = list(final)
    for i, a in enumerate(names):
        assert np.abs(final[a] - p0).max() > 0.05, a  # the params move
        for b in names[i + 1:]:
            assert np.abs(final[a] - final[b]).max() > 1e-3, (a, b)


# ---------------------------------------------------------------------------------------------------
# the optimizers against the formulas, every step, on both backends and every kernel version


@pytest.mark.parametrize("name", list(SGD_VARIANTS))
def test_sgd_matches_formula(backend, rng, name):
    kw = SGD_VARIANTS[name]
    params, grads = problem(rng)
    trajs = [sgd_formula(p, [g[j] for g in grads], LRS, **kw) for j, p in enumerate(params)]
    for version in versions(backend):
        ps = [on_backend(p) for p in params]
        gs = [on_backend(np.zeros_like(p)) for p in params]
        opt = SGD(list(zip(ps, gs)), LRS[0], version=version, **kw)

        def check(t):
            for j, p in enumerate(ps):
                want_p, want_buf = trajs[j][t]
                np.testing.assert_allclose(host(p), want_p, rtol=RTOL, atol=ATOL, err_msg=f"{version} step {t + 1}")
                if want_buf is not None:
                    got = host(opt.state["momentum_buffer"][j])
                    np.testing.assert_allclose(got, want_buf, rtol=RTOL, atol=ATOL, err_msg=f"{version} buf {t + 1}")

        run_steps(opt, gs, grads, LRS, check)
        assert opt.step_count == STEPS
        assert ("momentum_buffer" in opt.state) == (kw.get("momentum", 0) != 0)  # no buffer without momentum
        for g, gh in zip(gs, grads[-1]):
            np.testing.assert_array_equal(host(g), gh)  # grads are read, never written


@pytest.mark.parametrize("name", list(ADAM_VARIANTS))
def test_adam_matches_formula(backend, rng, name):
    kw = ADAM_VARIANTS[name]
    params, grads = problem(rng)
    trajs = [adam_formula(p, [g[j] for g in grads], LRS, **kw) for j, p in enumerate(params)]
    # on the kernel backends None is the default kernel, which reads the step from a device counter
    for version in versions(backend) + ([None] if backend != "cpu" else []):
        ps = [on_backend(p) for p in params]
        gs = [on_backend(np.zeros_like(p)) for p in params]
        opt = Adam(list(zip(ps, gs)), LRS[0], version=version, **kw)

        def check(t):
            for j, p in enumerate(ps):
                want_p, want_m, want_v = trajs[j][t]
                msg = f"{version} step {t + 1}"
                np.testing.assert_allclose(host(p), want_p, rtol=RTOL, atol=ATOL, err_msg=msg)
                np.testing.assert_allclose(host(opt.state["exp_avg"][j]), want_m, rtol=RTOL, atol=ATOL, err_msg=msg)
                # v holds squares of gradients down to 1e-4·(0.01)² = 1e-8: compare it relatively
                np.testing.assert_allclose(host(opt.state["exp_avg_sq"][j]), want_v, rtol=RTOL, atol=1e-12,
                                           err_msg=msg)

        run_steps(opt, gs, grads, LRS, check)
        assert opt.step_count == STEPS


def test_adamw_class_is_decoupled_adam(backend, rng):
    params, grads = problem(rng)
    gs_host = [g[0] for g in grads]
    traj = adam_formula(params[0], gs_host, LRS, weight_decay=1e-2, decoupled=True)  # AdamW's default decay
    p, g = on_backend(params[0]), on_backend(np.zeros_like(params[0]))
    opt = AdamW([(p, g)], lr=LRS[0])
    assert opt.decoupled and opt.weight_decay == 1e-2 and isinstance(opt, Adam)
    run_steps(opt, [g], [[x] for x in gs_host], LRS)
    np.testing.assert_allclose(host(p), traj[-1][0], rtol=RTOL, atol=ATOL)
    assert opt.state_dict()["optimizer"] == "adamw"


# ---------------------------------------------------------------------------------------------------
# PyTorch itself: trajectories recorded by tests/data/make_torch_optim.py, re-run where torch is installed

TORCH_RECORD = json.loads((Path(__file__).parent / "data" / "torch_optim.json").read_text())


def _case_kwargs(kw):
    return {k: (tuple(v) if k == "betas" else v) for k, v in kw.items()}


def test_matches_recorded_torch_optim(backend):
    """Every SGD/Adam/AdamW variant, 5 steps with an lr change, against torch.optim's own numbers."""
    rec = TORCH_RECORD
    params = [np.asarray(p, np.float32) for p in rec["params"]]
    grads = [[np.asarray(g, np.float32) for g in gs] for gs in rec["grads"]]
    assert len(rec["cases"]) == 10
    for case in rec["cases"]:
        kind, kw = case["kind"], _case_kwargs(case["kw"])
        ps = [on_backend(p) for p in params]
        gs = [on_backend(np.zeros_like(p)) for p in params]
        opt = make(kind, list(zip(ps, gs)), rec["lrs"][0], None, kw)
        run_steps(opt, gs, grads, rec["lrs"])
        assert set(opt.state) == set(case["state"]), (kind, kw)
        for j, p in enumerate(ps):
            np.testing.assert_allclose(host(p), case["params"][j], rtol=RTOL, atol=ATOL, err_msg=f"{kind} {kw}")
            for name in opt.state:
                np.testing.assert_allclose(host(opt.state[name][j]), case["state"][name][j], rtol=RTOL, atol=1e-12,
                                           err_msg=f"{kind} {kw} {name}")


def test_recorded_torch_trajectories_are_torch_and_the_formulas():
    """The record holds what the formulas above give (so it is not noise), and, where torch is installed,
    exactly what torch.optim gives now (so it cannot drift from PyTorch)."""
    rec = TORCH_RECORD
    params = [np.asarray(p, np.float32) for p in rec["params"]]
    grads = [[np.asarray(g, np.float32) for g in gs] for gs in rec["grads"]]
    for case in rec["cases"]:
        kw = _case_kwargs(case["kw"])
        for j, p0 in enumerate(params):
            gj = [gs[j] for gs in grads]
            if case["kind"] == "sgd":
                final = sgd_formula(p0, gj, rec["lrs"], **kw)[-1][0]
            else:
                final = adam_formula(p0, gj, rec["lrs"], **kw)[-1][0]
            np.testing.assert_allclose(case["params"][j], final, rtol=1e-12, atol=1e-12, err_msg=str(case["kw"]))
    try:
        import torch
    except ImportError:
        return  # the formulas above were checked; torch itself is an optional cross-check
    sys.path.insert(0, str(Path(__file__).parent / "data"))
    try:
        from make_torch_optim import torch_trajectory
    finally:
        sys.path.pop(0)
    for case in rec["cases"]:
        final, state = torch_trajectory(torch, case["kind"], case["kw"], params, grads, rec["lrs"])
        np.testing.assert_allclose(np.concatenate([np.ravel(a) for a in final]),
                                   np.concatenate([np.ravel(a) for a in case["params"]]), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------------
# memory: state planned once, on the backend; steps allocate nothing


@pytest.mark.parametrize("kind, kw, buffers", [
    ("sgd", dict(), 0),
    ("sgd", dict(momentum=0.9, weight_decay=0.01), 1),
    ("adam", dict(weight_decay=0.01), 2),
    ("adam", dict(weight_decay=0.01, decoupled=True), 2),
])
def test_state_on_backend_allocated_once(backend, rng, kind, kw, buffers):
    params, grads = problem(rng, steps=2)
    ps = [on_backend(p) for p in params]
    gs = [on_backend(g) for g in grads[0]]
    before = _base.allocation_stats()
    opt = make(kind, list(zip(ps, gs)), 0.1, None, kw)
    if backend != "cpu":
        # allocated at construction, through _base.zeros: one array per param and buffer (and for Adam a
        # one-element step counter per updated segment, here one per param)
        counters = len(params) if kind == "adam" else 0
        assert _base.allocation_stats()[0] - before[0] == buffers * len(params) + counters
    assert sum(len(v) for v in opt.state.values()) == buffers * len(params)
    for bufs in opt.state.values():
        for b, p in zip(bufs, params):
            assert tuple(b.shape) == p.shape
            assert isinstance(b, np.ndarray) == (backend == "cpu")
            assert _base.is_device_array(b) == (backend != "cpu")
    before = _base.allocation_stats()
    p_ids = [id(p) for p in ps]
    for _ in range(2):
        opt.step()
        opt.zero_grad()
    assert _base.allocation_stats() == before  # a training step makes no device allocation
    assert [id(p) for p, _ in opt.params] == p_ids  # the same arrays, updated in place
    for g in gs:
        assert not host(g).any()  # zero_grad zeroed every grad in place
    assert any(np.abs(host(p) - p0).max() > 1e-3 for p, p0 in zip(ps, params))  # the steps did update


def test_cpu_step_updates_the_callers_arrays_in_place(cpu_backend, rng):
    params, grads = problem(rng, steps=1)
    ps = [p.copy() for p in params]
    views = [p.reshape(-1) for p in ps]  # any alias of the caller's memory sees the update
    opt = Adam(list(zip(ps, grads[0])), lr=0.1, weight_decay=0.1)
    opt.step()
    for v, p, p0 in zip(views, ps, params):
        assert np.shares_memory(v, p)
        assert np.abs(v - p0.reshape(-1)).max() > 1e-3


def test_accepts_parameter_objects(backend, rng):
    class Param:  # what gpu_cnn.nn.Parameter offers
        def __init__(self, data, grad):
            self.data, self.grad = data, grad

    params, grads = problem(rng)
    objs = [Param(on_backend(p), on_backend(g)) for p, g in zip(params, grads[0])]
    opt = SGD(objs, lr=0.1)
    opt.step()
    want = sgd_formula(params[1], [grads[0][1]], [0.1])[0][0]
    np.testing.assert_allclose(host(objs[1].data), want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------
# state_dict


@pytest.mark.parametrize("kind, kw", [
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam", dict(weight_decay=0.01)),
    ("adam", dict(weight_decay=0.1, decoupled=True)),
])
def test_state_dict_round_trip_continues_identically(backend, rng, kind, kw):
    params, grads = problem(rng)
    ps = [on_backend(p) for p in params]
    gs = [on_backend(np.zeros_like(p)) for p in params]
    opt = make(kind, list(zip(ps, gs)), LRS[0], None, kw)
    run_steps(opt, gs, grads[:2], LRS[:2])
    sd = opt.state_dict()
    assert sd["step"] == 2 and sd["optimizer"] == ("adamw" if kw.get("decoupled") else kind)
    for name in opt.state:
        for a, p in zip(sd[name], params):
            assert isinstance(a, np.ndarray) and a.shape == p.shape
            assert np.abs(a).max() > 0  # the buffers hold something worth restoring
    saved = {k: [a.copy() for a in v] for k, v in sd.items() if isinstance(v, list)}
    midway = [host(p) for p in ps]

    # a second optimizer over copies of the params, constructed with another lr, then loaded
    ps2 = [on_backend(p) for p in midway]
    gs2 = [on_backend(np.zeros_like(p)) for p in params]
    opt2 = make(kind, list(zip(ps2, gs2)), 0.5, None, kw)
    opt2.load_state_dict(sd)
    assert opt2.step_count == 2 and opt2.lr == opt.lr
    # and a third without the state: it must end elsewhere, or the test proves nothing
    ps3 = [on_backend(p) for p in midway]
    gs3 = [on_backend(np.zeros_like(p)) for p in params]
    opt3 = make(kind, list(zip(ps3, gs3)), LRS[2], None, kw)

    run_steps(opt, gs, grads[2:], LRS[2:])
    run_steps(opt2, gs2, grads[2:], LRS[2:])
    run_steps(opt3, gs3, grads[2:], LRS[2:])
    for p, p2, p3 in zip(ps, ps2, ps3):
        np.testing.assert_array_equal(host(p2), host(p))  # same float32 math on the same inputs: bit-identical
        assert np.abs(host(p3) - host(p)).max() > 1e-4
    for k, v in saved.items():  # state_dict returned copies, not views of the live buffers
        for a, b in zip(sd[k], v):
            np.testing.assert_array_equal(a, b)


def test_load_state_dict_rejects_mismatches(backend, rng):
    params, _ = problem(rng)
    ps = [on_backend(p) for p in params]
    gs = [on_backend(np.zeros_like(p)) for p in params]
    sgd = SGD(list(zip(ps, gs)), 0.1, momentum=0.9)
    adam = Adam(list(zip(ps, gs)), 0.1)
    with pytest.raises(ValueError, match="state.*'adam'"):
        sgd.load_state_dict(adam.state_dict())
    sd = sgd.state_dict()
    bad = dict(sd, momentum_buffer=[sd["momentum_buffer"][0], np.zeros((5, 3))])
    with pytest.raises(ValueError, match=r"momentum_buffer'\]\[1\].*shape"):
        sgd.load_state_dict(bad)
    with pytest.raises(ValueError, match="momentum_buffer"):
        sgd.load_state_dict({k: v for k, v in sd.items() if k != "momentum_buffer"})
    with pytest.raises(ValueError, match="momentum_buffer"):
        SGD(list(zip(ps, gs)), 0.1).load_state_dict(sd)  # no momentum here: nowhere to put the buffer
    with pytest.raises(ValueError, match="step"):
        sgd.load_state_dict(dict(sd, step=-1))
    with pytest.raises(TypeError, match="state"):
        sgd.load_state_dict([1, 2])
    # nothing was changed by the failed loads
    assert sgd.step_count == 0 and not host(sgd.state["momentum_buffer"][0]).any()


# ---------------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize("kind, kw, exc, match", [
    ("sgd", dict(lr=-0.1), ValueError, "lr"),
    ("sgd", dict(lr=float("nan")), ValueError, "lr"),
    ("sgd", dict(lr="0.1"), TypeError, "lr"),
    ("sgd", dict(lr=0.1, momentum=-0.5), ValueError, "momentum"),
    ("sgd", dict(lr=0.1, dampening=1.5), ValueError, "dampening"),
    ("sgd", dict(lr=0.1, weight_decay=-1e-4), ValueError, "weight_decay"),
    ("sgd", dict(lr=0.1, nesterov=True), ValueError, "nesterov.*momentum"),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError, "nesterov.*dampening"),
    ("sgd", dict(lr=0.1, nesterov="yes"), TypeError, "nesterov"),
    ("adam", dict(lr=-1e-3), ValueError, "lr"),
    ("adam", dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    ("adam", dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    ("adam", dict(betas=(0.9,)), TypeError, "betas"),
    ("adam", dict(eps=0.0), ValueError, "eps"),
    ("adam", dict(eps=-1e-8), ValueError, "eps"),
    ("adam", dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ("adam", dict(decoupled=1), TypeError, "decoupled"),
    ("adamw", dict(weight_decay=-0.01), ValueError, "weight_decay"),
])
def test_bad_hyperparameters_raise_clear_errors(cpu_backend, kind, kw, exc, match):
    pairs = [(np.zeros(3, np.float32), np.zeros(3, np.float32))]
    cls = {"sgd": SGD, "adam": Adam, "adamw": AdamW}[kind]
    with pytest.raises(exc, match=match):
        cls(pairs, **kw)


def test_lr_attribute_is_validated(cpu_backend):
    opt = Adam([(np.zeros(3, np.float32), np.zeros(3, np.float32))], lr=1e-3)
    opt.lr = 0.5
    assert opt.lr == 0.5
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0
    assert opt.lr == 0.5


def test_bad_params_raise_clear_errors(backend):
    ok = on_backend(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="params.*empty"):
        SGD([], lr=0.1)
    with pytest.raises(TypeError, match="params"):
        SGD(ok, lr=0.1)
    with pytest.raises(TypeError, match=r"params\[0\].*pair"):
        SGD([ok], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[0\].*shape"):
        SGD([(ok, on_backend(np.zeros(4, np.float32)))], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[1\].*more than once"):
        SGD([(ok, on_backend(np.zeros(3, np.float32))), (ok, on_backend(np.zeros(3, np.float32)))], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[1\].*more than once"):  # one buffer, two array objects
        SGD([(ok, on_backend(np.zeros(3, np.float32))), (ok[:], on_backend(np.zeros(3, np.float32)))], lr=0.1)
    six = on_backend(np.zeros(6, np.float32))
    with pytest.raises(ValueError, match=r"params\[1\].*more than once \(its memory overlaps params\[0\]'s\)"):
        SGD([(six, on_backend(np.zeros(6, np.float32))),
             (six.reshape(2, 3), on_backend(np.zeros((2, 3), np.float32)))], lr=0.1)  # another shape
    with pytest.raises(ValueError, match=r"params\[2\].*overlaps params\[1\]'s"):
        SGD([(ok, on_backend(np.zeros(3, np.float32))), (six[0:4], on_backend(np.zeros(4, np.float32))),
             (six[2:6], on_backend(np.zeros(4, np.float32)))], lr=0.1)  # two views sharing six[2:4]
    SGD([(six[0:3], on_backend(np.zeros(3, np.float32))), (six[3:6], on_backend(np.zeros(3, np.float32)))],
        lr=0.1)  # adjacent, not overlapping
    SGD([(ok, on_backend(np.zeros(3, np.float32))), (on_backend(np.zeros(3, np.float32)),
                                                     on_backend(np.zeros(3, np.float32)))], lr=0.1)  # two buffers
    if backend == "cpu":
        with pytest.raises(TypeError, match=r"params\[0\] grad.*float32"):
            SGD([(ok, np.zeros(3))], lr=0.1)
        with pytest.raises(ValueError, match=r"params\[0\] param.*C-contiguous"):
            SGD([(np.zeros((3, 4), np.float32)[:, ::2], np.zeros((3, 2), np.float32))], lr=0.1)
        with pytest.raises(TypeError, match=r"params\[0\] param.*NumPy"):
            SGD([([0.0, 1.0], np.zeros(2, np.float32))], lr=0.1)
    else:
        from numba import cuda

        with pytest.raises(TypeError, match=r"params\[0\] param.*device array"):
            SGD([(np.zeros(3, np.float32), ok)], lr=0.1)  # a host copy would be updated, not the model
        with pytest.raises(TypeError, match=r"params\[0\] grad.*float32"):
            SGD([(ok, cuda.to_device(np.zeros(3)))], lr=0.1)


def test_make_optimizer(backend):
    pairs = [(on_backend(np.zeros(3, np.float32)), on_backend(np.zeros(3, np.float32)))]
    opt = make_optimizer("sgd", pairs, 0.1, momentum=0.9)
    assert type(opt) is SGD and opt.momentum == 0.9 and opt.lr == 0.1
    opt = make_optimizer("ADAM", pairs, 0.01, weight_decay=0.1)
    assert type(opt) is Adam and not opt.decoupled and opt.weight_decay == 0.1
    opt = make_optimizer("adamw", pairs, 0.01)
    assert type(opt) is AdamW and opt.decoupled and opt.weight_decay == 1e-2
    with pytest.raises(ValueError, match="optimizer.*sgd, adam, adamw"):
        make_optimizer("rmsprop", pairs, 0.1)
    with pytest.raises(TypeError):
        make_optimizer("adam", pairs, 0.1, momentum=0.9)  # not an Adam argument
    if backend != "cpu":
        with pytest.raises(ValueError, match="version.*naive, ilp"):
            make_optimizer("sgd", pairs, 0.1, version="fast")


# ---------------------------------------------------------------------------------------------------
# the kernel launchers and dispatchers directly


def test_launchers_validate_and_dispatch(kernel_backend, rng):
    from numba import cuda

    from gpu_cnn.kernels import optim as K

    p, g, buf = (_base.to_device(rng.standard_normal((3, 5)).astype(np.float32)) for _ in range(3))
    with pytest.raises(ValueError, match="version.*naive, ilp"):
        K.sgd_step(p, g, None, 0.1, version="fast")
    with pytest.raises(ValueError, match="g: expected shape"):
        K.sgd_step(p, _base.to_device(np.zeros(15, np.float32)), None, 0.1)
    with pytest.raises(TypeError, match="p: expected a device array"):
        K.sgd_step(np.zeros((3, 5), np.float32), g, None, 0.1)
    with pytest.raises(TypeError, match="g: expected dtype float32"):
        K.sgd_step(p, cuda.to_device(np.zeros((3, 5))), None, 0.1)
    with pytest.raises(ValueError, match="buf"):
        K.sgd_step(p, g, None, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="v: expected shape"):
        K.adam_step(p, g, buf, _base.to_device(np.zeros(4, np.float32)), 1, 1e-3)
    with pytest.raises(ValueError, match="step"):
        K.adam_step(p, g, buf, buf, 0, 1e-3)
    with pytest.raises(TypeError, match="lr"):
        K.adam_step(p, g, buf, buf, 1, None)


@pytest.mark.parametrize("n", [1, 31, 33, 129, 700])
def test_launch_config_covers_every_element(kernel_backend, n):
    from gpu_cnn.kernels import optim as K

    for elems in (1, K.ELEMS_PER_THREAD):
        blocks, threads = K.launch_config(n, elems)
        assert threads % K.WARP == 0 and threads <= 256
        assert blocks * threads * elems >= n  # every element has a thread
        assert (blocks - 1) * threads * elems < n  # and no block is wholly idle


def test_kernels_cover_a_multi_block_array(kernel_backend, rng):
    """Several blocks (and a partial last one) for both versions: 1500 elements, 256-thread blocks."""
    from gpu_cnn.kernels import optim as K

    n = 1500
    p0, g0 = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    want, m_want, v_want = K.adam_reference(p0, g0, 0.0, 0.0, 1, 0.01, weight_decay=0.1)
    for version in K.VERSIONS:
        p, g = _base.to_device(p0), _base.to_device(g0)
        m, v = _base.zeros((n,)), _base.zeros((n,))
        blocks, threads = K.launch_config(n, 1 if version == "naive" else K.ELEMS_PER_THREAD)
        assert blocks >= 2 and n % (threads * (1 if version == "naive" else K.ELEMS_PER_THREAD)) != 0
        K.adam_step(p, g, m, v, 1, 0.01, weight_decay=0.1, version=version)
        np.testing.assert_allclose(p.copy_to_host(), want, rtol=RTOL, atol=ATOL, err_msg=version)
        assert math.isclose(float(np.abs(p.copy_to_host() - p0).max()), 0.01, rel_tol=0.5)  # |update| ≈ lr at step 1


def test_counted_adam_takes_its_step_from_the_device_over_several_blocks(kernel_backend, rng):
    """adam_counted_kernel: every block of every launch derives the same step from its ticket, so two
    launches over 300 elements (2 blocks, a partial last one) take steps 1 and 2, and a counter set for
    2 steps taken makes the next launch step 3; the launch arguments never change."""
    from gpu_cnn.kernels import optim as K

    n, lr = 300, 0.01
    assert K.adam_counted_blocks(n) >= 2
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]  # the third: after a restore
    for kw in (dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled=True)):
        want_p, want_m, want_v = p0.astype(np.float64), np.zeros(n), np.zeros(n)
        p, m, v = _base.to_device(p0), _base.zeros((n,)), _base.zeros((n,))
        count = _base.to_device(np.zeros(1, np.int64))
        for t, g0 in enumerate(grads[:2], start=1):
            want_p, want_m, want_v = K.adam_reference(want_p, g0, want_m, want_v, t, lr, **kw)
            K.adam_counted(p, _base.to_device(g0), m, v, count, lr, **kw)
            np.testing.assert_allclose(p.copy_to_host(), want_p, rtol=RTOL, atol=ATOL, err_msg=f"{kw} step {t}")
        assert int(count.copy_to_host()[0]) == 2 * K.adam_counted_blocks(n)
        # restored after 2 steps: the next launch is step 3 (a step-1 bias correction would differ by ~3x)
        p2 = _base.to_device(p0)
        m2, v2 = _base.zeros((n,)), _base.zeros((n,))
        _, mh, vh = K.adam_reference(p0, grads[0], 0.0, 0.0, 1, lr, **kw)
        _, mh, vh = K.adam_reference(p0, grads[1], mh, vh, 2, lr, **kw)
        m2.copy_to_device(mh.astype(np.float32))
        v2.copy_to_device(vh.astype(np.float32))
        K.adam_counted_set(count, n, 2)
        K.adam_counted(p2, _base.to_device(grads[2]), m2, v2, count, lr, **kw)
        want3, _, _ = K.adam_reference(p0, grads[2], mh, vh, 3, lr, **kw)
        np.testing.assert_allclose(p2.copy_to_host(), want3, rtol=RTOL, atol=ATOL, err_msg=f"{kw} restored")
