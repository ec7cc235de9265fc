"""Callbacks: ``trainer.callbacks`` (and ``finetune.callbacks``), Keras callbacks by ``_target_``.

Each entry is a mapping such as ``{_target_: keras.callbacks.EarlyStopping, monitor: val_loss,
patience: 3}``; every ``fit`` gets fresh instances, so a callback's state (EarlyStopping's
patience count, say) never leaks from pretraining into fine-tuning. The harness's own
per-epoch checkpoint callback runs after them, so it sees a stop they asked for.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from tfharness.config import targets


def make_callbacks(specs: Sequence[Any], key: str) -> List[Any]:
    """Fresh callback objects for one ``fit``; errors name ``<key>[i]._target_``."""
    import keras

    return [targets.check_result(f"{key}[{i}]", spec, targets.call(f"{key}[{i}]", spec),
                                 keras.callbacks.Callback, "a keras.callbacks.Callback")
            for i, spec in enumerate(specs)]


def finetune_specs(trainer_callbacks: Sequence[Any],
                   finetune_callbacks: Optional[Sequence[Any]]) -> tuple:
    """The callbacks fine-tuning uses and the key their errors name: ``finetune.callbacks``
    when set (even to ``[]``), else ``trainer.callbacks``."""
    if finetune_callbacks is None:
        return list(trainer_callbacks), "trainer.callbacks"
    return list(finetune_callbacks), "finetune.callbacks"
