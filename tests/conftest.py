"""Test setup: the kernel backend is chosen before Numba is imported.

By default the kernels run under Numba's CUDA simulator (``sim``). On a machine with a GPU,
``GPU_CNN_BACKEND=cuda python -m pytest`` runs the same tests on the real device instead.
"""
import os
import sys

os.environ.setdefault("GPU_CNN_BACKEND", "sim")  # must happen before numba.cuda is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gpu_cnn  # noqa: E402

KERNEL_BACKEND = os.environ["GPU_CNN_BACKEND"].strip().lower()
if KERNEL_BACKEND not in ("sim", "cuda"):
    KERNEL_BACKEND = "sim"
BACKENDS = ["cpu", KERNEL_BACKEND]

# The kernel test files: CI runs them under gpu_cnn.simcheck (GPU_CNN_SIMCHECK=1 python -m pytest -m simcheck),
# so every kernel is checked for races, divergent barriers, uninitialized reads and bad indices. A new kernel
# test file joins with one line here.
SIMCHECK_FILES = {
    "test_conv2d.py",
    "test_conv2d_igemm.py",
    "test_pool.py",
    "test_gemm.py",
    "test_activation.py",
    "test_softmax.py",
    "test_optim.py",
    "test_metrics.py",
    "test_conv_general.py",
    "test_norm.py",
}
if os.environ.get("GPU_CNN_SIMCHECK", "").strip() == "1":
    import gpu_cnn.simcheck  # noqa: E402,F401  (hooks every simulator launch; refuses on a real GPU)


def pytest_configure(config):
    config.addinivalue_line("markers", "simcheck: a kernel test file, run under GPU_CNN_SIMCHECK=1 in CI")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SIMCHECK_FILES:
            item.add_marker(pytest.mark.simcheck)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test once on the cpu backend and once on the kernel backend (sim or cuda)."""
    gpu_cnn.set_backend(request.param)
    yield request.param
    gpu_cnn.set_backend(KERNEL_BACKEND)


@pytest.fixture
def kernel_backend():
    """The backend that runs the CUDA kernels: sim (default) or cuda."""
    gpu_cnn.set_backend(KERNEL_BACKEND)
    yield KERNEL_BACKEND


@pytest.fixture
def cpu_backend():
    gpu_cnn.set_backend("cpu")
    yield "cpu"
    gpu_cnn.set_backend(KERNEL_BACKEND)


@pytest.fixture(autouse=True)
def _fast_simulator_barriers():
    """The simulator runs each CUDA thread of a block as a Python thread; at every syncthreads the
    waiting threads hand over the GIL only at the interpreter's switch interval (5 ms). Block
    reductions hit a barrier per tree level, and this shorter interval makes them several times faster.
    Speed only: results do not depend on it."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def poison_weight_before_step(monkeypatch):
    """poison(trainer, when): the model's first weight turns NaN (in place, as a diverging update would
    write it) just before Trainer.fit's device step number `when`."""

    def poison(trainer, when):
        real = trainer._device_step

        def poisoned(batch, step, following=None):
            if step == when:
                w = trainer.model.parameters()[0]
                host = w.numpy()
                host.flat[0] = np.nan
                w.assign(host)
            return real(batch, step, following)

        monkeypatch.setattr(trainer, "_device_step", poisoned)

    return poison
