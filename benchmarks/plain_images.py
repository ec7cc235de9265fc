"""The reference a user would write by hand for a folder of images: plain Keras.

``keras.utils.image_dataset_from_directory`` reads the folder (70% train, 30% validation, seeded),
a model like tfharness' ``cnn`` (or a MobileNetV2 with ``weights=None``) with a ``Rescaling``
layer in front is fitted, exported as a SavedModel, reloaded and checked through its serving
endpoint, and evaluated: the work of a ``tfharness data=image_folder finetune=none`` run. Run by
``benchmarks/data_bench.py``; writes its measurements as JSON to ``--metrics-out``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build(kind: str, input_shape: tuple, classes: int, filters, dense_units: int):
    import keras

    layers = keras.layers
    inputs = keras.Input(shape=input_shape)
    if kind == "mobilenetv2":
        base = keras.applications.MobileNetV2(input_shape=input_shape, alpha=0.35,
                                              include_top=False, weights=None, pooling="avg")
        x = keras.applications.mobilenet_v2.preprocess_input(inputs)
        outputs = layers.Dense(classes, activation="softmax")(base(x))
        return keras.Model(inputs, outputs)
    x = layers.Rescaling(1 / 255)(inputs)
    height, width = input_shape[:2]
    for f in filters:
        x = layers.Conv2D(f, 3, padding="same")(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        if height >= 2 and width >= 2:
            x = layers.MaxPooling2D(2)(x)
            height, width = height // 2, width // 2
    x = layers.Flatten()(x)
    x = layers.Dense(dense_units, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(classes, activation="softmax")(x))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--image-size", type=int, nargs=2, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model", default="cnn", choices=["cnn", "mobilenetv2"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--metrics-out", required=True)
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(args.seed)
    start = time.perf_counter()
    train, val = keras.utils.image_dataset_from_directory(
        args.dir, validation_split=0.3, subset="both", seed=args.seed,
        image_size=tuple(args.image_size), batch_size=args.batch_size)
    classes = len(train.class_names)
    train_images = sum(int(tf.shape(y)[0]) for y in train.map(lambda x, y: y))
    train, val = train.prefetch(tf.data.AUTOTUNE), val.prefetch(tf.data.AUTOTUNE)
    model = build(args.model, (*args.image_size, 3), classes, [16, 32], 32)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    fit_start = time.perf_counter()
    model.fit(train, validation_data=val, epochs=args.epochs, verbose=0)
    fit_seconds = time.perf_counter() - fit_start

    probe = next(iter(val))[0][:64].numpy()
    path = os.path.join(tempfile.mkdtemp(prefix="plain-images-"), "model")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)
    served = np.asarray(loaded.serve(tf.constant(probe)))
    assert float(np.max(np.abs(served - np.asarray(model(probe))))) <= 1e-5
    model.evaluate(val, verbose=0)
    with open(args.metrics_out, "w") as handle:
        json.dump({"images_per_second": train_images * args.epochs / fit_seconds,
                   "fit_seconds": fit_seconds, "train_images": train_images,
                   "load_and_train_seconds": time.perf_counter() - start}, handle)


if __name__ == "__main__":
    main()
