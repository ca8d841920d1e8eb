"""Backend selection: ``cuda`` (real GPU), ``sim`` (Numba's CUDA simulator) or ``cpu`` (NumPy).

The simulator is chosen by Numba when ``numba.cuda`` is first imported, so ``sim`` must be switched on
before that. This module never imports ``numba.cuda`` itself until a kernel backend is asked for, and it
sets ``NUMBA_ENABLE_CUDASIM`` (and reloads Numba's config) on the user's behalf.
"""
import os
import sys

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


def _enable_simulator(on):
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
