"""Checkpoints: round trip, atomic writes, and every refusal."""
import json
import os

import numpy as np
import pytest

from gpu_cnn import models
from gpu_cnn.checkpoint import CheckpointError, META_KEY, load, save


def test_round_trip_gives_bit_identical_predictions(backend, tmp_path, rng):
    model = models.digits_cnn(seed=3)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
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
