"""What both benchmarks share: backend choice (and the refusal under the simulator), the machine and
library description written with every result, timers (CUDA events on the GPU, ``perf_counter`` on
the CPU), float64 references, the device's measured ceilings (bandwidth, FP32 rate), launch overhead,
and the JSON / Markdown / PNG writers.

Nothing here imports ``numba.cuda`` at import time: the backend (real GPU or simulator) must be chosen
first, by :func:`select_backend`.

Timing on the GPU (:class:`CudaTimer`): every timed run is preceded by a one-thread *spin* kernel that
keeps the GPU busy for longer than Python takes to enqueue the run, so that the start event, the
run's launches and the end event are all queued before the GPU reaches them. The interval between the
two events is then the device time of the run alone, not Python's launch latency (which is reported
separately, as host µs per call, and by the launch-overhead figures).
"""
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

RESULTS_ROOT = Path(__file__).resolve().parent / "results"

SIM_REFUSAL = (
    "{prog}: refusing to time under the CUDA simulator (backend 'sim'): it runs every GPU thread as a "
    "Python thread, so its timings mean nothing. Use --backend cuda on a machine with an NVIDIA GPU, or "
    "--backend cpu; under the simulator only the correctness pass runs: add --check."
)


class SimRefused(SystemExit):
    """Raised (exit status 2) when a timing run is asked for under the simulator."""

    def __init__(self, prog):
        self.message = SIM_REFUSAL.format(prog=prog)
        super().__init__(2)


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here (cuda without a GPU, or a simulator/GPU switch mid-process)."""


# ---------------------------------------------------------------------------------------------------
# backend


def select_backend(name, prog, check=False):
    """Set the gpu_cnn backend (``None``: $GPU_CNN_BACKEND, else cuda when a GPU is present, else cpu).

    Under ``sim`` only a correctness pass (``check``) is allowed: a timing run raises :class:`SimRefused`
    before anything heavy is imported. Returns the backend name.
    """
    import gpu_cnn

    try:
        if name is None:
            env = os.environ.get("GPU_CNN_BACKEND", "").strip().lower()
            if env == "sim" and not check:
                raise SimRefused(prog)
            name = gpu_cnn.get_backend()
        name = name.lower()
        if name == "sim" and not check:
            raise SimRefused(prog)
        gpu_cnn.set_backend(name)
    except gpu_cnn.BackendError as exc:
        raise BackendUnavailable(str(exc)) from exc
    return name


def start(prog, parse_args, argv=None):
    """Parse a benchmark's command line and select its backend: (args, argv, backend).

    ``argv`` defaults to sys.argv[1:]; a ``--`` separator is dropped (``gpu-cnn bench --backend cpu --
    --quick`` passes one). backend is None when the run is refused (under the simulator without
    ``--check``, or a backend that cannot run here): the reason is then printed to stderr, and the caller
    exits with status 2.
    """
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--"]
    args = parse_args(argv)
    try:
        backend = select_backend(args.backend, prog, check=args.check)
    except SimRefused as exc:
        print(exc.message, file=sys.stderr)
        backend = None
    except BackendUnavailable as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        backend = None
    return args, argv, backend


def import_torch(device):
    """PyTorch configured for honest FP32 comparisons (TF32 off everywhere), or None when it cannot be
    imported or (device 'cuda') sees no GPU."""
    try:
        import torch
    except Exception:
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.set_float32_matmul_precision("highest")
    except Exception:
        pass
    if device == "cuda":
        try:
            if not torch.cuda.is_available():
                return None
        except Exception:
            return None
        torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest algorithm during the warm-up
    return torch


def import_cupy():
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        return cupy
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------
# the machine and the libraries


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def library_versions():
    out = {"python": platform.python_version()}
    for dist in ("gpu-cnn", "numpy", "numba", "numba-cuda", "torch", "cupy", "cupy-cuda12x", "cupy-cuda13x",
                 "matplotlib", "cuda-bindings"):
        v = _version(dist)
        if v is not None:
            out[dist] = v
    return out


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(query):
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def _cache_bytes_cpu():
    """Size of the largest CPU cache (the last level), from sysfs; 32 MiB when unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            s = (idx / "size").read_text().strip().upper()
            mult = {"K": 1024, "M": 1024 ** 2}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KM")) * mult)
        except Exception:
            continue
    return best or 32 * 1024 ** 2


def device_info(backend):
    """A dict describing the machine: GPU name, driver, CUDA versions, SMs, L2, memory; CPU model."""
    info = {"backend": backend, "host": platform.node(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    if backend == "cuda":
        from numba import cuda
        from numba.cuda.cudadrv import driver, runtime

        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        ctx = cuda.current_context()
        free, total = ctx.get_memory_info()
        info.update(name=name, compute_capability=".".join(map(str, dev.compute_capability)),
                    memory_bytes=int(total))
        for key, attr in (("sm_count", "MULTIPROCESSOR_COUNT"), ("l2_bytes", "L2_CACHE_SIZE"),
                          ("clock_khz", "CLOCK_RATE"), ("memory_clock_khz", "MEMORY_CLOCK_RATE"),
                          ("memory_bus_bits", "GLOBAL_MEMORY_BUS_WIDTH")):
            try:
                info[key] = int(getattr(dev, attr))
            except Exception:
                info[key] = None
        try:
            info["cuda_driver_api"] = ".".join(map(str, driver.driver.get_version()))
        except Exception:
            info["cuda_driver_api"] = None
        try:  # numba-cuda's runtime.get_version() reports the toolkit it compiles with (NVRTC's version)
            info["cuda_toolkit"] = ".".join(map(str, runtime.runtime.get_version()))
        except Exception:
            info["cuda_toolkit"] = None
        info["driver"] = _nvidia_smi("driver_version")
        info["nvidia_smi_name"] = _nvidia_smi("name")
        info["cache_bytes"] = info.get("l2_bytes") or 50 * 1024 ** 2
    else:
        info["name"] = info["cpu"]
        info["cache_bytes"] = _cache_bytes_cpu()
    return info


def slugify(text):
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return re.sub(r"-+", "-", s)[:60] or "unknown"


def device_slug(info):
    if info["backend"] == "cuda":
        return slugify(info.get("name", "gpu"))
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$|processor", " ", info.get("cpu", ""), flags=re.I)
    return "cpu-" + slugify(name)


def default_out_dir(info):
    return RESULTS_ROOT / f"{device_slug(info)}-{_dt.date.today().isoformat()}"


def command_line():
    """The exact command that produced a result."""
    exe = os.path.basename(sys.argv[0]) if sys.argv else "python"
    if exe == "__main__.py" or sys.argv[0].endswith(".py"):
        mod = sys.modules["__main__"].__spec__.name if getattr(sys.modules.get("__main__"), "__spec__", None) else sys.argv[0]
        return " ".join(["python", "-m", mod, *sys.argv[1:]])
    return " ".join(sys.argv)


def base_record(kind, backend, info, args, argv=None):
    """The fields every result file starts with. ``command`` is the process's exact command line (it may
    be ``gpu-cnn bench ...`` or pytest); ``invocation`` the equivalent ``python -m benchmarks.<kind>``."""
    import shlex

    env = {k: os.environ[k] for k in ("GPU_CNN_BACKEND", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                       "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ}
    return {
        "schema": 1,
        "kind": kind,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(),
        "invocation": " ".join(["python", "-m", f"benchmarks.{kind}", *map(shlex.quote, argv or [])]),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "backend": backend,
        "device": info,
        "versions": library_versions(),
        "environment": env,
        "settings": vars(args) if args is not None else {},
    }


def blas_threads():
    """The BLAS thread pools NumPy uses (threadpoolctl, when installed)."""
    try:
        from threadpoolctl import threadpool_info

        return [{"api": d.get("internal_api"), "threads": d.get("num_threads")} for d in threadpool_info()]
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------
# statistics and checks


def summarize(times_ms):
    ts = sorted(times_ms)
    return {"ms": statistics.median(ts), "ms_min": ts[0], "ms_max": ts[-1], "runs": len(ts),
            "ms_p10": ts[int(0.1 * (len(ts) - 1))], "ms_p90": ts[int(0.9 * (len(ts) - 1))]}


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 (inf when out holds NaN or inf: a NaN never passes)."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {out.shape} vs reference {ref.shape}")
    if not np.all(np.isfinite(out)):
        return math.inf
    den = np.linalg.norm(ref.ravel())
    num = np.linalg.norm((out - ref).ravel())
    return float(num / den) if den > 0 else float(num)


def sets_for(set_bytes, cache_bytes, max_sets, mem_cap):
    """How many input/output sets to rotate among: enough to cover twice the cache when memory allows."""
    want = math.ceil(2 * cache_bytes / max(1, set_bytes))
    return int(max(1, min(max_sets, want, mem_cap // max(1, set_bytes))))


# ---------------------------------------------------------------------------------------------------
# helper GPU kernels (compiled lazily, only on the cuda backend; built for sm_80/sm_90 by the tests)

_cuda = None  # numba.cuda, bound by gpu_helpers() before any of these is compiled
from numba import float32 as _f32  # noqa: E402  (numba core: choosing nothing about the simulator)


def _spin_kernel(out, n):
    """One thread, n dependent FMAs: keeps the GPU busy while the host enqueues a timed run."""
    acc = _f32(1.0)
    for _ in range(n):
        acc = _cuda.fma(acc, _f32(0.9999999), _f32(1e-7))
    if acc == _f32(-12345.0):  # never true; keeps the loop from being removed
        out[0] = acc


def _fma_kernel(out, n):
    """8 independent FMA chains per thread, n iterations: the device's FP32 FMA rate (16·n FLOP per thread)."""
    i = _cuda.grid(1)
    a0 = _f32(i) * _f32(1e-9)
    a1 = a0 + _f32(1e-3)
    a2 = a0 + _f32(2e-3)
    a3 = a0 + _f32(3e-3)
    a4 = a0 + _f32(4e-3)
    a5 = a0 + _f32(5e-3)
    a6 = a0 + _f32(6e-3)
    a7 = a0 + _f32(7e-3)
    b = _f32(0.9999999)
    c = _f32(1e-7)
    for _ in range(n):
        a0 = _cuda.fma(a0, b, c)
        a1 = _cuda.fma(a1, b, c)
        a2 = _cuda.fma(a2, b, c)
        a3 = _cuda.fma(a3, b, c)
        a4 = _cuda.fma(a4, b, c)
        a5 = _cuda.fma(a5, b, c)
        a6 = _cuda.fma(a6, b, c)
        a7 = _cuda.fma(a7, b, c)
    s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7
    if s == _f32(-12345.0):
        out[0] = s


def _empty_kernel():
    """Does nothing: the cost of a launch."""
    pass


def _empty_args_kernel(a, b, c, n):
    """Does nothing with three arrays and an int: a launch with typical arguments."""
    if n < 0:
        a[0] = b[0] + c[0]


HELPER_SIGNATURES = {
    "spin": (_spin_kernel, "void(float32[::1], int64)"),
    "fma": (_fma_kernel, "void(float32[::1], int64)"),
    "empty": (_empty_kernel, "void()"),
    "empty_args": (_empty_args_kernel, "void(float32[::1], float32[::1], float32[::1], int64)"),
}
_HELPERS = {}


def gpu_helpers():
    """{name: cuda.jit dispatcher} for the helper kernels (real GPU only)."""
    global _cuda
    if not _HELPERS:
        from numba import cuda

        _cuda = cuda
        for name, (fn, _sig) in HELPER_SIGNATURES.items():
            _HELPERS[name] = cuda.jit(fn)
    return _HELPERS


# ---------------------------------------------------------------------------------------------------
# timers


class CpuTimer:
    """Host wall clock (``time.perf_counter``) around each run."""

    kind = "perf_counter"

    def sync(self):
        pass

    def measure(self, fns, repeats):
        times = []
        for r in range(repeats):
            f = fns[r % len(fns)]
            t0 = time.perf_counter()
            f()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def host_us(self, fn, n=3):
        return None


class CudaTimer:
    """Device time of one run between two CUDA events, the GPU kept busy by a spin kernel meanwhile.

    All work is on the legacy default stream (Numba's, CuPy's and PyTorch's default), so the events,
    the spin kernel and the measured launches are ordered with each other.
    """

    kind = "cuda-events"

    def __init__(self):
        from numba import cuda

        self.cuda = cuda
        self.k = gpu_helpers()
        self.start = cuda.event(timing=True)
        self.end = cuda.event(timing=True)
        self.scratch = cuda.device_array(1, np.float32)
        self.us_per_iter = self._calibrate()

    def sync(self):
        self.cuda.synchronize()

    def _events(self, fn):
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end)

    def _calibrate(self):
        spin = self.k["spin"]
        spin[1, 1](self.scratch, 1000)  # compile
        self.sync()
        n = 20000
        ms = [self._events(lambda: spin[1, 1](self.scratch, n)) for _ in range(5)]
        return max(1e-4, statistics.median(ms) * 1e3 / n)

    def spin(self, us):
        iters = int(us / self.us_per_iter) + 1
        self.k["spin"][1, 1](self.scratch, iters)

    def host_us(self, fn, n=5):
        """Host time to enqueue one call (µs, median), the GPU drained between calls."""
        ts = []
        for _ in range(n):
            self.sync()
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
        self.sync()
        return statistics.median(ts)

    def measure(self, fns, repeats, spin_us=60.0):
        times = []
        for r in range(repeats):
            f = fns[r % len(fns)]
            self.spin(spin_us)
            self.start.record()
            f()
            self.end.record()
            self.end.synchronize()
            times.append(self.start.elapsed_time(self.end))
        return times

    def loop_ms(self, fns, calls):
        """Back-to-back calls with no spin: ms per call as a training loop sees it (launch-bound or not)."""
        self.sync()
        self.start.record()
        for i in range(calls):
            fns[i % len(fns)]()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / calls


# ---------------------------------------------------------------------------------------------------
# float64 references (vectorized: fast enough for the full-size benchmark shapes)


def _f64(a):
    return np.asarray(a, np.float64)


def conv_out_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def conv2d_ref(x, w, b, stride, padding):
    """y = conv2d(x, w) + b, float64. x (N, C, H, W), w (O, C, kh, kw); stride, padding: (int, int)."""
    x, w = _f64(x), _f64(w)
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = conv_out_size(h, kh, sh, ph), conv_out_size(wd, kw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.zeros((n, ho, wo, o))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
            y += np.tensordot(patch, w[:, :, i, j], axes=([1], [1]))
    y = y.transpose(0, 3, 1, 2)
    if b is not None:
        y = y + _f64(b)[None, :, None, None]
    return np.ascontiguousarray(y)


def conv2d_backward_input_ref(dy, w, x_shape, stride, padding):
    dy, w = _f64(dy), _f64(w)
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, wd = x_shape
    _, _, kh, kw = w.shape
    ho, wo = dy.shape[2], dy.shape[3]
    dxp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    for i in range(kh):
        for j in range(kw):
            contrib = np.tensordot(dy, w[:, :, i, j], axes=([1], [0])).transpose(0, 3, 1, 2)
            dxp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += contrib
    return np.ascontiguousarray(dxp[:, :, ph:ph + h, pw:pw + wd])


def conv2d_backward_weight_ref(dy, x, w_shape, stride, padding):
    dy, x = _f64(dy), _f64(x)
    (sh, sw), (ph, pw) = stride, padding
    o, c, kh, kw = w_shape
    ho, wo = dy.shape[2], dy.shape[3]
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dw = np.zeros((o, c, kh, kw))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
            dw[:, :, i, j] = np.tensordot(dy, patch, axes=([0, 2, 3], [0, 2, 3]))
    return dw


def conv2d_backward_bias_ref(dy):
    return _f64(dy).sum(axis=(0, 2, 3))


def max_pool2d_ref(x, kernel_size, stride, padding):
    """(y, idx) float64 / int64; idx = h*W + w within the (n, c) plane; padding never wins; first max wins."""
    x = _f64(x)
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    n, c, h, wd = x.shape
    ho, wo = conv_out_size(h, kh, sh, ph), conv_out_size(wd, kw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :ho, :wo]
    flat = win.reshape(n, c, ho, wo, kh * kw)
    a = flat.argmax(axis=-1)
    y = np.take_along_axis(flat, a[..., None], axis=-1)[..., 0]
    di, dj = np.divmod(a, kw)
    rows = np.arange(ho)[:, None] * sh - ph + di
    cols = np.arange(wo)[None, :] * sw - pw + dj
    return y, rows * wd + cols


def max_pool2d_backward_ref(dy, idx, x_shape):
    dy = _f64(dy)
    n, c, h, w = x_shape
    dx = np.zeros((n * c, h * w))
    rows = np.repeat(np.arange(n * c), dy.shape[2] * dy.shape[3])
    np.add.at(dx, (rows, np.asarray(idx).reshape(-1)), dy.reshape(-1))
    return dx.reshape(x_shape)


def relu_ref(x):
    return np.maximum(_f64(x), 0.0)


def relu_backward_ref(dy, x):
    return np.where(np.asarray(x) > 0, _f64(dy), 0.0)


def bias_relu_ref(x, b):
    x = _f64(x)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return np.maximum(x + _f64(b).reshape(shape), 0.0)


def linear_ref(x, w, b=None):
    y = _f64(x) @ _f64(w).T
    return y + _f64(b) if b is not None else y


def linear_backward_ref(dy, x, w):
    dy = _f64(dy)
    return dy @ _f64(w), dy.T @ _f64(x), dy.sum(axis=0)


def softmax_xent_ref(logits, labels):
    """(mean loss, probs, per-row losses), float64, stable log-sum-exp."""
    z = _f64(logits)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    rows = lse - z[np.arange(z.shape[0]), np.asarray(labels)]
    return float(rows.mean()), np.exp(z - lse[:, None]), rows


def softmax_xent_backward_ref(probs, labels):
    d = np.array(probs, np.float64)
    d[np.arange(d.shape[0]), np.asarray(labels)] -= 1.0
    return d / d.shape[0]


def sgd_momentum_ref(p, g, buf, lr, momentum, first_step):
    """torch.optim.SGD (no dampening, no weight decay): (new p, new buf)."""
    g = _f64(g)
    buf = g.copy() if first_step else momentum * _f64(buf) + g
    return _f64(p) - lr * buf, buf


def adam_ref(p, g, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """torch.optim.Adam (no weight decay): (new p, new m, new v)."""
    g = _f64(g)
    m = beta1 * _f64(m) + (1 - beta1) * g
    v = beta2 * _f64(v) + (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    p = _f64(p) - (lr / bc1) * m / (np.sqrt(v) / math.sqrt(bc2) + eps)
    return p, m, v


def sequential_loss_ref(spec, state, x, labels):
    """Mean cross-entropy of a gpu_cnn Sequential (its ``spec()`` and ``state_dict()``) in float64.

    Layer i's parameters are ``state["i.weight"]`` / ``state["i.bias"]``, as PyTorch names them."""
    h = _f64(x)
    for i, layer in enumerate(spec["layers"]):
        kind = layer["type"]
        if kind == "Conv2d":
            h = conv2d_ref(h, state[f"{i}.weight"], state.get(f"{i}.bias"), tuple(layer["stride"]), tuple(layer["padding"]))
        elif kind == "ReLU":
            h = np.maximum(h, 0.0)
        elif kind == "MaxPool2d":
            h = max_pool2d_ref(h, tuple(layer["kernel_size"]), tuple(layer["stride"]), tuple(layer["padding"]))[0]
        elif kind == "Flatten":
            h = h.reshape(h.shape[0], -1)
        elif kind == "Linear":
            h = linear_ref(h, state[f"{i}.weight"], state.get(f"{i}.bias"))
        else:
            raise ValueError(f"sequential_loss_ref: unsupported layer type {kind!r}")
    return softmax_xent_ref(h, labels)[0]


def torch_sequential(T, spec):
    """The PyTorch nn.Sequential of a gpu_cnn Sequential spec (same layer indices, so the same state_dict keys)."""
    nn = T.nn
    layers = []
    for layer in spec["layers"]:
        kind = layer["type"]
        if kind == "Conv2d":
            layers.append(nn.Conv2d(layer["in_channels"], layer["out_channels"], tuple(layer["kernel_size"]),
                                    stride=tuple(layer["stride"]), padding=tuple(layer["padding"]), bias=layer["bias"]))
        elif kind == "ReLU":
            layers.append(nn.ReLU())
        elif kind == "MaxPool2d":
            layers.append(nn.MaxPool2d(tuple(layer["kernel_size"]), stride=tuple(layer["stride"]),
                                       padding=tuple(layer["padding"])))
        elif kind == "Flatten":
            layers.append(nn.Flatten())
        elif kind == "Linear":
            layers.append(nn.Linear(layer["in_features"], layer["out_features"], bias=layer.get("bias", True)))
        else:
            raise ValueError(f"torch_sequential: unsupported layer type {kind!r}")
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------------
# ceilings and launch overhead


def gpu_ceilings(timer, torch=None, cupy=None, quick=False):
    """Measured bandwidth (device-to-device copy, bytes read + written) and FP32 rate (cuBLAS SGEMM
    through PyTorch or CuPy, TF32 off; and the FMA-bound Numba kernel)."""
    from numba import cuda

    out = {}
    free, _ = cuda.current_context().get_memory_info()
    nbytes = min(1 << 30, free // 8) if not quick else min(256 << 20, free // 8)
    n = nbytes // 4
    a = cuda.device_array(n, np.float32)
    b = cuda.device_array(n, np.float32)
    for _ in range(2):
        b.copy_to_device(a)
    ts = timer.measure([lambda: b.copy_to_device(a)], 10, spin_us=0.0)
    ms = statistics.median(ts)
    out["bandwidth_GBps"] = 2 * nbytes / (ms * 1e-3) / 1e9  # bytes read + bytes written
    out["bandwidth_source"] = f"cuMemcpyDtoD of {nbytes / 2**20:.0f} MiB, read + write, median of 10"
    a = b = None  # free them before the next measurements

    # FMA-bound kernel: 8 chains x n iterations x 2 FLOP per thread
    fma = timer.k["fma"]
    sms = 132
    try:
        sms = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:
        pass
    threads, blocks, iters = 256, sms * 8, 8192 if quick else 32768
    scratch = cuda.device_array(1, np.float32)
    fma[blocks, threads](scratch, 16)
    timer.sync()
    ts = timer.measure([lambda: fma[blocks, threads](scratch, iters)], 5, spin_us=0.0)
    out["fma_GFLOPs"] = 16.0 * iters * threads * blocks / (statistics.median(ts) * 1e-3) / 1e9

    # cuBLAS SGEMM
    size = 4096 if quick else 8192
    flop = 2.0 * size ** 3
    try:
        if torch is not None:
            x = torch.randn(size, size, device="cuda")
            y = torch.randn(size, size, device="cuda")
            z = torch.empty(size, size, device="cuda")
            f = lambda: torch.mm(x, y, out=z)  # noqa: E731
            src = f"torch.mm {size}^3 float32 (cuBLAS, TF32 off)"
        elif cupy is not None:
            x = cupy.random.standard_normal((size, size), dtype=cupy.float32)
            y = cupy.random.standard_normal((size, size), dtype=cupy.float32)
            z = cupy.empty((size, size), dtype=cupy.float32)
            f = lambda: cupy.matmul(x, y, out=z)  # noqa: E731
            src = f"cupy.matmul {size}^3 float32 (cuBLAS)"
        else:
            f = None
        if f is not None:
            for _ in range(3):
                f()
            timer.sync()
            ts = timer.measure([f], 10, spin_us=0.0)
            out["sgemm_GFLOPs"] = flop / (statistics.median(ts) * 1e-3) / 1e9
            out["sgemm_source"] = src
    except Exception as exc:  # a missing or broken vendor library is a note, not a failure
        out["sgemm_error"] = f"{type(exc).__name__}: {exc}"
    out["compute_GFLOPs"] = out.get("sgemm_GFLOPs") or out["fma_GFLOPs"]
    out["compute_source"] = "cuBLAS SGEMM" if out.get("sgemm_GFLOPs") else "FMA-bound Numba kernel"
    return out


def cpu_ceilings(quick=False):
    """Measured host memory bandwidth (np.copyto, read + write) and NumPy SGEMM rate."""
    nbytes = (64 if quick else 256) << 20
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t0)
    bw = 2 * nbytes / statistics.median(ts[1:]) / 1e9
    size = 1024 if quick else 2048
    rng = np.random.default_rng(0)
    x = rng.standard_normal((size, size), dtype=np.float32)
    y = rng.standard_normal((size, size), dtype=np.float32)
    z = np.empty_like(x)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.matmul(x, y, out=z)
        ts.append(time.perf_counter() - t0)
    rate = 2.0 * size ** 3 / statistics.median(ts[1:]) / 1e9
    return {"bandwidth_GBps": bw, "bandwidth_source": f"np.copyto of {nbytes >> 20} MiB, read + write",
            "compute_GFLOPs": rate, "compute_source": f"NumPy SGEMM {size}^3 float32 (BLAS)",
            "blas_threads": blas_threads()}


def launch_overhead_gpu(torch=None, cupy=None, n=2000):
    """µs per launch from Python, steady state (n launches then a synchronize, divided by n)."""
    from numba import cuda

    k = gpu_helpers()
    out = {}

    def per_launch(fn):
        for _ in range(50):
            fn()
        cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e6

    empty, empty_args = k["empty"], k["empty_args"]
    out["numba_empty_us"] = per_launch(lambda: empty[1, 1]())
    a = cuda.device_array(32, np.float32)
    out["numba_empty_3arrays_us"] = per_launch(lambda: empty_args[1, 32](a, a, a, 1))
    if cupy is not None:
        try:
            ker = cupy.RawKernel(r'extern "C" __global__ void empty_kernel() {}', "empty_kernel")
            out["cupy_empty_us"] = per_launch(lambda: ker((1,), (1,), ()))
        except Exception as exc:
            out["cupy_error"] = f"{type(exc).__name__}: {exc}"
    if torch is not None:
        t = torch.zeros(1, device="cuda")
        out["torch_add_1elem_us"] = per_launch(lambda: t.add_(1.0))
    return out


def launch_overhead_cpu(torch=None, n=2000):
    """µs per op call on a 1-element array: the fixed cost of the framework, not of the arithmetic."""
    from gpu_cnn import functional as F

    x = np.ones((1, 1), np.float32)
    y = np.empty_like(x)

    def per_call(fn):
        for _ in range(50):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6

    out = {"gpu_cnn_relu_1elem_us": per_call(lambda: F.relu(x, out=y))}
    if torch is not None:
        t = torch.ones(1, 1)
        out["torch_relu_1elem_us"] = per_call(lambda: torch.relu(t))
    return out


# ---------------------------------------------------------------------------------------------------
# output: JSON, Markdown, plots


def write_json(path, record):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        return str(o)

    def clean(o):  # JSON has no inf/NaN
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    path.write_text(json.dumps(clean(record), indent=1, default=default) + "\n")
    return path


def fmt(v, spec=".3g", none="—"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def num(v, none="—"):
    """A rate for a table: 3 significant digits for small values, none for NaN/None."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    a = abs(v)
    return f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"


def markdown_table(header, rows, align=None):
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = "osD^v<>pPX*h"


def roofline_png(rows, ceilings, path, title):
    """Log-log roofline: arithmetic intensity (FLOP/byte) vs GFLOP/s, the measured bandwidth and FP32
    ceilings, one labelled point per (case, version)."""
    plt = _pyplot()
    pts = [r for r in rows if r.get("ms") and r.get("flop") and r.get("bytes")]
    fig, ax = plt.subplots(figsize=(11, 7.5), dpi=110)
    bw, peak = ceilings.get("bandwidth_GBps"), ceilings.get("compute_GFLOPs")
    ais = [r["flop"] / r["bytes"] for r in pts] or [1.0]
    lo, hi = min(ais + [0.05]) / 2, max(ais + [(peak / bw) if bw and peak else 10]) * 4
    if bw and peak:
        xs = np.logspace(math.log10(lo), math.log10(hi), 200)
        ax.plot(xs, np.minimum(bw * xs, peak), "k-", lw=2, label=f"roofline: {bw:,.0f} GB/s, {peak:,.0f} GFLOP/s")
        ax.axvline(peak / bw, color="k", ls=":", lw=0.8)
        fma = ceilings.get("fma_GFLOPs")
        if fma and abs(fma - peak) / peak > 0.02:
            ax.axhline(fma, color="gray", ls="--", lw=1, label=f"FMA-bound kernel: {fma:,.0f} GFLOP/s")
    impls = sorted({r["version"] for r in pts}, key=lambda v: (v.startswith("vendor") or v in ("cudnn", "cublas", "torch-cpu"), v))
    cmap = plt.get_cmap("tab10")
    families = sorted({r["op"].split(".")[0] for r in pts})
    for ci, impl in enumerate(impls):
        for r in (r for r in pts if r["version"] == impl):
            fam = r["op"].split(".")[0]
            ax.scatter(r["flop"] / r["bytes"], r["gflops"], color=cmap(ci % 10), marker=_MARKERS[families.index(fam) % len(_MARKERS)],
                       s=36, edgecolors="k", linewidths=0.4, zorder=3)
            ax.annotate(f"{r['case']} {r['op'].split('.', 1)[-1]}", (r["flop"] / r["bytes"], r["gflops"]), fontsize=5.5,
                        xytext=(3, 2), textcoords="offset points", color=cmap(ci % 10))
    for ci, impl in enumerate(impls):
        ax.scatter([], [], color=cmap(ci % 10), marker="o", label=f"version: {impl}")
    for fi, fam in enumerate(families):
        ax.scatter([], [], color="w", edgecolors="k", marker=_MARKERS[fi % len(_MARKERS)], label=f"op: {fam}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of compulsory traffic)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def versions_png(rows, path, title):
    """Horizontal bars: ms of every version (and the vendor) per (op, case), log scale."""
    plt = _pyplot()
    groups = []
    for r in rows:
        key = (r["op"], r["case"])
        if r.get("ms") and key not in groups:
            groups.append(key)
    labels, values, colors, ticks = [], [], [], []
    versions = sorted({r["version"] for r in rows if r.get("ms")})
    cmap = plt.get_cmap("tab10")
    y = 0
    for key in groups:
        for r in (r for r in rows if (r["op"], r["case"]) == key and r.get("ms")):
            labels.append(f"{key[0]} {key[1]} · {r['version']}")
            values.append(r["ms"])
            colors.append(cmap(versions.index(r["version"]) % 10))
            ticks.append(y)
            y += 1
        y += 0.6
    fig, ax = plt.subplots(figsize=(10, max(3, 0.22 * len(values) + 1.2)), dpi=110)
    ax.barh(ticks, values, color=colors, edgecolor="k", linewidth=0.3)
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms (median; lower is faster)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", which="both", alpha=0.25)
    for v, t in zip(values, ticks):
        ax.text(v, t, f" {v:.3g}", va="center", fontsize=5.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
