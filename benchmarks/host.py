"""Host overhead of a training step, measured without a GPU: what the orchestrator asks of the device.

    python -m benchmarks.host                          # LeNet-5, SGD, batch 128 (the defaults)
    python -m benchmarks.host --optimizer adam --batch-size 512 --steps 30
    python -m benchmarks.host --out DIR                # where the JSON and Markdown go

A training step on the ``cuda`` backend costs the host the orchestrator's own Python, a launch per
kernel (numba-cuda: ~10-20 µs each, more for many array arguments), and a full wait for the device at
every blocking device-to-host copy or synchronisation. On a GPU those add up to more than the arithmetic
of a small CNN's step. This benchmark counts them where there is no GPU: LeNet-5 trains under the CUDA
simulator with every kernel *body* skipped (a launch is counted, by kernel, and returns at once; device
buffers start as zeros so the skipped arithmetic gives finite losses), and every host↔device copy,
device or pinned allocation and synchronisation is counted too. The host milliseconds are then the
orchestrator's Python alone: Numba's own launch cost on a real GPU comes on top (launches × ~15 µs).

Four ways of running a step, each after planning steps that are not counted:

* ``host batch``: ``Trainer.train_step(x, y)`` with NumPy images and labels (staged to the device);
* ``device batch``: ``train_step`` with images and labels already on the device;
* ``fit, eager``: ``Trainer(planned_step=False).fit`` over two data sets of different lengths (S1 and S2
  steps, one epoch each); per step = (count(S2) - count(S1)) / (S2 - S1), so what ``fit`` does once per
  epoch (including the planned step's warm-up and recording) cancels;
* ``inside fit``: the same with the default ``Trainer``: after its third step ``fit`` replays the
  recorded launches of a step (gpu_cnn.graph) instead of running the layers' Python.

The kernel choices are the ``cuda`` backend's (``--defaults cuda``, the default): Sequential's fusion and
the implicit-GEMM conv forward, which the simulator leaves off to save time when it runs kernel bodies.
``gpu-cnn bench host`` runs the same benchmark (results under ``runs/bench/`` unless ``--out``).

Figures per step: kernel launches (and which kernels), H2D / D2H / D2D copies, synchronisations (explicit
ones, and blocking D2H copies, which also wait for the device), device and pinned allocations, and the
median host milliseconds.
"""
import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from . import common as C

IMAGE = (1, 28, 28)
CLASSES = 10
MODES = ("host batch", "device batch", "fit, eager", "inside fit")
PROG = "python -m benchmarks.host"


def parse_args(argv, prog=PROG):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lenet5", help="a gpu_cnn.models name (default lenet5)")
    ap.add_argument("--optimizer", default="sgd", help="sgd, adam or adamw (default sgd)")
    ap.add_argument("--batch-size", type=int, default=128, help="images a step (default 128)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode (default 20)")
    ap.add_argument("--out", default=None, help="output folder (default: the benchmarks' results folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--defaults", choices=("cuda", "sim"), default="cuda",
                    help="kernel choices: cuda (default: what a GPU runs, fusion and implicit-GEMM conv on) or "
                         "sim (the simulator's own defaults)")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    if args.steps < 2:
        ap.error(f"--steps: expected an int >= 2, got {args.steps}")
    return args


class HostProbe:
    """Counts what the host asks of the (simulated) device while active; kernel bodies are skipped.

    Patches the simulator's launch (``FakeCUDAKernel.__call__``), ``numba.cuda``'s allocation and copy
    functions and the simulated arrays' copy methods, and restores them on exit. ``counts`` maps an event
    ("launch", "h2d", "d2h", "d2d", "sync", "alloc_device", "alloc_pinned") to its number, ``kernels``
    a kernel's name to its launches.
    """

    def __init__(self):
        self.counts = collections.Counter()
        self.kernels = collections.Counter()
        self._undo = []

    def reset(self):
        self.counts.clear()
        self.kernels.clear()

    def snapshot(self):
        return collections.Counter(self.counts), collections.Counter(self.kernels)

    def _patch(self, owner, name, make):
        old = getattr(owner, name)
        setattr(owner, name, make(old))
        self._undo.append((owner, name, old))

    def __enter__(self):
        from numba import cuda
        from numba.cuda.simulator import api, kernel
        from numba.cuda.simulator.cudadrv import devicearray as dv

        probe = self

        def launch(old):
            def __call__(k, *args):
                if k._device or kernel._kernel_context:  # a device function inside a kernel: not a launch
                    return old(k, *args)
                probe.counts["launch"] += 1
                probe.kernels[k.fn.__name__] += 1
                return None

            return __call__

        def alloc(kind):
            def make(old):
                def allocate(*args, **kwargs):
                    probe.counts[kind] += 1
                    a = old(*args, **kwargs)
                    host = a._ary if isinstance(a, dv.FakeCUDAArray) else a
                    host[...] = 0  # skipped kernels leave buffers as they were: zeros give finite losses
                    return a

                return allocate

            return make

        def to_device(old):
            def copy(ary, stream=0, copy=True, to=None):
                probe.counts["h2d"] += 1
                if to is None:
                    probe.counts["alloc_device"] += 1
                return old(ary, stream=stream, copy=copy, to=to)

            return copy

        def copy_to_host(old):
            def copy(self, ary=None, stream=0):
                probe.counts["d2h"] += 1
                if not stream:
                    probe.counts["blocking_d2h"] += 1
                return old(self, ary, stream)

            return copy

        def copy_to_device(old):
            def copy(self, ary, stream=0):
                probe.counts["d2d" if isinstance(ary, dv.FakeCUDAArray) or hasattr(ary, "copy_to_host") else "h2d"] += 1
                return old(self, ary, stream)

            return copy

        def sync(old):
            def synchronize(*args, **kwargs):
                probe.counts["sync"] += 1
                return old(*args, **kwargs)

            return synchronize

        self._patch(kernel.FakeCUDAKernel, "__call__", launch)
        for name in ("device_array", "device_array_like"):
            self._patch(cuda, name, alloc("alloc_device"))
        for name in ("pinned_array", "pinned_array_like", "mapped_array"):
            self._patch(cuda, name, alloc("alloc_pinned"))
        self._patch(cuda, "to_device", to_device)
        self._patch(dv.FakeCUDAArray, "copy_to_host", copy_to_host)
        self._patch(dv.FakeCUDAArray, "copy_to_device", copy_to_device)
        self._patch(cuda, "synchronize", sync)
        self._patch(api.stream, "synchronize", sync)
        self._patch(api.Event, "synchronize", sync)
        return self

    def __exit__(self, *exc):
        while self._undo:
            owner, name, old = self._undo.pop()
            setattr(owner, name, old)
        return False


EVENTS = ("launch", "h2d", "d2h", "d2d", "sync", "blocking_d2h", "alloc_device", "alloc_pinned")


def _per_step(counts, steps):
    return {e: counts.get(e, 0) / steps for e in EVENTS}


def _data(rng, n):
    x = rng.standard_normal((n, *IMAGE)).astype(np.float32)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    return x, y


def _trainer(args, planned_step=True):
    import gpu_cnn

    model = gpu_cnn.models.get_model(args.model, num_classes=CLASSES, seed=args.seed)
    return gpu_cnn.Trainer(model, optimizer=args.optimizer, lr=1e-3, batch_size=args.batch_size,
                           seed=args.seed, progress=False, planned_step=planned_step)


@contextlib.contextmanager
def kernel_defaults(which):
    """The kernel choices of ``which`` backend while inside: "cuda" turns on what the simulator leaves
    off for speed (Sequential's fusion, the implicit-GEMM conv forward); "sim" changes nothing."""
    if which != "cuda":
        yield
        return
    from gpu_cnn import fusion
    from gpu_cnn.kernels import conv2d

    was = (fusion._enabled, conv2d.IG_FORWARD_DEFAULT)
    fusion.set_enabled(True)
    conv2d.IG_FORWARD_DEFAULT = True
    try:
        yield
    finally:
        fusion.set_enabled(was[0])
        conv2d.IG_FORWARD_DEFAULT = was[1]


def measure_steps(args, probe, device):
    """Per-step counts and host ms of train_step on host or device batches (one planning step first)."""
    from numba import cuda

    rng = np.random.default_rng(args.seed)
    x, y = _data(rng, args.batch_size)
    trainer = _trainer(args)
    if device:
        x, y = cuda.to_device(x), cuda.to_device(y.astype(np.int32))
    trainer.train_step(x, y)  # plans every buffer
    probe.reset()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step(x, y)
        times.append((time.perf_counter() - t0) * 1e3)
    counts, kernels = probe.snapshot()
    return _per_step(counts, args.steps), {k: v / args.steps for k, v in kernels.items()}, times


def measure_fit(args, probe, repeats=3, planned_step=True):
    """Per-step counts and host ms inside Trainer.fit, from runs of two lengths (S1 < S2 steps): the
    difference cancels what fit does once an epoch. A warm-up fit comes first; the ms is the median of
    `repeats` differences, the runs of the two lengths interleaved."""
    rng = np.random.default_rng(args.seed)
    s1, s2 = max(1, args.steps // 4), args.steps
    x, y = _data(rng, args.batch_size * s2)
    trainer = _trainer(args, planned_step)
    trainer.fit((x[: args.batch_size * s1], y[: args.batch_size * s1]), epochs=1)  # plans buffers, warms up
    runs = {s1: [], s2: []}
    for _ in range(repeats):
        for steps in (s1, s2):
            probe.reset()
            t0 = time.perf_counter()
            trainer.fit((x[: args.batch_size * steps], y[: args.batch_size * steps]), epochs=1)
            runs[steps].append(((time.perf_counter() - t0) * 1e3, *probe.snapshot()))
    (_, c1, k1), (_, c2, k2) = runs[s1][-1], runs[s2][-1]
    d = s2 - s1
    counts = {e: (c2.get(e, 0) - c1.get(e, 0)) / d for e in EVENTS}
    kernels = {k: (k2.get(k, 0) - k1.get(k, 0)) / d for k in set(k1) | set(k2)}
    times = [(b[0] - a[0]) / d for a, b in zip(runs[s1], runs[s2])]
    if planned_step and trainer.planner.plan(args.batch_size) is None:
        print(f"note: the step was not planned ({trainer.planner.reason})", file=sys.stderr)
    return counts, kernels, times


def run(args):
    results = {}
    with HostProbe() as probe, kernel_defaults(args.defaults):
        for mode in MODES:
            if mode in ("inside fit", "fit, eager"):
                counts, kernels, times = measure_fit(args, probe, planned_step=(mode == "inside fit"))
            else:
                counts, kernels, times = measure_steps(args, probe, device=(mode == "device batch"))
            results[mode] = {"per_step": counts, "kernels_per_step": dict(sorted(kernels.items())),
                             "host_ms": statistics.median(times), "host_ms_samples": times}
            print(_line(mode, results[mode]), flush=True)
    return results


HEADER = (f"{'mode':<13} {'launches':>8} {'H2D':>5} {'D2H':>5} {'D2D':>5} {'syncs':>5} {'blocking':>8} "
          f"{'allocs':>6} {'host ms':>8}")


def _line(mode, r):
    p = r["per_step"]
    return (f"{mode:<13} {p['launch']:>8.1f} {p['h2d']:>5.1f} {p['d2h']:>5.1f} {p['d2d']:>5.1f} {p['sync']:>5.1f} "
            f"{p['blocking_d2h']:>8.1f} {p['alloc_device'] + p['alloc_pinned']:>6.1f} {r['host_ms']:>8.3f}")


def markdown(record):
    s = record["settings"]
    lines = [f"# Host overhead per training step: {s['model']}, {s['optimizer']}, batch {s['batch_size']}", "",
             f"Command: `{record['command']}`  ", f"Machine: {record['device'].get('cpu')} "
             f"({record['device'].get('cpu_count')} cores); CUDA simulator with kernel bodies skipped.", "",
             "| mode | launches | H2D | D2H | D2D | syncs | blocking D2H | allocations | host ms (median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, r in record["results"].items():
        p = r["per_step"]
        lines.append(f"| {mode} | {p['launch']:.1f} | {p['h2d']:.1f} | {p['d2h']:.1f} | {p['d2d']:.1f} | "
                     f"{p['sync']:.1f} | {p['blocking_d2h']:.1f} | {p['alloc_device'] + p['alloc_pinned']:.1f} | "
                     f"{r['host_ms']:.3f} |")
    lines += ["", f"Kernel choices: the {s.get('defaults', 'cuda')} backend's defaults. ``fit, eager``: "
              "``Trainer(planned_step=False)``; ``inside fit``: the default, the recorded step replayed "
              "(gpu_cnn.graph).", "", "Launches per step by kernel (inside fit):", ""]
    for name, n in record["results"]["inside fit"]["kernels_per_step"].items():
        if n:
            lines.append(f"- `{name}`: {n:g}")
    return "\n".join(lines) + "\n"


def main(argv=None, prog=PROG, results_root=None):
    """The benchmark; ``prog`` names it in --help, ``results_root`` replaces benchmarks/results/ as the
    root of the default output folder (``gpu-cnn bench host`` writes under runs/bench/)."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--"]
    args = parse_args(argv, prog)
    if "numba.cuda" not in sys.modules:
        os.environ["GPU_CNN_BACKEND"] = "sim"  # this benchmark runs under the simulator; set before numba loads
    import gpu_cnn

    try:
        gpu_cnn.set_backend("sim")
    except gpu_cnn.BackendError as exc:
        print(f"python -m benchmarks.host: needs the CUDA simulator ({exc}); run it in a fresh process",
              file=sys.stderr)
        return 2
    info = C.device_info("sim")
    print(f"host overhead per step: {args.model}, {args.optimizer}, batch {args.batch_size}, "
          f"{args.steps} steps a mode, kernel bodies skipped under the simulator", flush=True)
    print(HEADER)
    results = run(args)
    record = C.base_record("host", "sim", info, args, argv)
    record["results"] = results
    record["note"] = ("kernel bodies skipped under the CUDA simulator: host ms is the orchestrator's Python; "
                      "on a GPU add Numba's launch cost (~10-20 us a launch)")
    if args.out:
        out = Path(args.out)
    elif results_root:
        out = Path(results_root) / C.default_out_dir(info).name
    else:
        out = C.default_out_dir(info)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"host-{args.model}-{args.optimizer}-b{args.batch_size}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(record))
    print(f"wrote {out / (stem + '.json')} and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
