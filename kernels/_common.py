"""Helpers shared by every kernel module: ceil_div, launch grids, the kernel registry, fills, and the
device functions every kernel needs (flat-index unravelling, block-wide tree reductions).

Every kernel is declared with :func:`kernel`, which keeps it lazy (``@cuda.jit`` without a signature,
so importing works without a GPU) and records the signature the compile check builds it with.

With ``GPU_CNN_KERNEL_CACHE=1`` in the environment (``benchmarks/run_gpu.sh`` sets it, with a fresh
``NUMBA_CACHE_DIR`` per run) the kernels and device functions are compiled with Numba's on-disk cache,
so the benchmark, test and sanitizer processes of one GPU run compile each kernel once, not once each.
"""
import os
import sys
import threading

import numpy as np
from numba import config, cuda, float32

def _thread_safe_simulator_shared_arrays():
    """Under the CUDA simulator, make ``cuda.shared.array`` safe for the threads of a block.

    numba-cuda 0.30.4's simulator (``FakeCUDAShared.array``) looks the array up by its call site and
    creates it when missing, without a lock: two threads of a block arriving together can each create
    their own "shared" array, so one thread's writes never reach the others (tiled kernels then give
    wrong sums, now and then). Here the same lookup runs under a lock. Nothing changes on a GPU.
    Launches checked by gpu_cnn.simcheck allocate their shared arrays themselves (per block, under a lock).
    """
    if not config.ENABLE_CUDASIM:
        return
    from numba.cuda.simulator import kernelapi

    cls = kernelapi.FakeCUDAShared
    if getattr(cls, "_gpu_cnn_thread_safe", False):
        return
    original = cls.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory / unsupported: no call-site lookup
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):  # as the original does
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        site = (caller.f_code.co_filename, caller.f_lineno)  # what the original keys on
        with lock:
            res = self._allocations.get(site)
            if res is None:
                res = np.empty(shape, dtype)
                self._allocations[site] = res
        return res

    cls.array = array
    cls._gpu_cnn_thread_safe = True


_thread_safe_simulator_shared_arrays()

# Under the simulator, gpu_cnn.simcheck hooks the launches (checked inside simcheck.checking() or with
# GPU_CNN_SIMCHECK=1; with checking off they run as before). On a GPU it refuses GPU_CNN_SIMCHECK=1.
from gpu_cnn import simcheck as _simcheck  # noqa: E402,F401  (installs on import)

# name -> (dispatcher, signature, module). Filled at import time by @kernel.
KERNELS = {}
# name -> threads per block of its launches (int or tuple), where the registration gives ``block=``:
# the compile check needs it for the blocks and warps resident per SM.
KERNEL_BLOCKS = {}

# Numba's on-disk kernel cache, when asked for (see the module docstring); the simulator has none.
DISK_CACHE = os.environ.get("GPU_CNN_KERNEL_CACHE", "").strip() == "1" and not config.ENABLE_CUDASIM

# Threads per block for 1-D element-wise kernels.
TPB_1D = 256


def ceil_div(a, b):
    return (a + b - 1) // b


def grid_1d(n, tpb=TPB_1D):
    """(blocks, threads) covering n elements, at least one block."""
    return max(1, ceil_div(n, tpb)), tpb


# Threads of a grid-stride launch under the simulator, which runs every thread as a Python thread: a few
# threads looping over many elements cost a fraction of one thread per element.
SIM_STRIDE_THREADS = 32


def grid_stride_1d(n, tpb=TPB_1D):
    """(blocks, threads) for a grid-stride kernel over n elements: one element a thread on a GPU, one
    block of SIM_STRIDE_THREADS threads under the simulator (each thread then loops)."""
    if config.ENABLE_CUDASIM:
        return 1, SIM_STRIDE_THREADS
    return grid_1d(n, tpb)


def kernel(signature, block=None, launch_bounds=None):
    """Declare a CUDA kernel: lazy ``cuda.jit`` plus its compile-check signature.

    ``signature`` is a Numba signature string such as ``"void(float32[:, ::1], float32[::1])"``.
    ``block`` (optional) is the block shape its launcher uses on a GPU (an int or a tuple), from which the
    compile check computes the blocks and warps resident per SM. ``launch_bounds`` (optional,
    ``(max threads per block, min blocks per SM)``) is passed to ``cuda.jit`` and to the compile check:
    ptxas then keeps the registers low enough for that many blocks (the simulator ignores it).
    """

    def deco(fn):
        bounds = {} if launch_bounds is None or config.ENABLE_CUDASIM else {"launch_bounds": launch_bounds}
        k = cuda.jit(fn, cache=DISK_CACHE, **bounds)
        name = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
        KERNELS[name] = (k, signature, fn.__module__)
        if block is not None:
            KERNEL_BLOCKS[name] = block
        return k

    return deco


def device_function(signature):
    """Declare a CUDA device function; the compile check builds it with ``device=True``."""

    def deco(fn):
        f = cuda.jit(device=True, cache=DISK_CACHE)(fn)
        name = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
        KERNELS[name] = (f, signature, fn.__module__)
        return f

    return deco


# --- device functions (inlined into the kernels that call them) ----------------------------------------


@device_function("UniTuple(int64, 4)(int64, int64, int64, int64)")
def unravel4(i, B, C, D):
    """(a, b, c, d) of flat index i in a C-contiguous (A, B, C, D) array; d runs fastest.

    One thread per element, consecutive threads on consecutive d, so their loads and stores coalesce.
    """
    d = i % D
    t = i // D
    c = t % C
    t = t // C
    return t // B, t % B, c, d


@device_function("void(float32[::1], int64)")
def block_sum(buf, tid):
    """buf[0] = Σ buf by a shared-memory tree; len(buf) is the block size, a power of two.

    Every thread of the block must call it (it holds barriers), after writing its own buf[tid].
    """
    cuda.syncthreads()
    s = buf.shape[0] // 2
    while s > 0:
        if tid < s:
            buf[tid] += buf[tid + s]
        cuda.syncthreads()
        s //= 2


@device_function("void(float32[::1], int64)")
def block_max(buf, tid):
    """buf[0] = max of buf, as :func:`block_sum` (same barriers, same calling rule)."""
    cuda.syncthreads()
    s = buf.shape[0] // 2
    while s > 0:
        if tid < s:
            buf[tid] = max(buf[tid], buf[tid + s])
        cuda.syncthreads()
        s //= 2


@kernel("void(float32[::1], float32)", block=TPB_1D)
def fill_kernel(a, value):
    """Set every element of a contiguous float32 array (viewed flat) to value (grid-stride)."""
    # a: (n,) float32
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        a[i] = value


def fill(a, value=0.0):
    """Fill a C-contiguous float32 device array in place, without allocating."""
    flat = a.reshape(a.size) if a.ndim != 1 else a
    blocks, threads = grid_stride_1d(flat.shape[0])
    fill_kernel[blocks, threads](flat, float32(value))
    return a


def check_device_array(name, a, shape=None, dtype=np.float32):
    """Raise a clear error unless `a` is a C-contiguous device array of the given dtype (and shape).

    The launchers take Numba's device arrays (the simulator's too), by choice: they use Numba's methods
    (reshape, copy_to_host, is_c_contiguous), and a PyTorch tensor's dtype is not even NumPy's. Other CUDA
    arrays (CuPy, PyTorch) get an error that says how to wrap them; gpu_cnn.functional wraps them itself."""
    if not hasattr(a, "copy_to_host"):
        hint = ("; wrap it with numba.cuda.as_cuda_array(...) first (gpu_cnn.functional does so itself)"
                if hasattr(a, "__cuda_array_interface__") else "")
        raise TypeError(f"{name}: expected a device array (Numba's), got {type(a).__name__}{hint}")
    if np.dtype(a.dtype) != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {np.dtype(a.dtype).name}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")
    if not a.is_c_contiguous():
        raise ValueError(f"{name}: expected a C-contiguous array")
    return a


# --- simulator: warp shuffles ---------------------------------------------------------------------------


def _simulator_warp_shuffles():
    """Give the CUDA simulator ``cuda.shfl_xor_sync`` and ``cuda.shfl_down_sync`` (numba-cuda 0.30.4's has
    neither), for kernels whose every thread reaches every shuffle (the softmax warp kernel).

    Each thread posts its value, the block meets at its barrier, each reads its source lane's value
    (lane ^ lane_mask, or lane + delta; its own when that lane is outside the warp or the block), and
    the block meets again before the next exchange. Using the block barrier is stricter than a GPU
    (which needs only the warp): a kernel that shuffles under a thread-dependent branch hangs here
    rather than passing. Only the full mask is supported. Nothing changes on a GPU.
    """
    if not config.ENABLE_CUDASIM:
        return
    from numba.cuda.simulator import kernelapi

    cls = kernelapi.FakeCUDAModule
    if getattr(cls, "_gpu_cnn_shuffles", False):
        return
    lock = threading.Lock()

    def exchange(mask, value, source_of):
        if int(mask) & 0xFFFFFFFF != 0xFFFFFFFF:
            raise NotImplementedError("simulated warp shuffles support only the full mask 0xffffffff")
        t = threading.current_thread()
        # the simulator's BlockThread keeps its block in _manager; gpu_cnn.simcheck's checked threads in block
        manager = t._manager if hasattr(t, "_manager") else t.block
        with lock:
            posted = manager.__dict__.setdefault("_gpu_cnn_shuffle", {})
        tid = t.thread_id
        posted[tid] = value
        t.syncthreads()
        lane = tid % 32
        src = source_of(lane)
        got = posted.get(tid - lane + src, value) if 0 <= src < 32 else value
        t.syncthreads()
        return got

    def shfl_xor_sync(self, mask, value, lane_mask):
        return exchange(mask, value, lambda lane: lane ^ int(lane_mask))

    def shfl_down_sync(self, mask, value, delta):
        return exchange(mask, value, lambda lane: lane + int(delta))

    cls.shfl_xor_sync = shfl_xor_sync
    cls.shfl_down_sync = shfl_down_sync
    cls._gpu_cnn_shuffles = True


_simulator_warp_shuffles()
