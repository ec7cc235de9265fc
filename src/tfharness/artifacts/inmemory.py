"""In-memory models: a Keras model to bytes and back, in the ``.keras`` or the SavedModel form.

Nothing here writes model data to the filesystem. Both forms go through TensorFlow's in-memory
``ram://`` file system (``tf.io.gfile``), under a fresh prefix per call that is removed before the
call returns, so repeated calls do not accumulate memory:

- ``keras``: the exact bytes of a ``.keras`` archive (``model.save("ram://.../m.keras")``); written
  to a file, ``keras.saving.load_model`` reads them.
- ``savedmodel``: the tfharness SavedModel (named serving signatures, ``assets/tfharness/
  model.json``) packed as an uncompressed zip of its directory tree; unzipped anywhere, it is a
  SavedModel that ``saved_model_cli`` and TensorFlow Serving read. Compression would buy little:
  the bulk is float weights.

Two things outside model data still touch the disk, both from the libraries and both checked by
the tests: Keras' ``.keras`` writer makes an empty scratch folder for assets in
``tempfile.gettempdir()`` and removes it before returning; TensorFlow's AutoGraph caches the
source of functions it converts in the temp folder, once per process (removed at exit).
"""

from __future__ import annotations

import io
import time
import uuid
import zipfile
from typing import Sequence

import numpy as np

from tfharness.artifacts import serialization
from tfharness.models.applications import register_layers
from tfharness.errors import SaveError

FORMATS = ("keras", "savedmodel")
# The member every tfharness SavedModel zip has; how model_from_bytes tells the forms apart.
_SAVEDMODEL_MARKER = "saved_model.pb"
_KERAS_MARKER = "config.json"


def _scratch() -> str:
    """A new ``ram://`` folder no other call uses (calls may run in several threads)."""
    import tensorflow as tf

    folder = f"ram://tfharness-{uuid.uuid4().hex}"
    # The RAM file system lists and deletes recursively only folders that were made explicitly:
    # a file written under an implicit folder survives rmtree (it raises NotFound instead).
    tf.io.gfile.makedirs(folder)
    return folder


def _remove(folder: str) -> None:
    import tensorflow as tf

    if tf.io.gfile.exists(folder):
        tf.io.gfile.rmtree(folder)


def _zip_tree(root: str) -> bytes:
    """The files under the ``tf.io.gfile`` folder ``root`` as an uncompressed zip."""
    import tensorflow as tf

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for folder, _, files in tf.io.gfile.walk(root):
            relative = folder[len(root):].strip("/")
            for name in sorted(files):
                member = f"{relative}/{name}" if relative else name
                with tf.io.gfile.GFile(f"{folder.rstrip('/')}/{name}", "rb") as handle:
                    archive.writestr(member, handle.read())
    return buffer.getvalue()


def _unzip_tree(archive: zipfile.ZipFile, root: str) -> None:
    import tensorflow as tf

    for member in archive.infolist():
        if member.is_dir():
            continue
        name = member.filename
        # A zip member must not escape the folder it is unpacked into.
        if name.startswith("/") or ".." in name.split("/") or "://" in name:
            raise SaveError(f"Refusing SavedModel bytes with a member outside the model: {name!r}.")
        target = f"{root}/{name}"
        tf.io.gfile.makedirs(target.rsplit("/", 1)[0])  # explicitly: see _scratch
        with tf.io.gfile.GFile(target, "wb") as handle:
            handle.write(archive.read(member))


def model_to_bytes(model, fmt: str = "keras", signatures: Sequence[str] = ()) -> bytes:
    """Serializes ``model`` without writing it to the filesystem.

    Args:
        model: a built Keras model.
        fmt: ``"keras"`` (a ``.keras`` archive) or ``"savedmodel"`` (a zipped tfharness
            SavedModel).
        signatures: extra serving signatures for the SavedModel form
            (see :data:`tfharness.serving.EXTRA_SIGNATURES`).

    Returns:
        The bytes, which :func:`model_from_bytes` turns back into a Keras model.
    """
    import tensorflow as tf

    if fmt not in FORMATS:
        raise SaveError(f"Unknown in-memory format {fmt!r}; allowed: {', '.join(FORMATS)}.")
    if signatures and fmt != "savedmodel":
        raise SaveError(f"Only the savedmodel form carries serving signatures; got "
                        f"signatures={list(signatures)} with fmt={fmt!r}.")
    scratch = _scratch()
    try:
        if fmt == "keras":
            file = f"{scratch}/model.keras"
            model.save(file)
            with tf.io.gfile.GFile(file, "rb") as handle:
                return handle.read()
        serialization.write_savedmodel(model, f"{scratch}/model", signatures)
        return _zip_tree(f"{scratch}/model")
    finally:
        _remove(scratch)


def bytes_format(data: bytes) -> str:
    """``"keras"`` or ``"savedmodel"``: which form ``data`` is in; SaveError if neither."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
    except zipfile.BadZipFile as error:
        raise SaveError(f"These {len(data)} bytes are not a model from model_to_bytes "
                        f"(not a zip archive: {error}).") from error
    if _SAVEDMODEL_MARKER in names and serialization.METADATA_PATH.as_posix() in names:
        return "savedmodel"
    if _KERAS_MARKER in names:
        return "keras"
    raise SaveError(f"These bytes are a zip archive but neither a .keras model (no "
                    f"{_KERAS_MARKER}) nor a tfharness SavedModel (no {_SAVEDMODEL_MARKER} and "
                    f"{serialization.METADATA_PATH.as_posix()}).")


def load_from_bytes(data: bytes):
    """Like :func:`model_from_bytes`; also returns the loaded SavedModel object (or None)."""
    fmt = bytes_format(data)
    if fmt == "keras":
        # A private Keras API, on purpose: the public keras.saving.load_model takes paths only,
        # and for a ram:// path it copies the archive to a local temporary file first, which
        # breaks the promise that an in-memory round trip writes nothing to disk.
        # saving_lib.load_model reads a file object as is. tests/test_inmemory.py fails if it
        # breaks (the round trip is watched for any file written).
        from keras.src.saving import saving_lib

        register_layers()
        return saving_lib.load_model(io.BytesIO(data), compile=False, safe_mode=True), None
    scratch = _scratch()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            _unzip_tree(archive, scratch)
        # tf.saved_model.load reads every variable into memory, so the scratch copy can go.
        return serialization.load_savedmodel(scratch)
    finally:
        _remove(scratch)


def model_from_bytes(data: bytes):
    """Turns bytes from :func:`model_to_bytes` back into a Keras model, layers included."""
    return load_from_bytes(data)[0]


def save_reload_verify(model, fmt: str, probe: np.ndarray, atol: float,
                       signatures: Sequence[str] = ()) -> serialization.RoundTrip:
    """The in-memory counterpart of :func:`tfharness.serialization.save_reload_verify`.

    ``size_bytes`` is the length of the bytes; ``path`` is None.
    """
    start = time.perf_counter()
    data = model_to_bytes(model, fmt, signatures)
    saved = time.perf_counter()
    reloaded, loaded = load_from_bytes(data)
    loaded_at = time.perf_counter()
    diff, serving = serialization.verify_reload(model, reloaded, loaded, probe, atol,
                                                f"{len(data)} in-memory {fmt} bytes")
    return serialization.RoundTrip(path=None, model=reloaded, max_abs_diff=diff,
                                   serving_max_abs_diff=serving, save_seconds=saved - start,
                                   load_seconds=loaded_at - saved, size_bytes=len(data))
