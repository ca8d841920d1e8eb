"""gpu-cnn: hand-written Numba CUDA kernels for CNNs, and a small framework that trains CNNs with them.

    import gpu_cnn
    from gpu_cnn import functional as F, nn
    gpu_cnn.set_backend("cpu")        # or "sim" (Numba's CUDA simulator) or "cuda"
"""
import os as _os
import pathlib as _pathlib

from .backend import BackendError, get_backend, gpu_available, set_backend

__version__ = "0.1.0"

# From a source checkout that shadows an installed copy, ``gpu_cnn.kernels`` lives in ../kernels.
_root = _pathlib.Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "kernels" / "_common.py").is_file():
    __path__.append(str(_root))  # noqa: F821  (module __path__)

# The simulator must be on before numba.cuda is imported anywhere: honour the variable right away.
if _os.environ.get("GPU_CNN_BACKEND", "").strip().lower() == "sim":
    set_backend("sim")

_LAZY = {
    "functional": ".functional",
    "nn": ".nn",
    "models": ".models",
    "data": ".data",
    "viz": ".viz",
    "optim": ".optim",
    "memory": ".memory",
    "simcheck": ".simcheck",
}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return importlib.import_module(_LAZY[name], __name__)
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name in ("save", "load"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'gpu_cnn' has no attribute {name!r}")


__all__ = ["set_backend", "get_backend", "gpu_available", "BackendError", "Trainer", "save", "load",
           "functional", "nn", "models", "data", "viz", "optim", "memory",
           "simcheck"]
