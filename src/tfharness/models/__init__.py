"""Models: the builders a run can pretrain (``builders``), how they are compiled (``compile``),
the dtype policy they are built under (``precision``) and the Keras callbacks they train with
(``callbacks``)."""

from tfharness.models.builders import OUTPUT_DTYPE, build_model, cnn, layer_names, mlp  # noqa: F401
from tfharness.models.callbacks import finetune_specs, make_callbacks  # noqa: F401
from tfharness.models.precision import (  # noqa: F401
    restoring_policy,
    set_policy,
    warn_if_low_precision_output,
)
from tfharness.models.compile import (  # noqa: F401
    OPTIMIZERS,
    compile_model,
    make_loss,
    make_metrics,
    make_optimizer,
)
