"""``data=csv``: a table with a label column, read with pandas and checked cell by cell.

Features are every numeric column but the label (or ``data.feature_columns``); labels are class
names, integers or strings, mapped to indices in sorted order. Every cell must hold a value, and
every feature cell a number: the first one that does not is named in the error (key, file,
column, row). Pretraining and fine-tuning are split into train, validation and test as arrays
are (``data.val_fraction``, ``data.test_fraction``, seeded by ``data.seed``). The mean and
variance of the pretraining split's training features become a Keras ``Normalization`` layer
in front of the model (:func:`normalization`), so the served model takes raw feature values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from tfharness.config import CsvDataConfig, option_config
from tfharness.data import records
from tfharness.data.split import Split, numpy_only, split_arrays
from tfharness.errors import DataError

log = logging.getLogger("tfharness")


@dataclass
class Table:
    """One CSV read and checked: float32 features, int32 class indices, the class names."""

    path: Path
    x: np.ndarray
    y: np.ndarray
    class_names: List[str]
    label_type: str
    digest: str


def read_frame(key: str, path_text: str, cfg: CsvDataConfig):
    import pandas as pd

    path = Path(path_text).expanduser()
    if not path.is_file():
        raise DataError(key, path_text, "the path of an existing CSV file")
    try:
        frame = pd.read_csv(path, sep=cfg.delimiter)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(key, path_text, f"a CSV file with a header row ({first_line})") from None
    if frame.empty:
        raise DataError(key, path_text, "a CSV file with at least one data row")
    return path, frame


def _numeric_share(column) -> float:
    import pandas as pd

    present = column.dropna()
    if present.empty:
        return 0.0
    return float(pd.to_numeric(present, errors="coerce").notna().mean())


def feature_columns(frame, cfg: CsvDataConfig, path: Path) -> List[str]:
    """The feature columns: ``data.feature_columns``, or every other numeric column.

    A text column whose cells are mostly numbers counts as numeric (one stray word in a column
    of numbers is a data error to report, not a reason to drop the column).
    """
    import pandas as pd

    listing = ", ".join(map(str, frame.columns))
    if cfg.label_column not in frame.columns:
        raise DataError("data.label_column", cfg.label_column, f"a column of {path}: {listing}")
    if cfg.feature_columns is not None:
        for i, name in enumerate(cfg.feature_columns):
            if name not in frame.columns:
                raise DataError(f"data.feature_columns[{i}]", name,
                                f"a column of {path}: {listing}")
        return list(cfg.feature_columns)
    chosen, dropped = [], []
    for name in frame.columns:
        if name == cfg.label_column:
            continue
        column = frame[name]
        if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
            chosen.append(name)
        elif _numeric_share(column) >= 0.5:
            chosen.append(name)
        else:
            dropped.append(name)
    if dropped:
        log.info("data=csv: %s: using the numeric columns %s; not the text columns %s", path,
                 ", ".join(map(str, chosen)), ", ".join(map(str, dropped)))
    if not chosen:
        raise DataError("data.feature_columns", None, f"numeric feature columns besides "
                        f"'{cfg.label_column}' in {path}; it has {listing}")
    return chosen


def _first_bad(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def feature_array(frame, columns: List[str], key: str, path: Path) -> np.ndarray:
    """The features as float32; a missing or non-numeric cell is a :class:`DataError`."""
    import pandas as pd

    out = np.empty((len(frame), len(columns)), dtype=np.float32)
    for j, name in enumerate(columns):
        column = frame[name]
        missing = column.isna().to_numpy()
        if missing.any():
            row = _first_bad(missing)
            raise DataError(key, str(path), f"a value in every cell: column '{name}' is empty "
                            f"in data row {row + 1}")
        values = pd.to_numeric(column, errors="coerce")
        if values.isna().any():
            row = _first_bad(values.isna())
            raise DataError("data.feature_columns", name, f"numeric feature columns: '{name}' "
                            f"holds {column.iloc[row]!r} in data row {row + 1} of {path}")
        out[:, j] = values.to_numpy(dtype=np.float64)
    return out


def label_array(frame, cfg: CsvDataConfig, key: str,
                path: Path) -> Tuple[np.ndarray, List[str], str]:
    """Class indices (sorted class values), class names and the label's schema type."""
    import pandas as pd

    column = frame[cfg.label_column]
    missing = column.isna().to_numpy()
    if missing.any():
        raise DataError(key, str(path), f"a value in every cell: column '{cfg.label_column}' is "
                        f"empty in data row {_first_bad(missing) + 1}")
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        values = column.to_numpy()
        if not np.all(np.equal(np.mod(values, 1), 0)):
            raise DataError("data.label_column", cfg.label_column, f"a column of class labels "
                            f"(integers or names); {path} holds fractional values like "
                            f"{values[np.mod(values, 1) != 0][0]}")
        # factorize hashes; np.unique sorts every value (several times slower on 100,000 rows).
        y, classes = pd.factorize(values.astype(np.int64), sort=True)
        return y.astype(np.int32), [str(c) for c in classes], "long"
    y, classes = pd.factorize(column.astype(str), sort=True)
    return y.astype(np.int32), [str(c) for c in classes], "string"


def read_table(key: str, path_text: str, cfg: CsvDataConfig,
               columns: Optional[List[str]] = None) -> Tuple[Table, List[str]]:
    """Reads and checks one CSV; ``columns``: the feature columns it must have (fine-tuning)."""
    path, frame = read_frame(key, path_text, cfg)
    if columns is None:
        columns = feature_columns(frame, cfg, path)
    else:
        if cfg.label_column not in frame.columns:
            raise DataError("data.label_column", cfg.label_column,
                            f"a column of {path}: {', '.join(map(str, frame.columns))}")
        absent = [c for c in columns if c not in frame.columns]
        if absent:
            raise DataError(key, path_text, f"a CSV with the feature columns of data.path; it "
                            f"lacks {', '.join(map(str, absent))}")
    x = feature_array(frame, columns, key, path)
    y, class_names, label_type = label_array(frame, cfg, key, path)
    return Table(path=path, x=x, y=y, class_names=class_names, label_type=label_type,
                 digest=records.file_digest(path)), columns


@dataclass
class CsvData:
    """Both phases' tables, split, with what describes them."""

    columns: List[str]
    tables: Dict[str, Table]
    splits: Dict[str, Split]
    description: records.DataDescription


def load(cfg: CsvDataConfig) -> CsvData:
    pretrain, columns = read_table("data.path", cfg.path, cfg)
    tables = {"pretrain": pretrain}
    tables["finetune"] = (read_table("data.finetune_path", cfg.finetune_path, cfg, columns)[0]
                          if cfg.finetune_path is not None else pretrain)
    splits = {}
    description = records.DataDescription()
    for offset, (phase, table) in enumerate(tables.items()):
        splits[phase] = split_arrays(table.x, table.y, cfg.val_fraction, cfg.test_fraction,
                                     cfg.seed + offset, len(table.class_names),
                                     class_names=list(table.class_names))
        description.class_names[phase] = list(table.class_names)
        schema = records.column_schema(columns, cfg.label_column, table.label_type)
        for split in ("train", "val", "test"):
            description.splits[f"{phase}/{split}"] = records.split_record(
                label=f"{table.path.name}/{phase}/{split}", base_digest=table.digest,
                selection=[columns, cfg.label_column, split, cfg.seed + offset,
                           cfg.val_fraction, cfg.test_fraction],
                source=records.local_source(table.path), schema=schema,
                rows=len(getattr(splits[phase], split)[0]), class_names=table.class_names)
    description.digest = records.sha256_of(
        "csv", columns, cfg.label_column, cfg.seed, cfg.val_fraction, cfg.test_fraction,
        pretrain.digest, tables["finetune"].digest)
    return CsvData(columns=columns, tables=tables, splits=splits, description=description)


@numpy_only
def csv(**options) -> Dict[str, Split]:
    """The ``data=csv`` factory: both phases as split arrays, with class names, MLflow dataset
    records and (``normalize``) a ``Normalization`` layer adapted on the pretraining split's
    training rows for the front of the model (it then takes raw feature values)."""
    cfg = option_config(CsvDataConfig, options, "data")
    data = load(cfg)
    for phase, split in data.splits.items():
        split.mlflow_datasets = {part: data.description.splits[f"{phase}/{part}"]
                                 for part in ("train", "val", "test")}
    if cfg.normalize:
        train_x = data.splits["pretrain"].train[0]
        data.splits["pretrain"].preprocessing = lambda: [normalization(train_x)]
    return dict(data.splits)


def normalization(train_x: np.ndarray):
    """A Keras ``Normalization`` layer holding the mean and variance of ``train_x`` (the
    training split's features): what ``adapt`` computes, given to the layer as its ``mean``
    and ``variance``. Adapted statistics live in variables that tfharness' SavedModel rebuild
    (architecture from JSON, weights by path) does not restore; given ones are part of the
    layer's config, so every save format reloads them exactly."""
    import keras

    return keras.layers.Normalization(mean=train_x.mean(axis=0, dtype=np.float64),
                                      variance=train_x.var(axis=0, dtype=np.float64),
                                      name="normalize")
