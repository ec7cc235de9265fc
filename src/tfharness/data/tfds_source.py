"""``data=tfds``: a TensorFlow Datasets data set, its splits and classes chosen per phase.

The optional extra ``tensorflow-datasets`` (``pip install 'tfharness[tfds]'``). Each phase takes
the train, validation and test splits named in ``data.splits`` (``data.finetune_splits`` for
fine-tuning, when set), keeps the label values ``data.<phase>_classes`` and relabels them
0..n-1: the digits recipe (0-4, then 5-9) on any labelled data set. Batches stream from the
prepared data set as TensorFlow Datasets serves them; images are cast to float32 pixels (and
resized to ``data.image_size`` when set), labels to int32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from tfharness.config import TfdsDataConfig, option_config
from tfharness.data import records
from tfharness.data.split import Split
from tfharness.errors import DataError

SPLITS = ("train", "val", "test")


def import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("data", "tfds", "an installed tensorflow-datasets (the optional extra: "
                        "pip install 'tfharness[tfds]')") from None
    return tfds


@dataclass
class TfdsData:
    """What :func:`load` found: the phases' batched datasets, class names and counts."""

    datasets: Dict[str, Dict[str, object]]
    counts: Dict[str, Dict[str, int]]
    class_names: Dict[str, List[str]]
    input_shape: tuple
    is_image: bool
    description: records.DataDescription


def _builder(tfds, cfg: TfdsDataConfig):
    try:
        return tfds.builder(cfg.dataset, data_dir=cfg.data_dir)
    except tfds.core.DatasetNotFoundError:
        raise DataError("data.dataset", cfg.dataset, "a TensorFlow Datasets name "
                        "(tfds.list_builders() lists them)") from None


def _keys(builder, cfg: TfdsDataConfig) -> tuple:
    if cfg.feature_key is not None or cfg.label_key is not None:
        keys = (cfg.feature_key, cfg.label_key)
    else:
        keys = builder.info.supervised_keys
        if not keys or len(keys) != 2:
            raise DataError("data.feature_key", None, f"the feature and label keys of "
                            f"{cfg.dataset} (it has no supervised keys): data.feature_key, "
                            f"data.label_key")
    features = builder.info.features
    for key_name, key in zip(("data.feature_key", "data.label_key"), keys):
        if key not in features:
            raise DataError(key_name, key, f"a feature of {cfg.dataset}: "
                            f"{', '.join(features.keys())}")
    return keys


def _class_names(tfds, builder, label_key: str, cfg: TfdsDataConfig) -> List[str]:
    label = builder.info.features[label_key]
    if not isinstance(label, tfds.features.ClassLabel):
        raise DataError("data.label_key", label_key, f"a class label feature of {cfg.dataset}")
    return list(label.names)


def _phase_classes(cfg: TfdsDataConfig, phase: str, count: int) -> List[int]:
    chosen = getattr(cfg, f"{phase}_classes")
    if chosen is None:
        return list(range(count))
    for value in chosen:
        if not 0 <= value < count:
            raise DataError(f"data.{phase}_classes", list(chosen),
                            f"label values of {cfg.dataset} in 0..{count - 1}")
    return list(chosen)


def _check_split(builder, cfg: TfdsDataConfig, key: str, spec: str) -> None:
    """A split spec ("train[:85%]", "train+validation") names splits the data set has."""
    known = list(builder.info.splits.keys())
    for part in spec.split("+"):
        name = part.split("[", 1)[0].strip()
        if known and name not in known:
            raise DataError(key, spec, f"splits of {cfg.dataset} ({', '.join(known)}), sliced "
                            f"like train[:85%] if wanted")


def _split_stream(tfds, cfg: TfdsDataConfig, split: str, keys: tuple, key: str,
                  decoders=None):
    """``(feature, label)`` pairs of one split, unbatched; ``key``: the split's config key."""
    try:
        dataset = tfds.load(cfg.dataset, split=split, data_dir=cfg.data_dir,
                            download=cfg.download, decoders=decoders)
    except Exception as exc:  # noqa: BLE001 - tfds raises many kinds; each becomes one line
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if "could not find data" in text:
            raise DataError("data.data_dir", cfg.data_dir, f"a folder where {cfg.dataset} is "
                            f"prepared, or data.download=true ({text})") from None
        if "split" in text.lower():
            raise DataError(key, split, f"a split of {cfg.dataset}, sliced like train[:85%] if "
                            f"wanted ({text})") from None
        raise DataError("data.dataset", cfg.dataset, f"a data set TensorFlow Datasets can "
                        f"prepare here ({type(exc).__name__}: {text})") from None
    return dataset.map(lambda example: (example[keys[0]], example[keys[1]]))


def _relabel(dataset, classes: List[int], count: int):
    import tensorflow as tf

    mapping = np.full(count, -1, dtype=np.int32)
    mapping[classes] = np.arange(len(classes), dtype=np.int32)
    table = tf.constant(mapping)
    dataset = dataset.map(lambda x, y: (x, tf.gather(table, tf.cast(y, tf.int32))))
    return dataset.filter(lambda x, y: y >= 0)


def _count(tfds, cfg, split: str, keys: tuple, classes: List[int], total: int,
           key: str) -> int:
    """Examples of ``split`` in ``classes``: one pass over the labels alone (features are not
    decoded), so the batches' cardinality, hence the steps of an epoch, are known."""
    decoders = {keys[0]: tfds.decode.SkipDecoding()}
    stream = _relabel(_split_stream(tfds, cfg, split, keys, key, decoders), classes, total)
    return int(stream.reduce(np.int64(0), lambda n, _: n + 1))


def _shape(tfds, builder, keys: tuple, cfg: TfdsDataConfig) -> tuple:
    """``(sample shape after resizing, whether the feature is an image)``."""
    feature = builder.info.features[keys[0]]
    is_image = isinstance(feature, tfds.features.Image)
    shape = tuple(feature.shape)
    if cfg.image_size is not None:
        if not is_image:
            raise DataError("data.image_size", list(cfg.image_size),
                            f"null: feature '{keys[0]}' of {cfg.dataset} is not an image")
        shape = (*cfg.image_size, shape[-1])
    if any(d is None for d in shape):
        raise DataError("data.image_size", None, f"[height, width]: the images of {cfg.dataset} "
                        f"differ in size {tuple(feature.shape)}")
    return shape, is_image


def _part(tfds, builder, cfg: TfdsDataConfig, keys: tuple, spec: str, key: str,
          classes: List[int], total: int, seed: Optional[int]) -> tuple:
    """One part's ``(batches or None, example count)``; ``seed``: shuffle it (training)."""
    import tensorflow as tf

    def prepare(x, y):
        x = tf.cast(x, tf.float32)
        if cfg.image_size is not None:
            x = tf.image.resize(x, cfg.image_size)
        return x, y

    _check_split(builder, cfg, key, spec)
    count = _count(tfds, cfg, spec, keys, classes, total, key)
    stream = _relabel(_split_stream(tfds, cfg, spec, keys, key), classes, total)
    stream = stream.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    stream = stream.apply(tf.data.experimental.assert_cardinality(count))
    if seed is not None:
        stream = stream.shuffle(min(cfg.shuffle_buffer, max(count, 1)), seed=seed,
                                reshuffle_each_iteration=True)
    batches = stream.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE) if count else None
    return batches, count


def load(cfg: TfdsDataConfig, seed: int) -> TfdsData:
    """Opens the data set, checks keys, splits and classes, and builds each phase's batches."""
    tfds = import_tfds()
    builder = _builder(tfds, cfg)
    keys = _keys(builder, cfg)
    names = _class_names(tfds, builder, keys[1], cfg)
    shape, is_image = _shape(tfds, builder, keys, cfg)
    out = TfdsData(datasets={}, counts={}, class_names={}, input_shape=shape,
                   is_image=is_image, description=records.DataDescription())
    full_name = builder.info.full_name
    for offset, phase in enumerate(("pretrain", "finetune")):
        classes = _phase_classes(cfg, phase, len(names))
        own = phase == "finetune" and cfg.finetune_splits is not None
        splits = cfg.finetune_splits if own else cfg.splits
        out.class_names[phase] = [names[c] for c in classes]
        out.datasets[phase], out.counts[phase] = {}, {}
        for split in SPLITS:
            spec = getattr(splits, split)
            key = f"data.{'finetune_splits' if own else 'splits'}.{split}"
            batches, count = _part(tfds, builder, cfg, keys, spec, key, classes, len(names),
                                   seed + offset if split == "train" else None)
            out.datasets[phase][split], out.counts[phase][split] = batches, count
            out.description.splits[f"{phase}/{split}"] = records.split_record(
                label=f"{full_name}/{phase}/{split}",
                base_digest=records.sha256_of("tfds", full_name),
                selection=[spec, classes, list(shape)],
                source=("tfds", json.dumps({"name": full_name, "split": spec,
                                            "data_dir": str(builder.data_dir)})),
                schema=records.tensor_schema(shape), rows=count,
                class_names=out.class_names[phase])
        if not out.counts[phase]["train"]:
            raise DataError(f"data.{phase}_classes", classes, f"classes with examples in split "
                            f"{splits.train!r} of {cfg.dataset}")
    out.description.class_names = dict(out.class_names)
    out.description.digest = records.sha256_of(
        "tfds", full_name, {p: r.digest for p, r in out.description.splits.items()})
    return out


def tfds(**options) -> Dict[str, Split]:
    """The ``data=tfds`` factory: each phase's batches, class names and MLflow dataset records,
    and for images (with ``rescale``) a ``Rescaling(1/255)`` layer for the front of the model."""
    from tfharness.data.image_folder import rescaling

    cfg = option_config(TfdsDataConfig, options, "data")
    data = load(cfg, seed=cfg.seed)
    out = {}
    for phase in ("pretrain", "finetune"):
        parts = data.datasets[phase]
        out[phase] = Split(
            train=parts["train"], val=parts["val"], test=parts["test"],
            num_classes=len(data.class_names[phase]), class_names=data.class_names[phase],
            mlflow_datasets={part: data.description.splits[f"{phase}/{part}"]
                             for part in SPLITS},
            preprocessing=rescaling if data.is_image and cfg.rescale is not False else None)
    return out
