"""Backend selection, each case in a fresh interpreter (the simulator choice is fixed per process)."""
import os
import subprocess
import sys

import pytest

import gpu_cnn


def run_py(code, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_CNN_BACKEND", "NUMBA_ENABLE_CUDASIM")}
    env.update(env_overrides)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    return proc


def test_sim_from_environment_switches_simulator_on_before_numba():
    proc = run_py(
        "import gpu_cnn, numpy as np\n"
        "from numba import cuda\n"
        "from numba.core import config\n"
        "print(gpu_cnn.get_backend(), config.ENABLE_CUDASIM, type(cuda.to_device(np.ones(2))).__name__)\n",
        GPU_CNN_BACKEND="sim",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["sim", "1", "FakeCUDAArray"]


def test_set_backend_sim_without_environment_variable():
    proc = run_py(
        "import os, gpu_cnn\n"
        "assert 'NUMBA_ENABLE_CUDASIM' not in os.environ\n"
        "import numba  # numba itself already imported: the package reloads its config\n"
        "gpu_cnn.set_backend('sim')\n"
        "from gpu_cnn import functional as F\n"
        "import numpy as np\n"
        "from numba.core import config\n"
        "y = F.relu(np.array([[-1.0, 2.0]]))\n"
        "print(config.ENABLE_CUDASIM, y.tolist())\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "1 [[0.0, 2.0]]"


def test_cuda_without_gpu_is_a_clear_error_or_works_with_one():
    proc = run_py(
        "import gpu_cnn\n"
        "try:\n    gpu_cnn.set_backend('cuda'); print('OK', gpu_cnn.gpu_available())\n"
        "except gpu_cnn.BackendError as e:\n    print('ERR', e)\n"
    )
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.startswith("OK"):
        assert proc.stdout.split() == ["OK", "True"]  # a real GPU is present: cuda must work
    else:
        assert "needs an NVIDIA GPU" in proc.stdout and "'cpu'" in proc.stdout


def test_auto_selection_without_gpu_is_cpu():
    proc = run_py("import gpu_cnn\nprint(gpu_cnn.get_backend(), gpu_cnn.gpu_available())\n")
    assert proc.returncode == 0, proc.stderr
    backend, has_gpu = proc.stdout.split()
    assert backend == ("cuda" if has_gpu == "True" else "cpu")


def test_switching_from_sim_to_cuda_after_kernels_loaded_is_refused():
    proc = run_py(
        "import gpu_cnn\n"
        "gpu_cnn.set_backend('sim')\n"
        "from numba import cuda\n"
        "try:\n    gpu_cnn.set_backend('cuda')\nexcept gpu_cnn.BackendError as e:\n    print('ERR', e)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ERR") and "already imported" in proc.stdout


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="backend: expected one of cuda, sim, cpu"):
        gpu_cnn.set_backend("opencl")
    with pytest.raises(ValueError, match="backend"):
        gpu_cnn.set_backend(3)


def test_environment_variable_with_bad_name_is_a_clear_error():
    proc = run_py("import gpu_cnn\ngpu_cnn.get_backend()\n", GPU_CNN_BACKEND="tpu")
    assert proc.returncode != 0
    assert "$GPU_CNN_BACKEND: expected one of cuda, sim, cpu, got 'tpu'" in proc.stderr  # names where it came from


def test_cpu_backend_does_not_load_numba_cuda():
    proc = run_py(
        "import sys, numpy as np, gpu_cnn\n"
        "gpu_cnn.set_backend('cpu')\n"
        "from gpu_cnn import functional as F\n"
        "F.relu(np.ones((2, 3)))\n"
        "print('numba.cuda' in sys.modules)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_info_prints_backend_and_versions():
    proc = subprocess.run([sys.executable, "-m", "gpu_cnn.cli", "info", "--backend", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("backend      cpu", "numpy", "numba ", "numba-cuda   0.30.4", "cupy", "gpu", "python"):
        assert word in proc.stdout
