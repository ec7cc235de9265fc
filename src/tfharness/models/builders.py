"""Model builders: the ``model`` group's ``_target_`` callables, shipped ones and the user's.

A builder is called with ``input_shape=<tuple>`` and ``num_classes=<int>`` (both from the data)
and the option's other keys as keyword arguments, and returns a ``keras.Model``
(:func:`build_model`). The shipped ``mlp`` and ``cnn`` are builders like any other; their
schemas (:mod:`tfharness.config.schema`) type-check their keys. Their layers get explicit,
stable names (``dense_0``, ``conv_1``, ``output``) because freeze selectors, the
trainable-layer report and weight restoring refer to layers by name.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

from tfharness.config import targets
from tfharness.errors import ConfigError

KEY = "model"
# Output layers compute in float32 under every dtype policy (see tfharness.models.precision).
OUTPUT_DTYPE = "float32"


def build_model(option: Any, input_shape: Tuple[int, ...], num_classes: int):
    """Calls the model option's builder; returns its (uncompiled) ``keras.Model``."""
    import keras

    model = targets.call(KEY, option, optional=("name",), input_shape=tuple(input_shape),
                         num_classes=int(num_classes))
    return targets.check_result(KEY, option, model, keras.Model,
                                "a keras.Model (Sequential or functional)")


def mlp(input_shape: Tuple[int, ...], num_classes: int, units: Sequence[int] = (64,),
        activation: str = "relu", output_activation: str = "softmax", dropout: float = 0.0,
        name: str = "mlp"):
    """``Dense(units..., activation)`` then ``Dense(num_classes, output_activation)``."""
    import keras

    layers = keras.layers
    stack = [keras.Input(shape=input_shape, name="features")]
    if len(input_shape) > 1:
        stack.append(layers.Flatten(name="flatten"))
    for i, width in enumerate(units):
        stack.append(layers.Dense(width, activation=activation, name=f"dense_{i}"))
        if dropout > 0:
            stack.append(layers.Dropout(dropout, name=f"dropout_{i}"))
    stack.append(layers.Dense(num_classes, activation=output_activation, name="output",
                              dtype=OUTPUT_DTYPE))
    return keras.Sequential(stack, name=f"tfharness_{name}")


def cnn(input_shape: Tuple[int, ...], num_classes: int, filters: Sequence[int] = (16, 32),
        kernel_size: int = 3, dense_units: int = 32, activation: str = "relu",
        output_activation: str = "softmax", dropout: float = 0.0, name: str = "cnn"):
    """Conv2D + BatchNormalization + pooling blocks, then a Dense layer and the output."""
    import keras

    if len(input_shape) != 3:
        raise ConfigError("model", name, f"image-shaped data (height, width, channels); the "
                          f"data gives samples of shape {tuple(input_shape)}: use model=mlp or "
                          f"data.shape=[H,W,C]")
    layers = keras.layers
    stack = [keras.Input(shape=input_shape, name="features")]
    height, width = input_shape[0], input_shape[1]
    for i, count in enumerate(filters):
        stack += [
            layers.Conv2D(count, kernel_size, padding="same", name=f"conv_{i}"),
            layers.BatchNormalization(name=f"bn_{i}"),
            layers.Activation(activation, name=f"act_{i}"),
        ]
        # Pool only while there is something left to pool: 8x8 digits allow three halvings.
        if height >= 2 and width >= 2:
            stack.append(layers.MaxPooling2D(2, name=f"pool_{i}"))
            height, width = height // 2, width // 2
    stack.append(layers.Flatten(name="flatten"))
    stack.append(layers.Dense(dense_units, activation=activation, name="dense"))
    if dropout > 0:
        stack.append(layers.Dropout(dropout, name="dropout"))
    stack.append(layers.Dense(num_classes, activation=output_activation, name="output",
                              dtype=OUTPUT_DTYPE))
    return keras.Sequential(stack, name=f"tfharness_{name}")


def layer_names(model) -> Sequence[str]:
    return [layer.name for layer in model.layers]
