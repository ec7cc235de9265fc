"""The reference a user would write by hand for a CSV table: pandas and plain Keras.

Reads the file with ``pandas.read_csv`` (the library tfharness reads it with), maps the string
labels to class indices, holds out 15% for validation and 15% for test as tfharness does, adapts
a ``Normalization`` layer on the training rows and fits an MLP for one epoch. Records when the
first epoch ended (the benchmark compares the time from the process's start to then) and times
the load (reading to split arrays) and the epoch (``fit``) themselves. Run by ``benchmarks/data_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", required=True)
    parser.add_argument("--label", default="label")
    parser.add_argument("--units", type=int, nargs="+", default=[64])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--metrics-out", required=True)
    args = parser.parse_args()

    import keras
    import numpy as np
    import pandas as pd

    keras.utils.set_random_seed(args.seed)
    start = time.perf_counter()
    frame = pd.read_csv(args.path)
    classes, y = np.unique(frame[args.label].astype(str).to_numpy(), return_inverse=True)
    x = frame.drop(columns=[args.label]).to_numpy(dtype=np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    n_hold = int(round(len(x) * 0.15))
    test, val, train = order[:n_hold], order[n_hold:2 * n_hold], order[2 * n_hold:]
    load_seconds = time.perf_counter() - start

    normalize = keras.layers.Normalization()
    normalize.adapt(x[train])
    layers = [keras.Input(shape=x.shape[1:]), normalize]
    layers += [keras.layers.Dense(u, activation="relu") for u in args.units]
    layers.append(keras.layers.Dense(len(classes), activation="softmax"))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    first_epoch_end = {}

    class FirstEpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            first_epoch_end.setdefault("unix", time.time())

    fit_start = time.perf_counter()
    model.fit(x[train], y[train], validation_data=(x[val], y[val]), epochs=1,
              batch_size=args.batch_size, verbose=0, callbacks=[FirstEpochEnd()])
    epoch_seconds = time.perf_counter() - fit_start
    model.evaluate(x[test], y[test], verbose=0)
    with open(args.metrics_out, "w") as handle:
        json.dump({"load_seconds": load_seconds, "first_epoch_seconds": epoch_seconds,
                   "first_epoch_end_unix": first_epoch_end["unix"],
                   "rows_per_second": len(train) / epoch_seconds}, handle)


if __name__ == "__main__":
    main()
