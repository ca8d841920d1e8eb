"""Data-parallel training over MPI (launch, rendezvous, host arrays) and NCCL (device arrays on ``cuda``).

    mpiexec -n 4 gpu-cnn train ...          # or: gpu-cnn train --nproc 4 ...
    from gpu_cnn import distributed as dist
    dist.init()                             # rank and size from mpiexec / srun (MPI), or a world of one
    dist.all_reduce_(grad, op="mean")      # in place, on every rank
    dist.broadcast_(weights, root=0)

Which engine moves an array:

| array            | backend | engine                                                                |
|------------------|---------|-----------------------------------------------------------------------|
| NumPy            | any     | MPI (mpi4py), blocking, under a watchdog thread's deadline            |
| device (Numba…)  | cuda    | NCCL (nccl4py, else CuPy's cupy.cuda.nccl) on the device, no host copy |
| device           | sim     | MPI through the host (copy out, reduce, copy back): the simulator has  |
|                  |         | no NCCL; this path exists so the sim tests exercise the same calls     |

Every collective has a deadline (``timeout`` seconds, default $GPU_CNN_DIST_TIMEOUT or 300): a rank that
waits longer prints what it was waiting for and aborts the whole MPI job (``MPI_Abort``), so a rank that
died or hangs never leaves the others waiting forever. A rank that raises while training aborts the job
at once with its error (see :func:`abort`); :func:`init` also installs an excepthook that does the same
for uncaught exceptions.

NCCL on ``cuda`` is written against nccl4py 0.6 (``nccl.core.Communicator.init``, ``allreduce``,
``broadcast`` on ``__cuda_array_interface__`` buffers) and CuPy's ``NcclCommunicator``; it has not been
run on a GPU in this project's CI (which has none).
"""
import os
import sys
import time
import traceback

import numpy as np

ENV_DISTRIBUTED = "GPU_CNN_DISTRIBUTED"
ENV_TIMEOUT = "GPU_CNN_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
WATCHDOG_PERIOD = 0.1  # seconds between the watchdog's looks at the current deadline
ABORT_GRACE_S = 1.0  # seconds a failing rank waits, after printing its error, before MPI_Abort
OPS = ("sum", "mean")

# (rank, size, local rank) variables set by the launchers: MPICH/Intel MPI (hydra), Open MPI, Slurm.
_LAUNCHER_ENV = (
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


class DistributedError(RuntimeError):
    """A collective could not run (not initialised, MPI missing, bad arguments after init)."""


class _State:
    comm = None          # mpi4py COMM_WORLD
    rank = 0
    size = 1
    local_rank = 0
    timeout = DEFAULT_TIMEOUT
    nccl = None          # (kind, communicator) once the first device collective needs it


_S = _State()


def launched_size():
    """The world size a launcher (mpiexec, srun) announced in the environment, 1 when none did."""
    for _, size_var, _ in _LAUNCHER_ENV:
        value = os.environ.get(size_var, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def _env_local_rank():
    for _, _, local_var in _LAUNCHER_ENV:
        value = os.environ.get(local_var, "").strip()
        if value.isdigit():
            return int(value)
    return None


def requested():
    """True when $GPU_CNN_DISTRIBUTED asks for data-parallel training (1/true/yes)."""
    return os.environ.get(ENV_DISTRIBUTED, "").strip().lower() in ("1", "true", "yes", "on")


def is_initialized():
    return _S.comm is not None


def init(rank=None, world_size=None, timeout=None):
    """Join the MPI world (idempotent) and return (rank, world_size).

    Rank and size come from MPI, which reads them from the launcher (``mpiexec -n N``, ``srun``); a plain
    ``python`` process is a world of one. ``rank``/``world_size``, when given, must match what MPI says
    (a check that the script was launched as intended). ``timeout``: the deadline of every collective in
    seconds (default $GPU_CNN_DIST_TIMEOUT, else 300). On the ``cuda`` backend with several GPUs each rank
    takes device ``local_rank % n_gpus``."""
    if timeout is None:
        env = os.environ.get(ENV_TIMEOUT, "").strip()
        try:
            timeout = float(env) if env else DEFAULT_TIMEOUT
        except ValueError:
            raise ValueError(f"${ENV_TIMEOUT}: expected a number of seconds, got {env!r}") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    for name, value in (("rank", rank), ("world_size", world_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
            raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    if world_size is not None and world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    if not is_initialized():
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise DistributedError("gpu_cnn.distributed needs mpi4py and an MPI library: "
                                   "pip install -e \".[distributed]\" (mpi4py and the mpich wheel)") from exc
        comm = MPI.COMM_WORLD
        _S.comm, _S.rank, _S.size = comm, comm.Get_rank(), comm.Get_size()
        local = _env_local_rank()
        if local is None:
            local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=_S.rank).Get_rank()
        _S.local_rank = int(local)
        if _S.size > 1:
            _install_excepthook()
        _select_device()
    _S.timeout = float(timeout)
    if world_size is not None and world_size != _S.size:
        raise DistributedError(f"world_size: asked for {world_size} ranks but MPI has {_S.size} "
                               f"(launch with mpiexec -n {world_size})")
    if rank is not None and rank != _S.rank:
        raise DistributedError(f"rank: asked for rank {rank} but MPI says this process is rank {_S.rank}")
    return _S.rank, _S.size


def rank():
    """This process's rank (0 before :func:`init`)."""
    return _S.rank


def world_size():
    """The number of ranks (1 before :func:`init`)."""
    return _S.size


def local_rank():
    """This process's rank among the ranks on its machine (picks its GPU)."""
    return _S.local_rank


def is_root():
    return _S.rank == 0


def _select_device():
    from . import backend as _backend

    if _backend._backend != "cuda":  # never touch numba.cuda here on cpu/sim (sim must come first)
        return
    from numba import cuda

    n = len(cuda.gpus)
    if n > 1:
        cuda.select_device(_S.local_rank % n)


def _install_excepthook():
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        if _S.comm is not None and _S.size > 1 and not issubclass(kind, SystemExit):
            time.sleep(ABORT_GRACE_S)  # the traceback's way out through mpiexec (see abort)
            _abort_comm(1)

    sys.excepthook = hook


def _abort_comm(code):
    sys.stdout.flush()
    sys.stderr.flush()
    if _S.nccl is not None:
        try:
            _S.nccl[1].abort()
        except Exception:
            pass
    _S.comm.Abort(code)


def abort(exc=None, code=1):
    """Stop every rank: print `exc` (with its traceback) naming this rank, then ``MPI_Abort``.
    A world of one just returns (the caller re-raises)."""
    if not is_initialized() or _S.size == 1:
        return
    if exc is not None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        print(f"gpu_cnn.distributed: rank {_S.rank} of {_S.size} failed, stopping all ranks:\n{text}",
              file=sys.stderr, flush=True)
        # mpiexec relays a rank's output through its process manager, and MPI_Abort kills the job at once:
        # on a loaded machine the message could be lost on its way (seen in CI), so give it time to arrive
        time.sleep(ABORT_GRACE_S)
    _abort_comm(code)


# --------------------------------------------------------------------------------------------------
# host collectives: MPI non-blocking, polled against the deadline


class _Watchdog:
    """Deadlines for blocking collectives: the caller arms it before an MPI call and disarms it after; a
    daemon thread that finds a deadline passed prints what was being waited for and aborts the job. (A
    blocking call plus a watchdog costs microseconds a collective; polling a non-blocking request from
    Python cost hundreds.) mpi4py releases the GIL inside MPI calls and asks for MPI_THREAD_MULTIPLE, so
    the thread can run and call MPI_Abort while the main thread is blocked."""

    def __init__(self):
        import threading

        self.deadline, self.what, self.seconds = None, "", 0.0
        self.thread = threading.Thread(target=self._run, name="gpu_cnn.distributed watchdog", daemon=True)
        self.thread.start()

    def arm(self, what, timeout):
        self.seconds = _S.timeout if timeout is None else float(timeout)
        self.what = what
        self.deadline = time.monotonic() + self.seconds

    def disarm(self):
        self.deadline = None

    def _run(self):
        while True:
            time.sleep(WATCHDOG_PERIOD)
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                print(f"gpu_cnn.distributed: rank {_S.rank} of {_S.size}: {self.what} did not complete within "
                      f"{self.seconds:g} s (another rank failed, stopped or is stuck); aborting all ranks",
                      file=sys.stderr, flush=True)
                time.sleep(ABORT_GRACE_S)  # the message's way out through mpiexec (see abort)
                _abort_comm(3)


_watchdog = None


class _deadline:
    """``with _deadline(what, timeout): <blocking collective>``."""

    def __init__(self, what, timeout):
        global _watchdog
        if _watchdog is None:
            _watchdog = _Watchdog()
        self.what, self.timeout = what, timeout

    def __enter__(self):
        _watchdog.arm(self.what, self.timeout)

    def __exit__(self, *exc):
        _watchdog.disarm()


def _need_init():
    if not is_initialized():
        raise DistributedError("gpu_cnn.distributed.init() must be called first")


def _check_op(op):
    if op not in OPS:
        raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")


def _check_host(name, a):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array or a device array, got {type(a).__name__}")
    if a.dtype not in (np.float32, np.float64, np.int32, np.int64):
        raise TypeError(f"{name}: expected float32, float64, int32 or int64, got {a.dtype}")
    if not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"{name}: the array must be C-contiguous and writeable (it is reduced in place)")


def _host_all_reduce(a, op, timeout):
    from mpi4py import MPI

    with _deadline(f"all_reduce_ of {a.size} {a.dtype} values", timeout):
        _S.comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
    if op == "mean":
        if np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"array: op='mean' needs a floating array, got {a.dtype}")
        a /= a.dtype.type(_S.size)
    return a


def _host_broadcast(a, root, timeout):
    with _deadline(f"broadcast_ of {a.size} {a.dtype} values from rank {root}", timeout):
        _S.comm.Bcast(a, root=root)
    return a


def barrier(timeout=None):
    """Wait until every rank gets here (within the deadline)."""
    _need_init()
    if _S.size > 1:
        with _deadline("barrier", timeout):
            _S.comm.Barrier()


# --------------------------------------------------------------------------------------------------
# device collectives: NCCL on cuda, MPI through the host on sim


def _is_device(a):
    from .ops import _base

    return _base.is_device_array(a)


def _on_sim():
    from . import backend as _backend

    return _backend.get_backend() == "sim"


def _via_host(a, fn):
    """sim (or cuda without NCCL): copy out, run the host collective, copy back."""
    from .ops import _base

    dev = _base._as_cuda_array(a)
    host = np.ascontiguousarray(dev.copy_to_host())
    fn(host)
    dev.copy_to_device(host)
    return a


def _nccl():
    """(kind, communicator), created on first use: rank 0 makes the unique id and MPI broadcasts it."""
    if _S.nccl is not None:
        return _S.nccl
    try:
        import nccl.core as nccl

        uid = nccl.get_unique_id() if _S.rank == 0 else None
        uid = _S.comm.bcast(uid, root=0)  # nccl4py's UniqueId pickles
        _S.nccl = ("nccl4py", nccl.Communicator.init(_S.size, _S.rank, uid))
        return _S.nccl
    except ImportError:
        pass
    try:
        from cupy.cuda import nccl as cnccl
    except ImportError:
        raise DistributedError("device arrays on cuda need NCCL: pip install nccl4py[cu12] (or CuPy with NCCL); "
                               "the distributed extra lists them") from None
    uid = cnccl.get_unique_id() if _S.rank == 0 else None
    uid = _S.comm.bcast(uid, root=0)
    _S.nccl = ("cupy", cnccl.NcclCommunicator(_S.size, uid, _S.rank))
    return _S.nccl


def _nccl_wait(what, timeout):
    """Wait for the NCCL call just queued on the default stream, under the watchdog's deadline (past it the
    watchdog aborts the NCCL communicator and the MPI job)."""
    from numba import cuda

    with _deadline(f"NCCL {what}", timeout):
        cuda.default_stream().synchronize()


_NCCL_TYPES = {"float32": "FLOAT32", "float64": "FLOAT64", "int32": "INT32", "int64": "INT64"}


def _nccl_call(a, collective, op=None, root=0, timeout=None):
    from .ops import _base

    dev = _base._as_cuda_array(a)
    dtype = np.dtype(dev.dtype)
    if dtype.name not in _NCCL_TYPES:
        raise TypeError(f"array: expected float32, float64, int32 or int64, got {dtype}")
    if not dev.is_c_contiguous():
        raise ValueError("array: a device array must be C-contiguous (it is reduced in place)")
    kind, comm = _nccl()
    if kind == "nccl4py":
        import nccl.core as nccl

        if collective == "all_reduce":
            comm.allreduce(dev, dev, nccl.AVG if op == "mean" else nccl.SUM, stream=0)
        else:
            comm.broadcast(dev, dev, root, stream=0)
    else:
        from cupy.cuda import nccl as cnccl

        ptr = dev.__cuda_array_interface__["data"][0]
        dt = getattr(cnccl, "NCCL_" + _NCCL_TYPES[dtype.name])
        if collective == "all_reduce":
            comm.allReduce(ptr, ptr, dev.size, dt, cnccl.NCCL_AVG if op == "mean" else cnccl.NCCL_SUM, 0)
        else:
            comm.broadcast(ptr, ptr, dev.size, dt, root, 0)
    _nccl_wait(f"{collective} of {dev.size} {dtype} values", timeout)
    return a


# --------------------------------------------------------------------------------------------------
# public collectives


def all_reduce_(array, op="mean", timeout=None):
    """Reduce `array` over all ranks in place ("sum" or "mean") and return it. NumPy arrays go through
    MPI; device arrays through NCCL on cuda and through the host (MPI) on sim."""
    _need_init()
    _check_op(op)
    if _S.size == 1:
        return array
    if _is_device(array):
        if _on_sim():
            return _via_host(array, lambda h: _host_all_reduce(h, op, timeout))
        return _nccl_call(array, "all_reduce", op=op, timeout=timeout)
    _check_host("array", array)
    return _host_all_reduce(array, op, timeout)


def broadcast_(array, root=0, timeout=None):
    """Overwrite `array` on every rank with rank `root`'s values, in place; returns it."""
    _need_init()
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)) or not 0 <= root < _S.size:
        raise ValueError(f"root: expected a rank in [0, {_S.size}), got {root!r}")
    if _S.size == 1:
        return array
    if _is_device(array):
        if _on_sim():
            return _via_host(array, lambda h: _host_broadcast(h, root, timeout))
        return _nccl_call(array, "broadcast", root=root, timeout=timeout)
    _check_host("array", array)
    return _host_broadcast(array, root, timeout)


# --------------------------------------------------------------------------------------------------
# what the Trainer calls (one object, so the trainer holds a few one-line hooks)


class DataParallel:
    """The Trainer's data-parallel hooks: same start, own shard of every global batch, reduced gradients
    and metrics, rank 0 writes."""

    def __init__(self):
        init()
        self.rank, self.size = _S.rank, _S.size

    @property
    def is_root(self):
        return self.rank == 0

    def common_seed(self, seed):
        """The shuffling seed every rank uses: `seed`, or when None one drawn on rank 0 and broadcast,
        so that every rank shuffles the same way and the shards never overlap."""
        value = np.array([-1 if seed is None else seed], np.int64)
        if seed is None and self.rank == 0:
            value[0] = np.random.default_rng().integers(0, 2**31 - 1)
        broadcast_(value)
        return int(value[0])

    def broadcast_parameters(self, model):
        """Rank 0's initial weights on every rank."""
        for p in model.parameters():
            broadcast_(p.data)

    def shard(self, idx):
        """(this rank's indices, how many count) for a global batch of indices: contiguous parts whose
        sizes differ by at most one, every index on exactly one rank. A rank left with none (a last batch
        smaller than the world) steps on one borrowed image with weight 0, so the collectives still meet."""
        part = np.array_split(idx, self.size)[self.rank]
        self._local = len(part)
        return (part, len(part)) if len(part) else (idx[:1], 0)

    def pop_local_count(self, n):
        """The images this step counts for: the shard's size when :meth:`shard` chose it, else `n`."""
        local, self._local = getattr(self, "_local", None), None
        return n if local is None else local

    def step_counts(self, n_local, finite):
        """(images in the global batch, whether every rank's loss is finite): one small all-reduce, so that
        all ranks agree to stop on a NaN and can weight their gradients."""
        counts = np.array([n_local, 0 if finite else 1], np.int64)
        all_reduce_(counts, op="sum")
        return int(counts[0]), counts[1] == 0

    def all_reduce_gradients(self, params, n_local, n_global):
        """Each gradient becomes the gradient of the mean loss over the global batch: Σ_r (n_r/N)·g_r.

        Host gradients (cpu) are packed into one buffer and reduced in one MPI call (a copy of 4 bytes a
        parameter each way, far cheaper than one collective per tensor); so are device gradients on sim,
        which go through the host anyway. Device gradients on cuda are reduced per tensor by NCCL (AVG
        when the shards are equal, else weighted through the host): with the flat gradient buffer of the
        issue "A training step with the host out of the loop" this becomes one call on that buffer."""
        params = list(params)
        if self.size == 1 or not params:
            return
        weight = np.float32(n_local / n_global)
        if all(isinstance(p.grad, np.ndarray) for p in params) or _on_sim():
            self._reduce_packed(params, weight)
            return
        equal = n_global == n_local * self.size
        for p in params:
            if equal:
                all_reduce_(p.grad, op="mean")
            else:  # a last batch that does not split evenly: weight through the host
                def weighted(h, w=weight):
                    h *= w
                    _host_all_reduce(h, "sum", None)
                _via_host(p.grad, weighted)

    def _reduce_packed(self, params, weight):
        from .ops import _base

        sizes = [int(np.prod(p.grad.shape)) for p in params]
        total = sum(sizes)
        if getattr(self, "_packed", None) is None or self._packed.size != total:
            self._packed = np.empty(total, np.float32)  # planned once, reused every step
        buf, at = self._packed, 0
        for p, n in zip(params, sizes):
            g = p.grad if isinstance(p.grad, np.ndarray) else _base._as_cuda_array(p.grad).copy_to_host()
            buf[at:at + n] = g.reshape(-1)
            at += n
        buf *= weight
        _host_all_reduce(buf, "sum", None)
        at = 0
        for p, n in zip(params, sizes):
            part = buf[at:at + n].reshape(p.grad.shape)
            if isinstance(p.grad, np.ndarray):
                np.copyto(p.grad, part)
            else:
                _base._as_cuda_array(p.grad).copy_to_device(part)
            at += n

    def abort(self, exc):
        """A failure on this rank: stop every rank with its error (see the module's :func:`abort`)."""
        abort(exc)

    def sum_metrics(self, *values):
        """The sums over all ranks of a few numbers (loss·n, correct, seen)."""
        a = np.array(values, np.float64)
        all_reduce_(a, op="sum")
        return tuple(a.tolist())


# --------------------------------------------------------------------------------------------------
# launching local ranks (gpu-cnn train --nproc N)


def find_mpiexec():
    """The mpiexec to launch local ranks with: $GPU_CNN_MPIEXEC, else the one the mpich wheel installed
    next to this Python, else mpiexec on PATH. Raises DistributedError when there is none."""
    import shutil

    env = os.environ.get("GPU_CNN_MPIEXEC", "").strip()
    if env:
        return env
    candidates = []
    try:
        from importlib import metadata

        for f in metadata.files("mpich") or ():
            if f.name == "mpiexec":
                candidates.append(str(f.locate()))
    except Exception:
        pass
    for prefix in (sys.prefix, sys.base_prefix):
        candidates.append(os.path.join(prefix, "bin", "mpiexec"))
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.normpath(path)
    found = shutil.which("mpiexec")
    if found:
        return found
    raise DistributedError("no mpiexec found: pip install -e \".[distributed]\" (the mpich wheel brings one), "
                           "or set $GPU_CNN_MPIEXEC")


def launch_command(nproc, argv, mpiexec=None):
    """The command line that runs ``python -m gpu_cnn.cli <argv>`` as `nproc` local ranks."""
    return [mpiexec or find_mpiexec(), "-n", str(int(nproc)), sys.executable, "-m", "gpu_cnn.cli", *argv]
