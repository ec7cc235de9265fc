"""Fine-tuning: new heads, freeze selectors, stages, and the frozen-weights proof (``transfer``)."""

from tfharness.finetune.transfer import (  # noqa: F401
    BASE_SELECTOR,
    HEAD_NAME,
    StageReport,
    apply_freeze,
    attach_head,
    head_layer_name,
    planned_layers,
    resolve_selectors,
    snapshot,
    stage_key,
    stage_report,
    stages_of,
)
