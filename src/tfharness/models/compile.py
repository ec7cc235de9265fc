"""Compiling: the optimizer, loss and metrics a model trains with, each a name or a ``_target_``.

``trainer.optimizer`` (and ``finetune.optimizer``) is one of :data:`OPTIMIZERS` or a mapping
such as ``{_target_: keras.optimizers.AdamW, weight_decay: 0.01}``; the learning rate is the
trainer's (or the fine-tune stage's) unless the mapping sets ``learning_rate`` itself.
``trainer.loss`` and each of ``trainer.metrics`` is a name Keras knows or a ``_target_``
mapping. A new compile is what makes ``trainable`` changes count (see :mod:`tfharness.finetune`).
"""

from __future__ import annotations

from typing import Any, List, Sequence

from tfharness.config import targets

OPTIMIZERS = {
    "adam": "Adam",
    "adamw": "AdamW",
    "sgd": "SGD",
    "rmsprop": "RMSprop",
    "nadam": "Nadam",
    "adagrad": "Adagrad",
}
DEFAULT_LOSS = "sparse_categorical_crossentropy"
DEFAULT_METRICS = ("accuracy",)


def make_optimizer(spec: Any, learning_rate: float, key: str = "trainer.optimizer"):
    """A fresh optimizer: a name from :data:`OPTIMIZERS`, or a ``_target_`` mapping."""
    import keras

    if not targets.is_target(spec):
        return getattr(keras.optimizers, OPTIMIZERS[spec])(learning_rate=learning_rate)
    extra = {} if "learning_rate" in targets.options_of(spec) else {
        "learning_rate": learning_rate}
    optimizer = targets.call(key, spec, **extra)
    return targets.check_result(key, spec, optimizer, keras.optimizers.Optimizer,
                                "a keras.optimizers.Optimizer")


def make_loss(spec: Any, key: str = "trainer.loss"):
    """A loss name as Keras takes it, or the object a ``_target_`` mapping builds."""
    if not targets.is_target(spec):
        return spec
    loss = targets.call(key, spec)
    if not callable(loss):
        targets.reject(key, spec, loss, "a keras.losses.Loss or a loss function")
    return loss


def make_metrics(specs: Sequence[Any], key: str = "trainer.metrics") -> List[Any]:
    """Metric names as Keras takes them, and the objects ``_target_`` mappings build."""
    metrics = []
    for i, spec in enumerate(specs):
        if targets.is_target(spec):
            metric = targets.call(f"{key}[{i}]", spec)
            if not callable(metric):
                targets.reject(f"{key}[{i}]", spec, metric,
                               "a keras.metrics.Metric or a metric function")
            metrics.append(metric)
        else:
            metrics.append(spec)
    return metrics


def compile_model(model, optimizer: Any, learning_rate: float, loss: Any = DEFAULT_LOSS,
                  metrics: Sequence[Any] = DEFAULT_METRICS,
                  optimizer_key: str = "trainer.optimizer", *, jit_compile: Any = "auto",
                  steps_per_execution: int = 1) -> None:
    """Compiles with fresh optimizer, loss and metric objects; a new compile is what makes
    ``trainable`` changes count.

    ``jit_compile`` and ``steps_per_execution`` go to ``model.compile`` as they are. Under a
    ``mixed_float16`` model, Keras wraps the optimizer in a ``LossScaleOptimizer`` itself.
    """
    model.compile(optimizer=make_optimizer(optimizer, learning_rate, optimizer_key),
                  loss=make_loss(loss), metrics=make_metrics(metrics), jit_compile=jit_compile,
                  steps_per_execution=steps_per_execution)
