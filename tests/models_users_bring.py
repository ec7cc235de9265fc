"""The models users bring, built here as users build them (used by test_transfer.py)."""

from __future__ import annotations

import numpy as np

FEATURES = 12
IMAGE = (8, 8, 3)


def residual(features: int = FEATURES, classes: int = 4):
    """A small functional model with a residual Add and BatchNormalization."""
    import keras

    inputs = keras.Input((features,), name="features")
    stem = keras.layers.Dense(16, activation="relu", name="stem")(inputs)
    branch = keras.layers.Dense(16, activation="relu", name="branch")(stem)
    merged = keras.layers.Add(name="add")([stem, branch])
    normed = keras.layers.BatchNormalization(name="bn")(merged)
    outputs = keras.layers.Dense(classes, activation="softmax", name="output")(normed)
    return keras.Model(inputs, outputs, name="residual")


def guide_nested(shape=IMAGE, classes: int = 4):
    """The Keras transfer-learning guide's model: a base model nested in a functional one,
    called with training=False, then pooling, dropout and a Dense layer. The base repeats a
    name of the outer model ("bn"), as real bases do."""
    import keras

    base_in = keras.Input(shape, name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv_a")(base_in)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="relu_a")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv_b")(x)
    x = keras.layers.BatchNormalization(name="bn_b")(x)
    base = keras.Model(base_in, keras.layers.Activation("relu", name="relu_b")(x), name="base")

    inputs = keras.Input(shape, name="features")
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="output")(x)
    return keras.Model(inputs, outputs, name="guide")


def mobilenet(shape=(32, 32, 3), classes: int = 4):
    """A keras.applications MobileNetV2 (alpha 0.35, random weights) through tfharness' own
    builder, as model=keras_application builds it."""
    from tfharness.models.applications import build_keras_application

    return build_keras_application(shape, classes, name="MobileNetV2", weights=None,
                                   kwargs={"alpha": 0.35})


def stir_statistics(model, seed: int = 0) -> None:
    """Gives every weight, BatchNorm statistics included, values far from their initial ones,
    so a reload that dropped any of them would show."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype("float32"))
