"""Every kernel in gpu_cnn.kernels builds for real GPUs: PTX for sm_80 and sm_90, assembled by ptxas.

The simulator accepts code a GPU rejects (Python objects, NumPy calls, wrong types), so this is the
check that the kernels are real CUDA. Kernels are found by walking the package: a new kernel is
covered without editing this file.
"""
import json
import os
import subprocess
import sys

import pytest

from gpu_cnn.kernels import KERNEL_MODULES


@pytest.fixture(scope="module")
def build_results():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    env.pop("GPU_CNN_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "gpu_cnn.compile_check", "--json"], capture_output=True, text=True, env=env
    )
    assert proc.stdout.strip(), f"compile check printed nothing:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def test_every_kernel_builds_for_sm80_and_sm90(build_results):
    failed = [f"{r['kernel']} {r['arch']}: {r['error']}" for r in build_results if "error" in r]
    assert not failed, "\n".join(failed)
    built = {(r["kernel"], r["arch"]) for r in build_results}
    names = {r["kernel"] for r in build_results}
    assert built == {(n, a) for n in names for a in ("sm_80", "sm_90")}
    for r in build_results:
        if r.get("device_function"):
            continue  # built alone only to prove it compiles; inlined, it has no registers of its own
        assert r["registers"] > 0, r  # ptxas -v reported real resource usage


def test_device_functions_build_and_are_reported_as_such(build_results):
    """The shared device functions compile alone for both arches, and the kernels that call them build
    too (typing a call to a device function needs a GPU in numba-cuda 0.30; the check answers for it)."""
    device = {r["kernel"] for r in build_results if r.get("device_function")}
    assert {"_common.unravel4", "_common.block_sum", "_common.block_max"} <= device
    callers = {"conv2d.conv2d_forward_naive_kernel", "pool.maxpool_backward_gather_kernel",
               "softmax.softmax_xent_forward_kernel"}
    built = {r["kernel"] for r in build_results if "error" not in r and not r.get("device_function")}
    assert callers <= built


def test_every_kernel_module_contributes_kernels(build_results):
    modules = {r["kernel"].split(".")[0] for r in build_results}
    present = [m for m in KERNEL_MODULES if os.path.exists(os.path.join(os.path.dirname(sys.modules["gpu_cnn.kernels"].__file__), m + ".py"))]
    assert present, "no kernel modules found"
    for m in present:
        assert m in modules, f"kernels/{m}.py has no kernel in the compile check"


def test_unregistered_kernel_is_reported(tmp_path):
    """A kernel declared with bare @cuda.jit (no signature) makes the check fail, naming it."""
    code = (
        "import os; os.environ['NUMBA_ENABLE_CUDASIM']='0'\n"
        "import sys, types\n"
        "import gpu_cnn.kernels as pkg\n"
        "from numba import cuda\n"
        "mod = types.ModuleType('gpu_cnn.kernels.rogue'); sys.modules['gpu_cnn.kernels.rogue'] = mod\n"
        "mod.rogue = cuda.jit(lambda a: None)\n"
        "from gpu_cnn.compile_check import collect_kernels\n"
        "try:\n    collect_kernels()\nexcept RuntimeError as e:\n    print('REPORTED', e)\n"
    )
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    env.pop("GPU_CNN_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "REPORTED" in proc.stdout and "gpu_cnn.kernels.rogue.rogue" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("flag, cache", [("1", "CUDACache"), ("", "NullCache")])
def test_kernel_disk_cache_only_when_asked(tmp_path, flag, cache):
    """GPU_CNN_KERNEL_CACHE=1 (set by benchmarks/run_gpu.sh) gives every kernel and device function Numba's
    on-disk cache; without it none has one. Declaring a cached kernel needs no GPU."""
    code = (
        "import gpu_cnn.kernels as pkg, importlib, pkgutil\n"
        "from gpu_cnn.kernels import _common\n"
        "for m in pkgutil.iter_modules(pkg.__path__): importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "print(len(_common.KERNELS), sorted({type(d._cache).__name__ for d, _, _ in _common.KERNELS.values()}))\n"
    )
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", GPU_CNN_KERNEL_CACHE=flag, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("GPU_CNN_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    count, kinds = proc.stdout.split(" ", 1)
    assert int(count) > 20 and kinds.strip() == repr([cache]), proc.stdout + proc.stderr
