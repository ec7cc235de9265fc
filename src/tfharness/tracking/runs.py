"""Connecting to the store and opening a run: new, resumed, or spooled when the server is down.

Also what a resumed run asks the store (which points and artifacts it lacks, which models it
logged) and ending a run whose process died.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

from tfharness import heap
from tfharness.config import TrackingConfig
from tfharness.errors import TrackingError
from tfharness.tracking import spool
from tfharness.tracking.retries import retrying
from tfharness.tracking.store import open_experiment
from tfharness.tracking.unreachable import is_unreachable

log = logging.getLogger("tfharness")

# Run names are VARCHAR(250) in MLflow's schema; SQLite ignores that, PostgreSQL refuses more.
RUN_NAME_LIMIT = 250
# How long the calls that open a run are tried again while the server does not answer.
OPEN_RETRY_S = 60.0
# A new run's own random key: a creation whose answer was lost is found by it, not made twice.
OPEN_TOKEN_TAG = "tfharness.open_token"


@dataclass
class Store:
    """An open tracking store: a client, the run's experiment, and where it is."""

    client: object  # mlflow.MlflowClient
    experiment_id: str
    uri: str
    spooled: bool = False  # the spool store, standing in for an unreachable server


class ConnectAbandoned(Exception):
    """The caller let go of the tracker before its store was opened (see :func:`connect`)."""


def connect(cfg: TrackingConfig, own_retries: bool,
            may_open: Optional[Callable[[], bool]] = None) -> Store:
    """Imports MLflow and opens ``cfg.uri`` and ``cfg.experiment`` (created if missing): the
    slow part of opening a run (seconds: imports, the database schema check).

    With ``own_retries`` the caller retries unreachable calls itself, and MLflow's HTTP retries
    (minutes, with backoff) are switched off unless the user set them, as they would only hold
    the caller's queue behind one call. ``may_open``, asked once MLflow is imported and before
    the store is touched, returns False when the caller no longer wants it: then nothing is
    opened or created and :class:`ConnectAbandoned` is raised.
    """
    heap.import_frozen("mlflow")

    if may_open is not None and not may_open():
        raise ConnectAbandoned(cfg.uri)

    if own_retries and cfg.uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    client, experiment_id = open_experiment(cfg.uri, cfg.experiment)
    if cfg.log_models:
        # What model logging imports, loaded now rather than while the first model waits.
        heap.import_frozen("mlflow.models", "mlflow.pyfunc")
    return Store(client, experiment_id, cfg.uri)


def spool_instead(cfg: TrackingConfig, error: Exception,
                  resume_run_id: Optional[str]) -> Store:
    """The spool store when ``error`` says the server is unreachable and the config allows it;
    else raises ``error``. A store that cannot work at all (a bad scheme or path) is a setup
    error, reported before any training."""
    if cfg.on_unavailable != "spool" or resume_run_id is not None or not is_unreachable(error):
        raise error
    uri = spool.spool_uri(cfg.spool_dir)
    client, experiment_id = open_experiment(uri, cfg.experiment)
    log.warning("MLflow store %s unreachable (%s): logging to the spool %s; replay it with "
                "`python -m tfharness.sync %s`", cfg.uri, type(error).__name__, uri,
                cfg.spool_dir)
    return Store(client, experiment_id, uri, spooled=True)


def open_run(store: Store, cfg: TrackingConfig, run_name: str, tags: Dict[str, str],
             resume_run_id: Optional[str]) -> str:
    """Creates the run with its tags, or reopens ``resume_run_id``; returns its id."""
    import mlflow

    # MLflow calls made later in this process (loading the run's models by URI) go to its store.
    mlflow.set_tracking_uri(store.uri)
    if resume_run_id is not None:
        reopen(store, resume_run_id, tags)
        return resume_run_id
    token = uuid.uuid4().hex
    tags = {**tags, **cfg.tags, OPEN_TOKEN_TAG: token}
    if store.spooled:
        tags[spool.TARGET_URI] = cfg.uri

    def create() -> str:
        return store.client.create_run(store.experiment_id, run_name=run_name[:RUN_NAME_LIMIT],
                                       tags=tags).info.run_id

    def created_meanwhile() -> Optional[str]:
        # A creation the server carried out although its answer never came back.
        found = store.client.search_runs([store.experiment_id],
                                         f"tags.`{OPEN_TOKEN_TAG}` = '{token}'", max_results=1)
        return found[0].info.run_id if found else None

    return retrying(create, is_unreachable, what="MLflow store did not answer while opening "
                    "the run", deadline_s=OPEN_RETRY_S, found=created_meanwhile)


def reopen(store: Store, run_id: str, tags: Dict[str, str]) -> None:
    """Sets a resumed run RUNNING again, counting its resumes."""
    client = store.client
    try:
        previous = client.get_run(run_id)
    except Exception as exc:
        raise TrackingError(f"Cannot resume MLflow run {run_id} in {store.uri!r}: "
                            f"{type(exc).__name__}: {str(exc)[:500]}") from exc
    if previous.info.status == "RUNNING":
        # Its process died without a word (SIGKILL, OOM): say so before it runs again.
        mark_abandoned(client, run_id, "its process died while the run was RUNNING")
    client.update_run(run_id, status="RUNNING")
    resumes = int(previous.data.tags.get("tfharness.resumes", "0")) + 1
    client.set_tag(run_id, "tfharness.resumes", str(resumes))
    client.set_tag(run_id, "tfharness.last_command", tags.get("command", "")[:5000])


def mark_abandoned(client, run_id: str, reason: str) -> None:
    """Ends a run whose process died (left RUNNING) as KILLED, saying why."""
    try:
        client.set_tag(run_id, "tfharness.interrupted",
                       f"{reason}; marked KILLED at "
                       f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
        client.set_terminated(run_id, status="KILLED")
    except Exception:  # a run of another store, or deleted: nothing to mark
        return


def missing_points(client, run_id: str, points: List[list]) -> List[list]:
    """The ``[key, value, step]`` points the run lacks (each step of a key once)."""
    present: Dict[str, set] = {}
    missing = []
    for key, value, step in points:
        if key not in present:
            present[key] = {m.step for m in client.get_metric_history(run_id, key)}
        if step not in present[key]:
            missing.append([key, value, step])
            present[key].add(step)
    return missing


def missing_artifacts(client, run_id: str, files: Iterable[str]) -> List[str]:
    """The artifact paths in ``files`` the run lacks."""
    missing = []
    for file in files:
        folder = str(Path(file).parent) if "/" in file else None
        if file not in {a.path for a in client.list_artifacts(run_id, folder)}:
            missing.append(file)
    return missing


def logged_model_names(store: Store, run_id: str) -> List[str]:
    models = store.client.search_logged_models(
        [store.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    return [m.name for m in models]
