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
    proc = cli("train", "--epochs", "2", "--out", str(out), "--backend", "cpu")
    return out, proc


def test_train_writes_model_and_metrics(trained):
    out, proc = trained
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "train_seconds", "epochs", "backend", "dataset"):
        assert key in metrics
    assert 0.5 < metrics["test_accuracy"] <= 1.0  # a fraction, and two epochs learn something
    assert metrics["epochs"] == 2 and metrics["backend"] == "cpu" and metrics["dataset"] == "digits"
    # the default model (digits_cnn) has no training defaults of its own: adam's, and adam's weight decay 0
    assert (metrics["model"], metrics["optimizer"], metrics["lr"], metrics["weight_decay"]) == \
        ("digits_cnn", "adam", 0.003, 0.0)
    assert (out / "model.npz").is_file()
    assert "test accuracy" in proc.stdout


def test_evaluate_reproduces_the_training_accuracy(trained):
    out, _ = trained
    proc = cli("evaluate", str(out / "model.npz"), "--backend", "cpu", "--json")
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
    assert proc.returncode == 0 and "usage: gpu-cnn bench" in proc.stdout and "runs/bench/" in proc.stdout
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
    ("--weight-decay", "-0.001", "non-negative finite"), ("--weight-decay", "nan", "non-negative finite"),
    ("--weight-decay", "x", "non-negative finite"),
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


def test_lenet5_adapts_to_the_digits_with_its_own_defaults(tmp_path):
    """lenet5 used to be refused on 8×8 input; it now takes its small-input geometry (issue 13), and the
    training settings it gets when none are given are its own (sgd, lr 0.02, weight decay 1e-3; 30
    epochs, here cut to 2)."""
    out = tmp_path / "run"
    cli("train", "--model", "lenet5", "--epochs", "2", "--out", str(out), "--quiet", "--backend", "cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["optimizer"], metrics["lr"], metrics["weight_decay"]) == ("sgd", 0.02, 0.001)
    first, second = metrics["history"]
    # the first epochs learn: ten classes start at 10% accuracy and a loss of ln 10 = 2.30
    assert second["train_loss"] < first["train_loss"] < 2.0 and second["val_acc"] > 0.8, metrics["history"]


def test_train_settings_per_model_and_from_the_command_line():
    """What the command line gives wins; else the model's own defaults; a model's lr and weight decay
    come only with its own optimizer (lenet5 with adam gets adam's 0.003 and no weight decay, but still
    its 30 epochs)."""
    from gpu_cnn.cli import build_parser, train_settings

    def settings(*argv, model="lenet5"):
        got = train_settings(build_parser().parse_args(["train", *argv]), model)
        return got["epochs"], got["optimizer"], got["lr"], got["weight_decay"]

    assert settings() == (30, "sgd", 0.02, 0.001)
    assert settings("--lr", "0.1") == (30, "sgd", 0.1, 0.001)
    assert settings("--weight-decay", "0") == (30, "sgd", 0.02, 0.0)
    assert settings("--optimizer", "sgd", "--epochs", "3") == (3, "sgd", 0.02, 0.001)
    assert settings("--optimizer", "adam") == (30, "adam", 0.003, None)
    assert settings("--optimizer", "adamw", "--weight-decay", "0.05") == (30, "adamw", 0.003, 0.05)
    assert settings(model="digits_cnn") == (15, "adam", 0.003, None)
    assert settings("--optimizer", "sgd", model="resnet8") == (15, "sgd", 0.05, None)
    # lenet5's own settings are for its small-input geometry: on 28×28 images (MNIST) the general ones
    mnist = train_settings(build_parser().parse_args(["train"]), "lenet5", (1, 28, 28))
    assert (mnist["epochs"], mnist["optimizer"], mnist["lr"], mnist["weight_decay"]) == (15, "adam", 0.003, None)
    digits = train_settings(build_parser().parse_args(["train"]), "lenet5", (1, 8, 8))
    assert (digits["epochs"], digits["optimizer"]) == (30, "sgd")


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


# --------------------------------------------------------------------------------------------------
# A new user's first hour (issue 15)


def test_train_prints_validation_and_writes_both_pictures(trained):
    out, proc = trained
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2
    for line in epochs:
        assert "train loss" in line and "val loss" in line and line.count(" acc ") == 2
    metrics = json.loads((out / "metrics.json").read_text())
    # the validation images are 10 % (the default --val-split) of the training split, the test split untouched
    assert metrics["val_images"] == round(0.1 * (metrics["train_images"] + metrics["val_images"]))
    assert metrics["train_images"] + metrics["val_images"] + 360 - 1 <= 1797 <= metrics["train_images"] + metrics["val_images"] + 360 + 1
    for row in metrics["history"]:
        assert 0.0 <= row["val_acc"] <= 1.0 and row["val_loss"] > 0
    for name in ("curves.png", "confusion.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a real picture, not an empty canvas


def test_evaluate_prints_a_per_class_table(trained):
    out, _ = trained
    text = cli("evaluate", str(out / "model.npz"), "--backend", "cpu").stdout.splitlines()
    got = json.loads(cli("evaluate", str(out / "model.npz"), "--backend", "cpu", "--json").stdout)
    assert f"accuracy {got['test_accuracy']:.4f}" in text[0]
    rows = [line.split() for line in text[2:]]
    assert [r[0] for r in rows] == [str(k) for k in range(10)]
    images, correct = sum(int(r[1]) for r in rows), sum(int(r[2]) for r in rows)
    assert images == got["n"] and correct / images == pytest.approx(got["test_accuracy"], abs=1e-12)
    assert sum(int(r[4]) for r in rows) == images  # every image is predicted as some class
    for r in rows:
        assert float(r[3]) == pytest.approx(int(r[2]) / int(r[1]), abs=5e-5)


def test_runs_never_overwrite_an_earlier_run(trained, tmp_path):
    out, _ = trained
    before = snapshot(out)
    refused(cli("train", "--epochs", "1", "--out", str(out), "--backend", "cpu", check=False),
            "--out", "already holds a run", "--overwrite")
    assert snapshot(out) == before
    # without --out: runs/train-001, then runs/train-002, runs/latest pointing to the newest; --quiet is silent
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "gpu_cnn", "train", "--epochs", "1", "--quiet", "--backend",
                               "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={k: v for k, v in os.environ.items() if k != "GPU_CNN_BACKEND"})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "" and proc.stderr == ""
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "train-001", "train-002"]
    assert os.readlink(runs / "latest") == "train-002"
    for run in ("train-001", "train-002"):
        assert all((runs / run / f).is_file() for f in ("model.npz", "metrics.json", "curves.png", "confusion.png"))


def test_overwrite_is_allowed_when_asked(tmp_path):
    from gpu_cnn.cli import CLIError, _check_run_folder

    (tmp_path / "model.npz").write_bytes(b"x")
    with pytest.raises(CLIError, match="already holds a run"):
        _check_run_folder(str(tmp_path), overwrite=False)
    _check_run_folder(str(tmp_path), overwrite=True)  # no error
    _check_run_folder(str(tmp_path / "new"), overwrite=False)  # a new folder is always fine


def _digit_pngs(tmp_path):
    """A "7" from sklearn's digits as the training data draw it (light on dark), inverted (dark on light)
    and as black ink on a transparent background (RGBA, the alpha channel is the ink)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    i = int(np.flatnonzero(d.target == 7)[0])
    grey = (d.images[i] / 16 * 255).astype(np.uint8)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = grey
    paths = {"plain": tmp_path / "plain.png", "inverted": tmp_path / "inverted.png", "rgba": tmp_path / "rgba.png"}
    Image.fromarray(grey).resize((32, 32), Image.NEAREST).save(paths["plain"])
    Image.fromarray(255 - grey).resize((32, 32), Image.NEAREST).save(paths["inverted"])
    Image.fromarray(rgba, "RGBA").resize((32, 32), Image.NEAREST).save(paths["rgba"])
    return paths


def test_predict_inverts_dark_on_light_and_transparent_digits(trained, tmp_path):
    out, _ = trained
    ckpt = str(out / "model.npz")
    paths = _digit_pngs(tmp_path)
    results = {k: cli("predict", ckpt, str(p), "--backend", "cpu") for k, p in paths.items()}
    first = {k: r.stdout.splitlines()[0] for k, r in results.items()}
    assert first["plain"] == first["inverted"] == first["rgba"] == "class 7" + first["plain"][7:]
    assert first["plain"].startswith("class 7 ")
    assert "inverted" not in results["plain"].stderr
    assert "dark on a light background" in results["inverted"].stderr and "inverted it" in results["inverted"].stderr
    assert "transparent" in results["rgba"].stderr
    # --no-invert keeps the dark-on-light image as it is (and says so); --invert forces it on the plain one
    kept = cli("predict", ckpt, str(paths["inverted"]), "--no-invert", "--backend", "cpu")
    assert "--no-invert keeps it" in kept.stderr
    forced = cli("predict", ckpt, str(paths["plain"]), "--invert", "--backend", "cpu")
    assert "--invert" in forced.stderr


def test_fit_image_inverts_only_dark_on_light():
    from gpu_cnn.cli import _fit_image

    light_bg = np.ones((8, 8), np.float32)
    light_bg[2:6, 3:5] = 0.0  # a dark stroke on white
    notes = []
    got = _fit_image(light_bg, "x.npy", (1, 8, 8), {}, notes=notes)
    np.testing.assert_array_equal(got[0], 1.0 - light_bg)  # inverted exactly: 1 - x, no normalisation given
    assert notes and "inverted" in notes[0]
    notes = []
    np.testing.assert_array_equal(_fit_image(1.0 - light_bg, "x.npy", (1, 8, 8), {}, notes=notes)[0],
                                  1.0 - light_bg)
    assert notes == []


def test_predict_show_writes_a_png(trained, tmp_path):
    out, _ = trained
    show = tmp_path / "shown.png"
    proc = cli("predict", str(out / "model.npz"), str(_digit_pngs(tmp_path)["plain"]), "--show", str(show),
               "--backend", "cpu")
    assert f"wrote {show}" in proc.stdout
    data = show.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_no_broken_pipe_traceback(trained, tmp_path):
    out, _ = trained
    np.save(tmp_path / "img.npy", np.zeros((8, 8), np.float32))
    env = {k: v for k, v in os.environ.items() if k != "GPU_CNN_BACKEND"}
    proc = subprocess.Popen([sys.executable, "-m", "gpu_cnn", "predict", str(out / "model.npz"),
                             str(tmp_path / "img.npy"), "--backend", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before anything is printed, as after `| head`
    err = proc.stderr.read().decode()
    proc.wait(timeout=600)
    assert "Traceback" not in err and "Broken pipe" not in err and "BrokenPipeError" not in err, err


def test_version_and_python_m():
    import gpu_cnn

    proc = subprocess.run([sys.executable, "-m", "gpu_cnn", "--version"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == f"gpu-cnn {gpu_cnn.__version__}"
    proc = subprocess.run([sys.executable, "-m", "gpu_cnn", "--help"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: gpu-cnn")
    for cmd in ("train", "evaluate", "predict", "bench", "demo", "info", "kernels"):
        assert cmd in proc.stdout


def test_train_help_shows_every_default():
    help_text = " ".join(cli("train", "--help").stdout.split())
    for words in ("(default: 15; per model: lenet5 below 12×12 30)", "(default: 32)", "(default: adam; per model: lenet5 below 12×12 sgd)", "(default: 0.1)",
                  "(default: 0)", "sgd 0.05", "adam 0.003", "per model: lenet5 below 12×12 0.02 with sgd)",
                  "(default: the optimizer's: adamw 0.01, sgd and adam 0; per model: lenet5 below 12×12 0.001 with sgd)",
                  "runs/train-NNN", "(default: digits)", "digits_cnn fits 8×8", "lenet5 28×28"):
        assert words in help_text, words


def test_first_loss_is_near_ln_classes(cpu_backend):
    import math

    from gpu_cnn import data, functional as F, models

    train, _ = data.load_digits()
    x, y = train.images[:256], train.labels[:256].astype(np.int32)
    for seed in range(4):
        loss, _ = F.softmax_cross_entropy(np.array(models.digits_cnn(seed=seed).forward(x)), y)
        assert abs(float(loss) - math.log(10)) < 0.5, (seed, float(loss))
    # lenet5's output layer is initialised the same way: its logits on 28×28 noise stay small
    logits = np.array(models.lenet5(seed=0).forward(np.random.default_rng(0).standard_normal((8, 1, 28, 28),
                                                                                               dtype=np.float32)))
    loss, _ = F.softmax_cross_entropy(logits, np.zeros(8, np.int32))
    assert abs(float(loss) - math.log(10)) < 0.5


def test_nn_linear_keeps_its_default_init(cpu_backend):
    from gpu_cnn import nn

    nn.manual_seed(0)
    w = nn.Linear(400, 300).weight.numpy()
    assert abs(float(w.std()) - np.sqrt(2.0 / 400)) < 0.05 * np.sqrt(2.0 / 400)  # He init, as documented


def test_sim_backend_trains_a_tiny_preset_in_its_stated_time(tmp_path):
    import time

    from gpu_cnn.cli import SIM_PRESET, SIM_PRESET_SECONDS

    t0 = time.perf_counter()
    proc = cli("train", "--backend", "sim", "--out", str(tmp_path / "sim"))
    seconds = time.perf_counter() - t0
    assert seconds < SIM_PRESET_SECONDS, seconds
    assert "tiny preset" in proc.stdout and "--yes" in proc.stdout
    metrics = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert metrics["backend"] == "sim" and metrics["sim_preset"] is True
    assert metrics["train_images"] == SIM_PRESET["train_images"] and metrics["val_images"] == SIM_PRESET["val_images"]
    assert len(metrics["history"]) == SIM_PRESET["epochs"] and np.isfinite(metrics["test_loss"])


def test_bench_writes_under_runs_bench_and_shows_progress(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_CNN_BACKEND", "NUMBA_ENABLE_CUDASIM")}
    proc = subprocess.run([sys.executable, "-m", "gpu_cnn", "bench", "--backend", "cpu", "--sweep", "tiny",
                           "--only", "relu", "--repeats", "1", "--no-vendor", "--no-ceilings"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = list((tmp_path / "runs" / "bench").glob("*/kernels.json"))
    assert len(written) == 1 and (written[0].parent / "kernels.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing else written in the folder
    assert "results go to runs/bench/" in proc.stdout
    assert "cases done]" in proc.stderr  # progress while it runs
