"""``model=keras_application``: a ``keras.applications`` backbone with a head for the data.

:func:`build_keras_application` is the option's ``_target_``, a model builder like any other:
called with ``input_shape`` and ``num_classes`` from the data and the option's other keys.

The backbone is built without its top and nested in a functional model under the name ``base``,
the way the Keras transfer-learning guide builds it, so freeze selectors reach into it
(``base/block_16_*``, ``base/0:-20``)::

    features (raw pixels) -> preprocess -> base -> pool -> [dropout] -> output

``preprocess`` is the application's own ``preprocess_input`` inside the model, so a served
model takes raw pixels. Every ``preprocess_input`` in ``keras.applications`` is an affine map of
the channels; it is measured once and stored as Keras' built-in ``Rescaling`` layer when it
scales each channel on its own (``tf`` and ``torch`` modes: MobileNet, Inception, DenseNet, ...),
so the saved model needs nothing from tfharness to load; a map that also mixes channels (the
``caffe`` mode of ResNet and VGG: RGB to BGR) is a small registered layer, :class:`AffinePixels`.
Applications that preprocess inside themselves (EfficientNet, ConvNeXt, ...) get no layer.

With pretrained weights the backbone is called with ``training=False``, so its BatchNormalization
layers stay in inference mode even when it is unfrozen (the guide's advice); built from random
weights (``model.weights=null``) it trains its statistics like any model.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tfharness.errors import ConfigError

BASE_NAME = "base"
_AFFINE_CLASS = None


def constructors() -> List[str]:
    """The names of the model constructors in ``keras.applications``."""
    import keras

    return sorted(name for name in dir(keras.applications)
                  if name[:1].isupper() and callable(getattr(keras.applications, name)))


def register_layers():
    """Registers :class:`AffinePixels` with Keras (before loading a model that may hold one)."""
    global _AFFINE_CLASS
    if _AFFINE_CLASS is not None:
        return _AFFINE_CLASS
    import keras

    @keras.saving.register_keras_serializable(package="tfharness")
    class AffinePixels(keras.layers.Layer):
        """``y = x @ kernel + offset`` over the channel axis, with fixed (non-weight) constants."""

        def __init__(self, kernel, offset, **kwargs):
            super().__init__(**kwargs)
            self.kernel = [list(map(float, row)) for row in kernel]
            self.offset = list(map(float, offset))

        def call(self, inputs):
            ops = keras.ops
            inputs = ops.cast(inputs, self.compute_dtype)
            return ops.matmul(inputs, ops.convert_to_tensor(self.kernel, self.compute_dtype)) + \
                ops.convert_to_tensor(self.offset, self.compute_dtype)

        def get_config(self):
            return {**super().get_config(), "kernel": self.kernel, "offset": self.offset}

    _AFFINE_CLASS = AffinePixels
    return AffinePixels


def _affine_of(preprocess, channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """The matrix and offset of ``preprocess`` over the channels, checked on random pixels."""
    scale = 100.0
    probes = np.concatenate([np.zeros((1, channels)), np.eye(channels) * scale])
    out = np.asarray(preprocess(probes.reshape(-1, 1, 1, channels).astype("float32").copy()))
    out = out.reshape(-1, channels).astype("float64")
    offset = out[0]
    kernel = (out[1:] - offset) / scale
    pixels = np.random.default_rng(0).uniform(0, 255, (8, 2, 2, channels)).astype("float32")
    expected = np.asarray(preprocess(pixels.copy()), dtype="float64")
    if not np.allclose(pixels.astype("float64") @ kernel + offset, expected, atol=1e-3,
                       rtol=1e-4):
        raise ValueError("preprocess_input is not an affine map of the channels")
    return kernel, offset


def preprocessing_layer(constructor, channels: int):
    """The layer that does the application's ``preprocess_input``, or None when it is a no-op."""
    import keras

    module = sys.modules[constructor.__module__]
    kernel, offset = _affine_of(module.preprocess_input, channels)
    if np.allclose(kernel, np.eye(channels)) and np.allclose(offset, 0.0):
        return None
    if np.allclose(kernel, np.diag(np.diag(kernel))):
        return keras.layers.Rescaling(scale=np.diag(kernel).tolist(), offset=offset.tolist(),
                                      name="preprocess")
    return register_layers()(kernel.tolist(), offset.tolist(), name="preprocess")


def _constructor(name: str):
    import keras

    if name not in constructors():
        raise ConfigError("model.name", name, "a constructor of keras.applications: "
                          + ", ".join(constructors()))
    return getattr(keras.applications, name)


def _weights(weights: Optional[str]) -> Optional[str]:
    if weights is None or weights == "imagenet":
        return weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError("model.weights", weights, "imagenet (downloaded once into ~/.keras), "
                          "null (random initialization) or the path of an existing weights file")
    return str(path.resolve())


def _backbone(constructor, name: str, weights: Optional[str], input_shape: Tuple[int, ...],
              kwargs: Dict[str, Any]):
    accepted = inspect.signature(constructor).parameters
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(f"model.kwargs.{key}", kwargs[key], f"a keyword argument of "
                              f"keras.applications.{name}: {', '.join(accepted)}")
    try:
        return constructor(include_top=False, weights=weights, input_shape=input_shape,
                           pooling=None, name=BASE_NAME, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Keras says what is wrong; the key is ours to add
        text = " ".join(str(exc).split())[:400]
        if weights == "imagenet" and ("URL fetch failure" in text or "urlopen" in text
                                      or "Name or service not known" in text):
            raise ConfigError("model.weights", weights, f"weights that can be read here: "
                              f"downloading the imagenet weights failed ({text}); set "
                              f"model.weights=null or the path of a weights file") from None
        raise ConfigError("model", f"{name} with input shape {tuple(input_shape)}, weights="
                          f"{weights}, kwargs={kwargs}", f"what keras.applications.{name} "
                          f"accepts; Keras said: {type(exc).__name__}: {text}") from None


def build_keras_application(input_shape: Sequence[int], num_classes: int, *, name: str,
                            weights: Optional[str] = "imagenet", pooling: str = "avg",
                            dropout: float = 0.0, output_activation: str = "softmax",
                            kwargs: Optional[Dict[str, Any]] = None, activation: str = "relu"):
    """A functional model: raw pixels, the application's preprocessing, the backbone without
    its top (nested as ``base``), global pooling, optional dropout, and a Dense output.

    Args:
        input_shape: one sample's shape, (height, width, channels).
        num_classes: the width of the output layer.
        name: a constructor of ``keras.applications`` (``MobileNetV2``, ``ResNet50``, ...).
        weights: ``imagenet``, None (random) or the path of a weights file.
        pooling: ``avg`` or ``max`` over the backbone's feature map.
        dropout: dropout rate before the output layer (0: none).
        output_activation: the output layer's activation.
        kwargs: passed to the constructor as they are (``alpha=0.35``, ...).
        activation: unused (the backbone has its own); part of the shared model schema.

    Raises:
        ConfigError: naming the key (``model.name``, ``model.weights``, ``model.kwargs.<k>``,
            ``model``) when the application cannot be built as configured.
    """
    import keras

    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3:
        raise ConfigError("model", "keras_application", f"image-shaped data (height, width, "
                          f"channels); the data gives samples of shape {input_shape}")
    constructor = _constructor(name)
    weights = _weights(weights)
    base = _backbone(constructor, name, weights, input_shape, dict(kwargs or {}))
    inputs = keras.Input(shape=input_shape, name="features")
    x = inputs
    preprocess = preprocessing_layer(constructor, input_shape[-1])
    if preprocess is not None:
        x = preprocess(x)
    # Pretrained statistics stay as they are even when the base is unfrozen (the guide's advice).
    x = base(x, training=False) if weights is not None else base(x)
    pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else \
        keras.layers.GlobalMaxPooling2D
    x = pool(name="pool")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation=output_activation, name="output")(x)
    return keras.Model(inputs, outputs, name=f"tfharness_{name.lower()}")
