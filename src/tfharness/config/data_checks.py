"""Checks of the data options that read files: ``image_folder``, ``csv`` and ``tfds``.

Only what the config alone can tell (sizes, modes, fractions, names); whether the folders and
files exist and hold what the keys name is checked by their readers (``tfharness.data``), still
before any MLflow run opens.
"""

from __future__ import annotations

from typing import Any, List, Optional

from tfharness.config.schema import CsvDataConfig, ImageFolderDataConfig
from tfharness.errors import ConfigError


def _check(condition: bool, key: str, got: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(key, got, allowed)


def _check_choice(key: str, value: str, allowed: tuple) -> None:
    _check(value in allowed, key, value, "one of " + ", ".join(allowed))


COLOR_MODES = ("rgb", "grayscale", "rgba")
# tf.image.resize's methods, as image_dataset_from_directory takes them.
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian",
                  "mitchellcubic")
FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")


def _check_image_size(key: str, size: Optional[List[int]]) -> None:
    _check(size is not None and len(size) == 2 and all(d >= 1 for d in size), key, size,
           "[height, width], two positive sizes in pixels")


def check_file_data(data: Any) -> None:
    """The keys of data=image_folder, csv and tfds that types alone cannot check."""
    if isinstance(data, ImageFolderDataConfig):
        _check(bool(str(data.pretrain_dir).strip()), "data.pretrain_dir", data.pretrain_dir,
               "a folder with one sub-folder of images per class")
        _check_image_size("data.image_size", data.image_size)
        _check_choice("data.color_mode", data.color_mode, COLOR_MODES)
        _check_choice("data.interpolation", data.interpolation, INTERPOLATIONS)
        _check(isinstance(data.cache, bool) or (isinstance(data.cache, str)
                                                and bool(data.cache.strip())),
               "data.cache", data.cache, "false, true (in memory) or a file path prefix")
        aug = data.augment
        if aug.flip is not None:
            _check_choice("data.augment.flip", aug.flip, FLIP_MODES)
        for key in ("rotation", "zoom", "translation", "contrast", "brightness"):
            _check(0.0 <= getattr(aug, key) <= 1.0, f"data.augment.{key}", getattr(aug, key),
                   "a fraction in [0, 1] (0: no such layer)")
    elif isinstance(data, CsvDataConfig):
        _check(bool(str(data.path).strip()), "data.path", data.path, "the path of a CSV file")
        _check(bool(data.label_column), "data.label_column", data.label_column, "a column name")
        _check(len(data.delimiter) == 1, "data.delimiter", data.delimiter, "one character")
        if data.feature_columns is not None:
            _check(bool(data.feature_columns) and data.label_column not in data.feature_columns
                   and len(set(data.feature_columns)) == len(data.feature_columns),
                   "data.feature_columns", list(data.feature_columns),
                   "null (every numeric column but the label) or distinct column names other "
                   "than data.label_column")
    else:
        _check(bool(str(data.dataset).strip()), "data.dataset", data.dataset,
               "a TensorFlow Datasets name, such as mnist")
        for key in ("pretrain_classes", "finetune_classes"):
            classes = getattr(data, key)
            _check(classes is None or (bool(classes) and min(classes) >= 0
                                       and len(set(classes)) == len(classes)),
                   f"data.{key}", classes, "null (every class) or distinct label values >= 0")
        if data.image_size is not None:
            _check_image_size("data.image_size", data.image_size)
        _check(data.shuffle_buffer >= 1, "data.shuffle_buffer", data.shuffle_buffer,
               "an integer >= 1")
    if not isinstance(data, CsvDataConfig):
        _check(data.batch_size >= 1, "data.batch_size", data.batch_size, "an integer >= 1")
