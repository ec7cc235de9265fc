"""Models: the builders a run can pretrain (``builders``), how they are compiled (``compile``)
and the Keras callbacks they train with (``callbacks``)."""

from tfharness.models.builders import build_model, cnn, layer_names, mlp  # noqa: F401
from tfharness.models.callbacks import finetune_specs, make_callbacks  # noqa: F401
from tfharness.models.compile import (  # noqa: F401
    OPTIMIZERS,
    compile_model,
    make_loss,
    make_metrics,
    make_optimizer,
)
