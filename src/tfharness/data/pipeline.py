"""The input pipeline: a part of a :class:`~tfharness.data.split.Split` as ``fit`` and
``evaluate`` take it.

Arrays go through :func:`make_dataset`, a ``tf.data`` pipeline that shuffles indices per epoch
by ``(seed, epoch)`` alone (so a resumed run sees the batches an uninterrupted one sees) and
gathers each batch from the arrays in place. A ``tf.data.Dataset`` part is the source's own
pipeline and is used as given (:func:`fit_input`).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from tfharness.data.split import Arrays, is_dataset


def fit_input(part: Any, batch_size: int, *, shuffle: bool, seed: int,
              pad_to_multiple: int = 1, epochs: Optional[Tuple[int, int]] = None) -> tuple:
    """``(input, steps_per_epoch)`` for ``fit``/``evaluate``: a dataset part as it is (steps
    None: one pass per epoch), an array part through :func:`make_dataset`."""
    if is_dataset(part):
        return part, None
    return (make_dataset(part, batch_size, shuffle=shuffle, seed=seed,
                         pad_to_multiple=pad_to_multiple, epochs=epochs),
            steps_per_epoch(part, batch_size))


def counting(dataset):
    """``dataset`` with a counter of the samples it has yielded: ``(dataset, counter)``.

    How many samples a dataset part holds is unknown until it is read; counting as ``fit``
    reads it gives the throughput without a separate pass.
    """
    import tensorflow as tf

    counter = tf.Variable(0, dtype=tf.int64, trainable=False)

    def count(*batch):
        first = tf.nest.flatten(batch[0])[0]
        counter.assign_add(tf.cast(tf.shape(first)[0], tf.int64))
        return batch

    return dataset.map(count), counter


def make_dataset(arrays: Arrays, batch_size: int, *, shuffle: bool, seed: int,
                 pad_to_multiple: int = 1,
                 epochs: Optional[Tuple[int, int]] = None):
    """A ``tf.data`` pipeline over in-memory arrays that shuffles indices, not samples.

    Shuffling a dataset of samples moves every sample through the shuffle buffer one by one;
    here a seeded permutation of indices is batched, each batch of indices is gathered from the
    NumPy arrays where they are (``tf.numpy_function``), and batches are prefetched so the gather
    overlaps training. The arrays are never copied into TensorFlow: ``from_tensors`` (what Keras
    does for NumPy input) or ``from_tensor_slices`` would copy them into tensors, and
    ``cache()`` would keep yet another copy; on the large benchmark workload the in-place
    gather trained as fast with far less peak memory.

    ``pad_to_multiple`` > 1 (evaluation under a multi-replica strategy) pads the arrays with
    zero-weight rows up to a multiple of it and yields ``(x, y, weight)``: Keras 3 fails to
    evaluate a final batch that splits unevenly across replicas (AddN shape mismatch), and
    zero weights keep the padding out of every metric.

    With ``epochs=(first, end)`` and ``shuffle``, the pipeline holds the batches of epochs
    ``first..end-1`` back to back, and epoch ``e`` is shuffled by ``(seed, e)`` alone (a stateless
    shuffle). A run resumed at epoch ``e`` therefore sees exactly the batches an uninterrupted run
    sees there; fit it with ``steps_per_epoch=steps_per_epoch(...)``.
    """
    import tensorflow as tf

    if pad_to_multiple > 1 and not shuffle:
        arrays = _padded_with_weights(arrays, pad_to_multiple)
    arrays = tuple(np.asarray(a) for a in arrays)
    indices = _index_batches(len(arrays[0]), batch_size, shuffle=shuffle, seed=seed,
                             epochs=epochs)

    def gather(index):
        return tuple(part[index] for part in arrays)

    def batch_of(index):
        parts = tf.numpy_function(gather, [index], [tf.as_dtype(a.dtype) for a in arrays],
                                  stateful=False)
        for part, array in zip(parts, arrays):
            part.set_shape((None, *array.shape[1:]))
        return tuple(parts)

    # A sequential map: a gather is cheap, prefetch overlaps it with training, and parallel
    # calls only compete with the training ops for the cores (measured slower on 2 cores).
    return indices.map(batch_of).prefetch(tf.data.AUTOTUNE)


def _padded_with_weights(arrays: Arrays, multiple: int) -> Arrays:
    """``arrays`` padded with copies of their first row up to a multiple of ``multiple``, and a
    sample-weight array that is 1 for the real rows and 0 for the padding."""
    count = len(arrays[0])
    pad = -count % multiple
    weights = np.concatenate([np.ones(count, "float32"), np.zeros(pad, "float32")])
    padded = tuple(np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) for a in arrays)
    return (*padded, weights)


def _index_batches(count: int, batch_size: int, *, shuffle: bool, seed: int,
                   epochs: Optional[Tuple[int, int]]):
    """A dataset of batches of sample indices: per-epoch stateless shuffles when ``epochs`` is
    given (see ``make_dataset``), else one seeded shuffle reshuffled each iteration, or none."""
    import tensorflow as tf

    if shuffle and epochs is not None:
        first, end = epochs
        seed_tensor = tf.constant(seed, tf.int64)

        def epoch_order(epoch):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(count, dtype=tf.int64), seed=tf.stack([seed_tensor, epoch]))
            return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

        return tf.data.Dataset.range(first, end).flat_map(epoch_order)
    indices = tf.data.Dataset.range(count)
    if shuffle:
        indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    return indices.batch(batch_size)


def steps_per_epoch(arrays: Arrays, batch_size: int) -> int:
    """Batches in one epoch over array samples (the last one may be short)."""
    return -(-len(arrays[0]) // batch_size)
