"""Tracking: everything a run records in MLflow, and nothing else touches MLflow.

The contract users compare runs on: the resolved config as dotted params, one metric point per
epoch under ``pretrain/`` and ``finetune/`` (the UI draws one chart group per prefix), the logged
models, the config and overrides as artifacts, the trainable-layer report as a table, and a run
status that says how the run ended. Logging happens on a background thread in call order, so
an epoch never waits on a database or network round trip, and a failed logging call never ends
training: it fails the run when the run ends.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import logging

import numpy as np

from tfharness.tracking import store
from tfharness.config import TrackingConfig
from tfharness.errors import TrackingError

log = logging.getLogger("tfharness")

# MLflow accepts at most 100 params per batch call.
PARAM_BATCH = 100
PARAM_VALUE_LIMIT = 6000
# Run names are VARCHAR(250) in MLflow's schema; SQLite ignores that, PostgreSQL refuses more.
RUN_NAME_LIMIT = 250
# Run tag prefix holding each logged model's URI: ``tfharness.model_uri.finetuned``.
MODEL_URI_TAG = "tfharness.model_uri"


def git_commit(cwd: str | os.PathLike | None = None) -> Optional[str]:
    """The commit checked out in ``cwd``, or None outside a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def open_experiment(cfg: TrackingConfig):
    """An MlflowClient on ``cfg.uri`` and the id of ``cfg.experiment``, created if missing.

    Creating the database and the experiment here, in one process, before any parallel job
    writes to them, is what keeps a fresh SQLite store from racing on its schema.
    """
    return store.open_experiment(cfg.uri, cfg.experiment)


class Tracker:
    """Records one run. This base class records nothing; see :class:`MlflowTracker`."""

    run_id: Optional[str] = None

    def __init__(self):
        # Logged model URIs by name, complete once finish() has returned.
        self.model_uris: Dict[str, str] = {}
        # Registered model versions by registered name, complete once finish() has returned.
        self.registered_versions: Dict[str, str] = {}

    def start(self, run_name: str, params: Dict[str, str], tags: Dict[str, str],
              resume_run_id: Optional[str] = None) -> None:
        pass

    def mark_abandoned(self, run_id: str, reason: str) -> None:
        """Ends a run whose process died (left RUNNING) as KILLED, saying why."""

    def missing_points(self, points: List[list]) -> List[list]:
        """The ``[key, value, step]`` points of a resumed run that the store lacks."""
        return []

    def missing_artifacts(self, files: Iterable[str]) -> List[str]:
        return []

    def logged_model_names(self) -> List[str]:
        return []

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_model(self, model, name: str, example: np.ndarray, artifact: Path,
                  tags: Optional[Dict[str, str]] = None,
                  extra_artifacts: Optional[Dict[str, Path]] = None) -> None:
        pass

    def set_tags(self, tags: Dict[str, str]) -> None:
        pass

    def log_table(self, rows: List[Dict], artifact_file: str) -> None:
        pass

    def register_model(self, name: str, registered_name: str) -> None:
        pass

    def finish(self, error: Optional[BaseException] = None) -> None:
        pass


class MlflowTracker(Tracker):
    """Logs to the MLflow tracking URI and experiment named in the config.

    Opening the run happens here, in the caller's thread, so a store that cannot be used fails
    before any training (or, with ``tracking.on_unavailable=spool``, the run goes to a local
    spool store, see :mod:`tfharness.spool`). Everything after that (metrics, texts, tables,
    models) goes, in order, to one background thread, so the training loop never waits on the
    store: per-epoch metrics cost a queue put, and logging the pretrained model overlaps
    fine-tuning. When a tracking server stops answering, the thread keeps the call that failed
    and retries it with backoff, in order, while training goes on; :meth:`finish` waits up to
    ``tracking.drain_timeout_s`` for the server to come back, then spools what is left for
    ``python -m tfharness.sync``. A call that failed for another reason fails the run.
    """

    def __init__(self, cfg: TrackingConfig):
        super().__init__()
        self.cfg = cfg
        self.uri = cfg.uri
        self.spooled_run = False  # the whole run went to the spool store
        self._client = None
        self._experiment_id: Optional[str] = None
        self._connected = False
        self._connect_error: Optional[Exception] = None
        self._connecting: Optional[threading.Thread] = None
        self._queue: "queue.Queue" = queue.Queue()
        self._worker: Optional[threading.Thread] = None
        self._errors: List[str] = []
        self._abandon = threading.Event()
        self._undelivered: List[tuple] = []
        self._outage_since: Optional[float] = None
        self._outages: List[float] = []
        self._delayed = 0
        # What log_model was asked for: a spooled run's models are logged again by the sync.
        self.model_specs: List[Dict] = []

    def connect(self) -> None:
        """Imports MLflow and opens the store and the experiment: the slow part of :meth:`start`
        (seconds: imports, the database schema check), done ahead of it by the tracking process
        while the training process imports TensorFlow. An error is kept for :meth:`start`."""
        if self._connected:
            return
        self._connected = True
        import mlflow

        self._configure_http()
        try:
            self._client, self._experiment_id = store.open_experiment(self.uri,
                                                                      self.cfg.experiment)
        except Exception as exc:
            # Kept for start(): a client that could not open its store is never used.
            self._client, self._connect_error = None, exc
        if self.cfg.log_models:
            # What model logging imports, loaded now rather than while the first model waits.
            import mlflow.models  # noqa: F401
            import mlflow.pyfunc  # noqa: F401

    def _configure_http(self) -> None:
        if self.uri.startswith(("http://", "https://")):
            # tfharness retries in the background; MLflow's own retries (minutes, with backoff)
            # would only hold the queue behind one call.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    def start(self, run_name: str, params: Dict[str, str], tags: Dict[str, str],
              resume_run_id: Optional[str] = None) -> None:
        """Opens a new run, or reopens ``resume_run_id`` (its params are already logged)."""
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking.context.registry import resolve_tags

        if self._connecting is not None:
            self._connecting.join()
            self._connecting = None
        self.connect()
        if self._connect_error is not None:
            exc, self._connect_error = self._connect_error, None
            # Only a server that does not answer is worth spooling for; a store that cannot
            # work at all (a bad scheme or path) is a setup error, before any training.
            if (self.cfg.on_unavailable != "spool" or resume_run_id is not None
                    or not is_unreachable(exc)):
                raise exc
            from tfharness.tracking import spool

            self.uri = spool.spool_uri(self.cfg.spool_dir)
            self._client, self._experiment_id = store.open_experiment(self.uri,
                                                                      self.cfg.experiment)
            self.spooled_run = True
            tags = {**tags, spool.TARGET_URI: self.cfg.uri,
                    spool.SPOOL_REASON: f"{type(exc).__name__}: {str(exc)[:300]}"}
            log.warning("MLflow store %s unreachable (%s): logging to the spool %s; replay it "
                        "with `python -m tfharness.sync %s`", self.cfg.uri,
                        type(exc).__name__, self.uri, self.cfg.spool_dir)
        mlflow.set_tracking_uri(self.uri)
        if resume_run_id is not None:
            self._reopen(resume_run_id, tags)
            params = {}
        else:
            run = self._client.create_run(
                self._experiment_id, run_name=run_name[:RUN_NAME_LIMIT],
                tags=resolve_tags({**tags, **self.cfg.tags}))
            self.run_id = run.info.run_id
        items = [Param(k, v[:PARAM_VALUE_LIMIT]) for k, v in sorted(params.items())]
        try:
            for i in range(0, len(items), PARAM_BATCH):
                self._client.log_batch(self.run_id, params=items[i:i + PARAM_BATCH])
        except BaseException as error:
            self.finish(error)
            raise
        self._start_delivery()

    def _start_delivery(self) -> None:
        self._worker = threading.Thread(target=self._work, name="tfharness-tracking",
                                        daemon=True)
        self._worker.start()

    def _reopen(self, run_id: str, tags: Dict[str, str]) -> None:
        try:
            previous = self._client.get_run(run_id)
        except Exception as exc:
            raise TrackingError(f"Cannot resume MLflow run {run_id} in {self.uri!r}: "
                                f"{type(exc).__name__}: {str(exc)[:500]}") from exc
        if previous.info.status == "RUNNING":
            # Its process died without a word (SIGKILL, OOM): say so before it runs again.
            self.mark_abandoned(run_id, "its process died while the run was RUNNING")
        self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        resumes = int(previous.data.tags.get("tfharness.resumes", "0")) + 1
        self._client.set_tag(run_id, "tfharness.resumes", str(resumes))
        self._client.set_tag(run_id, "tfharness.last_command", tags.get("command", "")[:5000])

    def mark_abandoned(self, run_id: str, reason: str) -> None:
        try:
            self._client.set_tag(run_id, "tfharness.interrupted",
                                 f"{reason}; marked KILLED at "
                                 f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
            self._client.set_terminated(run_id, status="KILLED")
        except Exception:  # a run of another store, or deleted: nothing to mark
            return

    def missing_points(self, points: List[list]) -> List[list]:
        present: Dict[str, set] = {}
        missing = []
        for key, value, step in points:
            if key not in present:
                present[key] = {m.step for m in self._client.get_metric_history(self.run_id, key)}
            if step not in present[key]:
                missing.append([key, value, step])
                present[key].add(step)
        return missing

    def missing_artifacts(self, files: Iterable[str]) -> List[str]:
        missing = []
        for file in files:
            folder = str(Path(file).parent) if "/" in file else None
            listed = {a.path for a in self._client.list_artifacts(self.run_id, folder)}
            if file not in listed:
                missing.append(file)
        return missing

    def logged_model_names(self) -> List[str]:
        models = self._client.search_logged_models(
            [self._experiment_id], filter_string=f"source_run_id = '{self.run_id}'")
        return [m.name for m in models]

    # ------------------------------------------------------------------ background delivery
    def _work(self) -> None:
        import mlflow

        # MLflow's active run is per thread: make this run the worker's active run too (model
        # logging goes through the fluent API). Retried like any call while the store is down.
        attached = False
        while True:
            job = self._queue.get()
            if job is None:
                return
            while True:
                if self._abandon.is_set():
                    self._undelivered.append(job)
                    break
                try:
                    if not attached:
                        mlflow.start_run(run_id=self.run_id)
                        attached = True
                    self.deliver(job, self._client, self.run_id)
                except Exception as exc:  # reported by finish(), never raised into training
                    if is_unreachable(exc):
                        self._wait_for_store(job)
                        continue
                    self._errors.append(f"{job[1]}: {type(exc).__name__}: {exc}")
                    break
                if self._outage_since is not None:
                    self._outages.append(time.time() - self._outage_since)
                    self._outage_since = None
                    log.warning("MLflow store %s is back; delivering the calls kept meanwhile",
                                self.uri)
                break

    def _wait_for_store(self, job: tuple) -> None:
        if self._outage_since is None:
            self._outage_since = time.time()
            log.warning("MLflow store %s unreachable; training goes on, logging calls are "
                        "kept and retried", self.uri)
        if not job[-1]:
            job[-1] = True  # count each delayed call once
            self._delayed += 1
        waited = time.time() - self._outage_since
        self._abandon.wait(min(0.25 * 2 ** min(waited, 4), 2.0))

    def deliver(self, job: tuple, client, run_id: str) -> None:
        """Performs one queued logging call against ``client``'s store."""
        import mlflow

        kind, _, payload, _ = job
        if kind == "metrics":
            client.log_batch(run_id, metrics=payload)
        elif kind == "text":
            client.log_text(run_id, payload["text"], payload["file"])
        elif kind == "table":
            client.log_table(run_id, data=payload["columns"], artifact_file=payload["file"])
        elif kind == "model":
            from mlflow.models import Model
            from mlflow.pyfunc import _get_pyfunc_model_flavor_name

            python_model = str(Path(__file__).with_name("mlflow_model.py"))
            # What mlflow.pyfunc.log_model does, less the serving check of the input example:
            # that check loads the model, that is TensorFlow, into the tracking process (600 MiB
            # and seconds of CPU taken from training), to prove what the runner has proved
            # already: the saved artifact reloads and serves the same outputs (reload/* metrics).
            info = Model.log(
                flavor=_PyfuncFlavor,
                flavor_name=_get_pyfunc_model_flavor_name(python_model),
                validate_serving_input=False,
                artifact_path=None,
                run_id=run_id,
                name=payload["name"],
                python_model=python_model,
                artifacts={"model": str(payload["artifact"]),
                           **payload.get("extra_artifacts", {})},
                tags=payload.get("tags") or None,
                signature=payload["signature"],
                input_example=payload["example"],
                pip_requirements=payload["requirements"],
            )
            self.model_uris[payload["name"]] = info.model_uri
            # Lets a sweep find the model of its best trial from the run alone.
            client.set_tag(run_id, f"{MODEL_URI_TAG}.{payload['name']}", info.model_uri)
        elif kind == "tags":
            for key, value in payload.items():
                client.set_tag(run_id, key, value)
        elif kind == "call":
            payload()

    def _submit(self, kind: str, description: str, payload) -> None:
        # [kind, description, payload, counted as delayed]
        self._queue.put([kind, description, payload, False])

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._submit("metrics", f"metrics at step {step}", batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit("text", f"text {artifact_file}", {"text": text, "file": artifact_file})

    def log_model(self, model, name: str, example: np.ndarray, artifact: Path,
                  tags: Optional[Dict[str, str]] = None,
                  extra_artifacts: Optional[Dict[str, Path]] = None) -> None:
        """Logs the saved ``artifact`` of ``model`` as an MLflow model, in the background.

        ``tags`` go on the logged model (its sha256, where it came from); ``extra_artifacts``
        travel beside the artifact (its sha256 record).

        ``mlflow.pyfunc.load_model`` predicts with it (see ``tfharness/tracking/mlflow_model.py``). The pip
        requirements are given explicitly: inferring them costs seconds per model (a subprocess
        that imports the model). The URI lands in :attr:`model_uris` once :meth:`finish` ran.
        """
        output, requirements = model_output_and_requirements(model, example)
        self.log_model_output(name, example, output, artifact, requirements, tags,
                              extra_artifacts)

    def log_model_output(self, name: str, example: np.ndarray, output: np.ndarray,
                         artifact, requirements: List[str],
                         tags: Optional[Dict[str, str]] = None,
                         extra_artifacts: Optional[Dict[str, Path]] = None) -> None:
        """:meth:`log_model` once the model's ``output`` on ``example`` is known (what the
        tracking process receives: it never loads TensorFlow)."""
        from mlflow.models import infer_signature

        signature = infer_signature(example, output)
        spec = {"name": name, "artifact": str(artifact), "signature": signature,
                "example": example, "requirements": requirements, "tags": dict(tags or {}),
                "extra_artifacts": {k: str(v) for k, v in (extra_artifacts or {}).items()}}
        self.model_specs.append(spec)
        self._submit("model", f"model {name}", spec)

    def set_tags(self, tags: Dict[str, str]) -> None:
        items = dict(tags)
        self._submit("tags", f"tags {', '.join(items)}", items)

    def register_model(self, name: str, registered_name: str) -> None:
        """Registers the logged model ``name`` (queued before) as a new version of
        ``registered_name``; the version lands in :attr:`registered_versions`."""
        import mlflow

        def register() -> None:
            if name not in self.model_uris:
                raise TrackingError(f"model {name!r} was not logged (tracking.log_models=false?)")
            version = mlflow.register_model(self.model_uris[name], registered_name)
            self.registered_versions[registered_name] = str(version.version)
            self._client.set_tag(self.run_id, "tfharness.registered_model",
                                 f"{registered_name}/{version.version}")

        self._submit("call", f"registration of {name} as {registered_name!r}", register)

    def log_table(self, rows: List[Dict], artifact_file: str) -> None:
        columns: Dict[str, list] = {}
        for row in rows:
            for key, value in row.items():
                columns.setdefault(key, []).append(value)
        self._submit("table", f"table {artifact_file}",
                     {"columns": columns, "file": artifact_file})

    def _drain(self) -> None:
        """Waits for the queue; gives up on a store that stays down past the drain timeout."""
        if self._worker is None:
            return
        self._queue.put(None)
        while self._worker.is_alive():
            self._worker.join(0.2)
            down_for = time.time() - self._outage_since if self._outage_since else 0.0
            if down_for > self.cfg.drain_timeout_s:
                self._abandon.set()
        self._worker.join()
        self._worker = None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None:
                self._undelivered.append(job)

    def finish(self, error: Optional[BaseException] = None) -> None:
        """Delivers everything queued, then ends the run: FINISHED, FAILED or KILLED.

        Raises :class:`TrackingError` (after ending the run as FAILED) when something queued
        could not be logged, so a run never looks complete in MLflow while it is not. Calls kept
        through a server outage that outlasted ``tracking.drain_timeout_s`` are spooled
        instead, with the run's final status, and a warning says how to deliver them.
        """
        if self.run_id is None:
            return
        self.finish_as(*ending_of(error))

    def finish_as(self, status: str, message: Optional[str]) -> None:
        """:meth:`finish` with the ending already worked out (see :func:`ending_of`)."""
        if self.run_id is None:
            return
        error = message is not None
        self._drain()
        if status == "FINISHED" and self._errors:
            status = "FAILED"
            message = "Could not log " + "; ".join(self._errors)
        tags = {"error": message[:5000]} if message else {}
        if self._outages or self._undelivered:
            tags["tfharness.tracking_outage"] = (
                f"store unreachable {len(self._outages) + bool(self._undelivered)} time(s); "
                f"{self._delayed} logging call(s) delayed"
                + (f", {len(self._undelivered)} spooled for `python -m tfharness.sync`"
                   if self._undelivered else ", all delivered late, none lost"))
        if self._undelivered:
            from tfharness.tracking import spool

            where = spool.spool_tail(self, self._undelivered, status, tags)
            log.warning("MLflow store %s still unreachable after %.0f s: %d logging calls and "
                        "the run's status %s are spooled in %s; deliver them with `python -m "
                        "tfharness.sync %s`", self.uri, self.cfg.drain_timeout_s,
                        len(self._undelivered), status, where, self.cfg.spool_dir)
        elif self.spooled_run:
            from tfharness.tracking import spool

            spool.spool_tail(self, [], status, tags)
        else:
            try:
                for key, value in tags.items():
                    self._client.set_tag(self.run_id, key, value)
                self._client.set_terminated(self.run_id, status=status)
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
                from tfharness.tracking import spool

                spool.spool_tail(self, [], status, tags)
        if not error and self._errors:
            raise TrackingError(f"MLflow run {self.run_id} is incomplete: {message[:2000]}")


class _PyfuncFlavor:
    """``mlflow.pyfunc`` as the flavor ``Model.log`` saves with (any object with a
    ``save_model``), minus ``validate_serving_input``: ``Model.log`` reads that option and then
    passes it on to ``save_model``, which ``mlflow.pyfunc.save_model`` refuses."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs):
        import mlflow.pyfunc

        return mlflow.pyfunc.save_model(**kwargs)


def ending_of(error: Optional[BaseException]) -> tuple:
    """The run status and ``error`` tag that ``error`` (None: success) ends a run with."""
    if error is None:
        return "FINISHED", None
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    return status, f"{type(error).__name__}: {error}"


def model_output_and_requirements(model, example: np.ndarray) -> tuple:
    """What logging ``model`` needs from TensorFlow: its output on ``example`` (for the
    signature) and the pip requirements to serve it, given explicitly (no inference)."""
    import keras
    import tensorflow as tf

    # The prediction runs in the training thread, while the model is known to be idle.
    output = np.asarray(model(example, training=False))
    return output, [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server could not be reached (worth a retry)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = f"{type(error).__name__}: {error}"
        if isinstance(error, (ConnectionError, TimeoutError)) or any(marker in text for marker in (
                "Connection refused", "Max retries exceeded", "ConnectionError",
                "Failed to establish a new connection", "Read timed out",
                "RemoteDisconnected", "Connection aborted")):
            return True
        error = error.__cause__ or error.__context__
    return False


def make_tracker(cfg: TrackingConfig) -> Tracker:
    """The run's tracker: none with ``tracking=off``; by default one in the tracking process
    (:mod:`tfharness.tracking_process`), else in a thread of this process."""
    if cfg.name == "off":
        return Tracker()
    if cfg.process:
        from tfharness.tracking.process import ProcessTracker

        try:
            return ProcessTracker(cfg)
        except OSError as error:  # no interpreter to start, no process slots left
            log.warning("Cannot start the tracking process (%s: %s); logging from a thread of "
                        "this process instead", type(error).__name__, error)
    tracker = in_process_tracker(cfg)
    from tfharness.tracking.mlflow_async import background_connect

    tracker._connecting = background_connect(tracker)
    return tracker


def in_process_tracker(cfg: TrackingConfig) -> "MlflowTracker":
    """The tracker that talks to MLflow from this process, as ``tracking.async_backend`` says."""
    if cfg.async_backend == "mlflow":
        from tfharness.tracking.mlflow_async import MlflowAsyncTracker

        return MlflowAsyncTracker(cfg)
    return MlflowTracker(cfg)


def run_tags(data: str, model: str, extra: Dict[str, str]) -> Dict[str, str]:
    tags = {"data": data, "model": model, "command": " ".join(sys.argv), **extra}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def markdown_table(rows: Iterable[Dict]) -> str:
    rows = list(rows)
    if not rows:
        return ""
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row[h]) for h in headers) + " |")
    return "\n".join(lines) + "\n"


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
