"""Precision: the Keras dtype policy a run builds its models under (``trainer.precision``).

Keras keeps one global dtype policy per process and every layer built afterwards takes it. A
sweep runs many runs in one process, so each run sets its own policy when it starts
(:func:`set_policy`, after the session is cleared) and puts the previous one back when it ends
(:func:`restoring_policy`). The mixed policies compute in float16 or bfloat16 and keep the
variables in float32, so checkpoints and saved models hold float32 weights whatever the policy. The shipped builders and the fine-tune head keep their
output layer in float32 (``dtype="float32"``), as the Keras mixed-precision guide recommends, so
the softmax and the loss are computed in float32.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import Iterator, Optional

log = logging.getLogger("tfharness")

FLOAT32 = "float32"


def set_policy(name: str) -> None:
    """Makes ``name`` the global dtype policy of the models built from now on.

    Call it after ``keras.backend.clear_session()``, which puts the default policy back.
    """
    import keras

    keras.config.set_dtype_policy(name)


@contextlib.contextmanager
def restoring_policy(loading: Optional[threading.Thread] = None) -> Iterator[None]:
    """Puts back, when the block ends however it ends, the global dtype policy it started with
    (Keras' default when Keras was not loaded yet), so a run's policy never leaks to the next
    run in the process or to the caller.

    Keras is not imported here: it loads on a thread while the data loads (``loading``, see
    :func:`tfharness.pipeline.prepare.import_tensorflow_meanwhile`). A block that ends while that
    import still runs never used Keras (every use waits for it): there is nothing to put back,
    and a bad input is reported without waiting for TensorFlow.
    """
    previous = None
    # With ``loading`` given, Keras was not loaded when the run began (that thread loads it):
    # the policy to put back is Keras' default. Importing keras here would wait for that
    # thread as soon as it has begun (keras is in sys.modules, half imported).
    if loading is None and "keras" in sys.modules:
        import keras

        previous = keras.config.dtype_policy()
    try:
        yield
    finally:
        if "keras" in sys.modules and not (loading is not None and loading.is_alive()):
            import keras

            keras.config.set_dtype_policy(
                previous if previous is not None else keras.config.floatx())


def warn_if_low_precision_output(model, name: str) -> None:
    """Warns when a mixed-precision model's output is not float32 (a user's builder whose last
    layer was left on the global policy): its softmax and loss then run in low precision."""
    if name == FLOAT32:
        return
    dtypes = {str(getattr(out, "dtype", FLOAT32)) for out in getattr(model, "outputs", None) or []}
    low = sorted(d for d in dtypes if "float16" in d)
    if low:
        log.warning("trainer.precision=%s: the model's output is %s; give its last layer "
                    "dtype='float32' so the softmax and the loss stay in float32",
                    name, ", ".join(low))
