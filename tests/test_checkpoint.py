"""Checkpoints: round trip, atomic writes, and every refusal."""
import errno
import json
import os
import pickle
import re
import tempfile
import types
import zipfile

import numpy as np
import pytest

from gpu_cnn import models, nn
from gpu_cnn.checkpoint import MAX_DEPTH, META_KEY, RESERVED_KEYS, CheckpointError, load, save


def test_round_trip_gives_bit_identical_predictions(backend, tmp_path, rng):
    model = models.digits_cnn(seed=3)
    x = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)  # one image: the simulator runs every thread
    before = model.forward(x)
    path = save(model, tmp_path / "m.npz", metadata={"dataset": "digits", "metrics": {"test_accuracy": 0.5}})
    loaded = load(path)
    np.testing.assert_array_equal(loaded.forward(x), before)
    assert loaded.checkpoint_metadata["dataset"] == "digits"
    assert loaded.checkpoint_metadata["architecture"] == model.spec()
    assert [k for k in os.listdir(tmp_path)] == ["m.npz"]  # no temporary file left behind


def test_save_is_atomic_when_writing_fails(cpu_backend, tmp_path, monkeypatch):
    model = models.digits_cnn(seed=1)
    path = tmp_path / "m.npz"
    save(model, path)
    original = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        save(models.digits_cnn(seed=2), path)
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["m.npz"]


def test_truncated_and_corrupt_files_are_refused(cpu_backend, tmp_path):
    path = save(models.digits_cnn(), tmp_path / "m.npz")
    data = open(path, "rb").read()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.npz: corrupt or truncated"):
        load(tmp_path / "trunc.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all" * 10)
    with pytest.raises(CheckpointError, match="junk.npz"):
        load(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load(tmp_path / "missing.npz")


def test_pickle_is_refused(cpu_backend, tmp_path):
    model = models.digits_cnn()
    arrays = model.state_dict()
    arrays[META_KEY] = np.array(json.dumps({"format": "gpu-cnn-checkpoint", "format_version": 1, "architecture": model.spec()}))
    arrays["0.weight"] = np.array([{"evil": 1}], dtype=object)  # an object array is stored as a pickle
    np.savez(tmp_path / "p.npz", **arrays)
    with pytest.raises(CheckpointError, match="pickle"):
        load(tmp_path / "p.npz")


def test_other_architecture_is_refused(cpu_backend, tmp_path):
    path = save(models.digits_cnn(), tmp_path / "d.npz")
    with pytest.raises(CheckpointError, match="another architecture"):
        load(path, model=models.lenet5())
    # weights that do not fit the architecture the file names
    lenet = models.lenet5()
    arrays = lenet.state_dict()
    arrays[META_KEY] = np.array(json.dumps({"format": "gpu-cnn-checkpoint", "format_version": 1,
                                            "architecture": models.digits_cnn().spec()}))
    np.savez(tmp_path / "mix.npz", **arrays)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load(tmp_path / "mix.npz")


def test_not_a_checkpoint_and_future_versions_are_refused(cpu_backend, tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a gpu-cnn checkpoint"):
        load(tmp_path / "plain.npz")
    model = models.digits_cnn()
    arrays = model.state_dict()
    arrays[META_KEY] = np.array(json.dumps({"format": "gpu-cnn-checkpoint", "format_version": 99, "architecture": model.spec()}))
    np.savez(tmp_path / "v99.npz", **arrays)
    with pytest.raises(CheckpointError, match="format version 99"):
        load(tmp_path / "v99.npz")


# -- bad arguments to save/load, foreign and hostile files (audit A5, B8) --------------------------
# Tiny models on the cpu backend: these tests are about the file format and the errors, not kernels.

def _tiny(seed=0):
    nn.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))


def _write(path, meta, arrays=None):
    """A file laid out like a checkpoint, with `meta` (an object, or raw JSON text) as its metadata."""
    arrays = dict(arrays if arrays is not None else _tiny().state_dict())
    arrays[META_KEY] = np.array(meta if isinstance(meta, str) else json.dumps(meta))
    np.savez(path, **arrays)
    return path


def _meta(architecture):
    return {"format": "gpu-cnn-checkpoint", "format_version": 1, "architecture": architecture}


def _linear_arch(**layer):
    return {"type": "Sequential", "layers": [dict({"type": "Linear", "bias": True}, **layer)]}


def _no_rebuild(monkeypatch):
    """Make from_spec fail the test if load calls it: hostile architectures must be refused first."""
    def fail(spec):
        raise AssertionError("from_spec was called on an architecture that should have been refused")
    monkeypatch.setattr(nn, "from_spec", fail)


def test_tiny_round_trip_with_metadata_and_given_model(cpu_backend, tmp_path, rng):
    model = _tiny(seed=1)
    x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    before = model.forward(x)
    meta = types.MappingProxyType({"dataset": "digits", "epoch": np.int64(3), "acc": np.float32(0.5),
                                   "curve": np.arange(3.0), "notes": {"nested": [1, "two", None]}})
    path = save(model, tmp_path / "m.npz", metadata=meta)
    assert path == str(tmp_path / "m.npz")
    loaded = load(path)
    np.testing.assert_array_equal(loaded.forward(x), before)
    got = loaded.checkpoint_metadata
    assert (got["dataset"], got["epoch"], got["acc"], got["curve"]) == ("digits", 3, 0.5, [0.0, 1.0, 2.0])
    assert got["notes"] == {"nested": [1, "two", None]}
    assert (got["format"], got["format_version"], got["architecture"]) == ("gpu-cnn-checkpoint", 1, model.spec())
    # fill a given model of the same architecture (different initial weights) instead of rebuilding
    other = _tiny(seed=2)
    assert load(str(path), model=other) is other
    np.testing.assert_array_equal(other.forward(x), before)
    # overwrite in place; nested Sequentials round-trip too
    nested = nn.Sequential(nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))), nn.ReLU())
    save(nested, path)
    again = load(path)
    assert again.spec() == nested.spec()
    for k, v in nested.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[k], v)
    assert os.listdir(tmp_path) == ["m.npz"]


@pytest.mark.parametrize("key", RESERVED_KEYS)
def test_reserved_metadata_keys_are_refused_before_writing(cpu_backend, tmp_path, key):
    assert set(RESERVED_KEYS) >= {"format", "format_version", "architecture"}
    model = _tiny()
    path = save(model, tmp_path / "m.npz", metadata={"dataset": "digits"})
    original = open(path, "rb").read()
    with pytest.raises(ValueError, match=f"metadata: key '{key}' is reserved") as info:
        save(_tiny(seed=5), path, metadata={"dataset": "x", key: "lenet5"})
    assert not isinstance(info.value, CheckpointError)
    assert open(path, "rb").read() == original  # the old checkpoint is untouched
    with pytest.raises(ValueError, match=f"'{key}' is reserved"):
        save(model, tmp_path / "new.npz", metadata={key: 1})
    assert os.listdir(tmp_path) == ["m.npz"]  # no new file, no temporary file
    assert load(path).checkpoint_metadata["dataset"] == "digits"


def test_every_key_save_writes_itself_is_reserved(cpu_backend, tmp_path):
    path = save(_tiny(), tmp_path / "m.npz")
    with np.load(path) as z:
        written = set(json.loads(str(z[META_KEY])))
    assert written == set(RESERVED_KEYS)


@pytest.mark.parametrize("metadata, exc, message", [
    ([1, 2], TypeError, "metadata: expected a dict, got list"),
    ("dataset=digits", TypeError, "metadata: expected a dict, got str"),
    ({1: "a"}, TypeError, r"metadata: keys must be str, got int \(1\)"),
    ({"a": object()}, TypeError, "metadata value of type object is not JSON-serialisable"),
    ({"a": {1, 2}}, TypeError, "metadata value of type set is not JSON-serialisable"),
])
def test_bad_metadata_is_refused_before_writing(cpu_backend, tmp_path, metadata, exc, message):
    with pytest.raises(exc, match=message):
        save(_tiny(), tmp_path / "m.npz", metadata=metadata)
    assert os.listdir(tmp_path) == []


def test_metadata_that_json_cannot_write_is_refused(cpu_backend, tmp_path):
    circular = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match=r"metadata: cannot be written as JSON \(ValueError: Circular reference"):
        save(_tiny(), tmp_path / "m.npz", metadata={"a": circular})
    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match=r"metadata: cannot be written as JSON \(RecursionError"):
        save(_tiny(), tmp_path / "m.npz", metadata={"a": deep})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", ["abc", None, 3, np.zeros(3), {"0.weight": np.zeros(3)}])
def test_model_argument_must_be_a_module(cpu_backend, tmp_path, bad):
    with pytest.raises(TypeError, match=f"model: expected a gpu_cnn.nn.Module, got {type(bad).__name__}"):
        save(bad, tmp_path / "m.npz")
    assert os.listdir(tmp_path) == []
    path = save(_tiny(), tmp_path / "m.npz")
    if bad is not None:  # load(path, model=None) rebuilds the model
        with pytest.raises(TypeError, match=f"model: expected a gpu_cnn.nn.Module, got {type(bad).__name__}"):
            load(path, model=bad)
    assert isinstance(load(path, model=None), nn.Module)


def test_path_argument_is_checked(cpu_backend, tmp_path):
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got NoneType"):
        save(_tiny(), None)
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got int"):
        load(3)
    with pytest.raises(ValueError, match="path: expected a file path, got ''"):
        save(_tiny(), "")
    # bytes paths work as well as str and pathlib paths
    path = save(_tiny(), os.fsencode(tmp_path / "b.npz"))
    assert path == str(tmp_path / "b.npz")
    assert isinstance(load(os.fsencode(path)), nn.Module)


def _assert_names_user_path(exc, path):
    text = str(exc)
    assert str(path) in text and ".tmp-" not in text, text
    assert exc.filename == str(path)


def test_unwritable_location_names_the_users_path(cpu_backend, tmp_path, monkeypatch):
    model = _tiny()
    (tmp_path / "afile").write_text("x")
    under_file = tmp_path / "afile" / "m.npz"
    with pytest.raises(NotADirectoryError, match="is not a folder") as info:
        save(model, under_file)
    _assert_names_user_path(info.value, under_file)
    with pytest.raises(IsADirectoryError, match="the path is a folder") as info:
        save(model, tmp_path)
    _assert_names_user_path(info.value, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["afile"]

    def no_temp(*a, dir=None, **k):  # what mkstemp raises in a folder the user may not write to
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, ".tmp-abc123.npz"))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", no_temp)
        with pytest.raises(PermissionError, match=r"cannot write the checkpoint \(Permission denied\)") as info:
            save(model, tmp_path / "m.npz")
    _assert_names_user_path(info.value, tmp_path / "m.npz")
    assert info.value.errno == errno.EACCES

    path = save(model, tmp_path / "m.npz")
    original = open(path, "rb").read()

    def no_replace(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", no_replace)
        with pytest.raises(PermissionError, match="Permission denied") as info:
            save(_tiny(seed=9), path)
    _assert_names_user_path(info.value, path)
    assert open(path, "rb").read() == original
    assert sorted(os.listdir(tmp_path)) == ["afile", "m.npz"]  # the temporary file was removed


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_save_into_proc_names_the_users_path(cpu_backend):
    with pytest.raises(OSError) as info:
        save(_tiny(), "/proc/gpu-cnn-model.npz")
    _assert_names_user_path(info.value, "/proc/gpu-cnn-model.npz")
    assert "cannot write the checkpoint" in str(info.value)


def test_npy_file_is_not_a_checkpoint(cpu_backend, tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match=r"plain\.npy: not a gpu-cnn checkpoint \(\.npz\): .*np\.save"):
        load(tmp_path / "plain.npy")


@pytest.mark.parametrize("name, content, why", [
    ("notes.txt", b"hello, not a checkpoint\n", "not a zip archive"),
    ("metrics.json", json.dumps({"test_accuracy": 0.9}).encode(), "not a zip archive"),
    ("empty.npz", b"", "the file is empty"),
    ("obj.pkl", pickle.dumps({"a": 1}), "not a zip archive"),
])
def test_non_zip_files_are_not_reported_as_pickles(cpu_backend, tmp_path, name, content, why):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: not a gpu-cnn checkpoint \(\.npz\): {why}") as info:
        load(tmp_path / name)
    assert "pickle" not in str(info.value)


def test_bare_pickle_file_is_never_unpickled(cpu_backend, tmp_path):
    (tmp_path / "evil.npz").write_bytes(pickle.dumps(_Tripwire()))
    _Tripwire.fired = False
    with pytest.raises(CheckpointError, match="not a zip archive"):
        load(tmp_path / "evil.npz")
    assert not _Tripwire.fired


class _Tripwire:
    fired = False

    def __reduce__(self):
        return (_Tripwire._fire, ())

    @staticmethod
    def _fire():
        _Tripwire.fired = True


def test_zip_member_that_is_not_an_array_is_refused(cpu_backend, tmp_path):
    path = _write(tmp_path / "z.npz", _meta(_tiny().spec()))
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError, match=r"z\.npz: entry 'notes\.txt' is not a NumPy array"):
        load(path)


@pytest.mark.parametrize("text, got", [("[1, 2]", "list"), ("3.0", "float"), ("null", "NoneType"),
                                       ('"a string"', "str"), ("true", "bool")])
def test_metadata_that_is_json_but_not_an_object_is_refused(cpu_backend, tmp_path, text, got):
    path = _write(tmp_path / "m.npz", text)
    with pytest.raises(CheckpointError, match=rf"m\.npz: unreadable metadata \(expected a JSON object, got {got}\)"):
        load(path)


def test_metadata_entry_that_is_not_json_text_is_refused(cpu_backend, tmp_path):
    arrays = _tiny().state_dict()
    np.savez(tmp_path / "num.npz", **arrays, **{META_KEY: np.array(3.0)})
    with pytest.raises(CheckpointError, match=r"num\.npz: unreadable metadata \(__gpu_cnn_meta__ is a float64 array"):
        load(tmp_path / "num.npz")
    np.savez(tmp_path / "two.npz", **arrays, **{META_KEY: np.array(["{}", "{}"])})
    with pytest.raises(CheckpointError, match=r"two\.npz: unreadable metadata .*shape \(2,\)"):
        load(tmp_path / "two.npz")
    path = _write(tmp_path / "deep.npz", "[" * 100_000 + "]" * 100_000)  # json would hit RecursionError
    with pytest.raises(CheckpointError, match=r"deep\.npz: unreadable metadata \(RecursionError"):
        load(path)


def test_huge_architectures_are_refused_before_allocating(cpu_backend, tmp_path, monkeypatch):
    _no_rebuild(monkeypatch)
    path = _write(tmp_path / "lin.npz", _meta(_linear_arch(in_features=10**7, out_features=10**7)))
    with pytest.raises(CheckpointError, match=r"lin\.npz: refused the architecture it names: it needs "
                                              r"100000010000000 parameter values, but the file holds only 47"):
        load(path)
    conv = {"type": "Conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": [10**5, 10**5], "bias": False}
    path = _write(tmp_path / "conv.npz", _meta({"type": "Sequential", "layers": [conv]}))
    with pytest.raises(CheckpointError, match=r"conv\.npz: .*needs 20000000000 parameter values"):
        load(path)
    path = _write(tmp_path / "many.npz", _meta({"type": "Sequential", "layers": [{"type": "ReLU"}] * 10_001}))
    with pytest.raises(CheckpointError, match=r"many\.npz: .*more than 10000 layers"):
        load(path)


def test_deeply_nested_architectures_are_refused_before_rebuilding(cpu_backend, tmp_path, monkeypatch):
    _no_rebuild(monkeypatch)
    arch = {"type": "ReLU"}
    for _ in range(MAX_DEPTH + 1):
        arch = {"type": "Sequential", "layers": [arch]}
    path = _write(tmp_path / "deep.npz", _meta(arch))
    with pytest.raises(CheckpointError, match=rf"deep\.npz: .*nested deeper than {MAX_DEPTH} levels"):
        load(path)
    # nesting the json module itself cannot parse
    text = '{"format": "gpu-cnn-checkpoint", "format_version": 1, "architecture": ' + \
        '{"type": "Sequential", "layers": [' * 5000 + "]}" * 5000 + "}"
    path = _write(tmp_path / "deeper.npz", text)
    with pytest.raises(CheckpointError, match=r"deeper\.npz: unreadable metadata \(RecursionError"):
        load(path)


@pytest.mark.parametrize("layer, message", [
    ({"in_features": 0, "out_features": 3}, "in_features must be a positive int, got 0"),
    ({"in_features": 8, "out_features": -3}, "out_features must be a positive int, got -3"),
    ({"in_features": 1.5, "out_features": 3}, "in_features must be a positive int, got 1.5"),
    ({"in_features": "8", "out_features": 3}, "in_features must be a positive int, got '8'"),
    ({"in_features": True, "out_features": 3}, "in_features must be a positive int, got True"),
    ({"out_features": 3}, "in_features must be a positive int, got None"),
])
def test_invalid_linear_sizes_are_refused_naming_the_problem(cpu_backend, tmp_path, monkeypatch, layer, message):
    _no_rebuild(monkeypatch)
    path = _write(tmp_path / "bad.npz", _meta(_linear_arch(**layer)))
    with pytest.raises(CheckpointError, match=rf"bad\.npz: refused the architecture it names: "
                                              rf"architecture\.layers\[0\] \(Linear\): {re.escape(message)}"):
        load(path)


@pytest.mark.parametrize("field, value, message", [
    ("in_channels", 0, "in_channels must be a positive int, got 0"),
    ("out_channels", -4, "out_channels must be a positive int, got -4"),
    ("kernel_size", 0, "kernel_size must be a positive int or a pair of them, got 0"),
    ("kernel_size", [3], "kernel_size must be a positive int or a pair of them, got [3]"),
    ("kernel_size", [3, 3, 3], "kernel_size must be a positive int or a pair of them, got [3, 3, 3]"),
])
def test_invalid_conv_sizes_are_refused_naming_the_problem(cpu_backend, tmp_path, monkeypatch, field, value, message):
    _no_rebuild(monkeypatch)
    arch = _tiny().spec()
    arch["layers"][0][field] = value
    path = _write(tmp_path / "bad.npz", _meta(arch))
    with pytest.raises(CheckpointError, match=rf"architecture\.layers\[0\] \(Conv2d\): {re.escape(message)}"):
        load(path)


@pytest.mark.parametrize("arch, message", [
    (None, "architecture: expected a layer description (a JSON object), got NoneType"),
    ("lenet5", "architecture: expected a layer description (a JSON object), got str"),
    ({"type": "Sequential", "layers": 5}, "architecture.layers: expected a list of layers, got int"),
    ({"type": "Sequential"}, "architecture.layers: expected a list of layers, got NoneType"),
    ({"type": "Sequential", "layers": [{"type": "ReLU"}, 7]},
     "architecture.layers[1]: expected a layer description (a JSON object), got int"),
])
def test_malformed_architectures_are_refused(cpu_backend, tmp_path, arch, message):
    path = _write(tmp_path / "bad.npz", _meta(arch))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load(path)


@pytest.mark.parametrize("error", [ZeroDivisionError("float division by zero"), MemoryError("Unable to allocate"),
                                   RecursionError("maximum recursion depth exceeded"), ValueError("in_features: no"),
                                   TypeError("unexpected keyword argument 'bogus'")])
def test_errors_while_rebuilding_become_checkpoint_errors(cpu_backend, tmp_path, monkeypatch, error):
    path = save(_tiny(), tmp_path / "m.npz")

    def rebuild(spec):
        raise error

    monkeypatch.setattr(nn, "from_spec", rebuild)
    with pytest.raises(CheckpointError, match=rf"m\.npz: cannot rebuild the architecture it names "
                                              rf"\({type(error).__name__}: {re.escape(str(error))}\)"):
        load(path)


def test_unknown_layer_type_and_unexpected_arguments_are_checkpoint_errors(cpu_backend, tmp_path):
    path = _write(tmp_path / "u.npz", _meta({"type": "Sequential", "layers": [{"type": "LayerNorm", "p": 0.5}]}))
    with pytest.raises(CheckpointError, match=r"u\.npz: cannot rebuild the architecture it names \(ValueError: .*LayerNorm"):
        load(path)
    arch = _linear_arch(in_features=8, out_features=3, bogus=1)
    path = _write(tmp_path / "b.npz", _meta(arch), {"0.weight": np.zeros((3, 8)), "0.bias": np.zeros(3)})
    with pytest.raises(CheckpointError, match=r"b\.npz: cannot rebuild the architecture it names \(TypeError: .*bogus"):
        load(path)


def test_a_short_weight_is_reported_by_name(cpu_backend, tmp_path):
    arrays = _tiny().state_dict()
    arrays["0.bias"] = arrays["0.bias"][:1]
    path = _write(tmp_path / "short.npz", _meta(_tiny().spec()), arrays)
    with pytest.raises(CheckpointError, match=r"short\.npz: weights do not fit the architecture: .*'0\.bias'.*\(2,\).*\(1,\)"):
        load(path)


def test_save_refuses_a_model_that_load_could_not_rebuild(cpu_backend, tmp_path):
    model = nn.ReLU()
    for _ in range(MAX_DEPTH + 1):
        model = nn.Sequential(model)
    with pytest.raises(ValueError, match=rf"model: load could not rebuild its architecture: .*nested deeper than {MAX_DEPTH}"):
        save(model, tmp_path / "m.npz")
    assert os.listdir(tmp_path) == []
