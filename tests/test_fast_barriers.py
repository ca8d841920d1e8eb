"""The package itself makes the simulator's barriers fast: while a simulator kernel runs, the interpreter's
switch interval is gpu_cnn.backend.SIM_SWITCH_INTERVAL_S, and afterwards (also after a failing kernel) it is
whatever it was before. Outside the tests nothing else shortens it (tests/conftest.py does, for the suite)."""
import sys

import numpy as np
import pytest
from numba import config, cuda

import gpu_cnn.backend as B

pytestmark = pytest.mark.skipif(not config.ENABLE_CUDASIM, reason="the switch interval matters only under the simulator")

seen = []


@cuda.jit
def record_interval(out):
    i = cuda.threadIdx.x
    if i == 0:
        seen.append(sys.getswitchinterval())  # plain Python: the simulator runs kernels as Python
    cuda.syncthreads()
    out[i] = i


@cuda.jit
def fail(out):
    seen.append(sys.getswitchinterval())
    raise RuntimeError("planted failure")


def test_launch_shortens_the_interval_and_restores_it(kernel_backend):
    sys.setswitchinterval(0.005)  # the interpreter's default; conftest's fixture puts its own back afterwards
    seen.clear()
    out = np.zeros(4, np.int64)
    record_interval[1, 4](out)
    assert seen == [pytest.approx(B.SIM_SWITCH_INTERVAL_S)]
    assert sys.getswitchinterval() == pytest.approx(0.005)
    np.testing.assert_array_equal(out, [0, 1, 2, 3])


def test_a_failing_kernel_restores_the_interval(kernel_backend):
    sys.setswitchinterval(0.004)
    seen.clear()
    with pytest.raises(Exception):
        fail[1, 1](np.zeros(1))
    assert seen == [pytest.approx(B.SIM_SWITCH_INTERVAL_S)]
    assert sys.getswitchinterval() == pytest.approx(0.004)


def test_an_interval_already_shorter_is_kept(kernel_backend):
    sys.setswitchinterval(1e-5)  # already shorter: kept while the kernel runs
    seen.clear()
    record_interval[1, 2](np.zeros(2, np.int64))
    assert seen == [pytest.approx(1e-5)] and sys.getswitchinterval() == pytest.approx(1e-5)
