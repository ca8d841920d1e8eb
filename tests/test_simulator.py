"""The CUDA simulator as the suite runs it: shared arrays are shared by every thread of a block.

numba-cuda 0.30.4's simulator creates a block's shared array on first use without a lock, so two
threads arriving together could each get their own (gpu_cnn.kernels._common works around it). This
kernel makes every thread write its own slot of a shared array, then checks that thread 0 sees them
all. (On a GPU it holds by construction; the test runs there too.)
"""
import importlib
import sys

import numpy as np
from numba import cuda, int64  # after conftest chose the backend (the simulator is fixed on import)

importlib.import_module("gpu_cnn.kernels._common")  # installs the workaround under the simulator

THREADS = 256


@cuda.jit
def gather_ids(out):
    a = cuda.shared.array(THREADS, int64)
    b = cuda.shared.array(THREADS, int64)
    t = cuda.threadIdx.x
    a[t] = t + 1
    b[t] = 2 * (t + 1)
    cuda.syncthreads()
    if t == 0:
        total = 0
        for i in range(THREADS):
            total += a[i] + b[i]
        out[0] = total


def test_every_thread_of_a_block_shares_one_shared_array(kernel_backend):
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # simulator threads switch often: without the workaround most launches fail
    try:
        out = cuda.device_array(1, np.int64)
        for _ in range(25):  # every launch allocates the shared arrays anew
            gather_ids[1, THREADS](out)
            assert out.copy_to_host()[0] == 3 * THREADS * (THREADS + 1) // 2
    finally:
        sys.setswitchinterval(old)
