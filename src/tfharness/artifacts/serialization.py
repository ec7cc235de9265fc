"""Serialization: save a Keras model atomically, load it back as a full Keras model, verify it.

Keras 3 will not load a SavedModel back as a Keras model (``load_model`` accepts only ``.keras``
and ``.h5``; ``tf.saved_model.load`` returns an object with a signature and no layers). A
SavedModel written here therefore carries the architecture beside the graph: ``model.export``
writes a SavedModel that serves through ``serving_default`` like any other, and
``assets/tfharness/model.json`` holds ``model.to_json()`` plus the Keras path of every weight.
Loading rebuilds the model from the JSON and assigns each weight from the SavedModel variable of
the same path, so the reload has every layer, can be frozen per layer, and gets a new head.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from tfharness.artifacts import serving
from tfharness.models.applications import register_layers
from tfharness.errors import SaveError, VerificationError

SUFFIXES = {"savedmodel": "", "keras": ".keras", "h5": ".h5"}
METADATA_PATH = Path("assets") / "tfharness" / "model.json"
METADATA_FORMAT = "tfharness-savedmodel/1"


def artifact_path(directory: str | os.PathLike, stem: str, fmt: str) -> Path:
    """Where a model named ``stem`` is written in ``fmt``: a directory for SavedModels."""
    if fmt not in SUFFIXES:
        raise SaveError(f"Unknown save format {fmt!r}; allowed: {', '.join(SUFFIXES)}.")
    return Path(directory) / f"{stem}{SUFFIXES[fmt]}"


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


PARTIAL_MARKERS = (".tmp-", ".old-")


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry itself is on disk.
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_write(target: Path, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp)`` on a temporary sibling of ``target``, then renames it into place.

    A crash or an error at any point leaves either the previous artifact or the new one, never a
    half-written file under ``target``'s name, and no temporary file behind on error (after a
    SIGKILL, :func:`sweep_partial_writes` removes the temporary). Raises :class:`SaveError`
    when the folder cannot be written (read-only, full disk); the previous artifact stays.
    """
    target = Path(target)
    token = uuid.uuid4().hex[:8]
    # Keep the suffix: Keras picks the format from the file extension.
    tmp = target.with_name(f".{target.stem}.tmp-{token}{target.suffix}")
    old = target.with_name(f".{target.stem}.old-{token}{target.suffix}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        _fsync_tree(tmp)
        if target.is_dir():
            # Directories cannot be swapped by one rename: move the old one aside first
            # (sweep_partial_writes puts it back if the process dies between the two renames).
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as error:
        _remove(tmp)
        if old.exists() and not target.exists():
            os.replace(old, target)
        reason = None if isinstance(error, (KeyboardInterrupt, SaveError)) else \
            _storage_fault(error, target.parent)
        if reason:
            kept = "the previous version is kept" if target.exists() else "nothing was written"
            raise SaveError(f"Cannot write {target}: {reason}; {kept}.") from error
        raise
    _remove(old)
    return target


def _storage_fault(error: BaseException, folder: Path) -> str | None:
    """Why a write failed when the storage refused it (read-only, full, missing), else None.

    TensorFlow, Keras and h5py report these in their own exception types, so the folder is also
    probed directly.
    """
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return f"{seen.strerror} (errno {seen.errno})"
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    for known in ("Read-only file system", "No space left on device", "Permission denied",
                  "Disk quota exceeded"):
        if known in text:
            return known
    try:
        probe = folder / f".tfharness-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        return f"{exc.strerror} (errno {exc.errno})"
    return None


def sweep_partial_writes(directory: str | os.PathLike) -> None:
    """Cleans what a process killed inside :func:`atomic_write` left in ``directory``.

    Removes temporaries; an ``.old-`` copy whose target is missing (killed between the two renames
    of a directory swap) is the last complete version and is renamed back.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        name = path.name
        if not name.startswith(".") or not any(m in name for m in PARTIAL_MARKERS):
            continue
        if ".old-" in name:
            stem, _, rest = name[1:].partition(".old-")
            suffix = rest[8:]  # after the 8-character token
            original = directory / f"{stem}{suffix}"
            if not original.exists():
                os.replace(path, original)
                continue
        _remove(path)


def _saved_variable_name(weight) -> str:
    name = getattr(getattr(weight, "value", None), "name", None)
    return name.split(":")[0] if isinstance(name, str) else weight.path


def write_savedmodel(model, path: str | os.PathLike, signatures: Sequence[str] = ()) -> None:
    """Writes the tfharness SavedModel of ``model`` at ``path``, not atomically.

    ``path`` may be local or anything ``tf.io.gfile`` handles (``ram://`` keeps it in memory).
    ``signatures`` are the extra serving signatures of :mod:`tfharness.serving`.
    """
    import tensorflow as tf

    serving.export_savedmodel(model, str(path), signatures)
    metadata = {
        "format": METADATA_FORMAT,
        "architecture": json.loads(model.to_json()),
        # In model.weights order, by the SavedModel's own variable names ("<path>:0" for Keras
        # weights; a block loaded from another SavedModel keeps that SavedModel's names).
        "weight_paths": [_saved_variable_name(weight) for weight in model.weights],
    }
    meta_file = f"{path}/{METADATA_PATH.as_posix()}"
    tf.io.gfile.makedirs(meta_file.rsplit("/", 1)[0])
    with tf.io.gfile.GFile(meta_file, "w") as handle:
        handle.write(json.dumps(metadata))


def save_model(model, target: str | os.PathLike, fmt: str, signatures: Sequence[str] = ()) -> Path:
    """Saves ``model`` to ``target`` in ``fmt`` (``savedmodel``, ``keras`` or ``h5``) atomically.

    ``signatures`` (SavedModel only) are extra serving signatures, see :mod:`tfharness.serving`.
    """
    target = Path(target)
    if fmt == "savedmodel":
        return atomic_write(target, lambda tmp: write_savedmodel(model, tmp, signatures))
    if fmt in ("keras", "h5"):
        if target.suffix != SUFFIXES[fmt]:
            raise SaveError(f"A {fmt} model needs a '{SUFFIXES[fmt]}' file name; got {target}.")
        return atomic_write(target, lambda tmp: model.save(str(tmp)))
    raise SaveError(f"Unknown save format {fmt!r}; allowed: {', '.join(SUFFIXES)}.")


def is_harness_savedmodel(path: str | os.PathLike) -> bool:
    return (Path(path) / "saved_model.pb").is_file() and (Path(path) / METADATA_PATH).is_file()


def load_savedmodel(path: str | os.PathLike):
    """Rebuilds the Keras model of a SavedModel written by :func:`save_model`.

    Returns ``(keras_model, loaded)`` where ``loaded`` is the ``tf.saved_model.load`` object, so
    callers can also check the serving signature without loading twice.
    """
    import keras
    import tensorflow as tf

    # Read through tf.io.gfile so an in-memory (ram://) SavedModel loads the same way.
    with tf.io.gfile.GFile(f"{path}/{METADATA_PATH.as_posix()}", "r") as handle:
        metadata = json.loads(handle.read())
    if metadata.get("format") != METADATA_FORMAT:
        raise SaveError(f"{path} was written by an unknown tfharness format "
                        f"{metadata.get('format')!r}; this version reads {METADATA_FORMAT}.")
    loaded = tf.saved_model.load(str(path))
    register_layers()
    model = keras.models.model_from_json(json.dumps(metadata["architecture"]))
    # Nested models may repeat a path (a base's "bn/gamma" beside the outer "bn/gamma"): the
    # SavedModel keeps its variables in model.weights order, so the k-th variable of a name
    # belongs to the k-th weight of that path.
    by_name: dict = {}
    for variable in loaded.variables:
        by_name.setdefault(variable.name, []).append(variable)
    seen: dict = {}
    saved_paths = metadata["weight_paths"]
    if len(saved_paths) != len(model.weights):
        raise SaveError(f"{path}: the architecture has {len(model.weights)} weights but "
                        f"{len(saved_paths)} were saved.")
    for weight, saved_path in zip(model.weights, saved_paths):
        occurrence = seen[saved_path] = seen.get(saved_path, -1) + 1
        same = by_name.get(f"{saved_path}:0", by_name.get(saved_path, []))
        source = same[occurrence] if occurrence < len(same) else None
        if source is None:
            raise SaveError(f"{path}: no variable {saved_path!r} in the SavedModel.")
        if tuple(source.shape) != tuple(weight.shape):
            raise SaveError(f"{path}: variable {saved_path!r} has shape {tuple(source.shape)}, "
                            f"the rebuilt layer expects {tuple(weight.shape)}.")
        weight.assign(source.numpy())
    return model, loaded


def load_model(path: str | os.PathLike):
    """Loads a model written by :func:`save_model` as a full Keras model, layers included."""
    import keras

    path = Path(path)
    if not path.exists():
        raise SaveError(f"No model at {path}.")
    if path.is_dir():
        if not is_harness_savedmodel(path):
            raise SaveError(f"{path} is not a SavedModel written by tfharness "
                            f"(no {METADATA_PATH}).")
        return load_savedmodel(path)[0]
    if path.suffix in (".keras", ".h5"):
        register_layers()
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    raise SaveError(f"Cannot tell the format of {path}: expected a SavedModel directory, "
                    f"a .keras file or an .h5 file.")


def artifact_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class RoundTrip:
    """What saving and reloading one model measured."""

    path: Optional[Path]  # None for an in-memory round trip
    model: object
    max_abs_diff: float
    serving_max_abs_diff: float | None
    save_seconds: float
    load_seconds: float
    size_bytes: int


def check_outputs(expected: np.ndarray, actual, atol: float, where) -> float:
    """The largest absolute difference of two model outputs; raises past ``atol`` (or on NaN)."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        raise VerificationError(f"The model reloaded from {where} gives outputs of shape "
                                f"{actual.shape}, the saved model {expected.shape}.")
    diff = float(np.max(np.abs(expected - actual))) if expected.size else 0.0
    if not diff <= atol:  # also catches NaN
        raise VerificationError(
            f"The model reloaded from {where} differs from the model that was saved: largest "
            f"absolute output difference {diff:.3g} > save_format.verify_atol={atol:g}.")
    return diff


def save_reload_verify(model, target: str | os.PathLike, fmt: str, probe: np.ndarray,
                       atol: float, signatures: Sequence[str] = ()) -> RoundTrip:
    """Saves ``model``, loads it back and checks that both give the same outputs on ``probe``.

    Raises :class:`VerificationError` when the largest absolute difference exceeds ``atol``.
    A SavedModel is also checked through its ``serving_default`` signature, the way TensorFlow
    Serving would call it.
    """
    start = time.perf_counter()
    path = save_model(model, target, fmt, signatures)
    saved = time.perf_counter()
    if fmt == "savedmodel":
        reloaded, loaded = load_savedmodel(path)
    else:
        reloaded, loaded = load_model(path), None
    loaded_at = time.perf_counter()

    diff, serving = verify_reload(model, reloaded, loaded, probe, atol, path)
    return RoundTrip(path=path, model=reloaded, max_abs_diff=diff, serving_max_abs_diff=serving,
                     save_seconds=saved - start, load_seconds=loaded_at - saved,
                     size_bytes=artifact_size(path))


def verify_reload(model, reloaded, loaded, probe: np.ndarray, atol: float, where):
    """Compares ``reloaded`` (and the SavedModel object ``loaded``, if any) with ``model``.

    Returns ``(max_abs_diff, serving_max_abs_diff or None)``; raises :class:`VerificationError`
    past ``atol``. The SavedModel is called through ``serving_default`` with its named input, the
    way TensorFlow Serving calls it.
    """
    expected = np.asarray(model(probe, training=False))
    diff = check_outputs(expected, reloaded(probe, training=False), atol, where)
    if loaded is None:
        return diff, None
    import tensorflow as tf

    outputs = loaded.signatures["serving_default"](**{serving.INPUT_NAME: tf.constant(probe)})
    served = outputs.get(serving.default_output_name(model), next(iter(outputs.values())))
    return diff, check_outputs(expected, served, atol, f"{where} (serving_default signature)")
