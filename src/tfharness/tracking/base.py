"""The :class:`Tracker` interface: everything the pipeline asks of tracking, and nothing more.

The pipeline holds a Tracker and never learns which one runs (none with ``tracking=off``, the
MLflow tracker with tfharness' delivery thread, or the one on MLflow's asynchronous logging):
see :func:`tfharness.tracking.make_tracker`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from tfharness.errors import TrackingError


class Tracker:
    """Records one run. This base class records nothing (``tracking=off``)."""

    run_id: Optional[str] = None

    def __init__(self):
        # Logged model URIs by name, complete once finish() has returned.
        self.model_uris: Dict[str, str] = {}
        # Registered model versions by registered name, complete once finish() has returned.
        self.registered_versions: Dict[str, str] = {}

    def start(self, run_name: str, params: Dict[str, str], tags: Dict[str, str],
              resume_run_id: Optional[str] = None) -> None:
        """Opens a new run, or reopens ``resume_run_id`` (its params are already logged)."""

    def mark_abandoned(self, run_id: str, reason: str) -> None:
        """Ends a run whose process died (left RUNNING) as KILLED, saying why."""

    def missing_points(self, points: List[list]) -> List[list]:
        """The ``[key, value, step]`` points of a resumed run that the store lacks."""
        return []

    def missing_artifacts(self, files: Iterable[str]) -> List[str]:
        """The artifact paths of a resumed run that the store lacks."""
        return []

    def logged_model_names(self) -> List[str]:
        """The names of the models this run has logged so far."""
        return []

    def query(self, function: Callable, *args):
        """Returns ``function(client, *args)``, called with an ``MlflowClient`` on the run's store
        where the tracker talks to it (the tracking process, if one runs). ``function`` must be
        a module-level function and its answer picklable; store errors are raised here."""
        raise TrackingError(f"tracking is off: nothing to ask of a store ({function.__name__})")

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None:
        """Records one point of each metric at ``step``."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Records ``text`` as the artifact ``artifact_file``."""

    def log_model(self, model, name: str, example: np.ndarray, artifact: Path,
                  tags: Optional[Dict[str, str]] = None,
                  extra_artifacts: Optional[Dict[str, Path]] = None, step: int = 0) -> None:
        """Logs the saved ``artifact`` of ``model`` as the MLflow model ``name``, produced at
        epoch ``step``."""

    def link_model_metrics(self, name: str, keys: List[str]) -> None:
        """Links the latest point of each run metric in ``keys`` to the logged model ``name``
        (MLflow's logged-model metrics: the Models page and the model's page show them)."""

    def log_figure(self, kind: str, data: Dict, artifact_file: str) -> None:
        """Draws ``data`` with :data:`tfharness.tracking.plots.DRAWERS` ``[kind]`` and logs the PNG."""

    def log_inputs(self, datasets: List[Dict[str, Optional[str]]]) -> None:
        """Records the run's datasets (``DatasetRecord.to_dict()`` of
        :mod:`tfharness.data.records`), as ``mlflow.log_input`` would."""

    def set_tags(self, tags: Dict[str, str]) -> None:
        """Sets run tags."""

    def log_table(self, rows: List[Dict], artifact_file: str) -> None:
        """Records ``rows`` (dicts with the same keys) as a table artifact."""

    def register_model(self, name: str, registered_name: str,
                       alias: Optional[str] = None) -> None:
        """Registers the logged model ``name`` as a new version of ``registered_name`` (with
        ``alias``, if given)."""

    def log_model_input(self, model_id: str) -> None:
        """Records the logged model ``model_id`` as an input of the run (MLflow's lineage)."""

    def finish(self, error: Optional[BaseException] = None) -> None:
        """Delivers what is pending and ends the run as :func:`ending_of` ``error`` says."""


def ending_of(error: Optional[BaseException]) -> Tuple[str, Optional[str]]:
    """The run status and ``error`` tag that ``error`` (None: success) ends a run with."""
    if error is None:
        return "FINISHED", None
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    return status, f"{type(error).__name__}: {error}"
