"""Fine-tuning: new heads, freeze selectors, stages, and the proof that frozen layers stayed put.

Follows the Keras transfer-learning guide: freezing sets ``layer.trainable = False`` and is
followed by a fresh ``compile()`` (changing ``trainable`` has no effect until then), and a frozen
BatchNormalization layer runs in inference mode, so its moving statistics stay fixed too; the
weight check after each stage covers them.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set

import numpy as np

from tfharness.config import (
    SELECTOR_INDEX,
    SELECTOR_SLICE,
    FinetuneConfig,
    HeadConfig,
    StageConfig,
)
from tfharness.errors import ConfigError, VerificationError

BASE_SELECTOR = "@base"
HEAD_NAME = "head"


def stages_of(cfg: FinetuneConfig) -> List[StageConfig]:
    """The stages to run: the configured ones, or one stage made of the top-level keys."""
    if cfg.stages:
        return list(cfg.stages)
    return [StageConfig(name="finetune", freeze=list(cfg.freeze), learning_rate=cfg.learning_rate,
                        epochs=cfg.epochs)]


def stage_key(cfg: FinetuneConfig, index: int) -> str:
    """The config key of a stage's freeze list, for error messages."""
    return f"finetune.stages[{index}].freeze" if cfg.stages else "finetune.freeze"


def head_layer_name(base_names: Sequence[str]) -> str:
    name, n = HEAD_NAME, 1
    while name in base_names:
        name, n = f"{HEAD_NAME}_{n}", n + 1
    return name


def planned_layers(base_names: Sequence[str], head: Optional[HeadConfig]) -> List[str]:
    """The layer names the fine-tune model will have, known before anything is trained."""
    if head is None:
        return list(base_names)
    if head.pop >= len(base_names):
        raise ConfigError("finetune.head.pop", head.pop,
                          f"fewer than the model's {len(base_names)} layers "
                          f"({', '.join(base_names)})")
    kept = list(base_names[:len(base_names) - head.pop])
    return kept + [head_layer_name(kept)]


def resolve_selectors(selectors: Sequence[str], names: Sequence[str], base_count: int,
                      key: str) -> Set[int]:
    """Layer indices that the selectors pick out of ``names``.

    Each selector must match at least one layer; otherwise :class:`ConfigError` lists the layers.
    """
    chosen: Set[int] = set()
    listing = ", ".join(f"{i}:{n}" for i, n in enumerate(names))
    for position, raw in enumerate(selectors):
        selector = str(raw).strip()
        matched: List[int]
        if selector == BASE_SELECTOR:
            matched = list(range(base_count))
        elif SELECTOR_INDEX.match(selector):
            index = int(selector)
            matched = [index % len(names)] if -len(names) <= index < len(names) else []
        elif SELECTOR_SLICE.match(selector):
            start, stop = (int(p) if p else None for p in selector.split(":"))
            matched = list(range(len(names)))[start:stop]
        else:
            matched = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, selector)]
        if not matched:
            raise ConfigError(f"{key}[{position}]", selector,
                              f"a selector matching at least one layer of {listing}")
        chosen.update(matched)
    return chosen


def attach_head(model, head: HeadConfig):
    """A new model sharing the pretrained layers, minus the last ``head.pop``, plus a Dense head."""
    import keras

    kept = model.layers[:len(model.layers) - head.pop]
    name = head_layer_name([layer.name for layer in kept])
    # float32 under a mixed-precision policy too: the softmax and loss stay in float32.
    new_head = keras.layers.Dense(head.num_classes, activation=head.activation, name=name,
                                  dtype="float32")
    inputs = keras.Input(shape=model.input_shape[1:], name="features")
    return keras.Sequential([inputs, *kept, new_head], name=f"{model.name}_finetuned")


def apply_freeze(model, frozen: Set[int]) -> None:
    for index, layer in enumerate(model.layers):
        layer.trainable = index not in frozen


def snapshot(model) -> List[List[np.ndarray]]:
    """Copies of every layer's weights, trainable and not (BatchNorm statistics included)."""
    return [[np.array(w) for w in layer.get_weights()] for layer in model.layers]


def _relative_change(before: List[np.ndarray], after: List[np.ndarray]) -> Optional[float]:
    if not before:
        return None
    delta = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(after, before)))
    scale = np.sqrt(sum(float(np.sum(b ** 2)) for b in before))
    return float(delta / scale) if scale > 0 else float(delta)


def _max_change(before: List[np.ndarray], after: List[np.ndarray]) -> float:
    return max((float(np.max(np.abs(a - b))) for a, b in zip(after, before) if a.size), default=0.0)


def _param_count(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def _output_shape(layer) -> str:
    try:
        return str(tuple(layer.output.shape))
    except (AttributeError, ValueError):
        return "?"


@dataclass
class StageReport:
    """What one fine-tune stage did to each layer."""

    stage: str
    rows: List[Dict] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0
    frozen_weight_change_max: float = 0.0


def stage_report(model, stage: str, frozen: Set[int], before, after) -> StageReport:
    """Builds the per-layer rows and raises if any frozen layer's weights moved."""
    report = StageReport(stage=stage, trainable_params=_param_count(model.trainable_weights),
                         frozen_params=_param_count(model.non_trainable_weights))
    moved = []
    for index, layer in enumerate(model.layers):
        change = _relative_change(before[index], after[index])
        if index in frozen:
            worst = _max_change(before[index], after[index])
            report.frozen_weight_change_max = max(report.frozen_weight_change_max, worst)
            if worst != 0.0:
                moved.append(f"{layer.name} (max abs change {worst:.3g})")
        report.rows.append({
            "stage": stage,
            "index": index,
            "layer": layer.name,
            "class": type(layer).__name__,
            "trainable": bool(layer.trainable),
            "trainable_params": _param_count(layer.trainable_weights),
            "non_trainable_params": _param_count(layer.non_trainable_weights),
            "output_shape": _output_shape(layer),
            "relative_weight_change": change,
        })
    if moved:
        raise VerificationError(f"Frozen layers changed during fine-tune stage '{stage}': "
                                + ", ".join(moved))
    return report
