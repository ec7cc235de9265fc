"""Fine-tuning: stages, freezing, and the proof that frozen layers stayed put.

The head surgery is in :mod:`tfharness.surgery`, the layer tree and its selectors in
:mod:`tfharness.layertree`. Follows the Keras transfer-learning guide: freezing sets
``layer.trainable = False`` and is followed by a fresh ``compile()`` (changing ``trainable`` has
no effect until then), and a frozen BatchNormalization layer runs in inference mode, so its
moving statistics stay fixed too; the weight check after each stage covers them, for every layer
of every nested model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from tfharness.finetune import layertree, surgery
from tfharness.config import FinetuneConfig, StageConfig
from tfharness.errors import VerificationError

attach_head = surgery.attach_head
resolve_selectors = layertree.resolve_selectors


def stages_of(cfg: FinetuneConfig) -> List[StageConfig]:
    """The stages to run: the configured ones, or one stage made of the top-level keys."""
    if cfg.stages:
        return list(cfg.stages)
    return [StageConfig(name="finetune", freeze=list(cfg.freeze), learning_rate=cfg.learning_rate,
                        epochs=cfg.epochs)]


def stage_key(cfg: FinetuneConfig, index: int) -> str:
    """The config key of a stage's freeze list, for error messages."""
    return f"finetune.stages[{index}].freeze" if cfg.stages else "finetune.freeze"


def prepare(model, cfg: FinetuneConfig) -> Tuple[object, List[str]]:
    """The fine-tune model (the new head attached, or ``model`` itself) and the head's names."""
    head = cfg.new_head()
    if head is None:
        return model, []
    return surgery.attach_head(model, head)


def plan(model, cfg: FinetuneConfig) -> List[Set[str]]:
    """Everything a fine-tune needs to know about ``model``, checked before any run opens.

    Attaches the head to a throwaway model (so the cut, the pooling and the head are checked)
    and resolves each stage's selectors on it. Returns the frozen layer paths of each stage.
    """
    tuned, head_names = prepare(model, cfg)
    return [layertree.resolve_selectors(stage.freeze, tuned, head_names, stage_key(cfg, index))
            for index, stage in enumerate(stages_of(cfg))]


def _is_batchnorm(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def apply_freeze(model, frozen: Set[str], freeze_batchnorm: bool = False) -> None:
    """Sets ``trainable`` on every layer of the tree from the frozen paths.

    A frozen nested model freezes everything inside it (Keras propagates the flag down). With
    ``freeze_batchnorm`` every BatchNormalization layer stays frozen, in inference mode, even
    where its block trains: the Keras guide's advice for fine-tuning a pretrained base.
    """
    def visit(container, prefix: str) -> None:
        for layer in layertree.visible_layers(container):
            path = prefix + layer.name
            layer.trainable = path not in frozen
            if layer.trainable and layertree.is_nested(layer):
                visit(layer, path + "/")
            if freeze_batchnorm and _is_batchnorm(layer):
                layer.trainable = False

    visit(model, "")


def snapshot(model) -> List[List[np.ndarray]]:
    """Copies of the weights of every layer of the tree, nested ones included, trainable and not
    (BatchNorm statistics included), in :func:`layertree.leaves` order."""
    return [[np.array(w) for w in node.layer.get_weights()] for node in layertree.leaves(model)]


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


def stage_report(model, stage: str, before, after) -> StageReport:
    """Builds one row per layer of the tree, nested ones by path, and raises if any frozen
    layer's weights moved (a layer is frozen when it, or a nested model around it, is)."""
    report = StageReport(stage=stage, trainable_params=_param_count(model.trainable_weights),
                         frozen_params=_param_count(model.non_trainable_weights))
    moved = []
    for node, old, new in zip(layertree.leaves(model), before, after):
        layer, trainable = node.layer, node.effectively_trainable
        if not trainable:
            worst = _max_change(old, new)
            report.frozen_weight_change_max = max(report.frozen_weight_change_max, worst)
            if worst != 0.0:
                moved.append(f"{node.path} (max abs change {worst:.3g})")
        total = _param_count(layer.weights)
        trained = _param_count(layer.trainable_weights) if trainable else 0
        report.rows.append({
            "stage": stage,
            "index": node.index,
            "layer": node.path,
            "class": type(layer).__name__,
            "trainable": trainable,
            "trainable_params": trained,
            "non_trainable_params": total - trained,
            "output_shape": _output_shape(layer),
            "relative_weight_change": _relative_change(old, new),
        })
    if moved:
        raise VerificationError(f"Frozen layers changed during fine-tune stage '{stage}': "
                                + ", ".join(moved))
    return report
