"""The data interface: what a data source hands the pipeline, and how the pipeline reads it.

A data source is any option of the ``data`` group: ``_target_`` names a callable (a *factory*),
called with the option's other keys as keyword arguments (see :mod:`tfharness.data.load`). It
returns a mapping with a ``"pretrain"`` phase and, optionally, a ``"finetune"`` phase (without
it, fine-tuning uses the pretraining data). Each phase is one of:

- ``(x, y)``: NumPy arrays, features shaped ``(n, ...)`` and labels shaped ``(n,)`` (integer
  class indices) or ``(n, k)``; the harness splits them into train, validation and test by
  ``data.val_fraction`` and ``data.test_fraction``, shuffled by ``data.seed`` (the fine-tune
  phase by ``data.seed + 1``);
- a mapping with ``"train"`` and, optionally, ``"val"`` and ``"test"`` (missing or None: no
  validation, no test metrics), each ``(x, y)`` arrays or a ``tf.data.Dataset`` that yields
  ``(x, y)`` batches; optional ``"num_classes"`` (else counted from the labels),
  ``"class_names"``, ``"mlflow_datasets"`` (how each part is recorded in MLflow, see
  :mod:`tfharness.data.records`; else the harness describes it) and ``"preprocessing"`` (a
  callable returning Keras layers to put in front of a model built for this data, such as a
  ``Normalization`` adapted on the training part);
- a :class:`Split` (what a source that builds its parts itself may return).

Inside the pipeline each phase is a :class:`Split`, whose ``train``/``val``/``test`` parts are
either ``(x, y)`` arrays or a ``tf.data.Dataset``. Nothing downstream indexes a part directly:
:func:`is_dataset`, :func:`num_samples`, :func:`has_samples`, :func:`first_features` and
:func:`part_input_shape` answer for both kinds, and :mod:`tfharness.data.pipeline` turns a
part into what ``fit``/``evaluate`` take.

Arrays get what the harness promises for them: a seeded, per-epoch shuffle that a resumed run
repeats exactly. A dataset is the source's own pipeline and is iterated as given, once per
epoch: it must be finite and batched, and its order after a resume is whatever it yields.

Nothing here imports TensorFlow: data errors surface before it loads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from tfharness.errors import DataError

Arrays = Tuple[np.ndarray, np.ndarray]
# (x, y) arrays, or a tf.data.Dataset of (x, y) batches.
Part = Union[Arrays, Any]
PHASES = ("pretrain", "finetune")
PARTS = ("train", "val", "test")
# What a phase mapping may carry beside its parts.
EXTRAS = ("num_classes", "class_names", "mlflow_datasets", "preprocessing")


@dataclass
class Split:
    """One phase's data: train, validation and test parts, and what the labels mean.

    Attributes:
        train: ``(x, y)`` arrays or a ``tf.data.Dataset`` of ``(x, y)`` batches.
        val: the same kinds, or None (no validation).
        test: the same kinds, or None (no test metrics).
        num_classes: how many classes the labels index (the model's output width).
        class_names: a name per class index, when the source knows them.
        mlflow_datasets: per part, the MLflow dataset that records it (a
            :class:`~tfharness.data.records.DatasetRecord` or its dict), when the source
            describes its parts itself.
        preprocessing: a callable returning the Keras layers a model built from scratch for
            this data starts with (so the served model takes raw inputs), or None.
    """

    train: Part
    val: Optional[Part]
    test: Optional[Part]
    num_classes: int
    class_names: Optional[list] = None
    mlflow_datasets: Optional[Dict[str, Any]] = None
    preprocessing: Optional[Callable[[], list]] = None

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """The shape of one sample's features (without the batch dimension)."""
        return part_input_shape(self.train)


@dataclass
class DataBundle:
    """What a run needs: the pretraining split and the fine-tuning split."""

    name: str
    pretrain: Split
    finetune: Split

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return self.pretrain.input_shape


def numpy_only(factory):
    """Marks a data factory that never imports TensorFlow, so it may run while TensorFlow
    imports on another thread (two threads importing TensorFlow at once can deadlock); any
    other factory runs once that import is done."""
    factory.tfharness_numpy_only = True
    return factory


def waits_for_tensorflow(factory):
    """Marks a data factory that reads and checks its files without TensorFlow, then calls
    :func:`tensorflow_ready` before its first use of TensorFlow: it starts while TensorFlow
    imports on another thread, so a missing or empty folder is reported at once and the
    reading overlaps the import."""
    factory.tfharness_numpy_only = True
    factory.tfharness_waits_for_tensorflow = True
    return factory


# What tensorflow_ready() waits on while such a factory runs (see importing_tensorflow).
_tensorflow_import: List[Callable[[], None]] = []


def tensorflow_ready() -> None:
    """Returns once TensorFlow may be imported on this thread (see :func:`waits_for_tensorflow`)."""
    for wait in _tensorflow_import:
        wait()


@contextlib.contextmanager
def importing_tensorflow(wait: Callable[[], None]) -> Iterator[None]:
    """Within the block, :func:`tensorflow_ready` calls ``wait`` (TensorFlow imports on another
    thread until it returns)."""
    _tensorflow_import.append(wait)
    try:
        yield
    finally:
        _tensorflow_import.remove(wait)


def is_dataset(part: Any) -> bool:
    """True for a ``tf.data.Dataset`` (anything with an ``element_spec``), False for arrays."""
    return part is not None and not isinstance(part, (tuple, list)) and hasattr(
        part, "element_spec")


def num_samples(part: Optional[Part]) -> Optional[int]:
    """Samples in a part: the array length, 0 for None, None for a dataset (not counted)."""
    if part is None:
        return 0
    if is_dataset(part):
        return None
    return len(part[0])


def has_samples(part: Optional[Part]) -> bool:
    """Whether a part has anything to fit or evaluate on (a dataset is taken to)."""
    count = num_samples(part)
    return count is None or count > 0


def first_features(part: Optional[Part], size: int) -> np.ndarray:
    """Up to ``size`` samples' features from the front of a part, as one NumPy array."""
    if part is None or size <= 0:
        return np.zeros((0,), np.float32)
    if not is_dataset(part):
        return np.asarray(part[0][:size])
    rows, taken = [], 0
    for batch in part:
        features = np.asarray(batch[0])
        rows.append(features[:size - taken])
        taken += len(rows[-1])
        if taken >= size:
            break
    return np.concatenate(rows) if rows else np.zeros((0,), np.float32)


def probe_features(split: Split, size: int) -> np.ndarray:
    """A fixed batch to compare a model with its reload on: test samples, then validation,
    then training samples, ``size`` rows at most."""
    rows, taken = [], 0
    for part in (split.test, split.val, split.train):
        if taken >= size or not has_samples(part):
            continue
        rows.append(first_features(part, size - taken))
        taken += len(rows[-1])
    return np.concatenate(rows)[:size] if rows else np.zeros((0, *split.input_shape), np.float32)


def part_input_shape(part: Part) -> Tuple[int, ...]:
    """The features' per-sample shape; a dataset must declare it fully in its element_spec."""
    if is_dataset(part):
        return tuple(part.element_spec[0].shape)[1:]
    return tuple(np.asarray(part[0]).shape[1:])


def split_arrays(x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float,
                 seed: int, num_classes: int, class_names: Optional[list] = None) -> Split:
    """Shuffles with ``seed`` and cuts test, then validation, then train off the front."""
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = max(1, int(round(len(x) * test_fraction))) if test_fraction > 0 else 0
    n_val = max(1, int(round(len(x) * val_fraction))) if val_fraction > 0 else 0
    if len(x) - n_test - n_val < 1:
        raise DataError("data.val_fraction", val_fraction,
                        f"fractions that leave training samples out of {len(x)}")
    test = (x[:n_test], y[:n_test])
    val = (x[n_test:n_test + n_val], y[n_test:n_test + n_val])
    train = (x[n_test + n_val:], y[n_test + n_val:])
    return Split(train=train, val=val, test=test, num_classes=num_classes,
                 class_names=class_names)


def checked_arrays(value: Any, key: str, where: str) -> Arrays:
    """``value`` as ``(x, y)`` NumPy arrays, or a DataError naming ``key`` and ``where``."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise DataError(key, f"{where}: {type(value).__name__}",
                        "(x, y) arrays or a tf.data.Dataset of (x, y) batches")
    x, y = np.asarray(value[0]), np.asarray(value[1])
    if x.ndim < 2 or len(x) != len(y):
        raise DataError(key, f"{where}: features of shape {x.shape} with labels of shape "
                        f"{y.shape}", "features of shape (n, ...) with one label per sample")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(key, f"{where}: features of dtype {x.dtype}", "numeric features")
    if y.ndim == 1:
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise DataError(key, f"{where}: labels of dtype {y.dtype}",
                            "non-negative integer class indices (or (n, k) label arrays)")
        y = y.astype(np.int32)
    elif y.ndim != 2:
        raise DataError(key, f"{where}: labels of shape {y.shape}",
                        "labels of shape (n,) or (n, k)")
    return x, y


def classes_in(part: Optional[Part]) -> int:
    """The number of classes the labels of an array part index (0 for none)."""
    if part is None or is_dataset(part) or not len(part[1]):
        return 0
    y = part[1]
    return int(y.shape[1]) if y.ndim == 2 else int(y.max()) + 1


def dataset_classes(part: Any) -> int:
    """The number of classes a dataset's labels index: its label width, else one pass over it."""
    label_shape = tuple(part.element_spec[1].shape)
    if len(label_shape) == 2 and label_shape[1] is not None:
        return int(label_shape[1])
    largest = -1
    for batch in part:
        labels = np.asarray(batch[1])
        if labels.size:
            largest = max(largest, int(labels.max()))
    return largest + 1


def phase_split(value: Any, key: str, phase: str, *, val_fraction: float, test_fraction: float,
                seed: int) -> Split:
    """One phase of a factory's result as a :class:`Split` (see the module docstring)."""
    if isinstance(value, Split):
        return value
    if isinstance(value, Mapping):
        return _split_of_parts(value, key, phase)
    x, y = checked_arrays(value, key, phase)
    return split_arrays(x, y, val_fraction, test_fraction, seed, classes_in((x, y)))


def _split_of_parts(value: Mapping, key: str, phase: str) -> Split:
    unknown = sorted(set(value) - {*PARTS, *EXTRAS})
    if unknown or "train" not in value:
        raise DataError(key, f"{phase}: a mapping with keys {sorted(value)}",
                        "'train' and optionally 'val', 'test', " + ", ".join(
                            f"'{k}'" for k in EXTRAS))
    parts = {}
    for name in PARTS:
        part = value.get(name)
        parts[name] = part if part is None or is_dataset(part) else checked_arrays(
            part, key, f"{phase}.{name}")
    num_classes = value.get("num_classes")
    if num_classes is None:
        num_classes = max(dataset_classes(p) if is_dataset(p) else classes_in(p)
                          for p in parts.values() if p is not None)
    class_names = value.get("class_names")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != int(num_classes):
            raise DataError(key, f"{phase}.class_names: {len(class_names)} names",
                            f"one name per class ({num_classes})")
    if int(num_classes) < 1:
        raise DataError(key, f"{phase}.num_classes: {num_classes}", "an integer >= 1")
    preprocessing = value.get("preprocessing")
    if preprocessing is not None and not callable(preprocessing):
        raise DataError(key, f"{phase}.preprocessing: {type(preprocessing).__name__}",
                        "a callable that returns a list of Keras layers")
    return Split(train=parts["train"], val=parts["val"], test=parts["test"],
                 num_classes=int(num_classes), class_names=class_names,
                 mlflow_datasets=value.get("mlflow_datasets"), preprocessing=preprocessing)
