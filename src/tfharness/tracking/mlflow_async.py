"""``tracking.async_backend=mlflow``: MLflow's own asynchronous logging instead of tfharness'.

Metrics and tags go through ``MlflowClient.log_batch(..., synchronous=False)``, MLflow's logging
queue and thread; texts, tables, models and registrations are synchronous calls, as MLflow has
no asynchronous form of them. Retries are MLflow's HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``), left as the user set
them. A call that still fails never ends training: at the end of the run, what failed because
the server was unreachable is spooled as with the default backend, anything else fails the run.
"""

from __future__ import annotations

from typing import List, Tuple

from mlflow.entities import RunTag

from tfharness.config import TrackingConfig
from tfharness.tracking.jobs import Job, MetricsJob, TagsJob
from tfharness.tracking.tracker import MlflowTracker
from tfharness.tracking.unreachable import is_unreachable


class MlflowAsyncTracker(MlflowTracker):
    """:class:`MlflowTracker` with MLflow's asynchronous logging in place of its delivery thread."""

    retries_itself = False

    def __init__(self, cfg: TrackingConfig):
        super().__init__(cfg)
        # (job, RunOperations) of each asynchronous call, waited on when the run ends.
        self._pending: List[Tuple[Job, object]] = []

    def _start_delivery(self) -> None:
        """Nothing of ours to start: MLflow starts its logging thread on first use."""

    def submit(self, job: Job) -> None:
        client = self._store.client
        try:
            if isinstance(job, MetricsJob):
                operations = client.log_batch(self.run_id, metrics=job.metrics,
                                              synchronous=False)
            elif isinstance(job, TagsJob):
                operations = client.log_batch(
                    self.run_id, tags=[RunTag(k, str(v)) for k, v in job.tags.items()],
                    synchronous=False)
            else:
                # In order, as with the default backend: a call that reads what was logged
                # before it (linking a model's figures) must find it there.
                self._drain()
                job.deliver(client, self.run_id)
                return
        except Exception as exc:  # never raised into training; finish() reports it
            self._failed(job, exc)
            return
        self._pending.append((job, operations))

    def _failed(self, job: Job, error: BaseException) -> None:
        if is_unreachable(error):
            self.record.delayed += 1
            self.record.undelivered.append(job)
        else:
            self.record.failed(job.description, error)

    def _drain(self) -> None:
        """Waits for MLflow's queue, call by call, so a failure is pinned on its call."""
        pending, self._pending = self._pending, []
        for job, operations in pending:
            try:
                operations.wait()
            except Exception as exc:
                self._failed(job, exc)
