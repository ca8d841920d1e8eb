"""Training throughput: LeNet-5 on MNIST-shaped data, this project's Trainer against PyTorch eager.

    python -m benchmarks.train                         # backend: $GPU_CNN_BACKEND, else cuda if present, else cpu
    python -m benchmarks.train --backend cuda          # vs PyTorch on the GPU (cuDNN, cuBLAS; fp32, TF32 off)
    python -m benchmarks.train --backend cpu           # vs PyTorch on the CPU (its default thread count)
    python -m benchmarks.train --batch-sizes 128,512 --windows 7 --steps 50
    python -m benchmarks.train --backend sim --check   # correctness only, a tiny network (the simulator cannot time)

What is measured, per batch size:

* gpu_cnn: ``Trainer(lenet5(10), "sgd", lr, batch_size, momentum 0.9).train_step(x, y)`` -- the public
  API -- on batches already on the device (numba device arrays; NumPy on cpu); it returns the loss and
  the number correct as Python numbers.
* PyTorch: the same Sequential, the same initial weights, ``torch.optim.SGD(lr, momentum=0.9)``, the
  data already on the device; each step ends with ``loss.item()`` and the number correct ``.item()``,
  as train_step returns them (both sides synchronise with the device once per step).

Data: random images (1×28×28, standard normal) and labels (10 classes), a few distinct batches rotated.
Correctness first: the first step's loss is compared with a float64 NumPy forward of the same weights,
and (when PyTorch is there) the second step's loss -- after one SGD step on each side -- with PyTorch's.
Then a warm-up, then ``--windows`` timed windows of ``--steps`` steps each, gpu_cnn and PyTorch windows
interleaved so that drift on a shared machine hits both; the median step time over the windows gives
images/s = batch / step time. ratio = gpu_cnn images/s ÷ PyTorch images/s (1.00 = as fast).
"""
import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from . import common as C

IMAGE = (1, 28, 28)
CLASSES = 10
LR = 0.01
MOMENTUM = 0.9
LOSS_RTOL = 1e-4  # float32 forward of LeNet-5 vs float64: ~1e-6 relative
STEP2_RTOL = 1e-3  # after one SGD step on each side (different float32 summation orders): ~1e-5


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("cuda", "cpu", "sim"), default=None)
    ap.add_argument("--batch-sizes", default="128,512", help="comma-separated (default 128,512)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per side (default 20 on cuda, 3 on cpu)")
    ap.add_argument("--windows", type=int, default=None, help="timed windows per side (default 11)")
    ap.add_argument("--steps", type=int, default=None, help="steps per window (default 50 on cuda, 10 on cpu)")
    ap.add_argument("--batches", type=int, default=4, help="distinct random batches rotated (default 4)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>-<date>/)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--check", action="store_true", help="correctness only (a tiny network under sim), no timing")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batch-sizes: expected comma-separated ints, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        ap.error("--batch-sizes: expected positive ints")
    return args


# ---------------------------------------------------------------------------------------------------
# the two sides


def make_batches(rng, batch, count, image=IMAGE):
    xs = [rng.standard_normal((batch, *image), dtype=np.float32) for _ in range(count)]
    ys = [rng.integers(0, CLASSES, batch).astype(np.int64) for _ in range(count)]
    return xs, ys


class Ours:
    def __init__(self, model_fn, batch, seed):
        from gpu_cnn.trainer import Trainer

        self.model = model_fn()
        self.state0 = {k: np.array(v) for k, v in self.model.state_dict().items()}
        self.trainer = Trainer(self.model, optimizer="sgd", lr=LR, batch_size=batch, seed=seed,
                               momentum=MOMENTUM, progress=False)

    def to_device(self, xs, ys):
        """The batches where the model runs: device arrays on cuda (labels int32), NumPy on cpu."""
        import gpu_cnn

        if gpu_cnn.get_backend() == "cpu":
            return xs, ys
        from numba import cuda

        return [cuda.to_device(x) for x in xs], [cuda.to_device(y.astype(np.int32)) for y in ys]

    def step(self, x, y):
        return self.trainer.train_step(x, y)

    def sync(self):
        import gpu_cnn

        if gpu_cnn.get_backend() == "cuda":
            from numba import cuda

            cuda.synchronize()


class Torch:
    def __init__(self, T, spec, state0, device):
        self.T, self.device = T, device
        self.model = C.torch_sequential(T, spec).to(device)
        self.loaded = True
        try:
            self.model.load_state_dict({k: T.from_numpy(np.ascontiguousarray(v)) for k, v in state0.items()})
        except Exception as exc:  # keys differ: time it anyway, with PyTorch's own initial weights
            self.loaded = f"{type(exc).__name__}: {exc}"
        self.opt = T.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)

    def to_device(self, xs, ys):
        T = self.T
        return ([T.from_numpy(x).to(self.device) for x in xs], [T.from_numpy(y).to(self.device) for y in ys])

    def step(self, x, y):
        T = self.T
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = T.nn.functional.cross_entropy(logits, y)
        loss.backward()
        self.opt.step()
        return loss.item(), int((logits.argmax(1) == y).sum().item())

    def sync(self):
        if self.device == "cuda":
            self.T.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------


def check(ours, torch_side, xs, ys, spec):
    """First-step loss vs float64; second-step loss vs PyTorch. Returns a dict; raises on a mismatch."""
    ref = C.sequential_loss_ref(spec, ours.state0, xs[0], ys[0])
    xs, ys = ours.to_device(xs[:2], ys[:2])  # as timed: the batches already where the model runs
    loss1, _ = ours.step(xs[0], ys[0])
    res = {"loss_step1": loss1, "loss_step1_ref64": ref, "loss_step1_relerr": abs(loss1 - ref) / max(1e-12, abs(ref))}
    if not res["loss_step1_relerr"] <= LOSS_RTOL:
        raise RuntimeError(f"first-step loss {loss1!r} differs from the float64 reference {ref!r} "
                           f"(rel err {res['loss_step1_relerr']:.2e} > {LOSS_RTOL:.0e})")
    loss2, _ = ours.step(xs[1 % len(xs)], ys[1 % len(ys)])
    res["loss_step2"] = loss2
    if torch_side is not None and torch_side.loaded is True:
        txs, tys = torch_side.dev_batches
        t1, _ = torch_side.step(txs[0], tys[0])
        t2, _ = torch_side.step(txs[1 % len(txs)], tys[1 % len(tys)])
        res.update(torch_loss_step1=t1, torch_loss_step2=t2, step2_relerr=abs(loss2 - t2) / max(1e-12, abs(t2)))
        if not res["step2_relerr"] <= STEP2_RTOL:
            raise RuntimeError(f"second-step loss {loss2!r} differs from PyTorch's {t2!r} after one SGD step "
                               f"(rel err {res['step2_relerr']:.2e} > {STEP2_RTOL:.0e})")
    return res


def time_windows(sides, windows, steps):
    """Interleaved windows: ({name: [seconds per step, one per window]}, {name: [last loss of each window]}).

    A non-finite loss matters: Trainer.train_step skips backward and the update on one, so the step
    would be cheaper than a real one. The caller rejects such a run."""
    out = {name: [] for name in sides}
    losses = {name: [] for name in sides}
    for _ in range(windows):
        for name, (side, xs, ys) in sides.items():
            side.sync()
            bad = 0
            t0 = time.perf_counter()
            for i in range(steps):
                loss, _ = side.step(xs[i % len(xs)], ys[i % len(ys)])
                bad += not math.isfinite(loss)
            side.sync()
            out[name].append((time.perf_counter() - t0) / steps)
            losses[name].append(loss if not bad else math.nan)
    return out, losses


def main(argv=None):
    args, argv, backend = C.start("benchmarks.train", parse_args, argv)
    if backend is None:
        return 2
    from gpu_cnn import models, nn

    gpu = backend == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (20 if gpu else 3)
    args.windows = args.windows if args.windows is not None else 11
    args.steps = args.steps if args.steps is not None else (50 if gpu else 10)
    T = None if args.no_torch else C.import_torch(backend)
    tdev = "cuda" if gpu else "cpu"
    rng = np.random.default_rng(args.seed)

    if args.check:
        if backend == "sim" or args.batch_sizes == [128, 512]:
            args.batch_sizes = [2]
        if backend == "sim":  # LeNet-5 under the simulator takes minutes a step: a tiny network of the same kinds
            image = (1, 8, 8)
            model_fn = lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # noqa: E731
                                             nn.Flatten(), nn.Linear(2 * 4 * 4, CLASSES))
        else:
            image, model_fn = IMAGE, (lambda: models.lenet5(num_classes=CLASSES, seed=args.seed))
        failures = 0
        for batch in args.batch_sizes:
            ours = Ours(model_fn, batch, args.seed)
            spec = ours.model.spec()
            xs, ys = make_batches(rng, batch, 2, image)
            ts = None
            if T is not None:
                ts = Torch(T, spec, ours.state0, tdev)
                ts.dev_batches = ts.to_device(xs, ys)
            try:
                res = check(ours, ts, xs, ys, spec)
                print(f"ok   backend {backend} batch {batch}: " + ", ".join(f"{k} {v:.6g}" for k, v in res.items()))
            except Exception as exc:
                failures += 1
                print(f"FAIL backend {backend} batch {batch}: {type(exc).__name__}: {exc}")
        return 1 if failures else 0

    info = C.device_info(backend)
    out_dir = Path(args.out) if args.out else C.default_out_dir(info)
    record = C.base_record("train", backend, info, args, argv)
    record["model"] = "lenet5 (gpu_cnn.models.lenet5 / the same torch.nn.Sequential)"
    record["optimizer"] = {"name": "sgd", "lr": LR, "momentum": MOMENTUM}
    record["data"] = {"image": list(IMAGE), "classes": CLASSES, "distinct_batches": args.batches,
                      "gpu_cnn_input": f"arrays already on {tdev} through Trainer.train_step",
                      "torch_input": f"tensors already on {tdev}"}
    record["threads"] = {"cpu_count": os.cpu_count(), "blas": C.blas_threads(),
                         "torch": T.get_num_threads() if T is not None else None,
                         "torch_interop": T.get_num_interop_threads() if T is not None else None}
    if T is not None:
        record["torch"] = {"version": T.__version__, "tf32": False,
                           "cudnn": T.backends.cudnn.version() if gpu else None,
                           "cudnn_benchmark": bool(T.backends.cudnn.benchmark) if gpu else None}
    print(f"benchmarks.train: backend {backend}, device {info.get('name')}, batches {args.batch_sizes}, "
          f"warm-up {args.warmup}, {args.windows} windows x {args.steps} steps, "
          f"torch {T.__version__ + ' (' + str(T.get_num_threads()) + ' threads)' if T is not None else 'not available'}")
    rows, errors = [], record.setdefault("errors", [])
    for batch in args.batch_sizes:
        ours = Ours(lambda: models.lenet5(num_classes=CLASSES, seed=args.seed), batch, args.seed)
        spec = ours.model.spec()
        xs, ys = make_batches(rng, batch, max(2, args.batches))
        ts = None
        if T is not None:
            ts = Torch(T, spec, ours.state0, tdev)
            ts.dev_batches = ts.to_device(xs, ys)
            if ts.loaded is not True:
                errors.append(f"batch {batch}: torch could not load gpu_cnn's weights ({ts.loaded}); own init used")
        try:
            chk = check(ours, ts, xs, ys, spec)
        except Exception as exc:
            errors.append(f"batch {batch}: check failed: {type(exc).__name__}: {exc}")
            print(f"batch {batch}: CHECK FAILED, not timed: {exc}")
            rows.append({"batch": batch, "impl": "gpu_cnn", "error": str(exc)})
            continue
        sides = {"gpu_cnn": (ours, *ours.to_device(xs, ys))}
        if ts is not None:
            sides["torch"] = (ts, *ts.dev_batches)
        for name, (side, bx, by) in sides.items():  # warm-up (compiles the kernels, cuDNN autotuning)
            for i in range(args.warmup):
                side.step(bx[i % len(bx)], by[i % len(by)])
            side.sync()
        per_step, losses = time_windows(sides, args.windows, args.steps)
        base = {}
        for name, ts_ in per_step.items():
            med = statistics.median(ts_)
            row = {"batch": batch, "impl": name, "steps_per_window": args.steps, "windows": args.windows,
                   "warmup_steps": args.warmup, "ms_per_step": med * 1e3, "ms_per_step_min": min(ts_) * 1e3,
                   "ms_per_step_max": max(ts_) * 1e3, "window_ms_per_step": [t * 1e3 for t in ts_],
                   "images_per_s": batch / med, "window_last_loss": losses[name]}
            if not all(math.isfinite(v) for v in losses[name]):
                row["error"] = "a loss became NaN/inf during the timed windows: the timing is not valid"
                errors.append(f"batch {batch} {name}: {row['error']}")
            if name == "gpu_cnn":
                row["check"] = chk
            base[name] = row
        if "torch" in base:
            base["gpu_cnn"]["ratio_vs_torch"] = base["gpu_cnn"]["images_per_s"] / base["torch"]["images_per_s"]
            base["torch"]["ratio_vs_torch"] = 1.0
        for row in base.values():
            rows.append(row)
            print(_line(backend, row), flush=True)
        for row in fit_rows(args, backend, batch, xs, ys, ts, errors):
            rows.append(row)
            print(_line(backend, row), flush=True)
        record["results"] = rows
        write_outputs(out_dir, record, rows, info, backend, quiet=True)  # a run cut short keeps what it has
    record["results"] = rows
    write_outputs(out_dir, record, rows, info, backend)
    return 1 if any("error" in r for r in rows) else 0


def fit_rows(args, backend, batch, xs, ys, torch_side, errors):
    """The training loop as fast code runs it, nothing read back per step: gpu_cnn's ``Trainer.fit`` (host
    data, one epoch of ``--steps`` steps per window; its planned step, and on cuda with and without the
    CUDA graph) and PyTorch eager looping over device tensors without ``.item()``. Per-epoch step time
    from fit's own epoch clock (which ends with the epoch's metrics read, so the device has finished)."""
    from gpu_cnn import models
    from gpu_cnn.trainer import Trainer

    X = np.concatenate([xs[i % len(xs)] for i in range(args.steps)])
    Y = np.concatenate([ys[i % len(ys)] for i in range(args.steps)])
    variants = [("fit+graph", True), ("fit", False)] if backend == "cuda" else [("fit", False)]
    out = {}
    for name, graph in variants:
        try:
            trainer = Trainer(models.lenet5(num_classes=CLASSES, seed=args.seed), optimizer="sgd", lr=LR,
                              batch_size=batch, seed=args.seed, momentum=MOMENTUM, progress=False,
                              cuda_graph=graph)
            hist = trainer.fit((X, Y), epochs=args.windows + 1)  # epoch 1: warm-up, recording, capture
        except Exception as exc:
            errors.append(f"batch {batch} {name}: {type(exc).__name__}: {exc}")
            continue
        ts_ = [h["seconds"] / args.steps for h in hist[1:]]
        plan = trainer.planner.plan(batch)
        out[name] = {"batch": batch, "impl": f"gpu_cnn {name}", "steps_per_window": args.steps,
                     "windows": args.windows, "warmup_steps": args.steps, "ms_per_step": statistics.median(ts_) * 1e3,
                     "ms_per_step_min": min(ts_) * 1e3, "ms_per_step_max": max(ts_) * 1e3,
                     "window_ms_per_step": [t * 1e3 for t in ts_],
                     "images_per_s": batch / statistics.median(ts_),
                     "planned": plan is not None, "launches_per_step": plan.launches if plan else None,
                     "graph": bool(plan and plan.cuda_graph and plan.graph_error is None),
                     "graph_error": plan.graph_error if plan else None, "plan_refused": trainer.planner.reason}
    if torch_side is not None:
        txs, tys = torch_side.dev_batches
        T = torch_side.T

        def loop():
            for i in range(args.steps):
                torch_side.opt.zero_grad(set_to_none=True)
                loss = T.nn.functional.cross_entropy(torch_side.model(txs[i % len(txs)]), tys[i % len(tys)])
                loss.backward()
                torch_side.opt.step()
            torch_side.sync()

        loop()
        ts_ = []
        for _ in range(args.windows):
            t0 = time.perf_counter()
            loop()
            ts_.append((time.perf_counter() - t0) / args.steps)
        med = statistics.median(ts_)
        out["torch loop"] = {"batch": batch, "impl": "torch loop", "steps_per_window": args.steps,
                             "windows": args.windows, "warmup_steps": args.steps, "ms_per_step": med * 1e3,
                             "ms_per_step_min": min(ts_) * 1e3, "ms_per_step_max": max(ts_) * 1e3,
                             "window_ms_per_step": [t * 1e3 for t in ts_], "images_per_s": batch / med,
                             "ratio_vs_torch": 1.0}
        for name in ("fit+graph", "fit"):
            if name in out:
                out[name]["ratio_vs_torch"] = out[name]["images_per_s"] / out["torch loop"]["images_per_s"]
    return list(out.values())


def _line(backend, r):
    ratio = r.get("ratio_vs_torch")
    return (f"{backend:<5} batch {r['batch']:>4}  {r['impl']:<8} {r['steps_per_window']:>3} steps x {r['windows']} windows  "
            f"{r['ms_per_step']:9.3f} ms/step  {r['images_per_s']:10.0f} images/s  "
            f"ratio {'—' if ratio is None else format(ratio, '.3f')}")


def write_outputs(out_dir, record, rows, info, backend, quiet=False):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    C.write_json(out_dir / "train.json", record)
    th = record["threads"]
    lines = [f"# Training throughput: LeNet-5, {info.get('name')} ({backend}), {record['date'][:10]}", "",
             f"Command: `{record['command']}`" + (f" (= `{record['invocation']}`)" if record["invocation"] != record["command"] else "") + "  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + "  ",
             f"Threads: {th['cpu_count']} logical cores; torch {th['torch']} (interop {th['torch_interop']}); "
             f"NumPy BLAS {th['blas']}  ",
             f"SGD lr {LR}, momentum {MOMENTUM}; random MNIST-shaped data already on "
             f"{'the GPU' if backend == 'cuda' else 'the host'}; gpu_cnn through Trainer.train_step, PyTorch eager; "
             "both return loss and accuracy to the host each step.  ",
             "ms/step: median over the timed windows; ratio = gpu_cnn images/s ÷ PyTorch images/s.  ",
             "Rows `gpu_cnn fit`, `gpu_cnn fit+graph` and `torch loop`: the training loop with nothing read back "
             "per step (Trainer.fit on host data, its planned step replayed, with and without the CUDA graph; "
             "PyTorch eager over device tensors without .item()); their ratio is against `torch loop`.", ""]
    body = [[r["batch"], r["impl"], r.get("warmup_steps", "—"), f"{r.get('windows', '—')} × {r.get('steps_per_window', '—')}",
             C.fmt(r.get("ms_per_step"), ".3f"),
             f"{C.fmt(r.get('ms_per_step_min'), '.2f')}–{C.fmt(r.get('ms_per_step_max'), '.2f')}",
             C.fmt(r.get("images_per_s"), ",.0f"), C.fmt(r.get("ratio_vs_torch"), ".3f"),
             (r.get("error") or "")[:100]] for r in rows]
    lines.append(C.markdown_table(["batch", "impl", "warm-up steps", "windows × steps", "ms/step", "window min–max",
                                   "images/s", "ratio vs torch", "note"], body, ["r", "l", "r", "r", "r", "r", "r", "r", "l"]))
    if record.get("errors"):
        lines += ["", "Errors:", ""] + [f"- {e}" for e in record["errors"]]
    lines.append("")
    (out_dir / "train.md").write_text("\n".join(lines))
    if not quiet:
        print(f"\nwrote {out_dir / 'train.json'}, {out_dir / 'train.md'}")


if __name__ == "__main__":
    sys.exit(main())
