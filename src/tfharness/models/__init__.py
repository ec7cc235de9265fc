"""Models: the architectures a run can pretrain, and how they are compiled (``builders``)."""

from tfharness.models.builders import (  # noqa: F401
    build_model,
    compile_model,
    layer_names,
    make_optimizer,
)
