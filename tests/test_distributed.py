"""Data-parallel training (gpu_cnn.distributed) with 2 ranks under mpiexec (the mpich wheel), no GPU.

The ranks run this file as a script (``mpiexec -n 2 python tests/test_distributed.py MODE OUT``); pytest
then checks what rank 0 wrote against single-process training on the same global batches, computed here
in the pytest process (cpu) or in float64 NumPy (sim). What is checked:
- cpu, digits_cnn on the bundled digits, SGD with momentum: after every step both ranks hold bit-identical
  weights, equal to one process on the same global batches to float32 rounding; fit() over an epoch
  whose last batch does not split evenly (97 images, batch 32: the last batch of 1 leaves rank 1 with
  none) gives the one-process weights and metrics; only rank 0 writes a checkpoint.
- sim, a tiny MLP (device arrays, 2 steps): the same per-step checks through the device-array path (MPI through the host).
- gpu-cnn train --nproc 2 (1 epoch of digits) ends at the one-process test accuracy (±1 %).
- a rank that raises: mpiexec exits non-zero within seconds and shows the error; a rank that hangs: the
  other times out after its deadline and aborts the job.
The NCCL path (cuda) needs a GPU and is not run here.
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

# every test here starts an mpiexec job of 2 ranks: one xdist worker runs them all, one after another
# (`-n auto --dist loadgroup`), so that two jobs never share this 2-core machine's cores with the suite
pytestmark = pytest.mark.xdist_group("mpiexec")

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 4


# ---------------------------------------------------------------------------------------------- rank side


def _digits(n):
    from gpu_cnn import data

    train, _ = data.load_dataset("digits")
    return train.images[:n].astype(np.float32), train.labels[:n]


def _tiny(seed=1):
    from gpu_cnn import nn

    nn.manual_seed(seed)  # no conv: every simulated launch costs seconds, and the collectives are what is tested
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 4), nn.ReLU(), nn.Linear(4, 3))


def _tiny_data(n=10):
    rng = np.random.default_rng(7)
    return rng.standard_normal((n, 1, 6, 6)).astype(np.float32), rng.integers(0, 3, n)


def _flat(model):
    return np.concatenate([p.numpy().ravel() for p in model.parameters()])


def _batches(n, batch, steps, seed=11):
    order = np.random.default_rng(seed).permutation(n)
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def _rank_main(mode, out):
    import gpu_cnn
    from gpu_cnn import distributed as dist
    from gpu_cnn import models
    from gpu_cnn.trainer import Trainer

    gpu_cnn.set_backend("sim" if mode == "sim" else "cpu")
    r, size = dist.init(world_size=2, timeout=3.0 if mode == "hang" else 60.0)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if mode in ("cpu", "sim"):
        if mode == "cpu":
            x, y = _digits(97)
            model = models.digits_cnn(seed=100 + r)  # different on each rank: the broadcast must fix that
            batch = 32
        else:
            x, y = _tiny_data()
            model = _tiny(seed=1 + r)
            batch = 5
        trainer = Trainer(model, optimizer="sgd", lr=0.1, momentum=0.9, batch_size=batch, seed=5, distributed=True)
        steps = [_flat(model)]
        identical = [bool(np.array_equal(*comm.allgather(steps[0])))]
        for idx in _batches(len(y), batch, STEPS if mode == "cpu" else 2):
            local, _ = trainer.dp.shard(idx)
            trainer.train_step(x[local], y[local])
            w = _flat(model)
            identical.append(bool(np.array_equal(*comm.allgather(w))))
            steps.append(w)
        result = {"steps": np.stack(steps), "identical": np.array(identical)}
        if mode == "cpu":  # a whole epoch through fit(), from fresh weights, writing a checkpoint on rank 0
            model = models.digits_cnn(seed=0)
            ckpt = os.path.join(out, f"ckpt_rank{r}.npz")
            trainer = Trainer(model, optimizer="sgd", lr=0.1, momentum=0.9, batch_size=32, seed=5,
                              distributed=True, checkpoint_path=ckpt)
            row = trainer.fit((x, y), epochs=1)[-1]
            ev = trainer.evaluate((x, y))
            result.update(fit=_flat(model), fit_identical=np.array(np.array_equal(*comm.allgather(_flat(model)))),
                          train_loss=row["train_loss"], train_acc=row["train_acc"], eval_loss=ev["loss"],
                          eval_acc=ev["accuracy"])
        if r == 0:
            np.savez(os.path.join(out, f"{mode}.npz"), **result)
    elif mode == "raise":
        x, y = _digits(64)
        trainer = Trainer(models.digits_cnn(seed=0), optimizer="sgd", lr=0.05, batch_size=16, seed=0, distributed=True)
        if r == 1:
            calls = []
            real = trainer.train_step

            def failing(xb, yb):
                calls.append(1)
                if len(calls) == 2:
                    raise RuntimeError("planted failure on rank 1 at step 2")
                return real(xb, yb)

            trainer.train_step = failing
        trainer.fit((x, y), epochs=3)
    elif mode == "hang":
        buf = np.ones(3, np.float32)
        if r == 1:
            time.sleep(60)  # never joins: rank 0 must give up after its 3 s deadline
        dist.all_reduce_(buf)


# ---------------------------------------------------------------------------------------------- pytest side


def _mpiexec(mode, out, timeout=120):
    from gpu_cnn.distributed import find_mpiexec

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("GPU_CNN_BACKEND", None)
    cmd = [find_mpiexec(), "-n", "2", sys.executable, os.path.join(HERE, "test_distributed.py"), mode, str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.perf_counter() - t0


def _single(model, x, y, batches, **kw):
    """One process, the same global batches: the reference."""
    from gpu_cnn.trainer import Trainer

    trainer = Trainer(model, optimizer="sgd", lr=0.1, momentum=0.9, batch_size=len(batches[0]), seed=5, **kw)
    steps = [_flat(model)]
    for idx in batches:
        trainer.train_step(x[idx], y[idx])
        steps.append(_flat(model))
    return np.stack(steps)


def test_two_ranks_cpu_match_one_process(tmp_path, cpu_backend):
    from gpu_cnn import models
    from gpu_cnn.trainer import Trainer

    proc, _ = _mpiexec("cpu", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = np.load(tmp_path / "cpu.npz")
    assert got["identical"].all(), f"ranks differ after steps {np.flatnonzero(~got['identical'])}"
    x, y = _digits(97)
    want = _single(models.digits_cnn(seed=100), x, y, _batches(97, 32, STEPS))  # rank 0's initial weights
    assert np.array_equal(got["steps"][0], want[0])  # the broadcast gave rank 1 rank 0's weights
    assert np.abs(want[-1] - want[0]).max() > 1e-2  # the steps moved the weights
    # Two half-batch mean gradients averaged vs one full-batch mean: float32 summation order differs,
    # and 4 momentum steps carry it on; 1e-5 absolute on weights of size ~0.1-1 is float32 rounding.
    np.testing.assert_allclose(got["steps"], want, rtol=0, atol=1e-5)

    # fit() over one epoch of 97 images (batches 32, 32, 32, 1): shards, weighting, metrics, checkpoint.
    model = models.digits_cnn(seed=0)
    trainer = Trainer(model, optimizer="sgd", lr=0.1, momentum=0.9, batch_size=32, seed=5)
    row = trainer.fit((x, y), epochs=1)[-1]
    ev = trainer.evaluate((x, y))
    assert bool(got["fit_identical"])
    np.testing.assert_allclose(got["fit"], _flat(model), rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(got["train_loss"]), row["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(float(got["eval_loss"]), ev["loss"], rtol=1e-5)
    assert float(got["train_acc"]) == row["train_acc"] and float(got["eval_acc"]) == ev["accuracy"]
    assert (tmp_path / "ckpt_rank0.npz").exists() and not (tmp_path / "ckpt_rank1.npz").exists()


def _mlp_sgd_reference(w0, x, y, batches, lr=0.1, momentum=0.9):
    """float64 NumPy: Flatten → Linear(36, 4) → ReLU → Linear(4, 3), mean softmax cross-entropy over each
    whole global batch, torch.optim.SGD with momentum (buf = g, then momentum·buf + g; p −= lr·buf).
    w0: the flat float32 weights in parameter order (W1, b1, W2, b2). Returns the flat weights per step."""
    shapes = [(4, 36), (4,), (3, 4), (3,)]
    params, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        params.append(w0[at:at + size].astype(np.float64).reshape(shape))
        at += size
    bufs, out = None, [np.concatenate([p.ravel() for p in params])]
    for idx in batches:
        W1, b1, W2, b2 = params
        xb, yb = x[idx].reshape(len(idx), -1).astype(np.float64), y[idx]
        h_pre = xb @ W1.T + b1
        h = np.maximum(h_pre, 0)
        z = h @ W2.T + b2
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dz = p.copy()
        dz[np.arange(len(yb)), yb] -= 1
        dz /= len(yb)
        dh = (dz @ W2) * (h_pre > 0)
        grads = [dh.T @ xb, dh.sum(0), dz.T @ h, dz.sum(0)]
        bufs = grads if bufs is None else [momentum * b + g for b, g in zip(bufs, grads)]
        params = [q - lr * b for q, b in zip(params, bufs)]
        out.append(np.concatenate([q.ravel() for q in params]))
    return np.stack(out)


def test_two_ranks_sim_match_one_process(tmp_path, kernel_backend):
    proc, _ = _mpiexec("sim", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = np.load(tmp_path / "sim.npz")
    assert got["identical"].all(), f"ranks differ after steps {np.flatnonzero(~got['identical'])}"
    x, y = _tiny_data()
    assert np.array_equal(got["steps"][0], _flat(_tiny(seed=1)))  # rank 0's initial weights on both ranks
    want = _mlp_sgd_reference(got["steps"][0], x, y, _batches(len(y), 5, 2))
    assert np.abs(want[-1] - want[0]).max() > 1e-2  # the steps moved the weights
    np.testing.assert_allclose(got["steps"], want, rtol=0, atol=1e-5)  # float32 vs float64 over 2 steps


def test_failing_rank_stops_all_with_its_error(tmp_path):
    proc, seconds = _mpiexec("raise", tmp_path)
    assert proc.returncode != 0
    assert "planted failure on rank 1 at step 2" in proc.stderr
    assert "rank 1 of 2 failed" in proc.stderr
    assert seconds < 30, f"the job took {seconds:.0f} s to stop"


def test_hanging_rank_times_out(tmp_path):
    proc, seconds = _mpiexec("hang", tmp_path)
    assert proc.returncode != 0
    assert "did not complete within 3 s" in proc.stderr
    assert seconds < 30, f"the job took {seconds:.0f} s to stop (rank 1 sleeps 60 s)"


def test_cli_nproc_2_matches_one_process(tmp_path, cpu_backend):
    import json

    from gpu_cnn import cli

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("GPU_CNN_BACKEND", None)
    args = ["train", "--epochs", "1", "--backend", "cpu"]  # not --quiet: rank 0's summary line is checked
    proc = subprocess.run([sys.executable, "-m", "gpu_cnn.cli", *args, "--nproc", "2", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("test accuracy") == 1  # rank 0 alone prints
    assert "over 2 ranks" in proc.stdout
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    two = json.load(open(tmp_path / "two" / "metrics.json"))
    one = json.load(open(tmp_path / "one" / "metrics.json"))
    assert two["ranks"] == 2 and one["ranks"] == 1
    assert abs(two["test_accuracy"] - one["test_accuracy"]) <= 0.01  # the bar: the same within 1 %


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2])
