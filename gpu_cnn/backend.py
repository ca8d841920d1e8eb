"""Backend selection: ``cuda`` (real GPU), ``sim`` (Numba's CUDA simulator) or ``cpu`` (NumPy).

The simulator is chosen by Numba when ``numba.cuda`` is first imported, so ``sim`` must be switched on
before that. This module never imports ``numba.cuda`` itself until a kernel backend is asked for, and it
sets ``NUMBA_ENABLE_CUDASIM`` (and reloads Numba's config) on the user's behalf.
"""
import importlib.abc
import os
import sys
import threading

BACKENDS = ("cuda", "sim", "cpu")
ENV_VAR = "GPU_CNN_BACKEND"

_backend = None


class BackendError(RuntimeError):
    """A backend was asked for that this process cannot provide."""


def _cuda_module_loaded():
    return "numba.cuda" in sys.modules


def _sim_active():
    """True/False once numba.cuda is imported (then fixed for the process), None before."""
    if not _cuda_module_loaded():
        return None
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


# --- fast simulator barriers -----------------------------------------------------------------------
#
# The simulator runs every CUDA thread of a block as a Python thread. A thread waiting at
# cuda.syncthreads() hands the GIL over only at the interpreter's switch interval (5 ms by default), so
# a kernel with barriers crawls (one conv2d_backward of a 2×16×4×4 output took minutes). While a
# simulator kernel runs, the interval is shortened to SIM_SWITCH_INTERVAL_S and put back afterwards:
# the hook wraps the simulator's launch (FakeCUDAKernel.__call__) and nothing else. Speed only: results
# do not depend on it.

SIM_SWITCH_INTERVAL_S = 1e-4
_SIM_KERNEL_MODULE = "numba.cuda.simulator.kernel"
_launch_lock = threading.Lock()
_launch_depth = 0
_saved_interval = None


def _fast_barriers_launch(launch):
    def __call__(self, *args):
        global _launch_depth, _saved_interval
        if getattr(self, "_device", False):  # a device function called from a kernel: no launch
            return launch(self, *args)
        with _launch_lock:
            if _launch_depth == 0:
                _saved_interval = sys.getswitchinterval()
                if _saved_interval > SIM_SWITCH_INTERVAL_S:
                    sys.setswitchinterval(SIM_SWITCH_INTERVAL_S)
            _launch_depth += 1
        try:
            return launch(self, *args)
        finally:
            with _launch_lock:
                _launch_depth -= 1
                if _launch_depth == 0:
                    sys.setswitchinterval(_saved_interval)

    __call__.__wrapped__ = launch
    __call__._gpu_cnn_fast_barriers = True
    return __call__


def _patch_simulator_launch(module):
    cls = module.FakeCUDAKernel
    if not getattr(cls.__call__, "_gpu_cnn_fast_barriers", False):
        cls.__call__ = _fast_barriers_launch(cls.__call__)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the simulator's launch as soon as Numba imports it (nothing is imported early)."""

    def find_spec(self, name, path, target=None):
        if name != _SIM_KERNEL_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                loader = spec.loader

                class _Loader(importlib.abc.Loader):
                    def create_module(self, spec):
                        return loader.create_module(spec)

                    def exec_module(self, module):
                        loader.exec_module(module)
                        _patch_simulator_launch(module)

                spec.loader = _Loader()
                return spec
        return None


def _install_fast_barriers():
    module = sys.modules.get(_SIM_KERNEL_MODULE)
    if module is not None:
        _patch_simulator_launch(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def _enable_simulator(on):
    if on:
        _install_fast_barriers()
    state = _sim_active()
    if state is None:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1" if on else "0"
        if "numba" in sys.modules:
            from numba.core import config

            config.reload_config()
        return
    if state != on:
        want, have = ("sim", "a real GPU") if on else ("cuda", "the CUDA simulator")
        raise BackendError(
            f"cannot switch to backend {want!r}: numba.cuda was already imported for {have} in this process. "
            f"Choose the backend before using any kernel (gpu_cnn.set_backend first, or set {ENV_VAR})."
        )


def gpu_available():
    """True when a real NVIDIA GPU with a working driver is visible. Never raises."""
    if _sim_active():
        return False
    if _sim_active() is None and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:
        return False


def set_backend(name):
    """Select the backend for every op that follows: ``"cuda"``, ``"sim"`` or ``"cpu"``.

    ``"cuda"`` without a usable GPU raises :class:`BackendError`; it never falls back silently.
    """
    global _backend
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    name = name.lower()
    if name == "sim":
        _enable_simulator(True)
    elif name == "cuda":
        _enable_simulator(False)
        if not gpu_available():
            raise BackendError(
                "backend 'cuda' needs an NVIDIA GPU with a working driver, and none was found "
                "(numba.cuda.is_available() is False). Use 'cpu', or 'sim' for the CUDA simulator."
            )
    _backend = name
    return name


def get_backend():
    """The current backend name, choosing one on first use: $GPU_CNN_BACKEND, else cuda if a GPU is
    present, else cpu."""
    if _backend is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env.lower() not in BACKENDS:
                raise ValueError(f"${ENV_VAR}: expected one of {', '.join(BACKENDS)}, got {env!r} "
                                 f"(set {ENV_VAR} to a valid backend, or unset it)")
            set_backend(env)
        else:
            set_backend("cuda" if gpu_available() else "cpu")
    return _backend


def uses_kernels():
    """True on the backends that run the Numba CUDA kernels (cuda and sim)."""
    return get_backend() in ("cuda", "sim")
