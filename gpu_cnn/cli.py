"""The ``gpu-cnn`` command line: train, evaluate, predict, bench, demo, info, kernels."""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

DEFAULTS = {  # the embedded default run: sklearn's digits, no download, no GPU needed
    "dataset": "digits", "model": None, "epochs": 15, "batch_size": 32, "lr": None,
    "optimizer": "adam", "seed": 0, "val_split": 0.1,
}

# The learning rate each optimizer gets when --lr is not given (they need different scales).
DEFAULT_LR = {"sgd": 0.05, "adam": 0.003, "adamw": 0.003}

# Training settings a model gets when the command line does not give them (else DEFAULTS and DEFAULT_LR).
# A model's lr and weight_decay belong to its optimizer: `--model lenet5 --optimizer adam` gets adam's
# defaults. lenet5: chosen on validation splits of the digits' training part (20% held out, 10 splits
# and seeds, the test split unread): with adam 3e-3 it fits the training part by epoch 11 and its
# validation accuracy then wanders from epoch to epoch (15 epochs: 98.3% ± 0.9 over the splits); SGD
# with momentum and weight decay settles, and still gains a little from 15 to 30 epochs (98.5%, 98.8%;
# measured with 6 and 16 channels, the small-input lenet5 that has 12 and 32 now gave 98.9%).
# They were chosen for lenet5's small-input geometry (below 12×12, the digits); at 28×28 (MNIST, 60,000
# images: 30 epochs would take twice as long as the general 15) lenet5 keeps the general defaults.
MODEL_TRAIN_DEFAULTS = {"lenet5": {"epochs": 30, "optimizer": "sgd", "lr": 0.02, "weight_decay": 1e-3}}
SMALL_INPUT_ONLY = {"lenet5": 12}  # model -> the image side below which its MODEL_TRAIN_DEFAULTS apply

MODEL_FITS = ("digits_cnn fits 8×8 (digits) and 10×10 (synthetic) images, lenet5 28×28 (mnist, fashion-mnist; it "
              "adapts to small images such as the digits), resnet8 and mobilenet_tiny any size")


# The input each built-in model was designed for (channels, height, width).
MODEL_INPUT = {"lenet5": (1, 28, 28), "digits_cnn": (1, 8, 8)}


from .data import DATASETS  # noqa: E402  (pure NumPy: no Numba, no backend chosen)


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


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative finite number, got {text!r}") from None
    if not (np.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a non-negative finite number, got {text!r}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's default in its help: "(default: X)" unless the help already says it; flags say off."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None:
            return text
        if action.default is False:
            return text + " (default: off)"
        return text + " (default: %(default)s)"


def fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _model_names():
    from .models import MODELS

    return tuple(MODELS)


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
    cmd += ["--json"] if args.json else []
    for text in args.only or ():
        cmd += ["--only", text]
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


SIM_PRESET = {"train_images": 8, "val_images": 4, "test_images": 4, "batch_size": 4, "epochs": 1}
SIM_PRESET_SECONDS = 60  # the most the preset takes on 2 busy CPU cores; README and --help say so


def _sim_model(input_shape, num_classes, seed):
    from . import nn
    from .models import OUTPUT_INIT_SCALE

    if seed is not None:
        nn.manual_seed(seed)
    c, h, w = input_shape
    model = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * (h // 2) * (w // 2), num_classes))
    out = model.layers[-1].weight
    out.assign(out.numpy() * OUTPUT_INIT_SCALE)
    return model


RUN_FILES = ("model.npz", "metrics.json", "curves.png", "confusion.png")


def _next_run_dir(root="runs", prefix="train-"):
    """runs/train-001, runs/train-002, ...: the first number above every existing one (never an earlier run)."""
    taken = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                taken.append(int(name[len(prefix):]))
    return os.path.join(root, f"{prefix}{max(taken, default=0) + 1:03d}")


def _point_latest(out, root="runs"):
    """runs/latest -> the newest run (a symlink; an existing real folder of that name is left alone)."""
    link = os.path.join(root, "latest")
    if os.path.abspath(os.path.dirname(os.path.abspath(out))) != os.path.abspath(root):
        return None
    try:
        if os.path.islink(link):
            os.unlink(link)
        elif os.path.exists(link):
            return None
        os.symlink(os.path.basename(os.path.normpath(out)), link)
        return link
    except OSError:
        return None


def _check_run_folder(out, overwrite):
    """An --out that already holds a run is refused unless --overwrite."""
    if os.path.isdir(out) and not overwrite:
        held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
        if held:
            raise CLIError(f"--out: {out!r} already holds a run ({', '.join(held)}); pass --overwrite to replace "
                           f"it, or choose another --out (without --out each run gets a new runs/train-NNN)")


def cmd_train(args):
    from . import models, viz
    from .checkpoint import save
    from .trainer import Trainer, TrainingError

    say = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))
    default_out = args.out is None
    out = _next_run_dir() if default_out else args.out
    _check_out(out)  # before the data are loaded: a refused run writes nothing
    _check_run_folder(out, args.overwrite)
    if args.nproc > 1 or _distributed_launch():  # data-parallel: launch the ranks, or join as one
        from . import distributed

        if distributed.launched_size() == 1:
            if default_out:  # every rank writes (rank 0) into the same, new folder
                args.argv = list(args.argv) + ["--out", out]
            return _launch_ranks(args)
    backend = _apply_backend(args)
    root = _join_ranks()  # before any device memory: each rank picks its GPU
    if not root:
        say = lambda *a, **k: None  # noqa: E731  (only rank 0 prints and writes)
    train, test = _load_data(args)
    input_shape = tuple(int(s) for s in train.images.shape[1:])
    preset = backend == "sim" and not args.yes
    if preset:
        p = SIM_PRESET
        model_name, epochs, batch_size = "sim_tiny", p["epochs"], p["batch_size"]
        model = _sim_model(input_shape, train.num_classes, args.seed)
        train, test = train[:p["train_images"] + p["val_images"]], test[:p["test_images"]]
        val_split = p["val_images"] / len(train)
        say(f"backend sim: the CUDA simulator runs one Python thread per GPU thread, so this is a tiny preset "
            f"(~{SIM_PRESET_SECONDS} s or less): a 4-filter CNN, {p['train_images']} training images in batches of "
            f"{batch_size}, {p['val_images']} validation and {p['test_images']} test images, {epochs} epoch. Pass "
            f"--yes to run the full settings on the simulator anyway (hours).")
    else:
        model_name, batch_size, val_split = args.model or _default_model(input_shape), args.batch_size, args.val_split
        epochs = train_settings(args, model_name, input_shape)["epochs"]
        model = models.get_model(model_name, num_classes=train.num_classes, seed=args.seed,
                                 input_shape=input_shape)
    try:
        model.output_shape(input_shape)  # clear error now if the model does not fit the data
    except ValueError as exc:
        option = f"--model {model_name}" if args.model else f"--dataset {args.dataset}"
        need = MODEL_INPUT.get(model_name)
        raise CLIError(f"{option}: {model_name} " + (f"needs {_shape_text(need)} input" if need else
                       "does not take this input") + f", but the {args.dataset} images are "
                       f"{_shape_text(input_shape)} ({exc}); {MODEL_FITS}") from exc
    if val_split > 0:
        fit_part, val_part = train.split(val_split, seed=args.seed)
    else:
        fit_part, val_part = train, None
    ckpt = os.path.join(out, "model.npz")
    meta = {"dataset": args.dataset, "model": model_name, "input_shape": list(input_shape),
            "num_classes": int(train.num_classes), "normalization": _norm(train)}
    settings = train_settings(args, model_name, input_shape)
    optimizer, lr = settings["optimizer"], settings["lr"]
    trainer = Trainer(model, optimizer=optimizer, lr=lr, batch_size=batch_size, seed=args.seed,
                      weight_decay=settings["weight_decay"],
                      progress=False if args.quiet else None, checkpoint_path=ckpt, metadata=meta)
    if root:
        os.makedirs(out, exist_ok=True)  # only now: a refused run leaves no folder behind
    weight_decay = float(trainer.optimizer.weight_decay)  # the optimizer's own default when not set
    val_text = f"{len(val_part)} validation" if val_part is not None else "no validation"
    say(f"training {model_name} on {args.dataset} ({len(fit_part)} train / {val_text} / {len(test)} test images) "
        f"with {optimizer}, lr={lr:g}, weight decay {weight_decay:g}, batch {batch_size}, {epochs} epoch{'s' if epochs != 1 else ''}, backend {backend}")
    t0 = time.perf_counter()
    try:
        for epoch in range(epochs):
            row = trainer.fit(fit_part, epochs=1, val_data=val_part)[-1]
            line = (f"epoch {row['epoch']:3d}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}")
            if "val_loss" in row:
                line += f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
            say(line + f"  ({row['seconds']:.1f} s)")
    except TrainingError as exc:
        if root:
            print(f"gpu-cnn train: error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    m, pred = _evaluate_and_predict(trainer, test)
    ranks = trainer.dp.size if getattr(trainer, "dp", None) else 1
    if not root:
        return 0
    metrics = {"test_accuracy": m["accuracy"], "test_loss": m["loss"], "train_seconds": seconds,
               "epochs": epochs, "backend": backend, "dataset": args.dataset, "model": model_name,
               "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "seed": args.seed,
               "val_split": val_split, "train_images": len(fit_part),
               "val_images": 0 if val_part is None else len(val_part), "sim_preset": preset,
               "images_per_second": len(fit_part) * epochs / seconds, "ranks": ranks,
               "history": trainer.history}
    save(model, ckpt, metadata=dict(meta, metrics={k: v for k, v in metrics.items() if k != "history"},
                                    checkpoint="last", epoch=len(trainer.history)))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    title = f"{model_name} on {args.dataset}"
    viz.training_curves(trainer.history, title=f"{title}: training curves", save=os.path.join(out, "curves.png"))
    viz.confusion_matrix(test.labels, pred, class_names=test.classes, title=f"{title}, test split",
                         save=os.path.join(out, "confusion.png"))
    latest = _point_latest(out) if default_out else None
    say(f"test accuracy {m['accuracy']:.4f} ({m['n']} images), loss {m['loss']:.4f}; trained in {seconds:.1f} s "
        f"({metrics['images_per_second']:.0f} images/s{f' over {ranks} ranks' if ranks > 1 else ''})")
    say(f"wrote {out}/: model.npz, metrics.json, curves.png, confusion.png" +
        (f" ({latest} points to it)" if latest else ""))
    return 0


def _evaluate_and_predict(trainer, ds):
    """Trainer.evaluate's {"loss", "accuracy", "n"} and the predicted classes, from one forward pass."""
    probs = trainer.predict(ds.images)
    picked = np.clip(probs[np.arange(len(ds.labels)), ds.labels], np.finfo(np.float32).tiny, None)
    pred = probs.argmax(axis=1)
    return ({"loss": float(-np.log(picked.astype(np.float64)).mean()), "accuracy": float((pred == ds.labels).mean()),
             "n": int(len(ds.labels))}, pred)


def train_settings(args, model_name, input_shape=None):
    """{"epochs", "optimizer", "lr", "weight_decay"} for a run: what the command line gave, else the
    model's MODEL_TRAIN_DEFAULTS (for lenet5 only on images below SMALL_INPUT_ONLY's side), else DEFAULTS /
    DEFAULT_LR. The model's lr and weight decay come only with its own optimizer; weight_decay None leaves
    the optimizer's default (adamw 0.01, else 0)."""
    own = MODEL_TRAIN_DEFAULTS.get(model_name, {})
    side = SMALL_INPUT_ONLY.get(model_name)
    if side is not None and input_shape is not None and min(input_shape[-2:]) >= side:
        own = {}
    epochs = args.epochs if args.epochs is not None else own.get("epochs", DEFAULTS["epochs"])
    optimizer = args.optimizer if args.optimizer is not None else own.get("optimizer", DEFAULTS["optimizer"])
    mine = own if optimizer == own.get("optimizer") else {}
    lr = args.lr if args.lr is not None else mine.get("lr", DEFAULT_LR[optimizer])
    weight_decay = args.weight_decay if args.weight_decay is not None else mine.get("weight_decay")
    return {"epochs": epochs, "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay}


def _default_help(key, general):
    """'(default: GENERAL; per model: lenet5 X)' for the help of a setting MODEL_TRAIN_DEFAULTS may set;
    a model's lr and weight decay are shown with the optimizer they come with."""
    parts = []
    for name, own in MODEL_TRAIN_DEFAULTS.items():
        if key in own:
            value = own[key] if isinstance(own[key], str) else f"{own[key]:g}"
            small = f" below {SMALL_INPUT_ONLY[name]}×{SMALL_INPUT_ONLY[name]}" if name in SMALL_INPUT_ONLY else ""
            parts.append(f"{name}{small} {value}" + (f" with {own['optimizer']}" if key in ("lr", "weight_decay") else ""))
    return f"(default: {general}" + (f"; per model: {', '.join(parts)}" if parts else "") + ")"


def _default_model(input_shape):
    return "digits_cnn" if input_shape[-1] <= 10 else "lenet5"


def _distributed_launch():
    """True inside one of several ranks started by mpiexec/srun (or by --nproc)."""
    from . import distributed

    return distributed.launched_size() > 1


def _launch_ranks(args):
    """gpu-cnn train --nproc N: the same command as N local ranks under mpiexec."""
    import subprocess

    from . import distributed

    argv, skip = [], False
    for a in args.argv:  # the command line again, without --nproc
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    cmd = distributed.launch_command(args.nproc, argv)
    print(f"launching {args.nproc} ranks: {' '.join(cmd)}", flush=True)
    env = dict(os.environ, **{distributed.ENV_DISTRIBUTED: "1"})
    return subprocess.call(cmd, env=env)


def _join_ranks():
    """Join the MPI world when launched as a rank; True on rank 0 (or without MPI)."""
    if not _distributed_launch():
        return True
    from . import distributed

    os.environ[distributed.ENV_DISTRIBUTED] = "1"  # the Trainer then trains data-parallel
    return distributed.init()[0] == 0


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
    trainer = Trainer(model, batch_size=args.batch_size, progress=False)
    m = trainer.evaluate(test)
    pred = trainer.predict(test.images).argmax(axis=1)
    per_class = []
    for k in range(test.num_classes):
        mine = test.labels == k
        n, right = int(mine.sum()), int((pred[mine] == k).sum())
        name = str(test.classes[k]) if getattr(test, "classes", None) is not None and k < len(test.classes) else str(k)
        per_class.append({"class": k, "name": name, "images": n, "correct": right,
                          "accuracy": right / n if n else None,
                          "predicted_as_this": int((pred == k).sum())})
    if args.json:
        print(json.dumps({"test_accuracy": m["accuracy"], "test_loss": m["loss"], "n": m["n"], "dataset": args.dataset,
                          "checkpoint": args.checkpoint, "per_class": per_class}, indent=2))
        return 0
    print(f"{args.checkpoint} on the {args.dataset} test split: accuracy {m['accuracy']:.4f} "
          f"({sum(r['correct'] for r in per_class)} of {m['n']} images), loss {m['loss']:.4f}")
    width = max(5, max(len(r["name"]) for r in per_class))
    print(f"{'class':>{width}}  images  correct  accuracy  predicted as it")
    for r in per_class:
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        print(f"{r['name']:>{width}}  {r['images']:6d}  {r['correct']:7d}  {acc:>8}  {r['predicted_as_this']:15d}")
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
    notes = list(getattr(img, "notes", ()))
    x = _fit_image(img, args.image, shape, meta.get("normalization", {}), raw=args.raw, invert=args.invert,
                   notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    probs = Trainer(model, batch_size=1, progress=False).predict(x[None])[0]
    cls = int(probs.argmax())
    print(f"class {cls}  (p = {probs[cls]:.4f})")
    for i, p in enumerate(probs):
        print(f"  {i}: {p:.4f}")
    if args.show:
        from . import viz

        viz.prediction(x, probs, title=f"{os.path.basename(args.image)}: class {cls} (p = {probs[cls]:.2f})",
                       notes=notes, save=args.show)
        print(f"wrote {args.show}")
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
            return _grey(im)
    except UnidentifiedImageError:
        raise CLIError(f"{path}: not a readable image (PNG or .npy)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CLIError(f"{path}: not a readable image (PNG or .npy): {exc}") from exc


class _Image(np.ndarray):
    """A float32 image array that carries the notes made while reading it (``.notes``)."""


def _grey(im):
    """A PIL image -> (H, W) float32 in [0, 1]. A transparent image (an alpha channel that is not all
    opaque) is composited on a background that contrasts with its ink, so the digit survives: dark ink on
    white, light ink on black (the grey conversion alone would drop the alpha and lose a black digit on a
    transparent background)."""
    notes = []
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3]
        if alpha.min() < 1.0:
            grey = np.asarray(im.convert("RGBA").convert("L"), dtype=np.float32) / 255.0
            ink = alpha > 0.5
            dark_ink = bool(ink.any()) and float(np.median(grey[ink])) < 0.5
            background = 1.0 if dark_ink else 0.0
            notes.append(f"the image is transparent ({im.mode}): composited on "
                         f"{'white' if dark_ink else 'black'}, which contrasts with its {'dark' if dark_ink else 'light'} ink")
            out = (grey * alpha + background * (1.0 - alpha)).astype(np.float32)
            out = out.view(_Image)
            out.notes = notes
            return out
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (Pillow's "I;16", or "I" in older versions): scaled by 65535, as 8-bit by 255
        # (Pillow's own conversion to "L" clips values above 255 instead of scaling)
        return (np.asarray(im, dtype=np.float64) / 65535.0).astype(np.float32)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _is_dark_on_light(img):
    """True when the image's border (its outer ring of pixels), in [0, 1], is mostly light: a dark digit on
    a light background, the opposite of the training data (light strokes on a dark background)."""
    if img.ndim != 2 or min(img.shape) < 3:
        return False
    ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    return float(np.median(ring)) > 0.5


def _fit_image(img, path, shape, norm, raw=False, invert=None, notes=None):
    """An image from :func:`_read_image` -> (C, H, W) float32 for the model: with `raw`, exactly as given
    (it must already have the model's size); else scaled to [0, 1], inverted when it is dark on light
    (`invert` None: detected from its border; True/False: forced), resized and normalised like training.
    What was done is appended to `notes` (a list) when given."""
    notes = [] if notes is None else notes
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
    img = np.asarray(img, np.float32)
    dark_on_light = _is_dark_on_light(img)
    if invert is None and dark_on_light:
        notes.append("the image is dark on a light background (the model was trained on light strokes on dark): "
                     "inverted it (--no-invert to keep it as it is)")
        img = 1.0 - img
    elif invert:
        notes.append("inverted the image (--invert)")
        img = 1.0 - img
    elif invert is False and dark_on_light:
        notes.append("the image looks dark on light, but --no-invert keeps it as it is")
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
    rest = getattr(args, "rest", [])
    if rest[:1] == ["host"]:  # the host-overhead benchmark: under the simulator, so in a process of its own
        import subprocess

        env = dict(os.environ, GPU_CNN_BACKEND="sim", NUMBA_ENABLE_CUDASIM="1")
        code = ("import sys; from benchmarks import host; "
                "sys.exit(host.main(sys.argv[1:], prog='gpu-cnn bench host', results_root='runs/bench'))")
        return subprocess.call([sys.executable, "-c", code, *rest[1:]], env=env)
    if not args.backend:
        _env_backend()
    argv = ["--backend", args.backend] if args.backend else []
    argv += getattr(args, "rest", [])
    from benchmarks import kernels as kb

    return kb.main(argv, prog="gpu-cnn bench", results_root=os.path.join("runs", "bench"))


# --------------------------------------------------------------------------------------------------


def _which_arg(p):
    p.add_argument("--which", choices=("last", "best"), default="last",
                   help="last (default): the model after the last good epoch (model.npz); best: the epoch with "
                        "the lowest validation loss, else training loss (model.best.npz beside it)")


def build_parser():
    import gpu_cnn

    fmt = _DefaultsFormatter
    ap = argparse.ArgumentParser(prog="gpu-cnn", description="Hand-written Numba CUDA kernels for CNNs: train, "
                                 "evaluate, predict, benchmark. Start with: gpu-cnn train")
    ap.add_argument("--version", action="version", version=f"gpu-cnn {gpu_cnn.__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a CNN; writes model.npz, metrics.json, curves.png, confusion.png",
                       formatter_class=fmt, epilog=f"Models: {MODEL_FITS}. Backend sim runs a tiny preset "
                       f"(~{SIM_PRESET_SECONDS} s or less: a 4-filter CNN, {SIM_PRESET['train_images']} training images) "
                       f"unless --yes.")
    p.add_argument("--dataset", default=DEFAULTS["dataset"], choices=DATASETS,
                   help="digits is bundled (8×8); mnist and fashion-mnist read IDX files from --data-dir (28×28); "
                        "synthetic is drawn (10×10)")
    p.add_argument("--data-dir", help="folder with the IDX files (mnist, fashion-mnist); nothing is downloaded (default: none)")
    p.add_argument("--model", choices=_model_names(),
                   help=f"default: digits_cnn for images up to 10×10, else lenet5 ({MODEL_FITS})")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="passes over the training data " + _default_help("epochs", DEFAULTS["epochs"]))
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"], help="images per step")
    p.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"],
                   help="learning rate " + _default_help("lr", ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())))
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=None,
                   help="sgd has momentum 0.9 " + _default_help("optimizer", DEFAULTS["optimizer"]))
    p.add_argument("--weight-decay", type=non_negative_float, default=None,
                   help="L2 penalty on the weights (adamw's decoupled: p *= 1 - lr·weight_decay) " +
                        _default_help("weight_decay", "the optimizer's: adamw 0.01, sgd and adam 0"))
    p.add_argument("--val-split", type=fraction, default=DEFAULTS["val_split"],
                   help="fraction of the training data held out for validation (0: none); the test split is "
                        "never used for it")
    p.add_argument("--seed", type=non_negative_int, default=DEFAULTS["seed"],
                   help="initialisation, shuffling and the validation split")
    p.add_argument("--out", default=None,
                   help="output folder (default: a new runs/train-NNN, with runs/latest pointing to it)")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace an earlier run in that folder")
    p.add_argument("--yes", action="store_true",
                   help="on backend sim: run the full settings instead of the tiny preset (hours)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="data-parallel over N local ranks via mpiexec (the batch size is global); "
                        "clusters: mpiexec -n N gpu-cnn train ...")
    _backend_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy of a saved model on a dataset's test split, per class",
                       formatter_class=fmt)
    p.add_argument("checkpoint", help="a model.npz written by gpu-cnn train, or its run folder")
    _which_arg(p)
    p.add_argument("--dataset", help="default: the dataset the model was trained on")
    p.add_argument("--data-dir", help="folder with the IDX files (mnist, fashion-mnist) (default: none)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of text")
    _backend_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify one image (PNG or .npy)", formatter_class=fmt)
    p.add_argument("checkpoint", help="a model.npz written by gpu-cnn train, or its run folder")
    _which_arg(p)
    p.add_argument("image", help="PNG (any size, 8- or 16-bit, converted to grey and resized; transparent ones "
                                 "composited) or .npy (2-D array)")
    p.add_argument("--raw", action="store_true", help=".npy is already normalised like the training data")
    p.add_argument("--invert", action=argparse.BooleanOptionalAction, default=None,
                   help="invert the image (dark digit on light); default: detected from the image's border")
    p.add_argument("--show", metavar="FILE", help="write a PNG of the input as the model sees it, beside the "
                                                  "probabilities (default: none)")
    _backend_arg(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="kernel benchmarks (gpu-cnn bench --help lists the options); "
                                     "gpu-cnn bench host: a training step's host overhead, no GPU needed",
                       add_help=False,
                       description="The kernel benchmarks (benchmarks/kernels.py); `gpu-cnn bench host [--help]`: "
                                   "the host overhead of a training step (benchmarks/host.py). Results go to "
                                   "runs/bench/<device>-<date>/ unless --out.")
    _backend_arg(p)  # -h/--help and every other option go on to the benchmark itself
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the CNN explainer's worked example, printed; figures with --out")
    p.add_argument("--out", help="folder to write the explainer's figures (PNG) to (default: none, text only)")
    _backend_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="backend, GPU and library versions")
    _backend_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("kernels", help="every kernel's registers, shared memory, spills, occupancy and "
                                       "hot-loop instruction mix (ptxas + nvdisasm, no GPU needed)")
    p.add_argument("--arch", choices=("sm_80", "sm_90"), default="sm_90", help="sm_80 or sm_90 (default)")
    p.add_argument("--json", action="store_true", help="write the full report as JSON")
    p.add_argument("--only", action="append", metavar="TEXT", help="only kernels whose name contains TEXT (repeatable)")
    p.set_defaults(func=cmd_kernels)
    return ap


def main(argv=None):
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if rest and getattr(args, "func", None) is not cmd_bench:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 1
    from .backend import BackendError

    try:
        try:
            return args.func(args) or 0
        finally:
            sys.stdout.flush()  # a closed pipe shows up here, inside the BrokenPipeError handler below
    except BrokenPipeError:
        # `gpu-cnn predict ... | head -2`: the reader left; stop quietly, as command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (BackendError, OSError, ValueError) as exc:  # OSError: unwritable folders, unreadable files
        print(f"gpu-cnn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
