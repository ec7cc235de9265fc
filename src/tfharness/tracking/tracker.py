"""The MLflow tracker: everything a run records in MLflow, delivered in the background.

The contract users compare runs on: the resolved config as dotted params, one metric point per
epoch under ``pretrain/`` and ``finetune/`` (the UI draws one chart group per prefix), the logged
models, the config and overrides as artifacts, the trainable-layer report as a table, and a run
status that says how the run ended. A failed logging call never ends training: it fails the run
when the run ends.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np

from tfharness.config import TrackingConfig
from tfharness.errors import TrackingError
from tfharness.tracking import runs, store
from tfharness.tracking.base import Tracker, ending_of
from tfharness.tracking.batches import log_params
from tfharness.tracking.delivery import DeliveryRecord, DeliveryWorker
from tfharness.tracking.jobs import (CallJob, FigureJob, InputsJob, Job, LinkJob, MetricsJob,
                                     ModelJob, TableJob, TagsJob, TextJob)
from tfharness.tracking.naming import table_columns
from tfharness.tracking.models import (ModelSpec, link_model_input,
                                       model_output_and_requirements, register)
from tfharness.tracking.retries import retrying
from tfharness.tracking.spool import SPOOL_REASON, spool_tail
from tfharness.tracking.unreachable import is_unreachable

log = logging.getLogger("tfharness")


class OpeningGate:
    """Whether a connect thread may still open the store, and whether it has begun to."""

    def __init__(self):
        self._lock = threading.Lock()
        self._may_open = True
        self.opening = False

    def begin(self) -> bool:
        """Asked by the connect thread before it touches the store: may it?"""
        with self._lock:
            self.opening = self._may_open
            return self._may_open

    def close(self) -> bool:
        """No store is wanted any more; returns whether the thread had begun to open it."""
        with self._lock:
            self._may_open = False
            return self.opening


class MlflowTracker(Tracker):
    """Logs to the MLflow tracking URI and experiment named in the config.

    Opening the run happens in the caller's thread, so a store that cannot be used fails before
    any training (or, with ``tracking.on_unavailable=spool``, the run goes to the spool, see
    :mod:`tfharness.tracking.spool`). Everything after that goes, in order, to a
    :class:`~tfharness.tracking.delivery.DeliveryWorker`: per-epoch metrics cost a queue put,
    and logging the pretrained model overlaps fine-tuning. Calls kept through a server outage
    that outlasts ``tracking.drain_timeout_s`` are spooled when the run ends.
    """

    retries_itself = True  # whether this tracker retries unreachable calls itself

    def __init__(self, cfg: TrackingConfig):
        super().__init__()
        self.cfg = cfg
        self.uri = cfg.uri
        self.spooled_run = False  # the whole run went to the spool store
        self.record = DeliveryRecord()
        self._store: Optional[runs.Store] = None
        self._connect_error: Optional[Exception] = None
        self._connecting: Optional[threading.Thread] = None
        # A run that fails before it opens lets go at once unless the store is being created.
        self._gate = OpeningGate()
        self._worker: Optional[DeliveryWorker] = None
        # What log_model was asked for: a spooled run's models are logged again by the sync.
        self.model_specs: List[ModelSpec] = []

    # ------------------------------------------------------------------ opening the run
    def connect(self) -> None:
        """Opens the store (seconds: imports, the schema check); an error is kept for
        :meth:`start`, so a client that could not open its store is never used."""
        if self._store is not None or self._connect_error is not None:
            return
        try:
            self._store = runs.connect(self.cfg, own_retries=self.retries_itself,
                                       may_open=self._gate.begin)
        except Exception as exc:
            self._connect_error = exc

    def connect_meanwhile(self, after: Optional[threading.Thread] = None) -> None:
        """Starts :meth:`connect` on a thread, while this process loads data and TensorFlow;
        :meth:`start` waits for it.

        ``after``: a thread to let finish first (the run's TensorFlow import). MLflow's import
        and TensorFlow's hold the GIL most of the time: run at once, they finish later than run
        one after the other, and the run needs TensorFlow first (to build its model).
        """
        def connect_after() -> None:
            if after is not None:
                after.join()
            self.connect()

        self._connecting = threading.Thread(target=connect_after, daemon=True,
                                            name="tfharness-mlflow-connect")
        self._connecting.start()

    def start(self, run_name: str, params: Dict[str, str], tags: Dict[str, str],
              resume_run_id: Optional[str] = None) -> None:
        if self._connecting is not None:
            self._connecting.join()
            self._connecting = None
        self.connect()
        if self._connect_error is not None:
            error, self._connect_error = self._connect_error, None
            self._store = runs.spool_instead(self.cfg, error, resume_run_id)
            self.spooled_run = True
            tags = {**tags, SPOOL_REASON: f"{type(error).__name__}: {str(error)[:300]}"}
        self.uri = self._store.uri
        self.run_id = runs.open_run(self._store, self.cfg, run_name, tags, resume_run_id)
        if resume_run_id is None:  # a resumed run has its params already
            try:
                retrying(lambda: log_params(self._store.client, self.run_id, params),
                         is_unreachable, what="MLflow store did not answer while logging the "
                         "run's params", deadline_s=runs.OPEN_RETRY_S)
            except BaseException as error:
                self.finish(error)  # never a run left RUNNING without its params
                raise
        self._start_delivery()
        # The learning-curve plot is drawn at the end of the run: its imports are done now,
        # while the run trains, instead of while the run waits to end.
        from tfharness.tracking import plots

        threading.Thread(target=plots.preload, name="tfharness-preload-plots",
                         daemon=True).start()

    def _start_delivery(self) -> None:
        self._worker = DeliveryWorker(self.uri, self._deliver, self.record)

    def _deliver(self, job: Job) -> None:
        job.deliver(self._store.client, self.run_id)

    # ------------------------------------------------------------------ what a resume asks
    def mark_abandoned(self, run_id: str, reason: str) -> None:
        runs.mark_abandoned(self._store.client, run_id, reason)

    def missing_points(self, points: List[list]) -> List[list]:
        return runs.missing_points(self._store.client, self.run_id, points)

    def missing_artifacts(self, files: Iterable[str]) -> List[str]:
        return runs.missing_artifacts(self._store.client, self.run_id, files)

    def logged_model_names(self) -> List[str]:
        return runs.logged_model_names(self._store, self.run_id)

    def query(self, function, *args):
        return function(self._store.client, *args)

    # ------------------------------------------------------------------ recording
    def submit(self, job: Job) -> None:
        """Queues ``job`` for delivery, in order."""
        self._worker.submit(job)

    def record_failure(self, description: str, error: BaseException) -> None:
        """A call that failed before it could be queued: the run ends FAILED, saying so."""
        self.record.failed(description, error)

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.submit(MetricsJob(f"metrics at step {step}", batch))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.submit(TextJob(f"text {artifact_file}", text, artifact_file))

    def log_table(self, rows: List[Dict], artifact_file: str) -> None:
        self.submit(TableJob(f"table {artifact_file}", table_columns(rows), artifact_file))

    def set_tags(self, tags: Dict[str, str]) -> None:
        items = dict(tags)
        self.submit(TagsJob(f"tags {', '.join(items)}", items))

    def log_inputs(self, datasets: List[Dict[str, Optional[str]]]) -> None:
        items = [dict(d) for d in datasets]
        self.submit(InputsJob(f"datasets {', '.join(d['name'] for d in items)}", items))

    def log_figure(self, kind: str, data: Dict, artifact_file: str) -> None:
        self.submit(FigureJob(f"figure {artifact_file}", kind, data, artifact_file))

    def link_model_metrics(self, name: str, keys: List[str]) -> None:
        self.submit(LinkJob(f"metrics of model {name}", name, list(keys), self.model_uris))

    def log_model(self, model, name: str, example: np.ndarray, artifact: Path,
                  tags: Optional[Dict[str, str]] = None,
                  extra_artifacts: Optional[Dict[str, Path]] = None, step: int = 0) -> None:
        """Logs the saved ``artifact`` of ``model`` as an MLflow model, in the background.

        ``tags`` go on the logged model (its sha256, where it came from); ``extra_artifacts``
        travel beside the artifact (its sha256 record); ``step`` is the epoch the model was
        produced at. The URI lands in :attr:`model_uris` once :meth:`finish` ran.
        """
        output, requirements = model_output_and_requirements(model, example)
        self.log_model_output(name, example, output, artifact, requirements, tags,
                              extra_artifacts, step=step)

    def log_model_output(self, name: str, example: np.ndarray, output: np.ndarray, artifact,
                         requirements: List[str], tags: Optional[Dict[str, str]] = None,
                         extra_artifacts: Optional[Dict[str, Path]] = None,
                         step: int = 0) -> None:
        """:meth:`log_model` once the model's ``output`` on ``example`` is known."""
        self.log_model_spec(ModelSpec.of(name, example, output, artifact, requirements, tags,
                                         extra_artifacts, step))

    def log_model_spec(self, spec: ModelSpec) -> None:
        self.model_specs.append(spec)
        self.submit(ModelJob(f"model {spec.name}", spec, self.model_uris.__setitem__))

    def register_model(self, name: str, registered_name: str,
                       alias: Optional[str] = None) -> None:
        """Registers the logged model ``name`` (queued before) as a new version of
        ``registered_name``, with ``alias`` if given; the version lands in
        :attr:`registered_versions`."""

        def registration() -> None:
            self.registered_versions[registered_name] = register(
                self._store.client, self.run_id, self.model_uris, name, registered_name, alias)

        self.submit(CallJob(f"registration of {name} as {registered_name!r}", registration))

    def log_model_input(self, model_id: str) -> None:
        """Records the logged model ``model_id`` as an input of the run (MLflow's lineage)."""
        self.submit(CallJob(f"model input {model_id}",
                            lambda: link_model_input(self._store.client, self.run_id, model_id)))

    # ------------------------------------------------------------------ ending the run
    def _drain(self) -> None:
        if self._worker is not None:
            self._worker.drain(self.cfg.drain_timeout_s)
            self._worker = None

    def finish(self, error: Optional[BaseException] = None) -> None:
        """Delivers everything queued, then ends the run: FINISHED, FAILED or KILLED.

        Raises :class:`TrackingError` (after ending the run as FAILED) when something queued
        could not be logged, so a run never looks complete in MLflow while it is not. Calls kept
        through a server outage that outlasted ``tracking.drain_timeout_s`` are spooled
        instead, with the run's final status, and a warning says how to deliver them.
        """
        if self.run_id is not None:
            self.finish_as(*ending_of(error))
        elif self._connecting is not None:
            # No run was opened (a bad config or data). A connect thread that has not begun to
            # open the store never will; one that has may be creating it: exiting in the
            # middle of MLflow's schema migration would leave a fresh SQLite store that no
            # client can open. A server has nothing to corrupt: wait less.
            if self._gate.close():
                waited = store.LOCK_TIMEOUT_S if store.sqlite_path(self.cfg.uri) else 10.0
                self._connecting.join(timeout=waited)
            self._connecting = None

    def finish_as(self, status: str, message: Optional[str]) -> None:
        """:meth:`finish` with the ending already worked out (see :func:`ending_of`)."""
        if self.run_id is None:
            return
        self._drain()
        record = self.record
        failed_here = message is None and record.errors
        if failed_here:
            status, message = "FAILED", "Could not log " + "; ".join(record.errors)
        tags = {"error": message[:5000]} if message else {}
        outage = record.outage_tag()
        if outage:
            tags["tfharness.tracking_outage"] = outage
        self._end(status, tags)
        if failed_here:
            raise TrackingError(f"MLflow run {self.run_id} is incomplete: {message[:2000]}")

    def _end(self, status: str, tags: Dict[str, str]) -> None:
        """Sets the final tags and status on the store, or in the spool when it is down."""
        undelivered = self.record.undelivered
        if not undelivered and not self.spooled_run:
            try:
                for key, value in tags.items():
                    self._store.client.set_tag(self.run_id, key, value)
                self._store.client.set_terminated(self.run_id, status=status)
                return
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
        where = spool_tail(self.cfg, self.run_id, self.spooled_run, undelivered,
                           self.model_specs, status, tags)
        if undelivered:
            log.warning("MLflow store %s still unreachable after %.0f s: %d logging calls and "
                        "the run's status %s are spooled in %s; deliver them with `python -m "
                        "tfharness.sync %s`", self.uri, self.cfg.drain_timeout_s,
                        len(undelivered), status, where, self.cfg.spool_dir)
