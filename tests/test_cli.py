"""The gpu-cnn command line end to end on tiny runs (cpu backend)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest


def cli(*args, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_CNN_BACKEND", "NUMBA_ENABLE_CUDASIM")}
    proc = subprocess.run([sys.executable, "-m", "gpu_cnn.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = cli("train", "--epochs", "2", "--out", str(out), "--quiet", "--backend", "cpu")
    return out, proc


def test_train_writes_model_and_metrics(trained):
    out, proc = trained
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "train_seconds", "epochs", "backend", "dataset"):
        assert key in metrics
    assert 0.5 < metrics["test_accuracy"] <= 1.0  # a fraction, and two epochs learn something
    assert metrics["epochs"] == 2 and metrics["backend"] == "cpu" and metrics["dataset"] == "digits"
    assert (out / "model.npz").is_file()
    assert "test accuracy" in proc.stdout


def test_evaluate_reproduces_the_training_accuracy(trained):
    out, _ = trained
    proc = cli("evaluate", str(out / "model.npz"), "--backend", "cpu")
    got = json.loads(proc.stdout)
    want = json.loads((out / "metrics.json").read_text())
    assert got["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=1e-12)


def test_predict_png_and_npy(trained, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    out, _ = trained
    d = load_digits()
    img = d.images[0]  # a "0", values 0..16
    Image.fromarray((img / 16 * 255).astype(np.uint8)).resize((32, 32), Image.NEAREST).save(tmp_path / "zero.png")
    np.save(tmp_path / "zero.npy", img)
    for path in ("zero.png", "zero.npy"):
        proc = cli("predict", str(out / "model.npz"), str(tmp_path / path), "--backend", "cpu")
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("class ")
        probs = [float(line.split(":")[1]) for line in lines[1:]]
        assert len(probs) == 10 and abs(sum(probs) - 1) < 1e-3
    assert cli("predict", str(out / "model.npz"), str(tmp_path / "zero.npy"), "--backend", "cpu").stdout.startswith("class 0")


def test_every_command_has_help():
    for cmd in ("train", "evaluate", "predict", "bench", "demo", "info", "kernels"):
        proc = cli(cmd, "--help")
        assert "usage: gpu-cnn " + cmd in proc.stdout


def test_bad_input_is_a_clear_error(tmp_path):
    proc = cli("train", "--dataset", "cifar", "--out", str(tmp_path), "--backend", "cpu", check=False)
    assert proc.returncode == 2 and "cifar" in proc.stderr
    proc = cli("train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path), "--backend", "cpu", check=False)
    assert proc.returncode == 2 and "train-images-idx3-ubyte" in proc.stderr
    proc = cli("predict", str(tmp_path / "none.npz"), "x.png", check=False)
    assert proc.returncode == 2 and "none.npz" in proc.stderr


def test_demo_prints_the_true_map(tmp_path):
    proc = cli("demo", "--out", str(tmp_path), "--backend", "cpu")
    assert "2.8" in proc.stdout
    assert len(list(tmp_path.glob("*.png"))) >= 3
