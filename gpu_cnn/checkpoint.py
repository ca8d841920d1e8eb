"""Checkpoints: ``save(model, path)`` / ``load(path)`` as a ``.npz`` of the state_dict plus a JSON
metadata entry (architecture, format version, dataset, metrics).

Written atomically (a temporary file in the same folder, then ``os.replace``), and read with
``allow_pickle=False``. What ``save`` writes, ``load`` reads back: bad arguments are refused before
anything is written (``TypeError``/``ValueError`` naming the argument). A file that is not a ``.npz``
(a ``.npy``, a text file), a corrupt or truncated one, one that carries a pickle, one whose metadata
or architecture is malformed or hostile (nested too deep, more parameters than the file holds), or
one whose weights do not fit the architecture it names is refused with :class:`CheckpointError`.
So is a file whose weights hold NaN or ±inf (naming the tensor; ``load(path, allow_nonfinite=True)``
takes them), and a zip member whose declared size is not the size its array header says the tensor
needs: checked from the member's header before its data is decompressed, so a zip bomb is never read.
Files are written with the permissions any file the user writes gets (0666 less the umask: 0644
under umask 022), not the 0600 of a temporary file.
"""
import errno
import json
import numbers
import os
import tempfile
import zipfile
from collections.abc import Mapping

import numpy as np

FORMAT = "gpu-cnn-checkpoint"
FORMAT_VERSION = 1
META_KEY = "__gpu_cnn_meta__"
# metadata keys save() writes itself; user metadata may not set them
RESERVED_KEYS = ("format", "format_version", "architecture")
# bounds on the architecture load() rebuilds, so a hostile file cannot exhaust the stack or memory
MAX_DEPTH = 32
MAX_LAYERS = 10_000
# an architecture may name more parameter values than the file holds up to this many (load_state_dict
# then says which entry is missing or short); beyond it load refuses before allocating anything
MAX_UNBACKED_PARAMS = 1 << 24

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip


class CheckpointError(ValueError):
    """The file is not a usable gpu-cnn checkpoint."""


def save(model, path, metadata=None):
    """Write the model's weights and metadata to `path` (a .npz) atomically. Returns the path.

    `metadata` is a dict of JSON-able values with str keys; the keys in :data:`RESERVED_KEYS` are
    written by save itself and refused. Nothing is written when an argument is refused."""
    _check_model(model)
    path = _check_path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": model.spec()}
    meta.update(_check_metadata(metadata))
    arrays = model.state_dict()
    if META_KEY in arrays:
        raise ValueError(f"parameter name {META_KEY!r} is reserved")
    try:  # never write a file that load refuses
        _check_architecture(_normalise(meta["architecture"]), sum(int(np.size(v)) for v in arrays.values()))
    except _ArchitectureError as exc:
        raise ValueError(f"model: load could not rebuild its architecture: {exc}") from None
    arrays[META_KEY] = np.array(_dump_metadata(meta))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "cannot write the checkpoint, the path is a folder", path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write the checkpoint, {folder} is not a folder", path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise _write_error(exc, path) from exc
    except BaseException:
        _discard(tmp)
        raise
    return path


def best_path(path):
    """Where the Trainer keeps the BEST checkpoint beside the last one at `path`: ``model.npz`` ->
    ``model.best.npz`` (a path without ``.npz`` gets ``.best.npz`` appended)."""
    path = os.fsdecode(os.fspath(path))
    stem = path[:-4] if path.lower().endswith(".npz") else path
    return stem + ".best.npz"


def read(path, allow_nonfinite=False):
    """(state_dict, metadata) from a checkpoint, validated; raises CheckpointError."""
    path = _check_path(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a folder, not a checkpoint file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):  # a FIFO, a device such as /dev/zero, a socket
        raise CheckpointError(f"{path}: not a regular file (a checkpoint is a .npz file)")
    _check_is_npz(path)
    try:
        arrays = _read_members(path)
        if META_KEY not in arrays:
            raise CheckpointError(f"{path}: not a gpu-cnn checkpoint (no {META_KEY} entry)")
    except CheckpointError:
        raise
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint ({exc})") from exc
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, MemoryError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})") from exc
    meta = _parse_metadata(arrays.pop(META_KEY), path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a gpu-cnn checkpoint (format {meta.get('format')!r})")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r} ({type(version).__name__}) is not supported "
                              f"(this gpu-cnn reads format version {FORMAT_VERSION}, an int)")
    for k, v in arrays.items():
        counter = k.rsplit(".", 1)[-1] == "num_batches_tracked" and v.dtype.kind in "iu" and v.shape == ()
        if v.dtype.kind != "f" and not counter:  # BatchNorm's batch counter is an integer, as in PyTorch
            raise CheckpointError(f"{path}: entry {k!r} has dtype {v.dtype}, expected floating point")
        if not allow_nonfinite and not np.isfinite(v).all():
            n = int(np.count_nonzero(~np.isfinite(v)))
            raise CheckpointError(f"{path}: tensor {k!r} holds {n} NaN or infinite value(s) of {v.size}; refused "
                                  f"(a diverged model?). load(path, allow_nonfinite=True) takes it as it is")
    return arrays, meta


def _read_members(path):
    """{name: array} of every member of the .npz, each checked before its data is read: a .npy header
    (magic, version 1.0 or 2.0, no object dtype, so nothing is unpickled), and a declared
    (uncompressed) size equal to the header's size plus what the tensor's shape and dtype need."""
    arrays = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            with zf.open(info) as f:
                try:
                    version = np.lib.format.read_magic(f)
                except ValueError:
                    raise CheckpointError(f"{path}: entry {name!r} is not a NumPy array (.npy)") from None
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise CheckpointError(f"{path}: entry {name!r} is a .npy of version {version}, not 1.0 or 2.0")
                if dtype.hasobject:
                    raise CheckpointError(f"{path}: refused, the file carries pickled objects (entry {name!r}, "
                                          f"never loaded)")
                nbytes = dtype.itemsize
                for d in shape:
                    nbytes *= int(d)
                header = f.tell()
                if info.file_size != header + nbytes:
                    raise CheckpointError(
                        f"{path}: entry {name!r} declares {info.file_size} bytes, but its header (shape {shape}, "
                        f"{dtype}) needs {header + nbytes}; refused before reading it")
                data = f.read(nbytes)
                if len(data) != nbytes:
                    raise CheckpointError(f"{path}: entry {name!r} is truncated ({len(data)} of {nbytes} bytes)")
            a = np.frombuffer(data, dtype=dtype) if nbytes else np.empty(0, dtype)
            arrays[name] = a.reshape(shape, order="F" if fortran else "C").copy()
    return arrays


def _umask():
    """The process umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load(path, model=None, allow_nonfinite=False):
    """Rebuild the model a checkpoint describes (or fill `model`, which must have the same
    architecture) on the current backend; returns it. ``model.checkpoint_metadata`` holds the metadata.
    Weights holding NaN or ±inf are refused (naming the tensor) unless ``allow_nonfinite``."""
    from .nn import from_spec

    if model is not None:
        _check_model(model)
    state, meta = read(path, allow_nonfinite=allow_nonfinite)
    path = os.fsdecode(os.fspath(path))
    arch = meta.get("architecture")
    if model is None:
        try:
            _check_architecture(arch, sum(int(v.size) for v in state.values()))
        except _ArchitectureError as exc:
            raise CheckpointError(f"{path}: refused the architecture it names: {exc}") from None
        try:
            model = from_spec(arch)
        except Exception as exc:  # includes MemoryError, RecursionError, ZeroDivisionError from a layer
            raise CheckpointError(f"{path}: cannot rebuild the architecture it names "
                                  f"({type(exc).__name__}: {exc})") from exc
    elif _normalise(model.spec()) != arch:
        raise CheckpointError(f"{path}: the checkpoint is for another architecture than the given model")
    try:
        if allow_nonfinite:
            _assign_unchecked(model, state)
        else:
            model.load_state_dict(state)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the architecture: {exc}") from exc
    model.checkpoint_metadata = meta
    return model


def _assign_unchecked(model, state):
    """load_state_dict without its NaN/Inf refusal, for ``allow_nonfinite=True`` (names and shapes are
    still checked)."""
    own = dict(model.named_parameters())
    if set(own) != set(state):
        model.load_state_dict(state)  # raises the usual mismatch error
    for name, p in own.items():
        if state[name].shape != p.shape:
            raise ValueError(f"state_dict[{name!r}]: expected shape {p.shape}, got {state[name].shape}")
    for name, p in own.items():
        p.assign(state[name])


# -- argument checks (save and load) ---------------------------------------------------------------

def _check_model(model):
    from .nn import Module

    if not isinstance(model, Module):
        raise TypeError(f"model: expected a gpu_cnn.nn.Module, got {type(model).__name__}")


def _check_path(path):
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}") from None
    if not path:
        raise ValueError("path: expected a file path, got ''")
    return path


def _check_metadata(metadata):
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata: expected a dict, got {type(metadata).__name__}")
    for key in metadata:
        if not isinstance(key, str):
            raise TypeError(f"metadata: keys must be str, got {type(key).__name__} ({key!r})")
        if key in RESERVED_KEYS:
            raise ValueError(f"metadata: key {key!r} is reserved (save writes it itself; "
                             f"reserved keys: {', '.join(RESERVED_KEYS)})")
    return dict(metadata)


def _dump_metadata(meta):
    """JSON text that load parses back to the same keys; a clear error otherwise."""
    try:
        text = json.dumps(meta, default=_jsonable)
    except (ValueError, RecursionError) as exc:  # a circular reference, or nested too deep
        raise ValueError(f"metadata: cannot be written as JSON ({type(exc).__name__}: {exc})") from None
    try:
        json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"metadata: written as JSON, it cannot be read back ({type(exc).__name__}: {exc})") from None
    return text


def _discard(tmp):
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)


def _write_error(exc, path):
    """The OSError from writing `path`, naming `path` (not the temporary file), of the same kind."""
    if exc.errno is not None:
        return OSError(exc.errno, f"cannot write the checkpoint ({exc.strerror or exc})", path)
    return OSError(f"cannot write the checkpoint {path!r}: {exc}")


# -- reading ---------------------------------------------------------------------------------------

def _check_is_npz(path):
    """Refuse what is not a zip archive before np.load sees it: np.load falls back to unpickling
    files with an unknown magic number, and returns a bare array for a .npy."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if head.startswith(_NPY_MAGIC):
        raise CheckpointError(f"{path}: not a gpu-cnn checkpoint (.npz): it is a single array written by np.save (.npy)")
    if not head:
        raise CheckpointError(f"{path}: not a gpu-cnn checkpoint (.npz): the file is empty")
    if not head.startswith(_ZIP_MAGICS):
        raise CheckpointError(f"{path}: not a gpu-cnn checkpoint (.npz): not a zip archive")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (the zip archive has no central directory)")


def _parse_metadata(entry, path):
    if entry.dtype.kind != "U" or entry.shape != ():
        raise CheckpointError(f"{path}: unreadable metadata ({META_KEY} is a {entry.dtype} array of shape "
                              f"{entry.shape}, expected a JSON string)")
    try:
        meta = json.loads(entry.item())
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable metadata ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: unreadable metadata (expected a JSON object, got {type(meta).__name__})")
    return meta


class _ArchitectureError(ValueError):
    """An architecture that load would refuse; load reports it as CheckpointError, save as ValueError."""


def _check_architecture(arch, n_values):
    """Bound what load rebuilds before anything is allocated: at most MAX_DEPTH nested Sequentials and
    MAX_LAYERS layers, Conv2d/Linear sizes that are positive ints, and no more parameter values than
    the file holds (or MAX_UNBACKED_PARAMS, whichever is larger). Anything else wrong is left to
    from_spec, whose errors load wraps."""
    stack = [(arch, "architecture", 0)]
    layers = params = 0
    while stack:
        spec, where, depth = stack.pop()
        if not isinstance(spec, dict):
            raise _ArchitectureError(f"{where}: expected a layer description (a JSON object), got {type(spec).__name__}")
        layers += 1
        kind = spec.get("type")
        if kind == "Sequential":
            children = spec.get("layers")
            if not isinstance(children, list):
                raise _ArchitectureError(f"{where}.layers: expected a list of layers, got {type(children).__name__}")
            if children and depth + 1 > MAX_DEPTH:
                raise _ArchitectureError(f"{where}: Sequentials nested deeper than {MAX_DEPTH} levels")
            if layers + len(stack) + len(children) > MAX_LAYERS:
                raise _ArchitectureError(f"more than {MAX_LAYERS} layers")
            stack.extend((s, f"{where}.layers[{i}]", depth + 1) for i, s in reversed(list(enumerate(children))))
        elif kind == "Residual":
            children = [(spec.get(k), k) for k in ("block", "shortcut") if spec.get(k) is not None]
            if children and depth + 1 > MAX_DEPTH:
                raise _ArchitectureError(f"{where}: modules nested deeper than {MAX_DEPTH} levels")
            stack.extend((s, f"{where}.{k}", depth + 1) for s, k in children)
        elif kind == "BatchNorm2d":
            params += 4 * _size(spec, "num_features", where)
        elif kind == "Conv2d":
            c_in, c_out = (_size(spec, k, where) for k in ("in_channels", "out_channels"))
            kh, kw = _kernel_size(spec, where)
            groups = spec.get("groups", 1)
            groups = groups if _is_size(groups) and c_in % groups == 0 else 1
            params += c_out * (c_in // groups) * kh * kw + (c_out if spec.get("bias", True) is not False else 0)
        elif kind == "Linear":
            n_in, n_out = (_size(spec, k, where) for k in ("in_features", "out_features"))
            params += n_out * n_in + (n_out if spec.get("bias", True) is not False else 0)
    if params > max(n_values, MAX_UNBACKED_PARAMS):
        raise _ArchitectureError(f"it needs {params} parameter values, but the file holds only {n_values}")


def _is_size(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def _size(spec, key, where):
    v = spec.get(key)
    if not _is_size(v):
        raise _ArchitectureError(f"{where} ({spec['type']}): {key} must be a positive int, got {v!r}")
    return int(v)


def _kernel_size(spec, where):
    k = spec.get("kernel_size")
    if _is_size(k):
        return int(k), int(k)
    if isinstance(k, list) and len(k) == 2 and all(_is_size(v) for v in k):
        return int(k[0]), int(k[1])
    raise _ArchitectureError(f"{where} ({spec['type']}): kernel_size must be a positive int or a pair of them, got {k!r}")


def _normalise(spec):
    """`spec` as it reads back from the JSON in a file (tuples become lists)."""
    return json.loads(json.dumps(spec, default=_jsonable))


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"metadata value of type {type(o).__name__} is not JSON-serialisable")
