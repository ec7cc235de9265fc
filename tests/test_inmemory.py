"""In-memory round trips: a model to bytes and back in both forms, and no file written on the way."""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tfharness.artifacts import inmemory
from tfharness.config import CnnConfig
from tfharness.errors import SaveError
from tfharness.models import build_model, compile_model

# Python's audit events for what creates, changes or removes something on disk.
_WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree",
                 "os.symlink", "os.link", "shutil.copyfile", "shutil.move"}
_recorded: list = []
_recording = [False]


def _audit(event, args):
    if not _recording[0]:
        return
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            _recorded.append((event, os.fsdecode(path)))
    elif event in _WRITE_EVENTS:
        _recorded.append((event, os.fsdecode(args[0]) if args else ""))


sys.addaudithook(_audit)  # hooks cannot be removed; _recording keeps it idle outside the test


def trained_cnn():
    import keras

    keras.utils.set_random_seed(0)
    model = build_model(CnnConfig(filters=[4], dense_units=8), (8, 8, 1), 3)
    compile_model(model, "adam", 1e-2)
    x = np.random.default_rng(0).random((24, 8, 8, 1), dtype=np.float32)
    model.fit(x, np.arange(24) % 3, epochs=1, batch_size=8, verbose=0)
    return model, x


def tree(root) -> set:
    return {str(p) for p in Path(root).rglob("*")}


def test_round_trip_in_memory_writes_nothing_to_the_filesystem(tmp_path, monkeypatch):
    import tensorflow as tf

    model, x = trained_cnn()
    signatures = ("probabilities", "embedding")
    # The first export in a process makes TensorFlow's AutoGraph cache the converted source of
    # its own functions in the temp folder (a per-process code cache, no model data): do that
    # before watching, so the check below is about the round trip alone.
    inmemory.model_from_bytes(inmemory.model_to_bytes(model, "savedmodel", signatures))
    inmemory.model_from_bytes(inmemory.model_to_bytes(model, "keras"))

    # A private temp folder and working directory, so other processes on the machine writing
    # to /tmp cannot make this test pass or fail.
    private_tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    private_tmp.mkdir(), cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.chdir(cwd)
    before = {root: tree(root) for root in (tmp_path, cwd, tempfile.gettempdir())}

    # Remember the real scratch folders each call makes, to check they are gone afterwards.
    scratch_folders, make_scratch = [], inmemory._scratch
    monkeypatch.setattr(inmemory, "_scratch",
                        lambda: scratch_folders.append(make_scratch()) or scratch_folders[-1])
    _recorded.clear()
    _recording[0] = True
    try:
        trips = {fmt: inmemory.save_reload_verify(model, fmt, x, 0.0,
                                                  signatures if fmt == "savedmodel" else ())
                 for fmt in ("keras", "savedmodel")}
    finally:
        _recording[0] = False

    assert {root: tree(root) for root in before} == before
    # Keras' .keras writer makes an empty scratch folder for assets (tempfile.mkdtemp, probed
    # with an unnamed O_TMPFILE) and removes it; nothing else may create or open a file.
    scratch = [path for _, path in _recorded if Path(path).name.startswith("tmp")]
    assert all(Path(path).parent == private_tmp for path in scratch), _recorded
    removed_scratch = [path for event, path in _recorded
                       if event == "shutil.rmtree" and path in scratch]
    unexpected = [(event, path) for event, path in _recorded
                  if not any(path == s or path.startswith(s + os.sep) for s in scratch)
                  # shutil.rmtree removes a folder's entries by names relative to it.
                  and not (removed_scratch and event in ("os.rmdir", "os.remove")
                           and not os.path.isabs(path))]
    assert unexpected == [], _recorded
    assert not any(path.endswith((".keras", ".h5", ".pb", ".index", ".json"))
                   for _, path in _recorded)

    for fmt, trip in trips.items():
        assert trip.path is None and trip.max_abs_diff == 0.0
        assert trip.size_bytes > 0
        for original, restored in zip(model.weights, trip.model.weights):
            np.testing.assert_array_equal(np.asarray(original), np.asarray(restored))
    assert trips["savedmodel"].serving_max_abs_diff == 0.0
    # Training continues on the deserialized model, BatchNormalization included.
    reloaded = trips["savedmodel"].model
    compile_model(reloaded, "adam", 1e-2)
    before_fit = np.asarray(reloaded.get_layer("conv_0").kernel).copy()
    reloaded.fit(x, np.arange(24) % 3, epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(before_fit, np.asarray(reloaded.get_layer("conv_0").kernel))
    # Every call's ram:// scratch folder is gone, files and all: nothing accumulates in memory.
    assert len(scratch_folders) == 3  # keras save; savedmodel save and load
    left = [f"{folder}{member}" for folder in scratch_folders
            for member in ("", "/model.keras", "/model/saved_model.pb", "/saved_model.pb",
                           "/model/variables/variables.index", "/variables/variables.index",
                           "/assets/tfharness/model.json")
            if tf.io.gfile.exists(f"{folder}{member}")]
    assert left == []
    assert tf.io.gfile.glob("ram://tfharness-*") == []


def test_bytes_are_real_keras_and_savedmodel_archives(tmp_path):
    """Written to disk, the bytes are what Keras and TensorFlow read without tfharness."""
    import keras
    import tensorflow as tf

    model, x = trained_cnn()
    keras_bytes = inmemory.model_to_bytes(model, "keras")
    (tmp_path / "m.keras").write_bytes(keras_bytes)
    plain = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_array_equal(plain(x).numpy(), model(x).numpy())
    assert inmemory.bytes_format(keras_bytes) == "keras"

    sm_bytes = inmemory.model_to_bytes(model, "savedmodel", ["classes"])
    assert inmemory.bytes_format(sm_bytes) == "savedmodel"
    with zipfile.ZipFile(__import__("io").BytesIO(sm_bytes)) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "sm")
    assert {"saved_model.pb", "variables/variables.index",
            "assets/tfharness/model.json"} <= names
    served = tf.saved_model.load(str(tmp_path / "sm")).signatures["classes"](
        features=tf.constant(x))["classes"].numpy()
    np.testing.assert_array_equal(served, np.argmax(model(x).numpy(), axis=-1))


def test_bad_bytes_and_arguments_get_clear_errors():
    model, _ = trained_cnn()
    with pytest.raises(SaveError, match="not a zip archive"):
        inmemory.model_from_bytes(b"not a model")
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(SaveError, match="neither a .keras model"):
        inmemory.model_from_bytes(buffer.getvalue())
    with pytest.raises(SaveError, match="Unknown in-memory format 'h5'; allowed: keras, "
                                        "savedmodel"):
        inmemory.model_to_bytes(model, "h5")
    with pytest.raises(SaveError, match="Only the savedmodel form carries serving signatures"):
        inmemory.model_to_bytes(model, "keras", ["embedding"])
