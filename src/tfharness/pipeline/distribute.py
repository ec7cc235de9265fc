"""Where training runs inside one job: a ``tf.distribute`` strategy chosen by ``trainer.strategy``.

Models built under the strategy's scope keep it: Keras 3 records the strategy at construction and
``fit`` then splits each global batch across the replicas. Everything else in the runner (data,
saving, fine-tuning) is the same whichever strategy is chosen.

``multi_worker`` runs the same command in every worker process, each with its own ``TF_CONFIG``.
Every worker must run every step (each ``fit`` and ``evaluate`` is a collective), so each runs
the whole pipeline; only the chief records (:func:`for_this_worker`): the others open no MLflow
run and write their models and checkpoints into a temporary folder removed at exit.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Optional, Tuple

from tfharness.config import HarnessConfig, TrainerConfig
from tfharness.errors import ConfigError

log = logging.getLogger("tfharness")


def worker_task() -> Tuple[str, int, bool]:
    """This process's task in ``TF_CONFIG``: ``(type, index, is_chief)``.

    The chief is the ``chief`` task, or worker 0 of a cluster without one (TensorFlow's rule);
    with ``TF_CONFIG`` unset the process is a single local worker, its own chief.
    """
    raw = os.environ.get("TF_CONFIG", "")
    try:
        tf_config = json.loads(raw) if raw.strip() else {}
        task, cluster = tf_config.get("task", {}), tf_config.get("cluster", {})
        kind, index = str(task.get("type", "worker")), int(task.get("index", 0))
    except (ValueError, TypeError, AttributeError):
        raise ConfigError("TF_CONFIG", raw, 'JSON like {"cluster": {"worker": ["host:port", '
                          '...]}, "task": {"type": "worker", "index": 0}}') from None
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)
    return kind, index, chief


def for_this_worker(cfg: HarnessConfig) -> HarnessConfig:
    """``cfg`` as this process runs it: unchanged on the chief (and for any other strategy);
    for another ``multi_worker`` worker, without tracking, registration or report, its output
    and checkpoints in a temporary folder, so the chief's run is the only record."""
    if cfg.trainer.strategy != "multi_worker":
        return cfg
    kind, index, chief = worker_task()
    if chief:
        return cfg
    scratch = tempfile.mkdtemp(prefix=f"tfharness-{kind}-{index}-")
    atexit.register(shutil.rmtree, scratch, True)
    log.info("multi_worker: %s %d trains with the chief; the chief records the run", kind, index)
    return dataclasses.replace(
        cfg, tracking=dataclasses.replace(cfg.tracking, name="off", register=None),
        output_dir=os.path.join(scratch, "output"),
        checkpoint_root=os.path.join(scratch, "checkpoints"), print_report=False, resume=False)


def sweep_error(cfg: HarnessConfig) -> Optional[ConfigError]:
    """Why ``cfg`` cannot be a sweep's job (None: it can). Not a ``multi_worker`` run: every
    worker would run the whole sweep, opening runs and claiming pretrainings of its own, and
    the workers must stay in step."""
    if cfg.trainer.strategy != "multi_worker":
        return None
    return ConfigError("trainer.strategy", "multi_worker", "default or mirrored in a sweep (-m); "
                       "start one multi_worker run per setting instead")


def split_cpu(count: int) -> None:
    """Makes the first CPU appear as ``count`` logical devices (for mirrored training without GPUs).

    TensorFlow allows this only before its runtime starts, so it must come before any tensor
    is created in the process.
    """
    import tensorflow as tf

    if count <= 0:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu) or []
    if len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError as error:
        have = len(tf.config.list_logical_devices("CPU"))
        raise ConfigError("trainer.cpu_devices", count,
                          f"{have} (TensorFlow already started in this process with {have} "
                          f"logical CPU devices; the split must happen before: use a new "
                          f"process) [{error}]") from None


def make_strategy(cfg: TrainerConfig):
    """The strategy named by ``trainer.strategy``; builds nothing until its scope is entered."""
    import tensorflow as tf

    split_cpu(cfg.cpu_devices)
    if cfg.strategy == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        # MirroredStrategy() alone takes every GPU or, with none, one CPU: name the CPUs.
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if cfg.strategy == "multi_worker":
        # The cluster comes from TF_CONFIG (or a single local worker when it is unset).
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def into_scope(model, strategy):
    """``model`` rebuilt under ``strategy`` with the same weights (for a model loaded outside
    it); the model itself when the strategy is the default one."""
    import keras
    import tensorflow as tf

    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        return model
    if model.distribute_strategy is strategy:
        return model
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def fit_ready(model) -> None:
    """Lets ``fit``, ``evaluate`` and ``predict`` run on ``model`` under a multi-worker strategy.

    Keras 3.15 cannot train under ``MultiWorkerMirroredStrategy`` with more than one worker
    (keras-team/keras#20585), for two reasons, both fixed here for multi-worker runs only:

    - it builds the model from a first batch it averages with one ``strategy.reduce`` over the
      whole ``(x, y)`` structure, which the strategy refuses: this model builds from this
      worker's own part of the batch instead (the private ``_maybe_symbolic_build`` of this
      model is replaced; it calls the private ``_symbolic_build``);
    - it averages each step's scalar metrics with ``reduce(..., axis=0)``, which a scalar has no
      axis for: the module's private ``reduce_per_replica`` is wrapped to average across
      workers with ``axis=None``.

    Keras has no public hook for either. ``tests/test_distribute.py`` trains two workers on
    127.0.0.1, so a Keras that changes either private name fails that test.
    """
    import tensorflow as tf

    if not isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    _wrap_reduce_per_replica()
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: _build_from_local_batch(
        model, iterator, data_batch)


def _build_from_local_batch(model, iterator, data_batch) -> None:
    import tensorflow as tf

    strategy = model.distribute_strategy
    if iterator is not None:
        for _, _, batches in iterator:
            data_batch = tf.nest.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v, next(batches))
            break
    with strategy.scope():
        model._symbolic_build(data_batch=data_batch)


def _wrap_reduce_per_replica() -> None:
    """Averages a multi-worker step's outputs leaf by leaf with ``axis=None`` (see fit_ready)."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer  # private: see fit_ready

    original = tf_trainer.reduce_per_replica
    if getattr(original, "tfharness_multi_worker", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and isinstance(
                strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica.tfharness_multi_worker = True
    tf_trainer.reduce_per_replica = reduce_per_replica
