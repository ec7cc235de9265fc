"""Data: what each phase trains, validates and tests on, and how it reaches ``fit``.

- ``split``: the data interface (:class:`Split`, :class:`DataBundle`, what a factory returns);
- ``load``: calls the ``data`` option's factory and checks what it returns;
- ``builtin``: the shipped factories (digits, synthetic, npz);
- ``pipeline``: a part as ``fit``/``evaluate`` take it (the seeded ``tf.data`` pipeline).
"""

from tfharness.data.load import load_data  # noqa: F401
from tfharness.data.pipeline import counting, fit_input, make_dataset, steps_per_epoch  # noqa: F401
from tfharness.data.split import (  # noqa: F401
    Arrays,
    DataBundle,
    Part,
    Split,
    first_features,
    has_samples,
    is_dataset,
    num_samples,
    numpy_only,
    part_input_shape,
    phase_split,
    probe_features,
    split_arrays,
    tensorflow_ready,
    waits_for_tensorflow,
)
