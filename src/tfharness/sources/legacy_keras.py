"""Converts a legacy Keras 2 SavedModel into a legacy ``.h5`` file that Keras 3 loads with layers.

Run as a script in a child process (``python legacy_keras.py SAVEDMODEL OUT.h5 PROBE.npz
OUT.npz``) by :mod:`tfharness.sources`: tf_keras (the ``legacy`` extra) is imported only there, so
the Keras 3 process that trains never mixes the two Keras packages. It also writes the legacy
model's own outputs on the probe batch, so the caller can prove the Keras 3 model computes the
same function. This file imports nothing from tfharness.
"""

import sys


def main(source: str, target_h5: str, probe_file: str, outputs_file: str) -> None:
    import numpy as np
    import tf_keras

    model = tf_keras.models.load_model(source, compile=False)
    # Keras 3 reads the legacy HDF5 layout (architecture JSON + weights by layer), not Keras 2's
    # SavedModel; HDF5 keeps every layer, so per-layer freezing and head swaps work afterwards.
    model.save(target_h5, save_format="h5", include_optimizer=False)
    probe = np.load(probe_file)["x"]
    outputs = None
    expected = tuple(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
    if expected is not None and tuple(probe.shape[1:]) == expected:
        outputs = np.asarray(model(probe, training=False))
    np.savez(outputs_file, input_shape=np.asarray(expected or (), dtype=np.int64),
             has_outputs=np.asarray(outputs is not None),
             y=outputs if outputs is not None else np.zeros(0))


if __name__ == "__main__":
    main(*sys.argv[1:5])
