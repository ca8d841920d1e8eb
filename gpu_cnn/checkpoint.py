"""Checkpoints: ``save(model, path)`` / ``load(path)`` as a ``.npz`` of the state_dict plus a JSON
metadata entry (architecture, format version, dataset, metrics).

Written atomically (a temporary file in the same folder, then ``os.replace``), and read with
``allow_pickle=False``: a corrupt or truncated file, one that carries a pickle, or one whose weights do
not fit the architecture it names is refused with :class:`CheckpointError`.
"""
import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "gpu-cnn-checkpoint"
FORMAT_VERSION = 1
META_KEY = "__gpu_cnn_meta__"


class CheckpointError(ValueError):
    """The file is not a usable gpu-cnn checkpoint."""


def save(model, path, metadata=None):
    """Write the model's weights and metadata to `path` (a .npz) atomically. Returns the path."""
    path = os.fspath(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": model.spec()}
    meta.update(metadata or {})
    arrays = model.state_dict()
    if META_KEY in arrays:
        raise ValueError(f"parameter name {META_KEY!r} is reserved")
    arrays[META_KEY] = np.array(json.dumps(meta, default=_jsonable))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read(path):
    """(state_dict, metadata) from a checkpoint, validated; raises CheckpointError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if META_KEY not in names:
                raise CheckpointError(f"{path}: not a gpu-cnn checkpoint (no {META_KEY} entry)")
            arrays = {k: z[k] for k in names}
    except CheckpointError:
        raise
    except ValueError as exc:  # numpy refuses object arrays (pickles) with allow_pickle=False
        if "pickle" in str(exc).lower():
            raise CheckpointError(f"{path}: refused, the file carries pickled objects (never loaded)") from exc
        raise CheckpointError(f"{path}: corrupt checkpoint ({exc})") from exc
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})") from exc
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable metadata ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a gpu-cnn checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} is not supported (this is {FORMAT_VERSION})")
    for k, v in arrays.items():
        if v.dtype.kind != "f":
            raise CheckpointError(f"{path}: entry {k!r} has dtype {v.dtype}, expected floating point")
    return arrays, meta


def load(path, model=None):
    """Rebuild the model a checkpoint describes (or fill `model`, which must have the same
    architecture) on the current backend; returns it. ``model.checkpoint_metadata`` holds the metadata."""
    from .nn import from_spec

    state, meta = read(path)
    arch = meta.get("architecture")
    if model is None:
        try:
            model = from_spec(arch)
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{path}: cannot rebuild the architecture it names ({exc})") from exc
    elif model.spec() != arch:
        raise CheckpointError(f"{path}: the checkpoint is for another architecture than the given model")
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the architecture: {exc}") from exc
    model.checkpoint_metadata = meta
    return model


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"metadata value of type {type(o).__name__} is not JSON-serialisable")
