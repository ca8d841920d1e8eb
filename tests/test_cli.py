"""The gpu-cnn command line end to end on tiny runs (cpu backend)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest


def cli(*args, check=True, env_backend=None):
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_CNN_BACKEND", "NUMBA_ENABLE_CUDASIM")}
    if env_backend is not None:
        env["GPU_CNN_BACKEND"] = env_backend
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
    for cmd in ("train", "evaluate", "predict", "demo", "info", "kernels"):
        proc = cli(cmd, "--help")
        assert "usage: gpu-cnn " + cmd in proc.stdout
    proc = cli("bench", "--help")  # the benchmark's own options, which bench passes on
    assert proc.returncode == 0 and "usage: python -m benchmarks.kernels" in proc.stdout
    assert all(opt in proc.stdout for opt in ("--sweep", "--only", "--repeats", "--no-vendor"))


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


# --------------------------------------------------------------------------------------------------
# Bad input: a one-line "gpu-cnn <cmd>: error: ..." naming the option, exit status 2, no traceback,
# and nothing written or overwritten.


def refused(proc, *words):
    """Assert a clean refusal whose message contains every one of `words`; returns the error line."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("gpu-cnn "), proc.stderr
    assert ": error: " in line, proc.stderr
    for w in words:
        assert w in line, (w, line)
    return line


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("option,value,want", [
    ("--epochs", "0", "positive int"), ("--epochs", "-2", "positive int"), ("--epochs", "1.5", "positive int"),
    ("--batch-size", "0", "positive int"), ("--batch-size", "-3", "positive int"),
    ("--lr", "0", "positive finite"), ("--lr", "-0.1", "positive finite"), ("--lr", "nan", "positive finite"),
    ("--lr", "inf", "positive finite"), ("--seed", "-1", "non-negative int"), ("--seed", "x", "non-negative int"),
])
def test_train_refuses_bad_numbers_while_parsing(capsys, tmp_path, option, value, want):
    from gpu_cnn.cli import main

    # In-process is safe here: argparse refuses the value before any backend, data or folder is touched.
    with pytest.raises(SystemExit) as exc:
        main(["train", option, value, "--out", str(tmp_path / "run"), "--backend", "cpu"])
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("gpu-cnn train: error: ") and option in line and want in line and repr(value) in line
    assert not (tmp_path / "run").exists()


def test_train_refused_run_creates_no_folder(tmp_path):
    out = tmp_path / "run"
    refused(cli("train", "--lr", "-1", "--out", str(out), "--quiet", "--backend", "cpu", check=False),
            "--lr", "positive finite")
    assert not out.exists()  # refused while parsing: no empty output folder left behind


def test_train_epochs_0_keeps_an_earlier_run(trained):
    out, _ = trained
    before = snapshot(out)
    refused(cli("train", "--epochs", "0", "--out", str(out), "--quiet", "--backend", "cpu", check=False), "--epochs")
    assert snapshot(out) == before


def test_evaluate_refuses_a_bad_batch_size(trained):
    out, _ = trained
    refused(cli("evaluate", str(out / "model.npz"), "--batch-size", "0", "--backend", "cpu", check=False),
            "--batch-size", "positive int")


def test_kernels_refuses_an_unknown_arch():
    proc = cli("kernels", "--arch", "bogus", check=False)
    refused(proc, "--arch", "bogus", "sm_80", "sm_90")
    assert proc.stdout == ""


def test_out_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    refused(cli("train", "--epochs", "1", "--out", str(afile), "--quiet", "--backend", "cpu", check=False),
            "--out", "exists and is not a folder")
    refused(cli("train", "--epochs", "1", "--out", str(afile / "sub"), "--quiet", "--backend", "cpu", check=False),
            "--out", "is a file, not a folder")
    proc = cli("demo", "--out", str(afile), "--backend", "cpu", check=False)
    refused(proc, "--out", "exists and is not a folder")
    assert proc.stdout == ""  # refused before the worked example is printed
    assert afile.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [afile]


def test_run_demo_refuses_a_file_as_out_dir(tmp_path):
    from gpu_cnn.demo import run_demo

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    printed = []
    with pytest.raises(ValueError, match="out_dir: .* exists and is not a folder"):
        run_demo(afile, stream=printed.append)
    assert printed == [] and afile.read_text() == "keep me"


def test_lenet5_adapts_to_the_digits(tmp_path):
    """lenet5 used to be refused on 8×8 input; it now takes its small-input geometry (issue 13)."""
    out = tmp_path / "run"
    cli("train", "--model", "lenet5", "--epochs", "1", "--out", str(out), "--quiet", "--backend", "cpu")
    assert (out / "model.npz").exists()


def test_backend_from_the_environment_is_named(tmp_path):
    refused(cli("info", env_backend="bogus", check=False), "environment variable GPU_CNN_BACKEND", "'bogus'")
    out = tmp_path / "run"
    refused(cli("train", "--epochs", "1", "--out", str(out), "--quiet", env_backend="bogus", check=False),
            "GPU_CNN_BACKEND", "'bogus'")
    assert not out.exists()
    # --backend wins over the variable: the error is about the missing checkpoint
    refused(cli("evaluate", str(tmp_path / "none.npz"), "--backend", "cpu", env_backend="bogus", check=False),
            "none.npz")


def test_evaluate_refuses_a_dataset_of_another_shape(trained):
    out, _ = trained
    refused(cli("evaluate", str(out / "model.npz"), "--dataset", "synthetic", "--backend", "cpu", check=False),
            "--dataset synthetic", "1×10×10", "1×8×8")


def test_predict_refuses_bad_arrays(trained, tmp_path):
    out, _ = trained
    ckpt = str(out / "model.npz")
    cases = {
        "nan.npy": (np.full((8, 8), np.nan), "NaN or infinite"),
        "inf.npy": (np.where(np.eye(8) > 0, np.inf, 0.5), "NaN or infinite"),
        "empty.npy": (np.zeros((0, 8)), "empty"),
        "cplx.npy": (np.ones((8, 8), complex), "complex128"),
    }
    for name, (array, words) in cases.items():
        np.save(tmp_path / name, array)
        refused(cli("predict", ckpt, str(tmp_path / name), "--backend", "cpu", check=False), name, words)
    np.save(tmp_path / "big.npy", np.zeros((28, 28), np.float32))
    refused(cli("predict", ckpt, str(tmp_path / "big.npy"), "--raw", "--backend", "cpu", check=False),
            "big.npy", "--raw", "(8, 8)", "(28, 28)")


def test_predict_refuses_files_that_are_not_images(trained, tmp_path):
    out, _ = trained
    (tmp_path / "notpng.png").write_text("hello")
    (tmp_path / "txt.npy").write_text("hello")
    refused(cli("predict", str(out / "model.npz"), str(tmp_path / "notpng.png"), "--backend", "cpu", check=False),
            "notpng.png", "not a readable image")
    refused(cli("predict", str(out / "model.npz"), str(tmp_path / "txt.npy"), "--backend", "cpu", check=False),
            "txt.npy", "not a .npy file")


def test_predict_resizes_float_arrays_as_floats(trained, tmp_path):
    from sklearn.datasets import load_digits

    from gpu_cnn.cli import _fit_image

    # Negative values must not wrap around through uint8: a constant -0.25 stays -0.25 (float32 resize).
    got = _fit_image(np.full((16, 16), -0.25, np.float32), "x.npy", (1, 8, 8), {})
    assert got.shape == (1, 8, 8)
    np.testing.assert_allclose(got, -0.25, rtol=0, atol=1e-6)  # bilinear of a constant, float32 rounding only
    # End to end: a "0" at twice the size, values 0..16, is resized and still classified as 0.
    out, _ = trained
    np.save(tmp_path / "zero16.npy", np.kron(load_digits().images[0], np.ones((2, 2))))
    assert cli("predict", str(out / "model.npz"), str(tmp_path / "zero16.npy"), "--backend", "cpu").stdout.startswith("class 0")


@pytest.fixture
def api_checkpoints(tmp_path, cpu_backend):
    """Checkpoints written by gpu_cnn.save: no dataset, input_shape or normalisation metadata."""
    from gpu_cnn import checkpoint, models

    paths = {name: tmp_path / f"api_{name}.npz" for name in ("lenet5", "digits_cnn")}
    for name, path in paths.items():
        checkpoint.save(models.get_model(name, seed=0), path)
    return paths


def test_checkpoints_without_cli_metadata(api_checkpoints, tmp_path):
    lenet, digits = str(api_checkpoints["lenet5"]), str(api_checkpoints["digits_cnn"])
    refused(cli("evaluate", lenet, "--backend", "cpu", check=False), "does not record", "pass --dataset")
    refused(cli("evaluate", lenet, "--dataset", "digits", "--backend", "cpu", check=False),
            "--dataset digits", "1×8×8")
    np.save(tmp_path / "img8.npy", np.zeros((8, 8), np.float32))
    refused(cli("predict", lenet, str(tmp_path / "img8.npy"), "--backend", "cpu", check=False),
            "does not record its input shape", "8×8")
    # Where the model accepts the image's own size, that size is used, with a note.
    proc = cli("predict", digits, str(tmp_path / "img8.npy"), "--backend", "cpu")
    assert proc.stdout.startswith("class ") and "does not record its input shape" in proc.stderr
