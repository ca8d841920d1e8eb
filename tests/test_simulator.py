"""The CUDA simulator as the suite runs it: shared arrays are shared by every thread of a block.

numba-cuda 0.30.4's simulator creates a block's shared array on first use without a lock, so two
threads arriving together could each get their own (gpu_cnn.kernels._common works around it). Here the
allocation is made slow on purpose (a sleep lets the other threads run), which turns the rare race into
a certain one without the workaround. On a GPU the kernel runs as it is and the property holds by
construction.
"""
import importlib
import time

import numpy as np
from numba import config, cuda, int64  # after conftest chose the backend (the simulator is fixed on import)

_common = importlib.import_module("gpu_cnn.kernels._common")  # installs the workaround under the simulator

THREADS = 64


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


class _SlowEmpty:
    """numpy, except that np.empty sleeps first: a thread allocating a shared array hands over the GIL."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(*args, **kwargs):
        time.sleep(1e-3)
        return np.empty(*args, **kwargs)


def test_every_thread_of_a_block_shares_one_shared_array(kernel_backend, monkeypatch):
    if config.ENABLE_CUDASIM:
        from numba.cuda.simulator import kernelapi

        monkeypatch.setattr(kernelapi, "np", _SlowEmpty())  # the simulator's own allocation
        monkeypatch.setattr(_common, "np", _SlowEmpty())  # the workaround's
    out = cuda.device_array(1, np.int64)
    for _ in range(3):  # every launch allocates the shared arrays anew
        gather_ids[1, THREADS](out)
        assert out.copy_to_host()[0] == 3 * THREADS * (THREADS + 1) // 2


def test_grid_stride_fill_covers_every_element_with_few_threads(kernel_backend):
    """fill is grid-stride: under the simulator one block of SIM_STRIDE_THREADS threads loops over
    every element (1000: not a multiple of it), on a GPU one thread an element; a view is filled in place."""
    from gpu_cnn.ops import _base

    a = _base.to_device(np.arange(1003, dtype=np.float32))
    blocks, threads = _common.grid_stride_1d(1000)
    if config.ENABLE_CUDASIM:
        assert (blocks, threads) == (1, _common.SIM_STRIDE_THREADS)
    else:
        assert blocks * threads >= 1000
    _common.fill(a[:1000], 2.5)
    got = a.copy_to_host()
    assert (got[:1000] == 2.5).all() and (got[1000:] == [1000, 1001, 1002]).all()
