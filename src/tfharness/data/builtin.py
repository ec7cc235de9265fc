"""The shipped data sources, as factories of the ``data`` group like any user's.

Each is the ``_target_`` of its option (``conf/data/<name>.yaml``, schema in
:mod:`tfharness.config.schema`) and returns what :mod:`tfharness.data.split` describes. All
NumPy (the digits ship inside scikit-learn's wheel): no TensorFlow, no
download; marked :func:`~tfharness.data.split.numpy_only`, so they load while TensorFlow imports.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tfharness.data.split import Arrays, numpy_only, split_arrays
from tfharness.errors import DataError


def _relabel(y: np.ndarray, classes: list) -> np.ndarray:
    mapping = {c: i for i, c in enumerate(classes)}
    return np.array([mapping[int(v)] for v in y], dtype=np.int32)


def load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: ``(images, labels)``, images ``(1797, 8, 8)`` of 0..16 and
    labels 0..9, as ``sklearn.datasets.load_digits`` returns them.

    The file is read straight from scikit-learn's installed package when it is where scikit-learn
    keeps it, without importing scikit-learn: that import (SciPy and more) would hold the GIL
    that a run's start shares with TensorFlow's import. Private: ``datasets/data/digits.csv.gz`` is
    scikit-learn's own layout, not an API; where it is not found, ``load_digits`` is called
    (tests/test_private_apis.py checks that the file is found and that both agree).
    """
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as handle:
                table = np.loadtxt(handle, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    from sklearn.datasets import load_digits as sklearn_digits

    loaded = sklearn_digits()
    return loaded.images, loaded.target


@numpy_only
def digits(pretrain_classes: Sequence[int] = (0, 1, 2, 3, 4),
           finetune_classes: Sequence[int] = (5, 6, 7, 8, 9), finetune_fraction: float = 0.25,
           val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> Dict:
    """scikit-learn's 8x8 digits: pretrain on some digits, fine-tune on others (relabelled
    ``0..n-1``) with only ``finetune_fraction`` of the fine-tune training pool."""
    raw_images, raw_labels = load_digits()
    # 8x8 grey images with values 0..16, kept image-shaped so a CNN can use them as they are.
    images = (raw_images / 16.0).astype(np.float32)[..., np.newaxis]
    labels = raw_labels.astype(np.int32)

    def pool(classes: list) -> Arrays:
        mask = np.isin(labels, classes)
        return images[mask], _relabel(labels[mask], classes)

    def phase(classes: Sequence[int], phase_seed: int):
        classes = list(classes)
        return split_arrays(*pool(classes), val_fraction, test_fraction, phase_seed,
                            len(classes), class_names=[str(c) for c in classes])

    pretrain = phase(pretrain_classes, seed)
    finetune = phase(finetune_classes, seed + 1)
    # Few labels: keep only a fraction of the fine-tune training pool (val and test stay whole).
    keep = max(1, int(round(len(finetune.train[0]) * finetune_fraction)))
    finetune.train = (finetune.train[0][:keep], finetune.train[1][:keep])
    return {"pretrain": pretrain, "finetune": finetune}


@numpy_only
def synthetic(shape: Sequence[int] = (784,), num_samples: int = 100, num_classes: int = 10,
              finetune_num_samples: int = 100, finetune_num_classes: int = 5,
              val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> Dict:
    """Random features and labels of a given shape (the seed's examples use 784 features)."""
    rng = np.random.default_rng(seed)

    def draw(n: int, classes: int) -> Arrays:
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        y = rng.integers(0, classes, size=n).astype(np.int32)
        return x, y

    # The class counts are the configured ones, even where a small draw misses a class.
    pretrain = split_arrays(*draw(num_samples, num_classes), val_fraction, test_fraction, seed,
                            num_classes)
    finetune = split_arrays(*draw(finetune_num_samples, finetune_num_classes), val_fraction,
                            test_fraction, seed + 1, finetune_num_classes)
    return {"pretrain": pretrain, "finetune": finetune}


def _npz_arrays(archive, path: str, keys: Dict[str, str], x_key_name: str,
                y_key_name: str) -> Arrays:
    available = sorted(archive.files)
    for key_name in (x_key_name, y_key_name):
        if keys[key_name] not in available:
            raise DataError(f"data.{key_name}", keys[key_name],
                            f"an array stored in {path}: " + (", ".join(available) or "none"))
    x = np.asarray(archive[keys[x_key_name]], dtype=np.float32)
    y = np.asarray(archive[keys[y_key_name]])
    if x.ndim < 2 or len(x) != len(y):
        raise DataError(f"data.{x_key_name}", f"shape {x.shape} with labels of shape {y.shape}",
                        "features of shape (n, ...) with one label per sample")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise DataError(f"data.{y_key_name}", f"{y.dtype} array of shape {y.shape}",
                        "a 1-D array of non-negative integer class labels")
    return x, y.astype(np.int32)


@numpy_only
def npz(path: str, x_key: str = "x", y_key: str = "y", finetune_x_key: Optional[str] = None,
        finetune_y_key: Optional[str] = None) -> Dict:
    """Arrays from an ``.npz`` file; without fine-tune keys, fine-tuning uses the same arrays."""
    keys = {"x_key": x_key, "y_key": y_key, "finetune_x_key": finetune_x_key,
            "finetune_y_key": finetune_y_key}
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError("data.path", path, "the path of an existing .npz file")
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError("data.path", path, f"a readable .npz file ({exc})") from None
    with archive:
        if not hasattr(archive, "files"):
            raise DataError("data.path", path, "an .npz archive, not a single .npy array")
        phases: Dict[str, List] = {"pretrain": _npz_arrays(archive, path, keys, "x_key",
                                                           "y_key")}
        if finetune_x_key is not None:
            phases["finetune"] = _npz_arrays(archive, path, keys, "finetune_x_key",
                                             "finetune_y_key")
    if "finetune" in phases and phases["finetune"][0].shape[1:] != phases["pretrain"][0].shape[1:]:
        raise DataError("data.finetune_x_key", finetune_x_key,
                        f"features shaped like {x_key} {phases['pretrain'][0].shape[1:]}, got "
                        f"{phases['finetune'][0].shape[1:]}")
    return phases
