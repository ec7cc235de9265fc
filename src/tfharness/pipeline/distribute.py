"""Where training runs inside one job: a ``tf.distribute`` strategy chosen by ``trainer.strategy``.

Models built under the strategy's scope keep it: Keras 3 records the strategy at construction and
``fit`` then splits each global batch across the replicas. Everything else in the runner (data,
saving, fine-tuning) is the same whichever strategy is chosen.
"""

from __future__ import annotations

from tfharness.config import TrainerConfig
from tfharness.errors import ConfigError


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
