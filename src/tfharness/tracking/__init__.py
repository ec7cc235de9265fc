"""Tracking: everything a run records in MLflow, and how it gets there.

- ``base``: the :class:`Tracker` interface the pipeline talks to (and ``tracking=off``);
- ``tracker``: :class:`MlflowTracker`, which opens the run (``runs``) and hands every logging
  call, a ``jobs`` dataclass, to a ``delivery`` thread that retries through server outages;
- ``mlflow_async``: the same tracker on MLflow's own asynchronous logging
  (``tracking.async_backend=mlflow``);
- ``process``: either of them in a tracking process of its own, so MLflow never loads in the
  training process (``tracking.process``);
- ``models``: logging a saved artifact as an MLflow model (``mlflow_model`` is its pyfunc
  wrapper, loaded by MLflow by file path), and registering it;
- ``store``: opening a tracking store (created under a lock, errors naming tracking.uri);
- ``spool``: the local store a run logs to while its server is unreachable;
- ``batches``, ``tags``, ``tables``, ``unreachable``: small helpers shared with sweeps and sync.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Optional

from tfharness.config import TrackingConfig
from tfharness.tracking.backends import in_process_tracker
from tfharness.tracking.base import Tracker, ending_of
from tfharness.tracking.batches import PARAM_BATCH, PARAM_VALUE_LIMIT
from tfharness.tracking.models import MODEL_URI_TAG, model_output_and_requirements
from tfharness.tracking.process import ProcessTracker
from tfharness.tracking.store import open_experiment as _open_store
from tfharness.tracking.store import sqlite_artifact_root
from tfharness.tracking.tables import format_cell, markdown_table
from tfharness.tracking.tags import git_commit, run_tags
from tfharness.tracking.tracker import MlflowTracker
from tfharness.tracking.unreachable import is_unreachable

__all__ = ["MODEL_URI_TAG", "PARAM_BATCH", "PARAM_VALUE_LIMIT", "MlflowTracker", "Tracker",
           "ending_of", "format_cell", "git_commit", "is_unreachable", "make_tracker",
           "markdown_table", "model_output_and_requirements", "open_experiment", "run_tags",
           "sqlite_artifact_root"]

log = logging.getLogger("tfharness")


def make_tracker(cfg: TrackingConfig, after: Optional[threading.Thread] = None) -> Tracker:
    """The run's tracker: none with ``tracking=off``, else the MLflow tracker of
    ``tracking.async_backend``, which starts opening the store now, while this process loads the
    data and TensorFlow: in the tracking process (:func:`in_own_process`), or on a thread of
    this process once ``after`` (TensorFlow's import, if any) is done."""
    if cfg.name == "off":
        return Tracker()
    if in_own_process(cfg):
        try:
            return ProcessTracker(cfg)
        except OSError as error:  # no interpreter to start, no process slots left
            log.warning("Cannot start the tracking process (%s: %s); logging from a thread of "
                        "this process instead", type(error).__name__, error)
    tracker = in_process_tracker(cfg)
    tracker.connect_meanwhile(after)
    return tracker


def in_own_process(cfg: TrackingConfig) -> bool:
    """``tracking.process``; null (auto): yes unless MLflow is loaded in this process already,
    where a tracking process would only import it a second time."""
    if cfg.process is None:
        return "mlflow" not in sys.modules
    return bool(cfg.process)


def open_experiment(cfg: TrackingConfig):
    """An MlflowClient on ``cfg.uri`` and the id of ``cfg.experiment``, created if missing.

    Creating the database and the experiment in one process, before any parallel job writes to
    them, is what keeps a fresh SQLite store from racing on its schema.
    """
    return _open_store(cfg.uri, cfg.experiment)
