"""Tracking: everything a run records in MLflow, and how it gets there.

- ``tracker``: the :class:`Tracker` interface, the MLflow tracker (a logging thread), run tags;
- ``process``: the tracking process, so MLflow never loads in the training process;
- ``store``: opening a tracking store (created under a lock, errors naming tracking.uri);
- ``spool``: the local store a run logs to while its server is unreachable;
- ``mlflow_model``: the pyfunc wrapper logged with each model (loaded by MLflow by file path).
"""

from tfharness.tracking.tracker import (  # noqa: F401
    MODEL_URI_TAG,
    PARAM_BATCH,
    PARAM_VALUE_LIMIT,
    MlflowTracker,
    Tracker,
    ending_of,
    format_cell,
    git_commit,
    is_unreachable,
    make_tracker,
    markdown_table,
    model_output_and_requirements,
    open_experiment,
    run_tags,
)
from tfharness.tracking.store import sqlite_artifact_root  # noqa: F401

