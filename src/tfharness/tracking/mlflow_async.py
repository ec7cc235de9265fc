"""``tracking.async_backend=mlflow``: MLflow's own asynchronous logging instead of tfharness'.

Metrics and tags go through ``MlflowClient.log_batch(..., synchronous=False)``, MLflow's logging
queue and thread; texts, tables, models and registrations are synchronous calls, as MLflow has
no asynchronous form of them. Retries are MLflow's HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``: left as the user set
them). A call that still fails never ends training: at the end of the run, what failed because
the server was unreachable is spooled as with the default backend, anything else fails the run.
"""

from __future__ import annotations

import threading
import time
from typing import List, Optional

from tfharness.config import TrackingConfig
from tfharness.tracking.tracker import MlflowTracker, is_unreachable


class MlflowAsyncTracker(MlflowTracker):
    """:class:`MlflowTracker` with MLflow's asynchronous logging in place of its delivery thread."""

    def __init__(self, cfg: TrackingConfig):
        super().__init__(cfg)
        # (job, RunOperations) of each asynchronous call, waited on when the run ends.
        self._pending: List[tuple] = []

    def _configure_http(self) -> None:
        """MLflow's HTTP retry settings stay as the user set them (or MLflow's defaults)."""

    def _start_delivery(self) -> None:
        import mlflow

        # Metrics and tags travel through MLflow's logging queue; nothing of ours to start.
        mlflow.config.enable_async_logging(True)

    def _submit(self, kind: str, description: str, payload) -> None:
        from mlflow.entities import RunTag

        job = [kind, description, payload, False]
        try:
            if kind == "metrics":
                operations = self._client.log_batch(self.run_id, metrics=payload,
                                                    synchronous=False)
            elif kind == "tags":
                operations = self._client.log_batch(
                    self.run_id, tags=[RunTag(k, str(v)) for k, v in payload.items()],
                    synchronous=False)
            else:
                self.deliver(job, self._client, self.run_id)
                return
        except Exception as exc:  # never raised into training; finish() reports it
            self._failed(job, exc)
            return
        self._pending.append((job, operations))

    def _failed(self, job: list, exc: BaseException) -> None:
        if is_unreachable(exc):
            if self._outage_since is None:
                self._outage_since = time.time()
            self._delayed += 1
            self._undelivered.append(job)
        else:
            self._errors.append(f"{job[1]}: {type(exc).__name__}: {exc}")

    def _drain(self) -> None:
        """Waits for MLflow's queue (its ``flush_async_logging``, per call, so a failure is
        pinned on the call that failed)."""
        pending, self._pending = self._pending, []
        for job, operations in pending:
            try:
                operations.wait()
            except Exception as exc:
                self._failed(job, exc)


def background_connect(tracker: MlflowTracker) -> Optional[threading.Thread]:
    """Opens ``tracker``'s store on a thread (imports MLflow, checks the schema) while this
    process goes on loading data and TensorFlow; :meth:`MlflowTracker.start` waits for it."""
    thread = threading.Thread(target=tracker.connect, name="tfharness-mlflow-connect",
                              daemon=True)
    thread.start()
    return thread
