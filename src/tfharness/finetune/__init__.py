"""Fine-tuning: head surgery on the graph (``surgery``), the layer tree and its freeze selectors
(``layertree``), stages and the frozen-weights proof (``transfer``)."""

from tfharness.finetune.layertree import (  # noqa: F401
    BASE_SELECTOR,
    LayerNode,
    leaves,
    resolve_selectors,
    visible_layers,
    walk,
)
from tfharness.finetune.surgery import HEAD_NAME, attach_head, check_single_io  # noqa: F401
from tfharness.finetune.transfer import (  # noqa: F401
    StageReport,
    apply_freeze,
    plan,
    prepare,
    snapshot,
    stage_key,
    stage_report,
    stages_of,
)
