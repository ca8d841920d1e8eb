"""The ``gpu-cnn`` command line: train, evaluate, predict, bench, demo, info, kernels."""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

DEFAULTS = {  # the embedded default run: sklearn's digits, no download, no GPU needed
    "dataset": "digits", "model": None, "epochs": 15, "batch_size": 32, "lr": 0.003,
    "optimizer": "adam", "seed": 0,
}


# The input each built-in model was designed for (channels, height, width).
MODEL_INPUT = {"lenet5": (1, 28, 28), "digits_cnn": (1, 8, 8)}


class CLIError(ValueError):
    """Bad input found by the command line itself; main() prints it as ``gpu-cnn <cmd>: error: ...``."""


# argparse ``type=`` functions: a bad value is refused while the arguments are parsed, before any data
# set is loaded or any output folder created, as ``argument --epochs: expected a positive int, got '0'``.


def _int_arg(text, what, minimum):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text):
    return _int_arg(text, "a positive int", 1)


def non_negative_int(text):
    return _int_arg(text, "a non-negative int", 0)


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _shape_text(shape):
    return "×".join(str(int(s)) for s in shape)


def _check_out(path, option="--out"):
    """Refuse an output folder that cannot be created or written, before anything is computed or written."""
    full = os.path.abspath(path)
    if os.path.exists(full):
        if not os.path.isdir(full):
            raise CLIError(f"{option}: {path!r} exists and is not a folder")
        if not os.access(full, os.W_OK | os.X_OK):
            raise CLIError(f"{option}: the folder {path!r} is not writable")
        return
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CLIError(f"{option}: cannot create the folder {path!r}: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{option}: cannot create the folder {path!r}: {parent!r} is not writable")


def _backend_arg(p):
    p.add_argument("--backend", choices=("cuda", "sim", "cpu"), default=None,
                   help="compute backend (default: $GPU_CNN_BACKEND, else cuda when a GPU is present, else cpu)")


def _env_backend():
    """$GPU_CNN_BACKEND, checked (None when unset); a bad value is blamed on the variable, not on --backend."""
    from .backend import BACKENDS, ENV_VAR

    env = os.environ.get(ENV_VAR, "").strip()
    if env and env.lower() not in BACKENDS:
        raise CLIError(f"environment variable {ENV_VAR}: expected one of {', '.join(BACKENDS)}, got {env!r} "
                       f"(unset it, or pass --backend)")
    return env or None


def _apply_backend(args):
    import gpu_cnn
    from .backend import ENV_VAR

    if getattr(args, "backend", None):
        gpu_cnn.set_backend(args.backend)
        return gpu_cnn.get_backend()
    env = _env_backend()
    if env:
        try:
            gpu_cnn.set_backend(env)
        except gpu_cnn.BackendError as exc:
            raise gpu_cnn.BackendError(f"{exc} (backend {env!r} came from the environment variable {ENV_VAR})") from exc
    return gpu_cnn.get_backend()


# --------------------------------------------------------------------------------------------------
# info / kernels / demo


def cmd_info(args):
    import numba

    import gpu_cnn

    try:
        backend = _apply_backend(args)
    except gpu_cnn.BackendError as exc:
        backend = f"unavailable ({exc})"
    print(f"gpu-cnn      {gpu_cnn.__version__}")
    print(f"backend      {backend}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"numpy        {np.__version__}")
    print(f"numba        {numba.__version__}")
    print(f"numba-cuda   {_version('numba-cuda')}")
    print(f"cupy         {_version('cupy-cuda12x') or _version('cupy-cuda13x') or _version('cupy') or 'not installed'}")
    if gpu_cnn.gpu_available():
        from numba import cuda

        dev = cuda.get_current_device()
        ctx = cuda.current_context()
        free, total = ctx.get_memory_info()
        cc = dev.compute_capability
        name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
        print(f"gpu          {name}, compute capability {cc[0]}.{cc[1]}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)")
    else:
        print("gpu          none found (the cuda backend is unavailable; cpu and sim work)")
    return 0


def _version(dist):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cmd_kernels(args):
    import subprocess

    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    env.pop("GPU_CNN_BACKEND", None)
    cmd = [sys.executable, "-m", "gpu_cnn.compile_check", "--arch", args.arch]
    return subprocess.call(cmd, env=env)


def cmd_demo(args):
    if args.out is not None:
        _check_out(args.out)
    _apply_backend(args)
    from .demo import run_demo

    paths = run_demo(out_dir=args.out)
    if paths:
        print(f"\nwrote {len(paths)} figures to {args.out}:")
        for p in paths:
            print(f"  {p}")
    return 0


# --------------------------------------------------------------------------------------------------
# train / evaluate / predict


def _load_data(args):
    from . import data

    kw = {"data_dir": args.data_dir} if args.data_dir else {}
    if args.data_dir and os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        raise CLIError(f"--data-dir: {args.data_dir!r} is a file, not a folder (give the folder that holds "
                       f"the IDX files)")
    return data.load_dataset(args.dataset, **kw)


def cmd_train(args):
    from . import models
    from .checkpoint import save
    from .trainer import Trainer, TrainingError

    _check_out(args.out)  # before the data are loaded: a refused run writes nothing
    backend = _apply_backend(args)
    train, test = _load_data(args)
    input_shape = tuple(int(s) for s in train.images.shape[1:])
    model_name = args.model or ("digits_cnn" if train.images.shape[-1] <= 10 else "lenet5")
    model = models.get_model(model_name, num_classes=train.num_classes, seed=args.seed)
    try:
        model.output_shape(input_shape)  # clear error now if the model does not fit the data
    except ValueError as exc:
        option = f"--model {model_name}" if args.model else f"--dataset {args.dataset}"
        raise CLIError(f"{option}: {model_name} needs {_shape_text(MODEL_INPUT[model_name])} input, but the "
                       f"{args.dataset} images are {_shape_text(input_shape)} ({exc})") from exc
    ckpt = os.path.join(args.out, "model.npz")
    meta = {"dataset": args.dataset, "model": model_name, "input_shape": list(input_shape),
            "num_classes": int(train.num_classes), "normalization": _norm(train)}
    trainer = Trainer(model, optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      progress=False if args.quiet else None, checkpoint_path=ckpt, metadata=meta)
    os.makedirs(args.out, exist_ok=True)  # only now: a refused run leaves no folder behind
    print(f"training {model_name} on {args.dataset} ({len(train.labels)} train / {len(test.labels)} test images) "
          f"with {args.optimizer}, lr={args.lr}, batch {args.batch_size}, {args.epochs} epochs, backend {backend}")
    t0 = time.perf_counter()
    try:
        for epoch in range(args.epochs):
            row = trainer.fit(train, epochs=1)[-1]
            if not args.quiet:
                print(f"epoch {row['epoch']:3d}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.4f}  "
                      f"({row['seconds']:.1f} s)", flush=True)
    except TrainingError as exc:
        print(f"gpu-cnn train: error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    m = trainer.evaluate(test)
    metrics = {"test_accuracy": m["accuracy"], "test_loss": m["loss"], "train_seconds": seconds,
               "epochs": args.epochs, "backend": backend, "dataset": args.dataset, "model": model_name,
               "optimizer": args.optimizer, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
               "images_per_second": len(train.labels) * args.epochs / seconds, "history": trainer.history}
    save(model, ckpt, metadata=dict(meta, metrics={k: v for k, v in metrics.items() if k != "history"},
                                    checkpoint="last", epoch=len(trainer.history)))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"test accuracy {m['accuracy']:.4f} ({m['n']} images), loss {m['loss']:.4f}; "
          f"trained in {seconds:.1f} s")
    print(f"wrote {ckpt} and {os.path.join(args.out, 'metrics.json')}")
    return 0


def _norm(ds):
    mean, std = getattr(ds, "mean", 0.0), getattr(ds, "std", 1.0)
    return {"mean": np.asarray(mean, dtype=float).tolist(), "std": np.asarray(std, dtype=float).tolist()}


def _checkpoint_file(path, which):
    """The checkpoint file `which` ("last" or "best") names for `path`: a run folder gives its model.npz
    or model.best.npz; a file gives itself (last) or its best sibling (model.npz -> model.best.npz)."""
    from .checkpoint import best_path

    if os.path.isdir(path):
        path = os.path.join(path, "model.npz")
    if which == "best" and not path.lower().endswith(".best.npz"):
        best = best_path(path)
        if not os.path.exists(best):
            raise CLIError(f"--which best: there is no best checkpoint {best!r} beside {path!r} (gpu-cnn train "
                           f"writes one; gpu_cnn.save does not)")
        return best
    return path


def _load_model(path, which="last"):
    from .checkpoint import load

    model = load(_checkpoint_file(path, which))
    meta = model.checkpoint_metadata
    _check_normalization(meta.get("normalization", {}), path)
    return model, meta


def _check_normalization(norm, path):
    """The checkpoint's normalisation (mean, std): numbers, finite, std > 0; else a CLIError (a std of 0
    made every probability NaN)."""
    if not isinstance(norm, dict):
        raise CLIError(f"{path}: the checkpoint's normalization metadata is not a mapping: {norm!r}")
    for key, default in (("mean", 0.0), ("std", 1.0)):
        value = norm.get(key, default)
        try:
            a = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise CLIError(f"{path}: the checkpoint's normalization {key} is not a number (or a list of numbers): "
                           f"{value!r}") from None
        if a.ndim > 1 or not np.isfinite(a).all():
            raise CLIError(f"{path}: the checkpoint's normalization {key} must be finite numbers, got {value!r}")
        if key == "std" and (a <= 0).any():
            raise CLIError(f"{path}: the checkpoint's normalization std must be > 0, got {value!r} (dividing by it "
                           f"would give NaN probabilities)")


def _recorded_shape(meta, path):
    """The input shape (C, H, W) that `gpu-cnn train` records in a checkpoint, or None when there is none."""
    shape = meta.get("input_shape")
    if shape is None:
        return None
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise CLIError(f"{path}: the checkpoint's input_shape metadata is not three positive ints: {shape!r}")
    return tuple(shape)


def cmd_evaluate(args):
    from .trainer import Trainer

    _apply_backend(args)
    model, meta = _load_model(args.checkpoint, args.which)
    if not args.dataset and not meta.get("dataset"):
        raise CLIError(f"{args.checkpoint}: the checkpoint does not record which dataset it was trained on "
                       f"(it was not written by gpu-cnn train); pass --dataset")
    args.dataset = args.dataset or meta["dataset"]
    want = _recorded_shape(meta, args.checkpoint)
    _, test = _load_data(args)
    have = tuple(int(s) for s in test.images.shape[1:])
    if want is not None and have != want:
        trained_on = f" (it was trained on {meta['dataset']})" if meta.get("dataset") else ""
        raise CLIError(f"--dataset {args.dataset}: its images are {_shape_text(have)}, but the checkpoint's model "
                       f"takes {_shape_text(want)} input{trained_on}")
    try:
        out = model.output_shape(have)
    except ValueError as exc:
        raise CLIError(f"--dataset {args.dataset}: the checkpoint's model does not accept its "
                       f"{_shape_text(have)} images ({exc})") from exc
    if out[-1] < test.num_classes:
        raise CLIError(f"--dataset {args.dataset}: it has {test.num_classes} classes, but the checkpoint's model "
                       f"outputs {out[-1]}")
    m = Trainer(model, batch_size=args.batch_size, progress=False).evaluate(test)
    print(json.dumps({"test_accuracy": m["accuracy"], "test_loss": m["loss"], "n": m["n"], "dataset": args.dataset}, indent=2))
    return 0


def cmd_predict(args):
    from .nn import Conv2d
    from .trainer import Trainer

    _apply_backend(args)
    model, meta = _load_model(args.checkpoint, args.which)
    img = _read_image(args.image)
    shape = _recorded_shape(meta, args.checkpoint)
    if shape is None:
        # A checkpoint from gpu_cnn.save: no input shape and no normalisation. Take the image as it is,
        # if the model accepts its size; never guess a size to resize to.
        first = model.layers[0] if getattr(model, "layers", None) else None
        channels = first.in_channels if isinstance(first, Conv2d) else 1
        shape = (channels,) + tuple(img.shape[-2:])
        try:
            model.output_shape(shape)
        except ValueError as exc:
            raise CLIError(f"{args.checkpoint}: the checkpoint does not record its input shape (it was not written "
                           f"by gpu-cnn train), and its model does not accept this {_shape_text(img.shape[-2:])} "
                           f"image ({exc}); give an image of the size the model was trained on") from exc
        print(f"note: {args.checkpoint} does not record its input shape or normalisation; the image is used at its "
              f"own size ({_shape_text(shape)})" + ("" if args.raw else ", scaled to [0, 1]"), file=sys.stderr)
    x = _fit_image(img, args.image, shape, meta.get("normalization", {}), raw=args.raw)
    probs = Trainer(model, batch_size=1, progress=False).predict(x[None])[0]
    cls = int(probs.argmax())
    print(f"class {cls}  (p = {probs[cls]:.4f})")
    for i, p in enumerate(probs):
        print(f"  {i}: {p:.4f}")
    return 0


def _read_image(path):
    """A PNG (any format PIL reads, converted to grey, scaled to [0, 1]) or a .npy array -> float32,
    (H, W) or, for a 3-D .npy, (C, H, W); refused with a CLIError naming `path` if unreadable, empty or
    not finite."""
    if os.path.isdir(path):
        raise CLIError(f"{path}: a folder, not an image file (give one PNG or .npy)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    if not os.path.isfile(path):
        raise CLIError(f"{path}: not a regular file (give one PNG or .npy)")
    if path.lower().endswith(".npy"):
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":  # else np.load would try it as a pickle and say so
                raise CLIError(f"{path}: not a .npy file")
        try:
            img = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CLIError(f"{path}: not a readable .npy array ({exc})") from exc
        if img.dtype.kind not in "biuf":
            raise CLIError(f"{path}: expected a numeric image array, got dtype {img.dtype}")
        if img.size == 0:
            raise CLIError(f"{path}: the array is empty (shape {img.shape})")
        if img.ndim not in (2, 3):
            raise CLIError(f"{path}: expected a 2-D image array, got shape {img.shape}")
        img = img.astype(np.float32)
        if not np.isfinite(img).all():
            raise CLIError(f"{path}: the image contains NaN or infinite values")
        return img
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                # 16-bit grey (Pillow's "I;16", or "I" in older versions): scaled by 65535, as 8-bit
                # by 255 (Pillow's own conversion to "L" clips values above 255 instead of scaling)
                return (np.asarray(im, dtype=np.float64) / 65535.0).astype(np.float32)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise CLIError(f"{path}: not a readable image (PNG or .npy)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CLIError(f"{path}: not a readable image (PNG or .npy): {exc}") from exc


def _fit_image(img, path, shape, norm, raw=False):
    """An image from :func:`_read_image` -> (C, H, W) float32 for the model: with `raw`, exactly as given
    (it must already have the model's size); else scaled to [0, 1], resized and normalised like training."""
    c, h, w = shape
    if raw:
        sizes = [(c, h, w)] + ([(h, w)] if c == 1 else [])
        if img.shape not in sizes:
            raise CLIError(f"{path}: --raw needs an array of shape {' or '.join(map(str, sizes))}, the model's "
                           f"input size, got shape {img.shape}")
        return img.reshape(c, h, w)
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 2:
        raise CLIError(f"{path}: expected a 2-D image array, got shape {img.shape}")
    if c != 1:
        raise CLIError(f"{path}: the model takes {c}-channel input; give a .npy of shape {(c, h, w)} with --raw")
    if path.lower().endswith(".npy") and img.max() > 1.0:
        img = img / (255.0 if img.max() > 16 else 16.0)
    if img.shape != (h, w):
        from PIL import Image

        # Resized as float (PIL mode "F"), so negative or fractional values survive.
        img = np.asarray(Image.fromarray(np.ascontiguousarray(img, np.float32)).resize((w, h), Image.BILINEAR),
                         np.float32)
    mean = np.asarray(norm.get("mean", 0.0), np.float32)
    std = np.asarray(norm.get("std", 1.0), np.float32)
    return ((img.reshape(c, h, w) - mean.reshape(-1, 1, 1) if mean.ndim == 1 else img.reshape(c, h, w) - mean) /
            (std.reshape(-1, 1, 1) if std.ndim == 1 else std)).astype(np.float32)


def cmd_bench(args):
    if not args.backend:
        _env_backend()
    argv = ["--backend", args.backend] if args.backend else []
    argv += getattr(args, "rest", [])
    from benchmarks import kernels as kb

    return kb.main(argv)


# --------------------------------------------------------------------------------------------------


def _which_arg(p):
    p.add_argument("--which", choices=("last", "best"), default="last",
                   help="last (default): the model after the last good epoch (model.npz); best: the epoch with "
                        "the lowest validation loss, else training loss (model.best.npz beside it)")


def build_parser():
    ap = argparse.ArgumentParser(prog="gpu-cnn", description="Hand-written Numba CUDA kernels for CNNs: train, evaluate, benchmark.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a CNN and write DIR/model.npz and DIR/metrics.json")
    p.add_argument("--dataset", default=DEFAULTS["dataset"], help="digits (default, bundled), mnist, fashion-mnist, synthetic")
    p.add_argument("--data-dir", help="folder with the IDX files (mnist, fashion-mnist); nothing is downloaded")
    p.add_argument("--model", choices=("lenet5", "digits_cnn"), help="default: digits_cnn for 8×8 data, lenet5 for 28×28")
    p.add_argument("--epochs", type=positive_int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"])
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=DEFAULTS["optimizer"])
    p.add_argument("--seed", type=non_negative_int, default=DEFAULTS["seed"])
    p.add_argument("--out", default="runs/latest", help="output folder (default runs/latest)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _backend_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy of a saved model on a dataset's test split")
    p.add_argument("checkpoint", help="a model.npz written by gpu-cnn train, or its run folder")
    _which_arg(p)
    p.add_argument("--dataset", help="default: the dataset the model was trained on")
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=positive_int, default=256)
    _backend_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify one image (PNG or .npy)")
    p.add_argument("checkpoint", help="a model.npz written by gpu-cnn train, or its run folder")
    _which_arg(p)
    p.add_argument("image", help="PNG (any size, converted to grey and resized) or .npy (2-D array)")
    p.add_argument("--raw", action="store_true", help=".npy is already normalised like the training data")
    _backend_arg(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="kernel benchmarks (python -m benchmarks.kernels)", add_help=False,
                       description="The kernel benchmarks: every option of python -m benchmarks.kernels "
                                   "(gpu-cnn bench --help lists them).")
    _backend_arg(p)  # -h/--help and every other option go on to the benchmark itself
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the CNN explainer's worked example, printed; figures with --out")
    p.add_argument("--out", help="folder to write the explainer's figures (PNG) to")
    _backend_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="backend, GPU and library versions")
    _backend_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("kernels", help="every kernel's registers, shared memory and spills (ptxas)")
    p.add_argument("--arch", choices=("sm_80", "sm_90"), default="sm_90", help="sm_80 or sm_90 (default)")
    p.set_defaults(func=cmd_kernels)
    return ap


def main(argv=None):
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if rest and getattr(args, "func", None) is not cmd_bench:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    if not getattr(args, "func", None):
        ap.print_help()
        return 1
    from .backend import BackendError

    try:
        return args.func(args) or 0
    except (BackendError, OSError, ValueError) as exc:  # OSError: unwritable folders, unreadable files
        print(f"gpu-cnn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
