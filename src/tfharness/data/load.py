"""Loading: the ``data`` option's factory called, and what it returns checked and split.

The factory is called with the option's keys as keyword arguments (``_target_`` aside); the
keys the harness reads itself (``name``, ``val_fraction``, ``test_fraction``, ``seed``) reach it
only when it takes them. Whatever it returns becomes a :class:`DataBundle` or a
:class:`~tfharness.errors.DataError` naming ``data._target_``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Optional

from tfharness.config import targets
from tfharness.data import split as split_lib
from tfharness.data.split import (
    PHASES,
    DataBundle,
    Split,
    is_dataset,
    phase_split,
)
from tfharness.errors import DataError

KEY = "data"
# Read by the harness to split (x, y) arrays; passed to a factory only when it takes them.
HARNESS_KEYS = ("name", "val_fraction", "test_fraction", "seed")
DEFAULTS = {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0}


def load_data(option: Any, wait_for_tensorflow: Optional[Callable[[], None]] = None) -> DataBundle:
    """Calls the data option's factory and returns both phases as :class:`Split` s.

    ``wait_for_tensorflow`` is called first unless the factory is
    :func:`~tfharness.data.split.numpy_only` (TensorFlow may be importing on another thread).
    """
    factory = targets.resolve(KEY, targets.options_of(option).get(targets.TARGET))
    if wait_for_tensorflow is not None and not getattr(factory, "tfharness_numpy_only", False):
        wait_for_tensorflow()
    waits_itself = wait_for_tensorflow is not None and getattr(
        factory, "tfharness_waits_for_tensorflow", False)
    with (split_lib.importing_tensorflow(wait_for_tensorflow) if waits_itself
          else contextlib.nullcontext()):
        produced = targets.call(KEY, option, optional=HARNESS_KEYS)
    return bundle_of(produced, option)


def bundle_of(produced: Any, option: Any) -> DataBundle:
    """A factory's result (see :mod:`tfharness.data.split`) as a :class:`DataBundle`."""
    key = f"{KEY}.{targets.TARGET}"
    if not isinstance(produced, Mapping) or "pretrain" not in produced or set(produced) - set(
            PHASES):
        got = (f"a mapping with keys {sorted(produced)}" if isinstance(produced, Mapping)
               else type(produced).__name__)
        raise DataError(key, got, "a mapping with 'pretrain' and optionally 'finetune', each "
                        "(x, y) arrays or a mapping of 'train', 'val', 'test'")
    options = {**DEFAULTS, **targets.options_of(option)}
    fractions = {"val_fraction": float(options["val_fraction"]),
                 "test_fraction": float(options["test_fraction"])}
    seed = int(options["seed"])
    pretrain = phase_split(produced["pretrain"], key, "pretrain", seed=seed, **fractions)
    finetune_value = produced.get("finetune")
    if finetune_value is None:
        # One phase: fine-tuning uses the same data. Arrays are split again with the fine-tune
        # seed, as a second phase of the same arrays would be.
        finetune_value = produced["pretrain"]
    finetune = phase_split(finetune_value, key, "finetune", seed=seed + 1, **fractions)
    for phase, split in (("pretrain", pretrain), ("finetune", finetune)):
        _check_shapes(key, phase, split)
    if finetune.input_shape != pretrain.input_shape:
        raise DataError(key, f"finetune features of shape {finetune.input_shape}",
                        f"the pretrain features' shape {pretrain.input_shape}")
    return DataBundle(name=targets.option_name(option), pretrain=pretrain, finetune=finetune)


def _check_shapes(key: str, phase: str, split: Split) -> None:
    """Every part of a phase must give samples of one fully known shape."""
    shapes = set()
    for name in ("train", "val", "test"):
        part = getattr(split, name)
        if part is None:
            continue
        if is_dataset(part):
            spec = part.element_spec
            if not isinstance(spec, tuple) or len(spec) < 2 or not hasattr(spec[0], "shape"):
                raise DataError(key, f"{phase}.{name}: a dataset of {spec}",
                                "a tf.data.Dataset of (x, y) batches, x one tensor")
            shape = tuple(spec[0].shape)[1:]
            if None in shape:
                raise DataError(key, f"{phase}.{name}: samples of shape {shape}",
                                "a dataset whose element_spec gives the full sample shape")
        else:
            shape = tuple(part[0].shape[1:])
            if not len(part[0]):
                continue
        shapes.add(tuple(int(d) for d in shape))
    if len(shapes) > 1:
        raise DataError(key, f"{phase}: samples of shapes {sorted(shapes)}",
                        "one sample shape across train, val and test")
