"""gpu_cnn.simcheck, tested like a kernel: planted bugs it must catch with the right kind and a message
naming the array and element, and correct kernels using the same features that must pass clean.

The kernels are plain ``@cuda.jit`` functions, as a user would write them, on a few threads and blocks.
"""
import os
import re
import threading
import time

import numpy as np
import pytest
from numba import config, cuda, float32  # after conftest chose the backend

import gpu_cnn
from gpu_cnn import backend as gpu_backend
from gpu_cnn import simcheck
from gpu_cnn.ops import _base

pytestmark = pytest.mark.skipif(not config.ENABLE_CUDASIM, reason="simcheck checks simulator launches")

THIS = os.path.basename(__file__)
N = 8  # threads per block in most kernels below


def _line(fn, text):
    """The source line number of the first line of `fn` containing `text`: messages must name it."""
    import inspect

    src, first = inspect.getsourcelines(fn.py_func)
    for k, line in enumerate(src):
        if text in line:
            return first + k
    raise AssertionError(f"{text!r} not in {fn.py_func.__name__}")


def _caught(kind, launch):
    with simcheck.checking():
        with pytest.raises(simcheck.SimcheckError) as info:
            launch()
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.kind == kind, str(err)
    return str(err)


# --- planted bugs --------------------------------------------------------------------------------------


@cuda.jit
def neighbour_no_barrier(x, out):
    s = cuda.shared.array(N, float32)
    t = cuda.threadIdx.x
    s[t] = x[t]
    out[t] = s[(t + 1) % N]  # BUG: no syncthreads() before reading a neighbour's slot


def test_missing_barrier_before_neighbour_read_is_a_race(kernel_backend):
    x = np.arange(N, dtype=np.float32)
    msg = _caught("race", lambda: neighbour_no_barrier[1, N](x, np.zeros(N, np.float32)))
    assert "shared array 's'" in msg and "'neighbour_no_barrier'" in msg
    m = re.search(r"element \[(\d+)\]", msg)
    assert m
    # both accesses with their lines: the write s[t] and the read s[(t + 1) % N]
    assert f"{THIS}:{_line(neighbour_no_barrier, 's[t] = x[t]')}" in msg
    assert f"{THIS}:{_line(neighbour_no_barrier, 'out[t] = s[')}" in msg
    assert len(re.findall(r"block \(0, 0, 0\) thread \((\d+), 0, 0\)", msg)) == 2


@cuda.jit
def tile_loop_one_barrier(x, out):
    # each round loads a tile and every thread sums it; BUG: no barrier after the sum, so the next
    # round's load overwrites slots that slower threads still read
    s = cuda.shared.array(N, float32)
    t = cuda.threadIdx.x
    acc = float32(0)
    for r in range(3):
        s[t] = x[r * N + t]
        cuda.syncthreads()
        for j in range(N):
            acc += s[j]
    out[t] = acc


def test_missing_second_barrier_in_tile_loop_is_a_race(kernel_backend):
    x = np.arange(3 * N, dtype=np.float32)
    msg = _caught("race", lambda: tile_loop_one_barrier[1, N](x, np.zeros(N, np.float32)))
    assert "shared array 's'" in msg and re.search(r"element \[\d+\]", msg)
    assert f"{THIS}:{_line(tile_loop_one_barrier, 's[t] = x[r * N + t]')}" in msg
    assert f"{THIS}:{_line(tile_loop_one_barrier, 'acc += s[j]')}" in msg


@cuda.jit
def barrier_under_branch(x, out):
    s = cuda.shared.array(N, float32)
    t = cuda.threadIdx.x
    s[t] = x[t]
    if t < 4:
        cuda.syncthreads()  # BUG: only threads 0..3 reach it
    out[t] = s[t]


def test_barrier_under_thread_dependent_branch(kernel_backend):
    x = np.arange(N, dtype=np.float32)
    msg = _caught("barrier", lambda: barrier_under_branch[1, N](x, np.zeros(N, np.float32)))
    assert "'barrier_under_branch'" in msg
    assert f"{THIS}:{_line(barrier_under_branch, 'cuda.syncthreads()')}" in msg
    assert re.search(r"thread \([4-7], 0, 0\) returned", msg)


@cuda.jit
def early_return(x, out, n):
    s = cuda.shared.array(N, float32)
    t = cuda.threadIdx.x
    if t >= n:
        return  # BUG: the threads past n never reach the barrier below
    s[t] = x[t]
    cuda.syncthreads()
    out[t] = s[n - 1 - t]


def test_early_return_before_barrier(kernel_backend):
    x = np.arange(N, dtype=np.float32)
    msg = _caught("barrier", lambda: early_return[1, N](x, np.zeros(N, np.float32), 5))
    assert f"{THIS}:{_line(early_return, 'cuda.syncthreads()')}" in msg
    assert re.search(r"thread \([5-7], 0, 0\) returned from the kernel at ", msg)
    assert f"{THIS}:{_line(early_return, 'return  # BUG')}" in msg


@cuda.jit
def different_barriers(x, out):
    t = cuda.threadIdx.x
    if t % 2 == 0:
        cuda.syncthreads()  # even threads wait here
        out[t] = x[t]
    else:
        out[t] = -x[t]
        cuda.syncthreads()  # BUG: odd threads wait at another barrier


def test_threads_waiting_at_different_barriers(kernel_backend):
    x = np.arange(N, dtype=np.float32)
    msg = _caught("barrier", lambda: different_barriers[1, N](x, np.zeros(N, np.float32)))
    first = _line(different_barriers, "cuda.syncthreads()  # even")
    second = _line(different_barriers, "cuda.syncthreads()  # BUG")
    assert f"{THIS}:{first}" in msg and f"{THIS}:{second}" in msg
    assert "different syncthreads()" in msg


@cuda.jit
def all_write_out0(x, out):
    t = cuda.threadIdx.x
    out[0] = x[t]  # BUG: every thread writes out[0]


def test_every_thread_writing_one_element(kernel_backend):
    x = np.arange(N, dtype=np.float32)
    msg = _caught("race", lambda: all_write_out0[1, N](x, np.zeros(1, np.float32)))
    assert "argument 'out' element [0]" in msg and "global memory" in msg
    assert msg.count(f"{THIS}:{_line(all_write_out0, 'out[0] = x[t]')}") == 2


@cuda.jit
def half_tile(x, out):
    s = cuda.shared.array((2, N), float32)
    t = cuda.threadIdx.x
    s[0, t] = x[t]  # BUG: row 1 of the tile is never loaded
    cuda.syncthreads()
    out[t] = s[0, t] + s[1, t]


def test_reading_unwritten_half_of_shared_tile(kernel_backend):
    x = np.arange(N, dtype=np.float32)
    msg = _caught("uninitialized", lambda: half_tile[1, N](x, np.zeros(N, np.float32)))
    assert "shared array 's'" in msg
    assert re.search(r"element \[1, \d\]", msg)
    assert f"{THIS}:{_line(half_tile, 'out[t] = s[0, t] + s[1, t]')}" in msg


@cuda.jit
def copy_kernel(x, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = x[i]


def test_reading_device_array_nobody_wrote(kernel_backend):
    with simcheck.checking():
        x = cuda.device_array(N, np.float32)  # BUG: never written
        out = cuda.device_array(N, np.float32)
        with pytest.raises(simcheck.SimcheckError) as info:
            copy_kernel[1, N](x, out)
    assert info.value.kind == "uninitialized"
    msg = str(info.value)
    assert "argument 'x'" in msg and re.search(r"element \[\d\]", msg)
    assert "device_array" in msg and f"{THIS}:{_line(copy_kernel, 'out[i] = x[i]')}" in msg


def test_reading_projects_empty_buffer_nobody_wrote(kernel_backend):
    with simcheck.checking():
        x = _base.empty((3, N))  # the orchestrator's allocation helper
        x[0:2].copy_to_device(np.ones((2, N), np.float32))  # rows 0 and 1 written, row 2 not
        out = cuda.device_array(3 * N, np.float32)
        with pytest.raises(simcheck.SimcheckError) as info:
            copy_kernel[3, N](x.reshape(3 * N), out)
    assert info.value.kind == "uninitialized"
    assert re.search(r"argument 'x' element \[(1[6-9]|2[0-3])\]", str(info.value)), str(info.value)


@cuda.jit
def off_by_one_guard(x, out):
    i = cuda.grid(1)
    if i <= x.shape[0]:  # BUG: <= lets thread n read x[n]
        out[i] = x[i]


def test_off_by_one_guard_reads_past_the_end(kernel_backend):
    x = np.arange(5, dtype=np.float32)
    msg = _caught("bounds", lambda: off_by_one_guard[1, N](x, np.zeros(N, np.float32)))
    assert "argument 'x'" in msg and "index [5]" in msg and "past the end" in msg
    assert "thread (5, 0, 0)" in msg
    assert f"{THIS}:{_line(off_by_one_guard, 'out[i] = x[i]')}" in msg


@cuda.jit
def left_neighbour(x, out):
    t = cuda.threadIdx.x
    out[t] = x[t] - x[t - 1]  # BUG: x[-1] at t = 0


def test_negative_index_at_t0(kernel_backend):
    x = np.arange(N, dtype=np.float32)
    msg = _caught("bounds", lambda: left_neighbour[1, N](x, np.zeros(N, np.float32)))
    assert "negative index -1" in msg and "argument 'x'" in msg and "thread (0, 0, 0)" in msg


@cuda.jit
def blocks_race(x, out):
    i = cuda.grid(1)
    if cuda.threadIdx.x == 0:
        out[0] += x[i]  # BUG: thread 0 of every block updates out[0], no atomic


def test_two_blocks_racing_on_one_global_element(kernel_backend):
    x = np.arange(2 * N, dtype=np.float32)
    msg = _caught("race", lambda: blocks_race[2, N](x, np.zeros(1, np.float32)))
    assert "argument 'out' element [0]" in msg
    assert "block (0, 0, 0) thread (0, 0, 0)" in msg and "block (1, 0, 0) thread (0, 0, 0)" in msg
    assert "different blocks" in msg


@cuda.jit
def transpose_no_barrier(x, out):
    # 2-D block, 3-D shared array (any rank): BUG, the transposed read has no barrier before it
    s = cuda.shared.array((2, 4, 4), float32)
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    s[1, ty, tx] = x[ty, tx]
    out[ty, tx] = s[1, tx, ty]


def test_race_in_3d_shared_array_with_2d_block(kernel_backend):
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    msg = _caught("race", lambda: transpose_no_barrier[1, (4, 4)](x, np.zeros((4, 4), np.float32)))
    assert "shared array 's'" in msg and re.search(r"element \[1, \d, \d\]", msg)
    assert re.search(r"thread \(\d, \d, 0\)", msg)


@cuda.jit
def atomic_and_plain(out):
    t = cuda.threadIdx.x
    if t == 0:
        out[0] = 1.0  # BUG: a plain write among other threads' atomics
    else:
        cuda.atomic.add(out, 0, 1.0)


def test_plain_write_mixed_with_atomics_is_a_race(kernel_backend):
    msg = _caught("race", lambda: atomic_and_plain[1, N](np.zeros(1, np.float32)))
    assert "argument 'out' element [0]" in msg and "atomic" in msg


@cuda.jit
def spin_at_barrier(stop, out):
    t = cuda.threadIdx.x
    if t == 0:
        while stop[0] == 0:  # BUG: waits for something no thread will do, while the others wait
            pass
    cuda.syncthreads()
    out[t] = t


@cuda.jit
def last_block_sums(x, part, count, out, fence, by_ticket):
    # "last block reduces": each block writes its partial row, fences, and takes a ticket; the block that
    # draws the last ticket sums the rows in block order and resets the counter for the next launch
    last = cuda.shared.array(1, np.int32)
    t = cuda.threadIdx.x
    b = cuda.blockIdx.x
    part[b, t] = x[b * N + t] * 2
    if fence:
        cuda.threadfence()
    cuda.syncthreads()
    if t == 0:
        ticket = cuda.atomic.add(count, 0 if by_ticket else 1 + b, 1)
        last[0] = 1 if ticket == cuda.gridDim.x - 1 or not by_ticket and b == cuda.gridDim.x - 1 else 0
        if last[0]:
            cuda.atomic.exch(count, 0, 0)
    cuda.syncthreads()
    if last[0]:
        cuda.threadfence()
        acc = float32(0)
        for k in range(cuda.gridDim.x):
            acc += part[k, t]
        out[t] = acc


def _last_block_args(rng, blocks):
    x = rng.standard_normal(blocks * N).astype(np.float32)
    return x, np.zeros((blocks, N), np.float32), np.zeros(1 + blocks, np.int32), np.zeros(N, np.float32)


def test_last_block_reduction_without_threadfence_is_a_race(kernel_backend, rng):
    """The partials are read by the last block, but no thread fenced its write before the ticket: the
    atomic releases nothing, so the read races with the other block's write."""
    args = _last_block_args(rng, 3)
    msg = _caught("race", lambda: last_block_sums[3, N](*args, 0, 1))
    assert "argument 'part'" in msg and "different blocks" in msg


def test_last_block_reading_without_acquiring_is_a_race(kernel_backend, rng):
    """Fenced writes, but each block takes its ticket on its own counter element: the last block
    acquires no other block's release, and its read races."""
    args = _last_block_args(rng, 3)
    msg = _caught("race", lambda: last_block_sums[3, N](*args, 1, 0))
    assert "argument 'part'" in msg


def test_deadlock_times_out_instead_of_hanging(kernel_backend, monkeypatch):
    monkeypatch.setenv(simcheck.TIMEOUT_ENV_VAR, "1")
    stop = cuda.to_device(np.zeros(1, np.int32))
    start = time.monotonic()
    try:
        msg = _caught("barrier", lambda: spin_at_barrier[1, 4](stop, np.zeros(4, np.float32)))
    finally:
        stop.copy_to_device(np.ones(1, np.int32))  # let the spinning thread go
    assert time.monotonic() - start < 30
    assert "3 of 4 threads" in msg and "no progress" in msg


@cuda.jit
def raises_inside(x):
    x[cuda.threadIdx.x] = 1 // (cuda.threadIdx.x - 3)


def test_other_errors_in_a_thread_still_surface(kernel_backend):
    with simcheck.checking(), pytest.raises(ZeroDivisionError):
        raises_inside[1, N](np.zeros(N, np.float32))


# --- correct kernels pass clean -------------------------------------------------------------------------


@cuda.jit
def tree_sum(x, out):
    s = cuda.shared.array(N, float32)
    t = cuda.threadIdx.x
    i = cuda.grid(1)
    s[t] = x[i] if i < x.shape[0] else float32(0)
    cuda.syncthreads()
    k = N // 2
    while k > 0:
        if t < k:
            s[t] += s[t + k]
        cuda.syncthreads()
        k //= 2
    if t == 0:
        out[cuda.blockIdx.x] = s[0]


@cuda.jit
def atomic_total(x, out):
    i = cuda.grid(1)
    if i < x.shape[0]:
        cuda.atomic.add(out, 0, x[i])


@cuda.jit
def broadcast_scale(x, out):
    s = cuda.shared.array(1, float32)
    t = cuda.threadIdx.x
    if t == 0:
        s[0] = x[0] * 2
    cuda.syncthreads()
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = x[i] + s[0]


@cuda.jit
def double_in_place(x):
    i = cuda.grid(1)
    if i < x.shape[0]:
        x[i] = 2 * x[i]


@cuda.jit
def double_buffered_sums(x, out, rounds):
    # round r reads tile r while loading tile r + 1 into the other buffer: one barrier per round
    s = cuda.shared.array((2, N), float32)
    t = cuda.threadIdx.x
    s[0, t] = x[t]
    cuda.syncthreads()
    acc = float32(0)
    for r in range(rounds):
        cur = r % 2
        if r + 1 < rounds:
            s[1 - cur, t] = x[(r + 1) * N + t]
        for j in range(N):
            acc += s[cur, j]
        cuda.syncthreads()
    out[t] = acc


@cuda.jit
def tile_transpose(x, out):
    # 2-D blocks and grid, a 2-D shared tile: guarded load, barrier, transposed store
    s = cuda.shared.array((4, 5), float32)  # padded row
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    col, row = cuda.grid(2)
    s[ty, tx] = x[row, col] if row < x.shape[0] and col < x.shape[1] else float32(0)
    cuda.syncthreads()
    ocol = cuda.blockIdx.y * 4 + tx
    orow = cuda.blockIdx.x * 4 + ty
    if orow < out.shape[0] and ocol < out.shape[1]:
        out[orow, ocol] = s[tx, ty]


@cuda.jit
def count_positive(x, out):
    t = cuda.threadIdx.x
    c = cuda.syncthreads_count(x[t] > 0)
    if t == 0:
        out[0] = c


@cuda.jit
def fill3d(out):
    x, y, z = cuda.grid(3)
    if x < out.shape[0] and y < out.shape[1] and z < out.shape[2]:
        out[x, y, z] = x * 100 + y * 10 + z


@cuda.jit
def sum3d(a, out):
    x, y, z = cuda.grid(3)
    if x < a.shape[0] and y < a.shape[1] and z < a.shape[2]:
        out[x, y, z] = a[x, y, z] + 1


@cuda.jit
def reverse_dynamic(x, out):
    s = cuda.shared.array(0, float32)  # dynamic shared memory, sized at launch
    t = cuda.threadIdx.x
    s[t] = x[t]
    cuda.syncthreads()
    out[t] = s[cuda.blockDim.x - 1 - t]


@pytest.fixture
def checked(kernel_backend):
    with simcheck.checking():
        yield


def test_tree_reduction_passes(checked, rng):
    x = rng.standard_normal(3 * N - 3).astype(np.float32)
    out = np.zeros(3, np.float32)
    tree_sum[3, N](x, out)
    ref = np.add.reduceat(np.pad(x.astype(np.float64), (0, 3)), [0, N, 2 * N])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)  # float32 sums of 8 values


def test_atomics_on_one_element_pass(checked, rng):
    x = rng.integers(-5, 6, 3 * N - 1).astype(np.float32)  # integers: the sum is exact in any order
    out = np.zeros(1, np.float32)
    atomic_total[3, N](x, out)
    assert out[0] == np.sum(x.astype(np.float64))


def test_last_block_reduction_with_fence_and_ticket_passes(checked, rng):
    """Fenced partials, one ticket counter: the last block's reads are ordered after every block's
    writes; the counter is back at 0 for the next launch, which passes too (same sum)."""
    x, part, count, out = _last_block_args(rng, 4)
    for _ in range(2):
        last_block_sums[4, N](x, part, count, out, 1, 1)
        np.testing.assert_allclose(out, 2 * x.reshape(4, N).astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-5)
        assert count[0] == 0


def test_one_writer_all_readers_after_barrier_passes(checked):
    x = np.arange(2 * N - 2, dtype=np.float32)
    out = np.zeros_like(x)
    broadcast_scale[2, N](x, out)
    np.testing.assert_array_equal(out, x + 2 * x[0])


def test_in_place_update_of_device_array_passes(checked, rng):
    h = rng.standard_normal(2 * N + 3).astype(np.float32)
    d = cuda.to_device(h)
    double_in_place[3, N](d)
    np.testing.assert_array_equal(d.copy_to_host(), 2 * h)


def test_double_buffered_tiles_pass(checked):
    rounds = 3
    x = np.arange(rounds * N, dtype=np.float32)
    out = np.zeros(N, np.float32)
    double_buffered_sums[1, N](x, out, rounds)
    np.testing.assert_array_equal(out, np.full(N, x.sum()))


def test_2d_block_tile_load_passes(checked, rng):
    x = rng.standard_normal((6, 7)).astype(np.float32)  # not a multiple of the 4x4 tile
    out = np.zeros((7, 6), np.float32)
    tile_transpose[(2, 2), (4, 4)](x, out)
    np.testing.assert_array_equal(out, x.T)


def test_syncthreads_count_passes(checked):
    x = np.array([1, -1, 2, 0, 3, -2, 5, 1], np.float32)
    out = np.zeros(1, np.int32)
    count_positive[1, N](x, out)
    assert out[0] == 5


def test_dynamic_shared_memory_passes(checked):
    x = np.arange(N, dtype=np.float32)
    out = np.zeros(N, np.float32)
    reverse_dynamic[1, N, 0, 4 * N](x, out)
    np.testing.assert_array_equal(out, x[::-1])


def test_device_array_written_by_a_launch_is_initialized_for_the_next(checked):
    a = cuda.device_array((3, 2, 5), np.float32)
    b = cuda.device_array((3, 2, 5), np.float32)
    fill3d[(2, 1, 2), (2, 2, 3)](a)  # 3-D grid and blocks, more threads than elements
    sum3d[(2, 1, 2), (2, 2, 3)](a, b)
    i, j, k = np.indices((3, 2, 5))
    np.testing.assert_array_equal(b.copy_to_host(), i * 100 + j * 10 + k + 1)


def test_filled_and_copied_buffers_are_initialized(checked):
    z = _base.zeros((N,))  # empty + the fill kernel
    h = cuda.device_array(N, np.float32)
    h.copy_to_device(np.arange(N, dtype=np.float32))
    out = cuda.device_array(N, np.float32)
    atomic_total[1, N](h, z[:1])  # z[0] was filled: atomics on it are fine
    copy_kernel[1, N](z, out)
    assert z.copy_to_host()[0] == np.arange(N).sum()
    np.testing.assert_array_equal(out.copy_to_host()[1:], 0)


def test_project_block_sum_device_function_passes(checked, rng):
    _common = __import__("gpu_cnn.kernels._common", fromlist=["block_sum"])
    block_sum = _common.block_sum

    @cuda.jit
    def sums(x, out):
        buf = cuda.shared.array(N, float32)
        t = cuda.threadIdx.x
        buf[t] = x[cuda.blockIdx.x, t]
        block_sum(buf, t)
        if t == 0:
            out[cuda.blockIdx.x] = buf[0]

    x = rng.integers(-9, 10, (2, N)).astype(np.float32)
    out = np.zeros(2, np.float32)
    sums[2, N](x, out)
    np.testing.assert_array_equal(out, x.sum(axis=1))


# --- how it is switched on, and where it is not available ----------------------------------------------


def test_decorator_form_checks(kernel_backend):
    @simcheck.checking()
    def run():
        all_write_out0[1, N](np.zeros(N, np.float32), np.zeros(1, np.float32))

    with pytest.raises(simcheck.SimcheckError):
        run()
    if not simcheck.enabled():  # unchecked outside (unless GPU_CNN_SIMCHECK=1): the launch just runs
        all_write_out0[1, N](np.zeros(N, np.float32), np.zeros(1, np.float32))


def test_environment_variable_turns_checking_on(kernel_backend, monkeypatch):
    monkeypatch.setenv(simcheck.ENV_VAR, "1")
    assert simcheck.enabled()
    with pytest.raises(simcheck.SimcheckError) as info:
        all_write_out0[1, N](np.zeros(N, np.float32), np.zeros(1, np.float32))
    assert info.value.kind == "race"


def test_cpu_backend_is_a_no_op(cpu_backend, rng):
    from gpu_cnn import functional as F

    x = rng.standard_normal((2, 3)).astype(np.float32)
    with simcheck.checking():
        y = F.relu(x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_cuda_backend_is_refused(monkeypatch):
    monkeypatch.setattr(gpu_backend, "_backend", "cuda")
    with pytest.raises(gpu_cnn.BackendError, match="compute-sanitizer.*run_gpu.sh"):
        with simcheck.checking():
            pass
    assert not simcheck.enabled() or os.environ.get(simcheck.ENV_VAR) == "1"


def test_no_simulator_threads_left_running(kernel_backend):
    # the planted bugs above unwind their threads; only the daemon spinner of the deadlock test may be
    # finishing (it was released)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if type(t).__name__ == "_Thread" and t.is_alive()]
        if not left:
            break
        time.sleep(0.05)
    assert not left
