"""The config schema: one dataclass per shipped config-group option.

The dataclasses are registered in Hydra's ConfigStore (see :func:`register_configs`) and each YAML
option names its schema as its first default, so a misspelt key or a wrong type fails while Hydra
composes the config. The ``model`` and ``data`` options are ``_target_`` mappings (see
:mod:`tfharness.config.targets`): a shipped option's schema defaults its ``_target_``; a user's
option needs no schema and reaches the run as a plain dict. :mod:`tfharness.config.checks` then
checks ranges and cross-field rules. Nothing here imports TensorFlow: a bad command line must
fail in well under a second.
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
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT_COMPILE = ("auto", True, False)
DIRECTIONS = ("maximize", "minimize")
TRACKING_MODES = ("local", "server", "off")
ON_UNAVAILABLE = ("fail", "spool")
PRETRAIN_CACHE_MODES = ("auto", "off", "refresh")
ASYNC_BACKENDS = ("harness", "mlflow")
HEAD_POOLING = ("avg", "max", "flatten")
APPLICATION_POOLING = ("avg", "max")
# Keyword arguments of a keras.applications constructor that tfharness decides.
APPLICATION_OWN_KWARGS = {"include_top", "input_shape", "input_tensor", "classes", "pooling",
                          "weights", "classifier_activation"}
RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SELECTOR_INDEX = re.compile(r"^-?\d+$")
SELECTOR_SLICE = re.compile(r"^(-?\d*):(-?\d*)$")


# --------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """What every shipped data option has; the factory it names gets these keys too."""

    _target_: str = MISSING
    name: str = MISSING
    # Fractions of each labelled pool held out for validation and test; the split is seeded
    # separately from training so the same data seed always gives the same split.
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0


@dataclass
class DigitsDataConfig(DataConfig):
    _target_: str = "tfharness.data.builtin.digits"
    name: str = "digits"
    pretrain_classes: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    finetune_classes: List[int] = field(default_factory=lambda: [5, 6, 7, 8, 9])
    # Fine-tuning on few labels is the point of transfer learning: keep this fraction of the
    # fine-tune training pool.
    finetune_fraction: float = 0.25


@dataclass
class SyntheticDataConfig(DataConfig):
    _target_: str = "tfharness.data.builtin.synthetic"
    name: str = "synthetic"
    shape: List[int] = field(default_factory=lambda: [784])
    num_samples: int = 100
    num_classes: int = 10
    finetune_num_samples: int = 100
    finetune_num_classes: int = 5


@dataclass
class NpzDataConfig(DataConfig):
    _target_: str = "tfharness.data.builtin.npz"
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

    _target_: str = "tfharness.data.image_folder.image_folder"
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
    _target_: str = "tfharness.data.csv_table.csv"
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

    _target_: str = "tfharness.data.tfds_source.tfds"
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
    """What the shipped builders share; each is called with these keys as keyword arguments."""

    _target_: str = MISSING
    name: str = MISSING
    activation: str = "relu"
    output_activation: str = "softmax"
    dropout: float = 0.0


@dataclass
class MlpConfig(ModelConfig):
    _target_: str = "tfharness.models.builders.mlp"
    name: str = "mlp"
    # Dense(units..., relu) then Dense(num_classes, softmax); the seed used units=[10].
    units: List[int] = field(default_factory=lambda: [64])


@dataclass
class CnnConfig(ModelConfig):
    _target_: str = "tfharness.models.builders.cnn"
    name: str = "cnn"
    filters: List[int] = field(default_factory=lambda: [16, 32])
    kernel_size: int = 3
    dense_units: int = 32


@dataclass
class KerasApplicationConfig(ModelConfig):
    _target_: str = "tfharness.models.applications.build_keras_application"
    # Any constructor in keras.applications: MobileNetV2, EfficientNetB0, ResNet50, ...
    name: str = "MobileNetV2"
    # imagenet (downloaded once into ~/.keras), null (random initialization) or the path of a
    # weights file.
    weights: Optional[str] = "imagenet"
    # How the backbone's feature map becomes one vector per sample: avg or max.
    pooling: str = "avg"
    # Passed to the constructor as they are (alpha=0.35 for MobileNetV2, ...).
    kwargs: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ trainer
@dataclass
class TrainerConfig:
    # A name (OPTIMIZERS) or a _target_ mapping such as {_target_: keras.optimizers.AdamW,
    # weight_decay: 0.01}; learning_rate comes from here (or the fine-tune stage) unless set.
    optimizer: Any = "adam"
    learning_rate: float = 1e-3
    # A Keras loss name or a _target_ mapping; metrics: a list of names or _target_ mappings.
    loss: Any = "sparse_categorical_crossentropy"
    metrics: List[Any] = field(default_factory=lambda: ["accuracy"])
    # _target_ mappings of Keras callbacks (EarlyStopping, ReduceLROnPlateau, your own), a fresh
    # instance in every fit.
    callbacks: List[Any] = field(default_factory=list)
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
    # XLA for the train, test and predict steps: "auto" is what Keras decides (on TensorFlow:
    # off without a GPU or under a distribution strategy), true or false force it.
    jit_compile: Any = "auto"
    # The Keras dtype policy of the models this run builds (PRECISIONS): the mixed ones compute
    # in float16/bfloat16 and keep variables in float32; output layers stay float32.
    precision: str = "float32"
    # Training steps run per call into TensorFlow (Keras' steps_per_execution): fewer calls,
    # less per-step overhead; per-batch callbacks then see every N-th batch.
    steps_per_execution: int = 1


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
    # How many layers to drop from the end of the output path before adding the head (0: the
    # head goes on top of the model's output).
    pop: int = 1
    # A top-level layer to hang the head from instead of counting with pop (the usual way to cut
    # a backbone: "base", "out_relu", ...).
    cut: Optional[str] = None
    # When the cut output is a feature map (height, width, channels): avg or max global pooling,
    # or flatten, before the head.
    pooling: Optional[str] = None
    # Dropout before the head's Dense layer (0: none).
    dropout: float = 0.0
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
    # null: trainer.optimizer. A name or a _target_ mapping, as trainer.optimizer.
    optimizer: Any = None
    # null: trainer.callbacks; a list (even []) replaces them for fine-tuning.
    callbacks: Optional[List[Any]] = None
    learning_rate: float = 1e-4
    epochs: int = 5
    batch_size: Optional[int] = None
    # When non-empty, stages replace the single stage described by freeze/learning_rate/epochs.
    stages: List[StageConfig] = field(default_factory=list)
    # Keep every BatchNormalization layer frozen (inference mode, weights fixed) even where its
    # block is unfrozen, as the Keras guide recommends for fine-tuning a pretrained base.
    freeze_batchnorm: bool = False
    # Also train the same fine-tune architecture from random initialization on the same data and
    # budget, and log transfer/gain = fine-tuned test accuracy minus the from-scratch one.
    transfer_gain: bool = False

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
    # Who delivers logging calls in the background: "harness" (tfharness' delivery thread, which
    # retries while a server is down and spools what it cannot deliver) or "mlflow" (MLflow's own
    # asynchronous logging and HTTP retry settings, MLFLOW_HTTP_REQUEST_*).
    async_backend: str = "harness"
    # Where MLflow runs: in a tracking process of its own (true), so its import and the store's
    # opening use another core while this process imports TensorFlow and loads the data, and
    # MLflow never loads in the training process; in this process (false); or null (auto): a
    # process of its own unless MLflow is already loaded here (a notebook, a sweep's launcher).
    process: Optional[bool] = None
    # Register the run's final (fine-tuned) model under this name in the model registry.
    register: Optional[str] = None
    # An alias (such as "champion") the new version of tracking.register or sweep.register_best
    # gets only when it beats the alias's current holder, both evaluated in this run on the same
    # held-out data, by at least promote_min_delta (the first version of a name always gets it).
    promote: Optional[str] = None
    promote_min_delta: float = 0.0
    # The metric compared (null: sweep.objective), in sweep.direction: test/<metric>,
    # <phase>/val_<metric> or <phase>/test_<metric> of the final model's phase.
    promote_metric: Optional[str] = None


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
    # auto: reuse the pretrained model of a FINISHED run in the same store with the same
    # pretraining fingerprint (see tfharness.pipeline.pretrain_cache); off: always pretrain;
    # refresh: pretrain, and make this run the one later runs reuse.
    pretrain_cache: str = "auto"
    # How long a sweep job waits for another job of the sweep that pretrains the same model.
    pretrain_wait_s: float = 7200.0


GROUP_SCHEMAS = {
    "data": {"digits": DigitsDataConfig, "synthetic": SyntheticDataConfig, "npz": NpzDataConfig,
             "image_folder": ImageFolderDataConfig, "csv": CsvDataConfig, "tfds": TfdsDataConfig},
    "model": {"mlp": MlpConfig, "cnn": CnnConfig,
              "keras_application": KerasApplicationConfig},
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
        elif isinstance(value, list) and any(isinstance(item, dict) for item in value):
            # Lists of _target_ mappings (callbacks, metrics): one param per key, by index.
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)
        else:
            flat[prefix] = "null" if value is None else str(value)

    walk("", dataclasses.asdict(cfg))
    return flat


def option_config(schema: type, options: Dict[str, Any], key: str) -> Any:
    """A shipped option's keys, as its factory receives them, typed by its ``schema`` (a user
    may also name the factory from an option of their own, without the schema)."""
    from omegaconf.errors import MissingMandatoryValue, ValidationError

    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), options)
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{key}.{exc.full_key}", "???", "a value: this option needs it set"
                          ) from None
    except (ValidationError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(key, sorted(options), f"the keys of {schema.__name__} ({first})"
                          ) from None
