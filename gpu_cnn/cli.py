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


def _backend_arg(p):
    p.add_argument("--backend", choices=("cuda", "sim", "cpu"), default=None,
                   help="compute backend (default: $GPU_CNN_BACKEND, else cuda when a GPU is present, else cpu)")


def _apply_backend(args):
    import gpu_cnn

    if getattr(args, "backend", None):
        gpu_cnn.set_backend(args.backend)
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
    print(f"cupy         {_version('cupy-cuda12x') or _version('cupy') or 'not installed'}")
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
    return data.load_dataset(args.dataset, **kw)


def cmd_train(args):
    from . import models
    from .checkpoint import save
    from .trainer import Trainer, TrainingError

    backend = _apply_backend(args)
    train, test = _load_data(args)
    model_name = args.model or ("digits_cnn" if train.images.shape[-1] <= 10 else "lenet5")
    model = models.get_model(model_name, num_classes=train.num_classes, seed=args.seed)
    input_shape = tuple(int(s) for s in train.images.shape[1:])
    model.output_shape(input_shape)  # clear error now if the model does not fit the data
    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, "model.npz")
    meta = {"dataset": args.dataset, "model": model_name, "input_shape": list(input_shape),
            "num_classes": int(train.num_classes), "normalization": _norm(train)}
    trainer = Trainer(model, optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      progress=False if args.quiet else None, checkpoint_path=ckpt, metadata=meta)
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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    m = trainer.evaluate(test)
    metrics = {"test_accuracy": m["accuracy"], "test_loss": m["loss"], "train_seconds": seconds,
               "epochs": args.epochs, "backend": backend, "dataset": args.dataset, "model": model_name,
               "optimizer": args.optimizer, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
               "images_per_second": len(train.labels) * args.epochs / seconds, "history": trainer.history}
    save(model, ckpt, metadata=dict(meta, metrics={k: v for k, v in metrics.items() if k != "history"}))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"test accuracy {m['accuracy']:.4f} ({m['n']} images), loss {m['loss']:.4f}; "
          f"trained in {seconds:.1f} s")
    print(f"wrote {ckpt} and {os.path.join(args.out, 'metrics.json')}")
    return 0


def _norm(ds):
    mean, std = getattr(ds, "mean", 0.0), getattr(ds, "std", 1.0)
    return {"mean": np.asarray(mean, dtype=float).tolist(), "std": np.asarray(std, dtype=float).tolist()}


def _load_model(path):
    from .checkpoint import load

    model = load(path)
    return model, model.checkpoint_metadata


def cmd_evaluate(args):
    from .trainer import Trainer

    _apply_backend(args)
    model, meta = _load_model(args.checkpoint)
    args.dataset = args.dataset or meta.get("dataset", "digits")
    _, test = _load_data(args)
    m = Trainer(model, batch_size=args.batch_size, progress=False).evaluate(test)
    print(json.dumps({"test_accuracy": m["accuracy"], "test_loss": m["loss"], "n": m["n"], "dataset": args.dataset}, indent=2))
    return 0


def cmd_predict(args):
    from .trainer import Trainer

    _apply_backend(args)
    model, meta = _load_model(args.checkpoint)
    shape = tuple(meta.get("input_shape", (1, 8, 8)))
    x = _read_image(args.image, shape, meta.get("normalization", {}), raw=args.raw)
    probs = Trainer(model, batch_size=1, progress=False).predict(x[None])[0]
    cls = int(probs.argmax())
    print(f"class {cls}  (p = {probs[cls]:.4f})")
    for i, p in enumerate(probs):
        print(f"  {i}: {p:.4f}")
    return 0


def _read_image(path, shape, norm, raw=False):
    """A PNG or .npy image -> (C, H, W) float32, scaled to [0, 1], resized and normalised like training."""
    c, h, w = shape
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    if path.lower().endswith(".npy"):
        img = np.load(path, allow_pickle=False).astype(np.float32)
        if img.ndim == 3 and img.shape[0] == 1:
            img = img[0]
        if img.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D image array, got shape {img.shape}")
        if raw:
            return img.reshape(c, h, w)
        if img.max() > 1.0:
            img = img / (255.0 if img.max() > 16 else 16.0)
    else:
        from PIL import Image

        with Image.open(path) as im:
            img = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if img.shape != (h, w):
        from PIL import Image

        img = np.asarray(Image.fromarray((img * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR), np.float32) / 255.0
    mean = np.asarray(norm.get("mean", 0.0), np.float32)
    std = np.asarray(norm.get("std", 1.0), np.float32)
    return ((img.reshape(c, h, w) - mean.reshape(-1, 1, 1) if mean.ndim == 1 else img.reshape(c, h, w) - mean) /
            (std.reshape(-1, 1, 1) if std.ndim == 1 else std)).astype(np.float32)


def cmd_bench(args):
    argv = ["--backend", args.backend] if args.backend else []
    argv += getattr(args, "rest", [])
    from benchmarks import kernels as kb

    return kb.main(argv)


# --------------------------------------------------------------------------------------------------


def build_parser():
    ap = argparse.ArgumentParser(prog="gpu-cnn", description="Hand-written Numba CUDA kernels for CNNs: train, evaluate, benchmark.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a CNN and write DIR/model.npz and DIR/metrics.json")
    p.add_argument("--dataset", default=DEFAULTS["dataset"], help="digits (default, bundled), mnist, fashion-mnist, synthetic")
    p.add_argument("--data-dir", help="folder with the IDX files (mnist, fashion-mnist); nothing is downloaded")
    p.add_argument("--model", choices=("lenet5", "digits_cnn"), help="default: digits_cnn for 8×8 data, lenet5 for 28×28")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=DEFAULTS["optimizer"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--out", default="runs/latest", help="output folder (default runs/latest)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _backend_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy of a saved model on a dataset's test split")
    p.add_argument("checkpoint", help="a model.npz written by gpu-cnn train")
    p.add_argument("--dataset", help="default: the dataset the model was trained on")
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=int, default=256)
    _backend_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify one image (PNG or .npy)")
    p.add_argument("checkpoint", help="a model.npz written by gpu-cnn train")
    p.add_argument("image", help="PNG (any size, converted to grey and resized) or .npy (2-D array)")
    p.add_argument("--raw", action="store_true", help=".npy is already normalised like the training data")
    _backend_arg(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="kernel benchmarks (python -m benchmarks.kernels)")
    _backend_arg(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the CNN explainer's worked example, printed; figures with --out")
    p.add_argument("--out", help="folder to write the explainer's figures (PNG) to")
    _backend_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="backend, GPU and library versions")
    _backend_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("kernels", help="every kernel's registers, shared memory and spills (ptxas)")
    p.add_argument("--arch", default="sm_90", help="sm_80 or sm_90 (default)")
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
    except (BackendError, FileNotFoundError, ValueError) as exc:
        print(f"gpu-cnn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
