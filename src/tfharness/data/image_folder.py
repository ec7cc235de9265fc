"""``data=image_folder``: folders of images, one sub-folder per class, streamed through tf.data.

The layout is the one ``keras.utils.image_dataset_from_directory`` reads, and the images are read
the way it reads them (``tf.io.decode_image``, then ``tf.image.resize``): mixed sizes are resized
to ``data.image_size``, grayscale or RGBA files are converted to ``data.color_mode``. Only the
list of files is held in memory; images are decoded batch by batch, in parallel, ahead of
training (``prefetch``), and kept after the first epoch only when ``data.cache`` asks for it.

Indexing the folders (finding classes, skipping files that are not images, splitting) is plain
Python, done before any image is read, so a bad folder fails before anything else, naming its key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tfharness.config import AugmentConfig, ImageFolderDataConfig, option_config
from tfharness.data import records
from tfharness.data.split import Split, tensorflow_ready, waits_for_tensorflow
from tfharness.errors import DataError

log = logging.getLogger("tfharness")

# What tf.io.decode_image reads (and image_dataset_from_directory accepts), by leading bytes:
# a file is an image when its content says so, whatever its name.
MAGIC = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"BM": "bmp",
}
CHANNELS = {"grayscale": 1, "rgb": 3, "rgba": 4}
# After a cache, images are shuffled in a buffer of this many (before it, the file list is
# shuffled whole, which costs only the names).
CACHED_SHUFFLE_BUFFER = 2048


def is_image(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return False
    return any(head.startswith(magic) for magic in MAGIC)


@dataclass
class FolderIndex:
    """The images of one folder: paths, class indices, class names, and what was skipped."""

    key: str
    root: Path
    class_names: List[str]
    paths: List[str]
    labels: np.ndarray
    skipped: List[Path]
    digest: str

    def take(self, order: np.ndarray) -> Tuple[List[str], np.ndarray]:
        return [self.paths[i] for i in order], self.labels[order]


def index_folder(key: str, folder: str, class_names: Optional[Sequence[str]] = None
                 ) -> FolderIndex:
    """Lists the images of ``folder`` (one sub-folder per class); raises :class:`DataError`
    naming ``key`` for a missing or empty folder, or a class folder without images.

    ``class_names``: the classes a held-out folder must have (those of the training folder).
    """
    root = Path(folder).expanduser()
    layout = "a folder with one sub-folder of images per class"
    if not root.is_dir():
        raise DataError(key, folder, f"an existing folder ({layout})")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(key, folder, f"{layout}; it has no sub-folders")
    if class_names is not None and classes != list(class_names):
        raise DataError(key, folder, f"the classes of the training folder ({', '.join(class_names)})"
                        f"; it has {', '.join(classes)}")
    paths: List[str] = []
    labels: List[int] = []
    skipped: List[Path] = []
    every_file: List[Path] = []
    for index, name in enumerate(classes):
        found = 0
        for path in records.files_under(root / name):
            if is_image(path):
                paths.append(str(path))
                labels.append(index)
                every_file.append(path)
                found += 1
            else:
                skipped.append(path)
        if not found:
            raise DataError(key, str(root / name), "class folders that each hold at least one "
                            "image (JPEG, PNG, GIF or BMP)")
    for path in root.iterdir():
        if path.is_file():
            skipped.append(path)  # loose files beside the class folders belong to no class
    if skipped:
        shown = ", ".join(str(p.relative_to(root)) for p in skipped[:5])
        log.warning("%s: skipped %d file(s) that are not images in %s: %s%s", key, len(skipped),
                    root, shown, ", ..." if len(skipped) > 5 else "")
    return FolderIndex(key=key, root=root, class_names=classes, paths=paths,
                       labels=np.asarray(labels, dtype=np.int32), skipped=skipped,
                       digest=records.files_digest(every_file, root))


def split_order(count: int, cfg: ImageFolderDataConfig, key: str, held_out: Dict[str, bool],
                seed_offset: int) -> Dict[str, np.ndarray]:
    """Positions of the train, val and test images of a folder, cut as ``split_arrays`` cuts
    arrays: a permutation seeded by ``data.seed``, test first, then validation. A split given
    as its own folder (``held_out``) is not cut here."""
    order = np.random.default_rng(cfg.seed + seed_offset).permutation(count)
    sizes = {}
    for split, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        sizes[split] = (0 if held_out[split] or fraction <= 0
                        else max(1, int(round(count * fraction))))
    if count - sizes["test"] - sizes["val"] < 1:
        raise DataError(key, f"{count} image(s)", "enough images to leave training images after "
                        "data.val_fraction and data.test_fraction are held out")
    test_end = sizes["test"]
    val_end = test_end + sizes["val"]
    return {"test": order[:test_end], "val": order[test_end:val_end], "train": order[val_end:]}


@dataclass
class PhaseFiles:
    """The files of one phase: ``splits[split] = (paths, labels)`` and where they came from."""

    class_names: List[str]
    splits: Dict[str, Tuple[List[str], np.ndarray]]
    digests: Dict[str, str]
    sources: Dict[str, Path]
    skipped: int


def phase_files(cfg: ImageFolderDataConfig, phase: str, seed_offset: int) -> PhaseFiles:
    """Indexes the folders of ``phase`` (``pretrain`` or ``finetune``) and splits them."""
    train = index_folder(f"data.{phase}_dir", getattr(cfg, f"{phase}_dir"))
    held: Dict[str, FolderIndex] = {}
    for split in ("val", "test"):
        folder = getattr(cfg, f"{phase}_{split}_dir")
        if folder is not None:
            held[split] = index_folder(f"data.{phase}_{split}_dir", folder, train.class_names)
    order = split_order(len(train.paths), cfg, f"data.{phase}_dir",
                        {s: s in held for s in ("val", "test")}, seed_offset)
    splits = {split: train.take(positions) for split, positions in order.items()}
    digests = {split: records.sha256_of(train.digest, split, cfg.seed + seed_offset,
                                        cfg.val_fraction, cfg.test_fraction, sorted(held))
               for split in order}
    sources = {split: train.root for split in order}
    for split, index in held.items():
        splits[split] = (index.paths, index.labels)
        digests[split], sources[split] = index.digest, index.root
    return PhaseFiles(class_names=train.class_names, splits=splits, digests=digests,
                      sources=sources, skipped=len(train.skipped)
                      + sum(len(i.skipped) for i in held.values()))


def index_data(cfg: ImageFolderDataConfig) -> Dict[str, PhaseFiles]:
    """Both phases' files; with no ``finetune_dir`` the fine-tune phase is the pretraining one."""
    pretrain = phase_files(cfg, "pretrain", 0)
    finetune = phase_files(cfg, "finetune", 1) if cfg.finetune_dir is not None else pretrain
    return {"pretrain": pretrain, "finetune": finetune}


def describe(cfg: ImageFolderDataConfig, phases: Dict[str, PhaseFiles]
             ) -> records.DataDescription:
    """Class names, the MLflow dataset record of each split, and the data digest."""
    channels = CHANNELS[cfg.color_mode]
    schema = records.tensor_schema([*cfg.image_size, channels])
    reading = [list(cfg.image_size), cfg.color_mode, cfg.interpolation]
    description = records.DataDescription()
    for phase, files in phases.items():
        description.class_names[phase] = list(files.class_names)
        for split, (paths, _) in files.splits.items():
            label = f"{files.sources[split].name}/{phase}/{split}"
            description.splits[f"{phase}/{split}"] = records.split_record(
                label=label, base_digest=files.digests[split], selection=reading,
                source=records.local_source(files.sources[split]), schema=schema,
                rows=len(paths), class_names=files.class_names,
                extra={"skipped_files": files.skipped})
    description.digest = records.sha256_of(
        "image_folder", reading, {f"{p}/{s}": d for p, f in phases.items()
                                  for s, d in f.digests.items()})
    return description


# ------------------------------------------------------------------------------ TensorFlow
def augmentation(cfg: AugmentConfig, seed: int):
    """The Keras preprocessing layers ``data.augment`` names, as one model (None: no layer)."""
    import keras

    layers = keras.layers
    stack = []
    if cfg.flip:
        stack.append(layers.RandomFlip(cfg.flip, seed=seed, name="flip"))
    if cfg.rotation:
        stack.append(layers.RandomRotation(cfg.rotation, seed=seed + 1, name="rotation"))
    if cfg.zoom:
        stack.append(layers.RandomZoom(cfg.zoom, seed=seed + 2, name="zoom"))
    if cfg.translation:
        stack.append(layers.RandomTranslation(cfg.translation, cfg.translation, seed=seed + 3,
                                              name="translation"))
    if cfg.contrast:
        stack.append(layers.RandomContrast(cfg.contrast, value_range=(0, 255), seed=seed + 4,
                                           name="contrast"))
    if cfg.brightness:
        stack.append(layers.RandomBrightness(cfg.brightness, value_range=(0, 255),
                                             seed=seed + 5, name="brightness"))
    return keras.Sequential(stack, name="augment") if stack else None


def load_image(path, cfg: ImageFolderDataConfig):
    """One image as ``image_dataset_from_directory`` reads it: float32 pixels in [0, 255]."""
    import tensorflow as tf

    channels = CHANNELS[cfg.color_mode]
    image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                               expand_animations=False)
    image = tf.image.resize(image, cfg.image_size, method=cfg.interpolation)
    image.set_shape((*cfg.image_size, channels))
    return image


def pipeline(paths: Sequence[str], labels: np.ndarray, cfg: ImageFolderDataConfig, *,
             training: bool, seed: int, cache_name: str, batch_size: Optional[int] = None):
    """A ``tf.data.Dataset`` of ``(images, labels)`` batches read from ``paths``.

    Training batches are reshuffled every epoch (seeded) and augmented; evaluation batches keep
    the file order. ``cache_name`` tells cache files of different splits apart.
    """
    import tensorflow as tf

    batch_size = batch_size or cfg.batch_size
    dataset = tf.data.Dataset.from_tensor_slices((list(paths), labels.astype(np.int32)))
    if training and not cfg.cache:
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(lambda path, label: (load_image(path, cfg), label),
                          num_parallel_calls=tf.data.AUTOTUNE)
    if cfg.cache:
        dataset = dataset.cache("" if cfg.cache is True else f"{cfg.cache}-{cache_name}")
        if training:
            dataset = dataset.shuffle(min(len(paths), CACHED_SHUFFLE_BUFFER), seed=seed,
                                      reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    augment = augmentation(cfg.augment, seed) if training else None
    if augment is not None:
        dataset = dataset.map(lambda x, y: (augment(x, training=True), y),
                              num_parallel_calls=tf.data.AUTOTUNE)
    if cfg.prefetch:
        dataset = dataset.prefetch(tf.data.AUTOTUNE)
    return dataset


def datasets(cfg: ImageFolderDataConfig, phases: Dict[str, PhaseFiles], seed: int,
             batch_size: Optional[int] = None) -> Dict[str, Dict]:
    """``{phase: {"train": ds, "val": ds, "test": ds}}`` of batches (empty splits: None)."""
    out: Dict[str, Dict] = {}
    reading = [list(cfg.image_size), cfg.color_mode, cfg.interpolation]
    for offset, (phase, files) in enumerate(phases.items()):
        out[phase] = {}
        for split, (paths, labels) in files.splits.items():
            if not paths:
                out[phase][split] = None
                continue
            out[phase][split] = pipeline(
                paths, labels, cfg, training=split == "train", seed=seed + offset,
                cache_name=f"{phase}-{split}-"
                f"{records.sha256_of(files.digests[split], reading)[:12]}",
                batch_size=batch_size)
    return out


def rescaling():
    import keras

    return [keras.layers.Rescaling(1 / 255, name="rescale")]


@waits_for_tensorflow
def image_folder(**options) -> Dict[str, Split]:
    """The ``data=image_folder`` factory: each phase's train, val and test batches streamed
    from its folders, with class names, MLflow dataset records and, with ``rescale``, a
    ``Rescaling(1/255)`` layer for the front of the model (it then takes raw pixels)."""
    cfg = option_config(ImageFolderDataConfig, options, "data")
    phases = index_data(cfg)
    description = describe(cfg, phases)
    tensorflow_ready()
    streams = datasets(cfg, phases, seed=cfg.seed)
    out = {}
    for phase, files in phases.items():
        out[phase] = Split(
            train=streams[phase]["train"], val=streams[phase]["val"],
            test=streams[phase]["test"], num_classes=len(files.class_names),
            class_names=list(files.class_names),
            mlflow_datasets={split: description.splits[f"{phase}/{split}"]
                             for split in ("train", "val", "test")},
            preprocessing=rescaling if cfg.rescale is not False else None)
    return out
