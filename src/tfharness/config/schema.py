"""The config schema: one dataclass per config-group option, and the checks types cannot express.

The dataclasses are registered in Hydra's ConfigStore (see :func:`register_configs`) and each YAML
option names its schema as its first default, so a misspelt key or a wrong type fails while Hydra
composes the config. :func:`validate` then checks ranges and cross-field rules. Nothing here
imports TensorFlow: a bad command line must fail in well under a second.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from tfharness.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "nadam", "adagrad")
ACTIVATIONS = ("softmax", "sigmoid", "linear", "relu", "tanh", "gelu", "elu", "selu", "swish")
SAVE_FORMATS = ("savedmodel", "keras", "h5")
SOURCE_KINDS = ("scratch", "path", "mlflow")
MLFLOW_SOURCE_URI = re.compile(r"^(models:/[^/@]+(/[^/]+|@[^/]+)?|runs:/[^/]+/.+)$")
# Kept in step with tfharness.serving.EXTRA_SIGNATURES (a test checks); config imports no TF.
SERVING_SIGNATURES = ("probabilities", "logits", "embedding", "classes")
IN_MEMORY_FORMATS = ("savedmodel", "keras")
STRATEGIES = ("default", "mirrored", "multi_worker")
DIRECTIONS = ("maximize", "minimize")
TRACKING_MODES = ("local", "server", "off")
ON_UNAVAILABLE = ("fail", "spool")
RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# --------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    name: str = MISSING
    # Fractions of each labelled pool held out for validation and test; the split is seeded
    # separately from training so the same data seed always gives the same split.
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0


@dataclass
class DigitsDataConfig(DataConfig):
    name: str = "digits"
    pretrain_classes: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    finetune_classes: List[int] = field(default_factory=lambda: [5, 6, 7, 8, 9])
    # Fine-tuning on few labels is the point of transfer learning: keep this fraction of the
    # fine-tune training pool.
    finetune_fraction: float = 0.25


@dataclass
class SyntheticDataConfig(DataConfig):
    name: str = "synthetic"
    shape: List[int] = field(default_factory=lambda: [784])
    num_samples: int = 100
    num_classes: int = 10
    finetune_num_samples: int = 100
    finetune_num_classes: int = 5


@dataclass
class NpzDataConfig(DataConfig):
    name: str = "npz"
    path: str = MISSING
    x_key: str = "x"
    y_key: str = "y"
    # When both are null the fine-tune phase trains on the same arrays as pretraining.
    finetune_x_key: Optional[str] = None
    finetune_y_key: Optional[str] = None


@dataclass
class AugmentConfig:
    """Keras preprocessing layers applied to training batches only (0 or null: layer off)."""

    # horizontal, vertical or horizontal_and_vertical (keras.layers.RandomFlip's modes).
    flip: Optional[str] = None
    # Fractions as the layers take them: rotation of a full turn, zoom and translation of the
    # image size, contrast and brightness of the pixel range.
    rotation: float = 0.0
    zoom: float = 0.0
    translation: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0


@dataclass
class ImageFolderDataConfig(DataConfig):
    """Folders laid out as ``keras.utils.image_dataset_from_directory`` reads them."""

    name: str = "image_folder"
    # One sub-folder per class; the sub-folder names are the class names.
    pretrain_dir: str = MISSING
    # null: fine-tune on the pretraining folder.
    finetune_dir: Optional[str] = None
    # Held-out folders (same layout); null: cut val_fraction / test_fraction off the phase's folder.
    pretrain_val_dir: Optional[str] = None
    pretrain_test_dir: Optional[str] = None
    finetune_val_dir: Optional[str] = None
    finetune_test_dir: Optional[str] = None
    image_size: List[int] = field(default_factory=lambda: [128, 128])
    color_mode: str = "rgb"
    interpolation: str = "bilinear"
    # Batches of both phases (streamed data is batched by its reader).
    batch_size: int = 32
    # false, true (in memory after the first epoch) or a file path prefix for tf.data's cache.
    cache: Any = False
    prefetch: bool = True
    # Scale pixels by 1/255 inside the model (a Rescaling layer), so it serves raw pixels.
    # null: yes, unless model=keras_application (which preprocesses raw pixels itself).
    rescale: Optional[bool] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class CsvDataConfig(DataConfig):
    name: str = "csv"
    path: str = MISSING
    # null: fine-tune on the same file.
    finetune_path: Optional[str] = None
    label_column: str = "label"
    # null: every other numeric column.
    feature_columns: Optional[List[str]] = None
    delimiter: str = ","
    # A Normalization layer adapted on the training split, first in the model.
    normalize: bool = True


@dataclass
class TfdsSplitsConfig:
    train: str = "train[:85%]"
    val: str = "train[85%:]"
    test: str = "test"


@dataclass
class TfdsDataConfig(DataConfig):
    """A TensorFlow Datasets data set (``pip install tfharness[tfds]``)."""

    name: str = "tfds"
    # A registered name, with a config or version if wanted: "mnist", "cifar10:3.0.2".
    dataset: str = MISSING
    data_dir: Optional[str] = None
    # false: use only data already prepared in data_dir (no network).
    download: bool = True
    splits: TfdsSplitsConfig = field(default_factory=TfdsSplitsConfig)
    # null: the same splits as pretraining.
    finetune_splits: Optional[TfdsSplitsConfig] = None
    # Label values each phase keeps, relabelled 0..n-1 (null: every class).
    pretrain_classes: Optional[List[int]] = None
    finetune_classes: Optional[List[int]] = None
    # null: the data set's supervised keys (as_supervised=True).
    feature_key: Optional[str] = None
    label_key: Optional[str] = None
    # Resize images to [height, width] (null: keep the data set's shape).
    image_size: Optional[List[int]] = None
    batch_size: int = 32
    # Scale image pixels by 1/255 inside the model (ignored for non-image features); null: yes,
    # unless model=keras_application (which preprocesses raw pixels itself).
    rescale: Optional[bool] = None
    shuffle_buffer: int = 10000


# -------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    name: str = MISSING
    activation: str = "relu"
    output_activation: str = "softmax"
    dropout: float = 0.0


@dataclass
class MlpConfig(ModelConfig):
    name: str = "mlp"
    # Dense(units..., relu) then Dense(num_classes, softmax); the seed used units=[10].
    units: List[int] = field(default_factory=lambda: [64])


@dataclass
class CnnConfig(ModelConfig):
    name: str = "cnn"
    filters: List[int] = field(default_factory=lambda: [16, 32])
    kernel_size: int = 3
    dense_units: int = 32


# ------------------------------------------------------------------------------------ trainer
@dataclass
class TrainerConfig:
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    epochs: int = 5
    batch_size: int = 32
    seed: int = 42
    # Deterministic kernels make "same seed, same metrics" hold exactly on CPU.
    deterministic: bool = True
    verbose: int = 0
    # tf.distribute strategy for training inside one job: default, mirrored, multi_worker.
    strategy: str = "default"
    # Split the CPU into this many logical devices (0: leave it whole). With no GPU this is how
    # mirrored training runs on one machine, one replica per logical CPU.
    cpu_devices: int = 0


# -------------------------------------------------------------------------------- save format
@dataclass
class SaveFormatConfig:
    name: str = "savedmodel"
    # Largest absolute difference allowed between the in-memory model and its reload.
    verify_atol: float = 1e-6
    verify_batch_size: int = 64
    # Save and reload through bytes in memory (tfharness.inmemory): no model file is written.
    in_memory: bool = False
    # SavedModel only: write <models>/<name>/<N>/, the layout TensorFlow Serving watches.
    versioned: bool = False
    # SavedModel only: signatures beside serving_default (tfharness.serving.EXTRA_SIGNATURES).
    signatures: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- finetune
@dataclass
class HeadConfig:
    # How many layers to drop from the end of the pretrained model before adding the head.
    pop: int = 1
    # null keeps the pretrained model's own output layer (no head swap; pop must then be 0).
    num_classes: Optional[int] = 5
    activation: str = "softmax"


@dataclass
class StageConfig:
    name: str = MISSING
    freeze: List[str] = field(default_factory=list)
    learning_rate: float = 1e-3
    epochs: int = 3


@dataclass
class FinetuneConfig:
    name: str = "none"
    enabled: bool = False
    head: HeadConfig = field(default_factory=HeadConfig)
    # Selectors: an index ("0", "-2"), a slice ("0:-1"), a layer name, a glob ("conv*"), or
    # "@base" for every layer that came from the pretrained model.
    freeze: List[str] = field(default_factory=list)
    optimizer: Optional[str] = None
    learning_rate: float = 1e-4
    epochs: int = 5
    batch_size: Optional[int] = None
    # When non-empty, stages replace the single stage described by freeze/learning_rate/epochs.
    stages: List[StageConfig] = field(default_factory=list)

    def new_head(self) -> Optional[HeadConfig]:
        """The head to attach, or None when the pretrained output layer is kept."""
        return self.head if self.head.num_classes is not None else None


# ----------------------------------------------------------------------------------- tracking
@dataclass
class TrackingConfig:
    name: str = "local"
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "tfharness"
    # Filled from the command-line overrides by the CLI when left null.
    run_name: Optional[str] = None
    log_models: bool = True
    tags: Dict[str, str] = field(default_factory=dict)
    # What to do when the store cannot be reached when the run starts: "fail" (a clear error
    # before any training) or "spool" (log to a local SQLite store; replay it later with
    # `python -m tfharness.sync`).
    on_unavailable: str = "fail"
    # Where spooled runs and undelivered logging calls wait for `tfharness.sync`.
    spool_dir: str = "mlflow-spool"
    # How long the end of a run waits for a store that went down mid-run before it spools what
    # could not be delivered.
    drain_timeout_s: float = 30.0
    # Log from a separate tracking process (true), so MLflow never loads in the training
    # process, or from a background thread of the training process (false).
    process: bool = True
    # Register the run's final (fine-tuned) model under this name in the model registry.
    register: Optional[str] = None


# ------------------------------------------------------------------------------------ sweep
@dataclass
class SweepConfig:
    # The metric a sweep compares trials on, as the run records it; the task function returns it.
    objective: str = "finetune/val_accuracy"
    direction: str = "maximize"
    # Fraction of trials allowed to fail: above it the parent run ends FAILED, and Optuna's
    # sweeper stops the search (it checks per batch of hydra.sweeper.n_jobs trials).
    max_failure_rate: float = 1.0
    # Register the best trial's model under this name, with the alias "champion".
    register_best: Optional[str] = None


# ------------------------------------------------------------------------------------- source
@dataclass
class SourceConfig:
    """Where a run starts: ``scratch`` builds and pretrains; the others load an artifact."""

    name: str = "scratch"
    # Keras' safe_mode refuses Lambda bytecode and unknown classes in .keras/.h5 files; only set
    # this for an artifact whose origin you trust (loading it can run its code).
    allow_unsafe: bool = False
    # For a SavedModel without Keras metadata (loaded as one opaque block): which function to
    # call (null: "serve", else the "serving_default" signature), and globs over the block's
    # variable names to keep frozen inside it.
    call_endpoint: Optional[str] = None
    freeze_variables: List[str] = field(default_factory=list)


@dataclass
class PathSourceConfig(SourceConfig):
    name: str = "path"
    # A SavedModel directory, a .keras file or an .h5 file.
    path: str = MISSING


@dataclass
class MlflowSourceConfig(SourceConfig):
    name: str = "mlflow"
    # models:/<name>/<version>, models:/<name>@<alias>, models:/<model_id> or runs:/<run_id>/<path>,
    # looked up in the store at tracking.uri.
    uri: str = MISSING


# ------------------------------------------------------------------------------------- top
@dataclass
class HarnessConfig:
    data: Any = MISSING
    model: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    save_format: SaveFormatConfig = field(default_factory=SaveFormatConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    source: Any = field(default_factory=SourceConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # Where this run writes its models and reports; the CLI points it at Hydra's run folder.
    output_dir: str = MISSING
    print_report: bool = True
    # false: a new run; true: continue the latest interrupted run with the same config, or start
    # a new one if there is none; "<run_id>": continue that run.
    resume: Any = False
    # Per-run checkpoints (<checkpoint_root>/<run_id>/) for resume; stable across invocations,
    # unlike output_dir, which is a new Hydra folder each time.
    checkpoint_root: str = "checkpoints"


GROUP_SCHEMAS = {
    "data": {"digits": DigitsDataConfig, "synthetic": SyntheticDataConfig, "npz": NpzDataConfig,
             "image_folder": ImageFolderDataConfig, "csv": CsvDataConfig, "tfds": TfdsDataConfig},
    "model": {"mlp": MlpConfig, "cnn": CnnConfig},
    "trainer": {"base": TrainerConfig},
    "save_format": {"base": SaveFormatConfig},
    "finetune": {"base": FinetuneConfig},
    "tracking": {"base": TrackingConfig},
    "source": {"scratch": SourceConfig, "path": PathSourceConfig, "mlflow": MlflowSourceConfig},
}


def register_configs() -> None:
    """Registers the schemas in Hydra's ConfigStore as ``schema_<group>_<option>``.

    They are stored outside any group so ``--help`` lists only real options; each YAML option
    pulls its schema in first with ``/schema_<group>_<option>@_here_``.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="harness_schema", node=HarnessConfig)
    for group, options in GROUP_SCHEMAS.items():
        for option, schema in options.items():
            store.store(name=f"schema_{group}_{option}", node=schema)


def to_typed(cfg: DictConfig | HarnessConfig) -> HarnessConfig:
    """Turns a composed DictConfig into dataclass instances (resolving interpolations)."""
    if isinstance(cfg, HarnessConfig):
        return cfg
    from omegaconf.errors import MissingMandatoryValue

    try:
        typed = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        # A required value (``???``), such as data.path or source.uri, left unset.
        raise ConfigError(exc.full_key, "???", "a value: this option needs it set, e.g. "
                          f"{exc.full_key}=...") from None
    if not isinstance(typed, HarnessConfig):
        raise ConfigError("<root>", type(typed).__name__, "a config composed on harness_schema")
    return typed


def flatten(cfg: HarnessConfig) -> Dict[str, str]:
    """The resolved config as ``{"model.units": "[10]", ...}``, the form MLflow params take."""
    flat: Dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = "null" if value is None else str(value)

    walk("", dataclasses.asdict(cfg))
    return flat


# ---------------------------------------------------------------------------------- checks
def _check(condition: bool, key: str, got: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(key, got, allowed)


def _check_fraction(key: str, value: float, *, open_low: bool = False) -> None:
    if open_low:
        _check(0.0 < value <= 1.0, key, value, "a number in (0, 1]")
    else:
        _check(0.0 <= value < 1.0, key, value, "a number in [0, 1)")


def _check_choice(key: str, value: str, allowed: tuple) -> None:
    _check(value in allowed, key, value, "one of " + ", ".join(allowed))


SELECTOR_INDEX = re.compile(r"^-?\d+$")
SELECTOR_SLICE = re.compile(r"^(-?\d*):(-?\d*)$")


def check_selector_syntax(key: str, selector: str) -> None:
    """Rejects selectors that can never match a layer (an empty string)."""
    _check(bool(str(selector).strip()), key, selector,
           "an index, a slice like 0:-1, a layer name, a glob like conv*, or @base")


def _validate_serving(cfg: HarnessConfig) -> None:
    """In-memory round trips, versioned layout and signatures, and how they combine."""
    sf = cfg.save_format
    if sf.in_memory:
        _check(sf.name in IN_MEMORY_FORMATS, "save_format.name", sf.name,
               "savedmodel or keras when save_format.in_memory=true (h5 has no in-memory form)")
        _check(not sf.versioned, "save_format.versioned", sf.versioned,
               "false when save_format.in_memory=true (nothing is written to version)")
        # An in-memory run logs no MLflow model (see runner._round_trip): nothing to register.
        for key, name in (("tracking.register", cfg.tracking.register),
                          ("sweep.register_best", cfg.sweep.register_best)):
            _check(name is None, key, name, "null when save_format.in_memory=true (an in-memory "
                   "run logs no model to register)")
    if sf.versioned:
        _check(sf.name == "savedmodel", "save_format.versioned", sf.versioned,
               "false unless save_format.name=savedmodel (the TensorFlow Serving layout holds "
               "SavedModels)")
    for i, name in enumerate(sf.signatures):
        _check(name in SERVING_SIGNATURES, f"save_format.signatures[{i}]", name,
               "one of " + ", ".join(SERVING_SIGNATURES))
    _check(len(set(sf.signatures)) == len(sf.signatures), "save_format.signatures",
           list(sf.signatures), "distinct signature names")
    _check(not sf.signatures or sf.name == "savedmodel", "save_format.signatures",
           list(sf.signatures), "[] unless save_format.name=savedmodel (only a SavedModel "
           "carries serving signatures)")
    if "probabilities" in sf.signatures:
        heads = [("model.output_activation", cfg.model.output_activation)]
        if cfg.finetune.enabled and cfg.finetune.new_head() is not None:
            heads.append(("finetune.head.activation", cfg.finetune.head.activation))
        for key, activation in heads:
            _check(activation in ("softmax", "sigmoid", "linear"), key, activation,
                   "softmax, sigmoid or linear when save_format.signatures lists "
                   "'probabilities' (any other output is not a probability)")


COLOR_MODES = ("rgb", "grayscale", "rgba")
# tf.image.resize's methods, as image_dataset_from_directory takes them.
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian",
                  "mitchellcubic")
FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")


def _check_image_size(key: str, size: Optional[List[int]]) -> None:
    _check(size is not None and len(size) == 2 and all(d >= 1 for d in size), key, size,
           "[height, width], two positive sizes in pixels")


def _validate_file_data(data: Any) -> None:
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


def validate(cfg: HarnessConfig) -> None:
    """Checks ranges and cross-field rules; raises :class:`ConfigError` naming the key."""
    data, model, trainer = cfg.data, cfg.model, cfg.trainer
    _check_fraction("data.val_fraction", data.val_fraction)
    _check_fraction("data.test_fraction", data.test_fraction)
    _check(data.val_fraction + data.test_fraction < 1.0, "data.test_fraction",
           data.test_fraction, f"val_fraction + test_fraction below 1 (val_fraction is "
           f"{data.val_fraction})")
    if isinstance(data, DigitsDataConfig):
        for key in ("pretrain_classes", "finetune_classes"):
            classes = getattr(data, key)
            _check(bool(classes) and all(0 <= c <= 9 for c in classes)
                   and len(set(classes)) == len(classes), f"data.{key}", classes,
                   "a non-empty list of distinct digits 0-9")
        _check_fraction("data.finetune_fraction", data.finetune_fraction, open_low=True)
    elif isinstance(data, SyntheticDataConfig):
        _check(bool(data.shape) and all(d >= 1 for d in data.shape), "data.shape", data.shape,
               "a non-empty list of positive sizes")
        for key in ("num_samples", "finetune_num_samples"):
            _check(getattr(data, key) >= 10, f"data.{key}", getattr(data, key),
                   "an integer >= 10 (enough for train, validation and test splits)")
        for key in ("num_classes", "finetune_num_classes"):
            _check(getattr(data, key) >= 1, f"data.{key}", getattr(data, key), "an integer >= 1")
    elif isinstance(data, (ImageFolderDataConfig, CsvDataConfig, TfdsDataConfig)):
        _validate_file_data(data)
    elif isinstance(data, NpzDataConfig):
        _check(bool(data.path), "data.path", data.path, "the path of an existing .npz file")
        _check((data.finetune_x_key is None) == (data.finetune_y_key is None),
               "data.finetune_y_key", data.finetune_y_key,
               "set together with data.finetune_x_key, or both null")

    _check_choice("model.activation", model.activation, ACTIVATIONS)
    _check_choice("model.output_activation", model.output_activation, ACTIVATIONS)
    _check(0.0 <= model.dropout < 1.0, "model.dropout", model.dropout, "a number in [0, 1)")
    if isinstance(model, MlpConfig):
        _check(all(u >= 1 for u in model.units), "model.units", model.units,
               "a list of positive layer widths")
    elif isinstance(model, CnnConfig):
        _check(bool(model.filters) and all(f >= 1 for f in model.filters), "model.filters",
               model.filters, "a non-empty list of positive filter counts")
        _check(model.kernel_size >= 1, "model.kernel_size", model.kernel_size, "an integer >= 1")
        _check(model.dense_units >= 1, "model.dense_units", model.dense_units, "an integer >= 1")

    _check_choice("trainer.optimizer", trainer.optimizer, OPTIMIZERS)
    _check(trainer.learning_rate > 0, "trainer.learning_rate", trainer.learning_rate,
           "a number > 0")
    _check(trainer.epochs >= 0, "trainer.epochs", trainer.epochs, "an integer >= 0")
    _check(trainer.batch_size >= 1, "trainer.batch_size", trainer.batch_size, "an integer >= 1")

    _check_choice("trainer.strategy", trainer.strategy, STRATEGIES)
    _check(trainer.cpu_devices >= 0, "trainer.cpu_devices", trainer.cpu_devices,
           "an integer >= 0 (0 keeps the CPU as one device)")
    if cfg.tracking.register is not None:
        _check(cfg.tracking.name != "off" and cfg.tracking.log_models, "tracking.register",
               cfg.tracking.register, "null while tracking is off or tracking.log_models is "
               "false (a registered version points at a logged model)")
    _check_choice("sweep.direction", cfg.sweep.direction, DIRECTIONS)
    _check(0.0 <= cfg.sweep.max_failure_rate <= 1.0, "sweep.max_failure_rate",
           cfg.sweep.max_failure_rate, "a fraction in [0, 1]")
    _check("/" in cfg.sweep.objective, "sweep.objective", cfg.sweep.objective,
           "a metric the run records, such as finetune/val_accuracy or test/accuracy")

    _check_choice("save_format.name", cfg.save_format.name, SAVE_FORMATS)
    _check(cfg.save_format.verify_atol >= 0, "save_format.verify_atol",
           cfg.save_format.verify_atol, "a number >= 0")
    _check(cfg.save_format.verify_batch_size >= 1, "save_format.verify_batch_size",
           cfg.save_format.verify_batch_size, "an integer >= 1")
    _validate_serving(cfg)

    ft = cfg.finetune
    if ft.enabled:
        if ft.optimizer is not None:
            _check_choice("finetune.optimizer", ft.optimizer, OPTIMIZERS)
        _check(ft.learning_rate > 0, "finetune.learning_rate", ft.learning_rate, "a number > 0")
        _check(ft.epochs >= 0, "finetune.epochs", ft.epochs, "an integer >= 0")
        if ft.batch_size is not None:
            _check(ft.batch_size >= 1, "finetune.batch_size", ft.batch_size, "an integer >= 1")
        if ft.new_head() is not None:
            _check(ft.head.num_classes >= 1, "finetune.head.num_classes", ft.head.num_classes,
                   "an integer >= 1, or null to keep the pretrained output layer")
            _check(ft.head.pop >= 0, "finetune.head.pop", ft.head.pop, "an integer >= 0")
            _check_choice("finetune.head.activation", ft.head.activation, ACTIVATIONS)
        else:
            _check(ft.head.pop == 0, "finetune.head.pop", ft.head.pop,
                   "0 when finetune.head.num_classes is null (no new head)")
        for i, selector in enumerate(ft.freeze):
            check_selector_syntax(f"finetune.freeze[{i}]", selector)
        for s, stage in enumerate(ft.stages):
            _check(stage.learning_rate > 0, f"finetune.stages[{s}].learning_rate",
                   stage.learning_rate, "a number > 0")
            _check(stage.epochs >= 0, f"finetune.stages[{s}].epochs", stage.epochs,
                   "an integer >= 0")
            for i, selector in enumerate(stage.freeze):
                check_selector_syntax(f"finetune.stages[{s}].freeze[{i}]", selector)

    source = cfg.source
    _check_choice("source.name", source.name, SOURCE_KINDS)
    if isinstance(source, PathSourceConfig):
        _check(bool(source.path.strip()), "source.path", source.path,
               "the path of a SavedModel directory, a .keras file or an .h5 file")
    if isinstance(source, MlflowSourceConfig):
        _check(bool(MLFLOW_SOURCE_URI.match(source.uri)), "source.uri", source.uri,
               "models:/<name>/<version>, models:/<name>@<alias>, models:/<model_id> or "
               "runs:/<run_id>/<path>")
    for i, pattern in enumerate(source.freeze_variables):
        _check(bool(str(pattern).strip()), f"source.freeze_variables[{i}]", pattern,
               "a variable name or glob like 'sequential/dense/*'")

    _check_choice("tracking.name", cfg.tracking.name, TRACKING_MODES)
    if cfg.tracking.name != "off":
        _check(bool(cfg.tracking.uri), "tracking.uri", cfg.tracking.uri, "a tracking URI")
        _check(bool(cfg.tracking.experiment), "tracking.experiment", cfg.tracking.experiment,
               "a non-empty experiment name")
    _check_choice("tracking.on_unavailable", cfg.tracking.on_unavailable, ON_UNAVAILABLE)
    _check(cfg.tracking.drain_timeout_s >= 0, "tracking.drain_timeout_s",
           cfg.tracking.drain_timeout_s, "a number of seconds >= 0")
    resume = cfg.resume
    if isinstance(resume, int) and not isinstance(resume, bool):
        # An all-digit run id parses as an integer on the command line.
        resume = cfg.resume = str(resume)
    _check(isinstance(resume, bool) or (isinstance(resume, str) and bool(RUN_ID.match(resume))),
           "resume", resume, "false, true, or the id of the run to continue (letters, digits, "
           "'-' and '_')")
    _check(bool(cfg.checkpoint_root), "checkpoint_root", cfg.checkpoint_root,
           "a folder for per-run checkpoints")
    if cfg.tracking.name == "server":
        _check(cfg.tracking.uri.startswith(("http://", "https://")), "tracking.uri",
               cfg.tracking.uri, "an http:// or https:// URI when tracking=server")

