"""The data: any callable that returns {"pretrain": ..., "finetune": ...}.

Each phase is (x, y) arrays, which tfharness splits into train/val/test by data.val_fraction
and data.test_fraction, or a mapping of "train", "val" and "test", each (x, y) arrays or a
tf.data.Dataset of (x, y) batches.
"""

import numpy as np


def blobs(num_samples=300, num_features=8, num_classes=3, finetune_classes=2, batch_size=16,
          seed=0):
    """Gaussian blobs: pretraining gets arrays, fine-tuning gets tf.data pipelines."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)

    def draw(n, classes):
        centres = rng.normal(scale=3.0, size=(classes, num_features))
        y = rng.integers(0, classes, size=n)
        x = centres[y] + rng.normal(size=(n, num_features))
        return x.astype("float32"), y.astype("int32")

    def batches(x, y):
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)

    fx, fy = draw(num_samples // 2, finetune_classes)
    cut, end = len(fx) * 3 // 5, len(fx) * 4 // 5
    return {
        "pretrain": draw(num_samples, num_classes),
        "finetune": {
            "train": batches(fx[:cut], fy[:cut]),
            "val": batches(fx[cut:end], fy[cut:end]),
            "test": batches(fx[end:], fy[end:]),
            "class_names": [f"blob_{i}" for i in range(finetune_classes)],
        },
    }
