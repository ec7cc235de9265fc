"""Python's cyclic garbage collector around the imports a run makes.

A run imports TensorFlow, Keras and MLflow: hundreds of thousands of objects that live as long as
the process. Each full pass of the collector walks every tracked object, and the heap's growth
during the imports is what sets those passes off, so a fresh process would walk the same modules
again and again while importing, and once more at exit. Here full passes wait while a thread
imports (young objects, where nearly all garbage is, are still collected), and what is alive when
the imports are done is frozen (``gc.freeze``: left out of every later pass). Figures are in
``benchmarks/results.md``.

Objects of the run itself may be frozen with them (the model is built while MLflow imports);
:func:`collect_frozen_run` makes them collectable again before a later run in the same process.
Nothing here changes what reference counting frees, which is nearly everything.
"""

from __future__ import annotations

import gc
import importlib
import sys
import threading

_lock = threading.Lock()
_importing = 0  # threads inside import_frozen()
_thresholds = gc.get_threshold()  # the collector's, while no thread is in there
_run_objects_frozen = False


def import_frozen(*names: str) -> None:
    """Imports the modules ``names`` that are not imported yet, with no full collection while
    any thread is in here; then everything alive is frozen. An import error is raised."""
    names = tuple(name for name in names if name not in sys.modules)
    if not names:
        return
    global _importing, _thresholds, _run_objects_frozen
    with _lock:
        if _importing == 0:
            _thresholds = gc.get_threshold()
            # Young objects are still collected (most garbage is young); full passes wait.
            gc.set_threshold(_thresholds[0], _thresholds[1], 1 << 30)
        _importing += 1
    try:
        for name in names:
            importlib.import_module(name)
    finally:
        with _lock:
            _importing -= 1
            if _importing == 0:
                gc.freeze()
                _run_objects_frozen = True
                gc.set_threshold(*_thresholds)


def collect_frozen_run() -> None:
    """Before a run that did not import: the objects an earlier run in this process had when
    its imports were frozen become collectable again, and its garbage is collected (one full
    pass); the rest is frozen again."""
    global _run_objects_frozen
    with _lock:
        if not _run_objects_frozen or _importing:
            return
        _run_objects_frozen = False
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def freeze_at_exit() -> None:
    """For ``atexit``: the interpreter's last full collections, before it tears the modules
    down, would walk every object once more; the process is ending, nothing needs them."""
    gc.freeze()
