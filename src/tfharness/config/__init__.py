"""The config: typed schemas, ``_target_`` resolution, and the checks types cannot express.

- ``schema``: the dataclasses Hydra validates the shipped options against;
- ``targets``: how a ``_target_`` mapping is resolved and called, with errors naming the key;
- ``checks``: :func:`validate`, ranges and cross-field rules.

Nothing here imports TensorFlow, so a bad command line fails in well under a second.
"""

from tfharness.config.schema import (  # noqa: F401
    ACTIVATIONS,
    DIRECTIONS,
    APPLICATION_OWN_KWARGS,
    APPLICATION_POOLING,
    GROUP_SCHEMAS,
    HEAD_POOLING,
    IN_MEMORY_FORMATS,
    JIT_COMPILE,
    MLFLOW_SOURCE_URI,
    ASYNC_BACKENDS,
    ON_UNAVAILABLE,
    OPTIMIZERS,
    PRECISIONS,
    RUN_ID,
    SAVE_FORMATS,
    SELECTOR_INDEX,
    SELECTOR_SLICE,
    SERVING_SIGNATURES,
    SOURCE_KINDS,
    STRATEGIES,
    TRACKING_MODES,
    AugmentConfig,
    CnnConfig,
    CsvDataConfig,
    DataConfig,
    DigitsDataConfig,
    FinetuneConfig,
    HarnessConfig,
    HeadConfig,
    KerasApplicationConfig,
    ImageFolderDataConfig,
    MlflowSourceConfig,
    MlpConfig,
    ModelConfig,
    NpzDataConfig,
    PathSourceConfig,
    SaveFormatConfig,
    SourceConfig,
    StageConfig,
    SweepConfig,
    SyntheticDataConfig,
    TfdsDataConfig,
    TfdsSplitsConfig,
    TrackingConfig,
    TrainerConfig,
    flatten,
    register_configs,
    option_config,
    to_typed,
)
from tfharness.config.checks import check_selector_syntax, validate  # noqa: F401,E402
