"""Models: the architectures a run can pretrain, and how they are compiled.

Layers get explicit, stable names (``dense_0``, ``conv_1``, ``output``) because freeze selectors,
the trainable-layer report and weight restoring all refer to layers by name.
"""

from __future__ import annotations

from typing import Sequence, Tuple

from tfharness.config import CnnConfig, MlpConfig, ModelConfig
from tfharness.errors import ConfigError


def build_model(cfg: ModelConfig, input_shape: Tuple[int, ...], num_classes: int):
    """Builds an uncompiled ``keras.Sequential`` for ``input_shape`` and ``num_classes``."""
    import keras

    layers = keras.layers
    stack = [keras.Input(shape=input_shape, name="features")]
    if isinstance(cfg, MlpConfig):
        if len(input_shape) > 1:
            stack.append(layers.Flatten(name="flatten"))
        for i, units in enumerate(cfg.units):
            stack.append(layers.Dense(units, activation=cfg.activation, name=f"dense_{i}"))
            if cfg.dropout > 0:
                stack.append(layers.Dropout(cfg.dropout, name=f"dropout_{i}"))
    elif isinstance(cfg, CnnConfig):
        if len(input_shape) != 3:
            raise ConfigError("model", "cnn", f"image-shaped data (height, width, channels); "
                              f"the data gives samples of shape {tuple(input_shape)}: use "
                              f"model=mlp or data.shape=[H,W,C]")
        height, width = input_shape[0], input_shape[1]
        for i, filters in enumerate(cfg.filters):
            stack += [
                layers.Conv2D(filters, cfg.kernel_size, padding="same", name=f"conv_{i}"),
                layers.BatchNormalization(name=f"bn_{i}"),
                layers.Activation(cfg.activation, name=f"act_{i}"),
            ]
            # Pool only while there is something left to pool: 8x8 digits allow three halvings.
            if height >= 2 and width >= 2:
                stack.append(layers.MaxPooling2D(2, name=f"pool_{i}"))
                height, width = height // 2, width // 2
        stack.append(layers.Flatten(name="flatten"))
        stack.append(layers.Dense(cfg.dense_units, activation=cfg.activation, name="dense"))
        if cfg.dropout > 0:
            stack.append(layers.Dropout(cfg.dropout, name="dropout"))
    else:
        raise ConfigError("model", getattr(cfg, "name", cfg), ["mlp", "cnn"])
    stack.append(layers.Dense(num_classes, activation=cfg.output_activation, name="output"))
    return keras.Sequential(stack, name=f"tfharness_{cfg.name}")


def make_optimizer(name: str, learning_rate: float):
    import keras

    classes = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": keras.optimizers.SGD,
        "rmsprop": keras.optimizers.RMSprop,
        "nadam": keras.optimizers.Nadam,
        "adagrad": keras.optimizers.Adagrad,
    }
    return classes[name](learning_rate=learning_rate)


def compile_model(model, optimizer: str, learning_rate: float) -> None:
    """Compiles for integer class labels; a new compile is what makes ``trainable`` changes count."""
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def layer_names(model) -> Sequence[str]:
    return [layer.name for layer in model.layers]
