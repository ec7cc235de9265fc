"""The checks types cannot express: ranges and cross-field rules, before anything runs.

:func:`validate` raises a :class:`ConfigError` naming the key, what it got and what is allowed.
A ``_target_`` is checked here only for its form (a dotted path); whether it imports and what
it returns needs the user's code (and often TensorFlow), so that is checked when the run is
prepared, still before any MLflow run opens (see :mod:`tfharness.pipeline.prepare`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from tfharness.config.schema import (
    ACTIVATIONS,
    DIRECTIONS,
    IN_MEMORY_FORMATS,
    JIT_COMPILE,
    MLFLOW_SOURCE_URI,
    ASYNC_BACKENDS,
    ON_UNAVAILABLE,
    OPTIMIZERS,
    PRECISIONS,
    PRETRAIN_CACHE_MODES,
    RUN_ID,
    SAVE_FORMATS,
    SERVING_SIGNATURES,
    SOURCE_KINDS,
    STRATEGIES,
    TRACKING_MODES,
    APPLICATION_OWN_KWARGS,
    APPLICATION_POOLING,
    HEAD_POOLING,
    CnnConfig,
    CsvDataConfig,
    DigitsDataConfig,
    HarnessConfig,
    KerasApplicationConfig,
    ImageFolderDataConfig,
    MlflowSourceConfig,
    MlpConfig,
    ModelConfig,
    NpzDataConfig,
    PathSourceConfig,
    SyntheticDataConfig,
    TfdsDataConfig,
)
from tfharness.config.data_checks import check_file_data
from tfharness.config.targets import TARGET, is_target, options_of
from tfharness.errors import ConfigError

# MLflow's alias names (and not v<number>, which names a version).
ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


def _check(condition: bool, key: str, got: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(key, got, allowed)


def _check_fraction(key: str, value: Any, *, open_low: bool = False) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value,
           "a number")
    if open_low:
        _check(0.0 < value <= 1.0, key, value, "a number in (0, 1]")
    else:
        _check(0.0 <= value < 1.0, key, value, "a number in [0, 1)")


def _check_choice(key: str, value: str, allowed: tuple) -> None:
    _check(value in allowed, key, value, "one of " + ", ".join(allowed))


def check_selector_syntax(key: str, selector: str) -> None:
    """Rejects selectors that can never match a layer (an empty string)."""
    _check(bool(str(selector).strip()), key, selector,
           "an index, a slice like 0:-1, a layer name, a glob like conv*, or @base")


def check_target_form(key: str, node: Any, what: str) -> None:
    """``node`` must be a ``_target_`` mapping whose path is a non-empty dotted name."""
    _check(is_target(node), f"{key}.{TARGET}", None,
           f"{what}: a mapping with _target_ (the dotted path of a callable) and its keyword "
           f"arguments")
    path = options_of(node)[TARGET]
    _check(isinstance(path, str) and bool(path.strip()) and " " not in path,
           f"{key}.{TARGET}", path, "the dotted path of a callable, such as my_models.build")


def check_name_or_target(key: str, value: Any, names: tuple = (), what: str = "") -> None:
    """A name (one of ``names`` when given) or a ``_target_`` mapping."""
    if isinstance(value, Mapping) or is_target(value):
        check_target_form(key, value, what)
        return
    if names:
        _check(value in names, key, value,
               "one of " + ", ".join(names) + " or a mapping with _target_")
    else:
        _check(isinstance(value, str) and bool(value.strip()), key, value,
               f"{what}: a name Keras knows or a mapping with _target_")


def _check_data(cfg: HarnessConfig) -> None:
    data = cfg.data
    check_target_form("data", data, "a data source")
    options = options_of(data)
    val, test = options.get("val_fraction", 0.15), options.get("test_fraction", 0.15)
    _check_fraction("data.val_fraction", val)
    _check_fraction("data.test_fraction", test)
    _check(val + test < 1.0, "data.test_fraction", test,
           f"val_fraction + test_fraction below 1 (val_fraction is {val})")
    seed = options.get("seed", 0)
    _check(isinstance(seed, int) and not isinstance(seed, bool), "data.seed", seed,
           "an integer")
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
        check_file_data(data)
    elif isinstance(data, NpzDataConfig):
        _check(bool(data.path), "data.path", data.path, "the path of an existing .npz file")
        _check((data.finetune_x_key is None) == (data.finetune_y_key is None),
               "data.finetune_y_key", data.finetune_y_key,
               "set together with data.finetune_x_key, or both null")


def _check_model(cfg: HarnessConfig) -> None:
    model = cfg.model
    check_target_form("model", model, "a model builder")
    if not isinstance(model, ModelConfig):
        return  # a user's builder: its own keys, checked by calling it
    _check_choice("model.activation", model.activation, ACTIVATIONS)
    _check_choice("model.output_activation", model.output_activation, ACTIVATIONS)
    _check(0.0 <= model.dropout < 1.0, "model.dropout", model.dropout, "a number in [0, 1)")
    if isinstance(model, MlpConfig):
        _check(all(u >= 1 for u in model.units), "model.units", model.units,
               "a list of positive layer widths")
    elif isinstance(model, KerasApplicationConfig):
        _check(model.pooling in APPLICATION_POOLING, "model.pooling", model.pooling,
               "one of " + ", ".join(APPLICATION_POOLING))
        for key in sorted(APPLICATION_OWN_KWARGS & set(model.kwargs)):
            _check(False, f"model.kwargs.{key}", model.kwargs[key],
                   "nothing: tfharness sets include_top, input_shape, classes, pooling and "
                   "weights itself (use model.weights and model.pooling)")
    elif isinstance(model, CnnConfig):
        _check(bool(model.filters) and all(f >= 1 for f in model.filters), "model.filters",
               model.filters, "a non-empty list of positive filter counts")
        _check(model.kernel_size >= 1, "model.kernel_size", model.kernel_size, "an integer >= 1")
        _check(model.dense_units >= 1, "model.dense_units", model.dense_units, "an integer >= 1")


def _check_callbacks(key: str, callbacks: Any) -> None:
    _check(isinstance(callbacks, list), key, callbacks,
           "a list of mappings with _target_ (Keras callbacks)")
    for i, callback in enumerate(callbacks):
        check_target_form(f"{key}[{i}]", callback, "a Keras callback")


def _check_trainer(cfg: HarnessConfig) -> None:
    trainer = cfg.trainer
    check_name_or_target("trainer.optimizer", trainer.optimizer, OPTIMIZERS)
    check_name_or_target("trainer.loss", trainer.loss, what="a loss")
    _check(isinstance(trainer.metrics, list), "trainer.metrics", trainer.metrics,
           "a list of metric names or mappings with _target_")
    for i, metric in enumerate(trainer.metrics):
        check_name_or_target(f"trainer.metrics[{i}]", metric, what="a metric")
    _check_callbacks("trainer.callbacks", trainer.callbacks)
    _check(trainer.learning_rate > 0, "trainer.learning_rate", trainer.learning_rate,
           "a number > 0")
    _check(trainer.epochs >= 0, "trainer.epochs", trainer.epochs, "an integer >= 0")
    _check(trainer.batch_size >= 1, "trainer.batch_size", trainer.batch_size, "an integer >= 1")
    _check_choice("trainer.strategy", trainer.strategy, STRATEGIES)
    _check(trainer.cpu_devices >= 0, "trainer.cpu_devices", trainer.cpu_devices,
           "an integer >= 0 (0 keeps the CPU as one device)")
    # Compared by identity and type: 1 == True in Python, and 1 is not a jit_compile value.
    _check(any(type(trainer.jit_compile) is type(v) and trainer.jit_compile == v
               for v in JIT_COMPILE), "trainer.jit_compile", trainer.jit_compile,
           "auto, true or false")
    _check_choice("trainer.precision", trainer.precision, PRECISIONS)
    _check(trainer.steps_per_execution >= 1, "trainer.steps_per_execution",
           trainer.steps_per_execution, "an integer >= 1")


def _check_finetune(cfg: HarnessConfig) -> None:
    ft = cfg.finetune
    if not ft.enabled:
        return
    if ft.optimizer is not None:
        check_name_or_target("finetune.optimizer", ft.optimizer, OPTIMIZERS)
    if ft.callbacks is not None:
        _check_callbacks("finetune.callbacks", ft.callbacks)
    _check(ft.learning_rate > 0, "finetune.learning_rate", ft.learning_rate, "a number > 0")
    _check(ft.epochs >= 0, "finetune.epochs", ft.epochs, "an integer >= 0")
    if ft.batch_size is not None:
        _check(ft.batch_size >= 1, "finetune.batch_size", ft.batch_size, "an integer >= 1")
    if ft.new_head() is not None:
        _check(ft.head.num_classes >= 1, "finetune.head.num_classes", ft.head.num_classes,
               "an integer >= 1, or null to keep the pretrained output layer")
        _check(ft.head.pop >= 0, "finetune.head.pop", ft.head.pop, "an integer >= 0")
        _check_choice("finetune.head.activation", ft.head.activation, ACTIVATIONS)
        if ft.head.pooling is not None:
            _check_choice("finetune.head.pooling", ft.head.pooling, HEAD_POOLING)
        _check(0.0 <= ft.head.dropout < 1.0, "finetune.head.dropout", ft.head.dropout,
               "a number in [0, 1)")
        if ft.head.cut is not None:
            _check(bool(ft.head.cut.strip()), "finetune.head.cut", ft.head.cut,
                   "the name of a layer, or null to cut with finetune.head.pop")
    else:
        _check(ft.head.pop == 0, "finetune.head.pop", ft.head.pop,
               "0 when finetune.head.num_classes is null (no new head)")
        _check(ft.head.cut is None, "finetune.head.cut", ft.head.cut,
               "null when finetune.head.num_classes is null (no new head)")
    for i, selector in enumerate(ft.freeze):
        check_selector_syntax(f"finetune.freeze[{i}]", selector)
    for s, stage in enumerate(ft.stages):
        _check(stage.learning_rate > 0, f"finetune.stages[{s}].learning_rate",
               stage.learning_rate, "a number > 0")
        _check(stage.epochs >= 0, f"finetune.stages[{s}].epochs", stage.epochs,
               "an integer >= 0")
        for i, selector in enumerate(stage.freeze):
            check_selector_syntax(f"finetune.stages[{s}].freeze[{i}]", selector)


def _check_serving(cfg: HarnessConfig) -> None:
    """In-memory round trips, versioned layout and signatures, and how they combine."""
    sf = cfg.save_format
    _check_choice("save_format.name", sf.name, SAVE_FORMATS)
    _check(sf.verify_atol >= 0, "save_format.verify_atol", sf.verify_atol, "a number >= 0")
    _check(sf.verify_batch_size >= 1, "save_format.verify_batch_size", sf.verify_batch_size,
           "an integer >= 1")
    if sf.in_memory:
        _check(sf.name in IN_MEMORY_FORMATS, "save_format.name", sf.name,
               "savedmodel or keras when save_format.in_memory=true (h5 has no in-memory form)")
        _check(not sf.versioned, "save_format.versioned", sf.versioned,
               "false when save_format.in_memory=true (nothing is written to version)")
        # An in-memory run logs no MLflow model (see pipeline/roundtrip.py): nothing to register.
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
        # A user's builder declares no output activation: serving reads it off the model.
        output = options_of(cfg.model).get("output_activation")
        heads = [("model.output_activation", output)] if output is not None else []
        if cfg.finetune.enabled and cfg.finetune.new_head() is not None:
            heads.append(("finetune.head.activation", cfg.finetune.head.activation))
        for key, activation in heads:
            _check(activation in ("softmax", "sigmoid", "linear"), key, activation,
                   "softmax, sigmoid or linear when save_format.signatures lists "
                   "'probabilities' (any other output is not a probability)")


def _check_source(cfg: HarnessConfig) -> None:
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


def _check_tracking(cfg: HarnessConfig) -> None:
    tracking = cfg.tracking
    _check_choice("tracking.name", tracking.name, TRACKING_MODES)
    if tracking.name != "off":
        _check(bool(tracking.uri), "tracking.uri", tracking.uri, "a tracking URI")
        _check(bool(tracking.experiment), "tracking.experiment", tracking.experiment,
               "a non-empty experiment name")
    if tracking.name == "server":
        _check(tracking.uri.startswith(("http://", "https://")), "tracking.uri",
               tracking.uri, "an http:// or https:// URI when tracking=server")
    _check_choice("tracking.on_unavailable", tracking.on_unavailable, ON_UNAVAILABLE)
    _check_choice("tracking.async_backend", tracking.async_backend, ASYNC_BACKENDS)
    _check(tracking.drain_timeout_s >= 0, "tracking.drain_timeout_s",
           tracking.drain_timeout_s, "a number of seconds >= 0")
    if tracking.register is not None:
        _check(tracking.name != "off" and tracking.log_models, "tracking.register",
               tracking.register, "null while tracking is off or tracking.log_models is "
               "false (a registered version points at a logged model)")
    _check_promotion(cfg)


def _check_promotion(cfg: HarnessConfig) -> None:
    """``tracking.promote``: an alias, a registered name to promote in, a held-out metric."""
    tracking = cfg.tracking
    _check(tracking.promote_min_delta >= 0, "tracking.promote_min_delta",
           tracking.promote_min_delta, "a number >= 0")
    if tracking.promote is None:
        return
    _check(bool(ALIAS.match(str(tracking.promote))) and not (str(tracking.promote)[:1] in 'vV' and str(tracking.promote)[1:].isdigit()),
           "tracking.promote", tracking.promote, "an alias name (letters, digits, '_' and '-', "
           "not v<number>), or null")
    _check(bool(tracking.register or cfg.sweep.register_best), "tracking.promote",
           tracking.promote, "null unless tracking.register or sweep.register_best names the "
           "registered model to promote in")
    metric = tracking.promote_metric or cfg.sweep.objective
    key = "tracking.promote_metric" if tracking.promote_metric else "sweep.objective"
    final = "finetune" if cfg.finetune.enabled else "pretrain"
    prefix, _, name = metric.partition("/")
    held_out = (prefix == "test" and name) or (prefix == final and name.startswith(
        ("val_", "test_")) and len(name) > 5)
    _check(bool(held_out), key, metric, f"a metric on held-out data to promote on: "
           f"test/<metric>, {final}/val_<metric> or {final}/test_<metric>")


def _check_run(cfg: HarnessConfig) -> None:
    """The sweep settings, ``resume`` and ``checkpoint_root``."""
    _check_choice("sweep.direction", cfg.sweep.direction, DIRECTIONS)
    _check(0.0 <= cfg.sweep.max_failure_rate <= 1.0, "sweep.max_failure_rate",
           cfg.sweep.max_failure_rate, "a fraction in [0, 1]")
    _check("/" in cfg.sweep.objective, "sweep.objective", cfg.sweep.objective,
           "a metric the run records, such as finetune/val_accuracy or test/accuracy")
    resume = cfg.resume
    if isinstance(resume, int) and not isinstance(resume, bool):
        # An all-digit run id parses as an integer on the command line.
        resume = cfg.resume = str(resume)
    _check(isinstance(resume, bool) or (isinstance(resume, str) and bool(RUN_ID.match(resume))),
           "resume", resume, "false, true, or the id of the run to continue (letters, digits, "
           "'-' and '_')")
    _check(cfg.trainer.strategy != "multi_worker" or resume is False, "resume", resume,
           "false with trainer.strategy=multi_worker (every worker must run the same steps, and "
           "only the chief keeps checkpoints: a resumed chief would wait for workers that start "
           "over)")
    _check(bool(cfg.checkpoint_root), "checkpoint_root", cfg.checkpoint_root,
           "a folder for per-run checkpoints")
    _check_choice("pretrain_cache", cfg.pretrain_cache, PRETRAIN_CACHE_MODES)
    _check(cfg.pretrain_wait_s >= 0, "pretrain_wait_s", cfg.pretrain_wait_s,
           "a number of seconds >= 0")


def validate(cfg: HarnessConfig) -> None:
    """Checks ranges and cross-field rules; raises :class:`ConfigError` naming the key."""
    for check in (_check_data, _check_model, _check_trainer, _check_finetune, _check_serving,
                  _check_source, _check_tracking, _check_run):
        check(cfg)
