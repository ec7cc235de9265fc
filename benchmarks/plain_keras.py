"""The reference a user would write by hand: the harness's work in plain Keras.

Same data, model, epochs, batch size, save format and fine-tune as a tfharness run of the same
workload: pretrain, export a SavedModel, load it back and check its outputs through the serving
signature, put a new head on the in-memory model with the base frozen, fine-tune, export and check
again, evaluate. ``--autolog`` adds ``mlflow.tensorflow.autolog()`` and an MLflow run, which is what
a user reaches for to track the same script. Run by ``scripts/bench``; prints nothing it is timed on.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def application_model(keras, work, shape, classes):
    """The keras.applications backbone as the Keras guide builds it: preprocessing inside,
    the base nested without its top, global pooling, a Dense output."""
    constructor = getattr(keras.applications, work["application"])
    base = constructor(include_top=False, weights=None, input_shape=shape,
                       **work.get("application_kwargs", {}))
    inputs = keras.Input(shape=shape)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # MobileNetV2's preprocess_input
    x = keras.layers.GlobalAveragePooling2D()(base(x))
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def application_head(keras, model, work):
    """A new head on the pooled features; the base frozen up to its last ``unfrozen`` layers."""
    base = model.layers[2]
    for layer in base.layers[:len(base.layers) - work["unfrozen"]]:
        layer.trainable = False
    outputs = keras.layers.Dense(work["head_classes"], activation="softmax")(
        model.layers[-2].output)
    return keras.Model(model.inputs[0], outputs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True, help="JSON from benchmarks/bench.py")
    parser.add_argument("--autolog", action="store_true")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--metrics-out", required=True)
    args = parser.parse_args()
    work = json.loads(args.workload)

    import keras
    import numpy as np
    import tensorflow as tf

    # The same arrays the harness trains on (NumPy only; no tfharness training code).
    from tfharness.config import DigitsDataConfig, SyntheticDataConfig
    from tfharness.data import load_data

    data_cfg = (DigitsDataConfig(**work["data"]) if work["data_name"] == "digits"
                else SyntheticDataConfig(**work["data"]))
    bundle = load_data(data_cfg)
    keras.utils.set_random_seed(work["seed"])

    if args.autolog:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
        mlflow.set_experiment("plain-autolog")
        mlflow.tensorflow.autolog()
        mlflow.start_run()

    (x, y), (xv, yv), (xt, yt) = bundle.pretrain.train, bundle.pretrain.val, bundle.pretrain.test
    if "application" in work:
        model = application_model(keras, work, x.shape[1:], bundle.pretrain.num_classes)
    else:
        layers = [keras.Input(shape=x.shape[1:])]
        if x.ndim > 2:
            layers.append(keras.layers.Flatten())
        layers += [keras.layers.Dense(u, activation="relu") for u in work["units"]]
        layers.append(keras.layers.Dense(bundle.pretrain.num_classes, activation="softmax"))
        model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(work["learning_rate"]),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(x, y, validation_data=(xv, yv), epochs=work["epochs"],
              batch_size=work["batch_size"], verbose=0)
    pretrain_seconds = time.perf_counter() - start

    out = tempfile.mkdtemp(prefix="plain-keras-")
    probe = xt[:64]

    def export_and_check(m, name):
        path = os.path.join(out, name)
        m.export(path, verbose=False)
        loaded = tf.saved_model.load(path)  # keep a reference: serve() uses its variables
        served = loaded.serve(tf.constant(probe))
        assert float(np.max(np.abs(np.asarray(served) - np.asarray(m(probe))))) <= 1e-6

    export_and_check(model, "pretrained")

    (fx, fy), (fxv, fyv), (fxt, fyt) = (bundle.finetune.train, bundle.finetune.val,
                                        bundle.finetune.test)
    if "application" in work:
        tuned = application_head(keras, model, work)
    else:
        base = model.layers[:-1]
        for layer in base:
            layer.trainable = False
        tuned = keras.Sequential([keras.Input(shape=x.shape[1:]), *base,
                                  keras.layers.Dense(work["head_classes"], activation="softmax")])
    tuned.compile(optimizer=keras.optimizers.Adam(work["finetune_learning_rate"]),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    tuned.fit(fx, fy, validation_data=(fxv, fyv), epochs=work["finetune_epochs"],
              batch_size=work["batch_size"], verbose=0)
    finetune_seconds = time.perf_counter() - start
    export_and_check(tuned, "finetuned")
    tuned.evaluate(fxt, fyt, verbose=0)
    if args.autolog:
        mlflow.end_run()

    with open(args.metrics_out, "w") as handle:
        json.dump({"pretrain/samples_per_second": len(x) * work["epochs"] / pretrain_seconds,
                   "finetune/samples_per_second": len(fx) * work["finetune_epochs"]
                   / finetune_seconds,
                   "pretrain/train_seconds": pretrain_seconds,
                   "finetune/train_seconds": finetune_seconds}, handle)


if __name__ == "__main__":
    main()
