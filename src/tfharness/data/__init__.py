"""Data: the arrays each phase trains, validates and tests on, and the ``tf.data`` pipeline.

``arrays`` holds the shipped data sets, the seeded splits and the input pipeline.
"""

from tfharness.data.arrays import (  # noqa: F401
    Arrays,
    DataBundle,
    Split,
    load_data,
    load_digits,
    load_npz,
    load_synthetic,
    make_dataset,
    split_arrays,
    steps_per_epoch,
)
