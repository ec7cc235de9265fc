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

import numpy as np

from tfharness.config import TrackingConfig
from tfharness.errors import TrackingError

# MLflow accepts at most 100 params per batch call.
PARAM_BATCH = 100
PARAM_VALUE_LIMIT = 6000
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


def sqlite_artifact_root(uri: str) -> Optional[str]:
    """Artifacts of a SQLite store go in ``mlartifacts/`` beside the database file.

    Without this MLflow would put them in ``./mlruns`` of whatever directory the run started in.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db_path = Path(uri[len(prefix):]).expanduser().resolve()
    return (db_path.parent / "mlartifacts").as_uri()


def open_experiment(cfg: TrackingConfig):
    """An MlflowClient on ``cfg.uri`` and the id of ``cfg.experiment``, created if missing.

    Creating the database and the experiment here, in one process, before any parallel job
    writes to them, is what keeps a fresh SQLite store from racing on its schema.
    """
    import mlflow

    client = mlflow.MlflowClient(cfg.uri)
    try:
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            return client, client.create_experiment(
                cfg.experiment, artifact_location=sqlite_artifact_root(cfg.uri))
        return client, experiment.experiment_id
    except Exception as exc:
        # Before any training: a store that cannot be reached is a setup error, not a crash.
        raise TrackingError(f"Cannot use the MLflow tracking store tracking.uri={cfg.uri!r} "
                            f"(experiment {cfg.experiment!r}): {type(exc).__name__}: "
                            f"{str(exc)[:500]}") from exc


class Tracker:
    """Records one run. This base class records nothing; see :class:`MlflowTracker`."""

    run_id: Optional[str] = None

    def __init__(self):
        # Logged model URIs by name, complete once finish() has returned.
        self.model_uris: Dict[str, str] = {}
        # Registered model versions by registered name, complete once finish() has returned.
        self.registered_versions: Dict[str, str] = {}

    def start(self, run_name: str, params: Dict[str, str], tags: Dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None:
        pass

    def epoch_logger(self, prefix: str, step_offset: int = 0):
        """A Keras callback logging ``<prefix>/<metric>`` at step ``step_offset + epoch``."""
        import keras

        return keras.callbacks.Callback()

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
    before any training. Everything after that (metrics, texts, tables, models) goes, in order,
    to one background thread, so the training loop never waits on the store: per-epoch metrics
    cost a queue put, and logging the pretrained model overlaps fine-tuning. :meth:`finish`
    drains the queue, then ends the run; a call that failed in the background fails the run.
    """

    def __init__(self, cfg: TrackingConfig):
        super().__init__()
        self.cfg = cfg
        self._client = None
        self._queue: "queue.Queue" = queue.Queue()
        self._worker: Optional[threading.Thread] = None
        self._errors: List[str] = []

    def start(self, run_name: str, params: Dict[str, str], tags: Dict[str, str]) -> None:
        import mlflow
        from mlflow.entities import Param

        mlflow.set_tracking_uri(self.cfg.uri)
        self._client, experiment_id = open_experiment(self.cfg)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                               tags={**tags, **self.cfg.tags})
        self.run_id = run.info.run_id
        items = [Param(k, v[:PARAM_VALUE_LIMIT]) for k, v in sorted(params.items())]
        try:
            for i in range(0, len(items), PARAM_BATCH):
                self._client.log_batch(self.run_id, params=items[i:i + PARAM_BATCH])
        except BaseException as error:
            self.finish(error)
            raise
        self._worker = threading.Thread(target=self._work, name="tfharness-tracking",
                                        daemon=True)
        self._worker.start()

    def _work(self) -> None:
        import mlflow

        # MLflow's active run is per thread: make this run the worker's active run too.
        try:
            mlflow.start_run(run_id=self.run_id)
            attached = None
        except Exception as exc:
            # Without it the fluent calls below would open a new run: log nothing, say so.
            attached = f"{type(exc).__name__}: {exc}"
        while True:
            job = self._queue.get()
            if job is None:
                return
            description, call = job
            if attached is not None:
                self._errors.append(f"{description}: not logged, run not resumable ({attached})")
                continue
            try:
                call()
            except Exception as exc:  # reported by finish(), never raised into training
                self._errors.append(f"{description}: {type(exc).__name__}: {exc}")

    def _submit(self, description: str, call) -> None:
        self._queue.put((description, call))

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._submit(f"metrics at step {step}",
                     lambda: self._client.log_batch(self.run_id, metrics=batch))

    def epoch_logger(self, prefix: str, step_offset: int = 0):
        import keras

        tracker = self

        class EpochLogger(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                metrics = {f"{prefix}/{k}": v for k, v in (logs or {}).items()
                           if np.isscalar(v) or np.ndim(v) == 0}
                tracker.log_metrics(metrics, step=step_offset + epoch)

        return EpochLogger()

    def log_text(self, text: str, artifact_file: str) -> None:
        import mlflow

        self._submit(f"text {artifact_file}", lambda: mlflow.log_text(text, artifact_file))

    def log_model(self, model, name: str, example: np.ndarray, artifact: Path,
                  tags: Optional[Dict[str, str]] = None,
                  extra_artifacts: Optional[Dict[str, Path]] = None) -> None:
        """Logs the saved ``artifact`` of ``model`` as an MLflow model, in the background.

        ``tags`` go on the logged model (its sha256, where it came from); ``extra_artifacts``
        travel beside the artifact (its sha256 record).

        ``mlflow.pyfunc.load_model`` predicts with it (see ``tfharness/mlflow_model.py``). The pip
        requirements are given explicitly: inferring them costs seconds per model (a subprocess
        that imports the model). The URI lands in :attr:`model_uris` once :meth:`finish` ran.
        """
        import keras
        import mlflow
        import tensorflow as tf
        from mlflow.models import infer_signature

        # The prediction runs here, in the training thread, while the model is known to be idle.
        signature = infer_signature(example, np.asarray(model(example, training=False)))
        requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]

        def log() -> None:
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts={"model": str(artifact),
                           **{k: str(v) for k, v in (extra_artifacts or {}).items()}},
                tags=dict(tags or {}),
                signature=signature,
                input_example=example,
                pip_requirements=requirements,
            )
            self.model_uris[name] = info.model_uri
            # Lets a sweep find the model of its best trial from the run alone.
            self._client.set_tag(self.run_id, f"{MODEL_URI_TAG}.{name}", info.model_uri)

        self._submit(f"model {name}", log)

    def set_tags(self, tags: Dict[str, str]) -> None:
        items = dict(tags)
        self._submit(f"tags {', '.join(items)}",
                     lambda: [self._client.set_tag(self.run_id, k, v) for k, v in items.items()])

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

        self._submit(f"registration of {name} as {registered_name!r}", register)

    def log_table(self, rows: List[Dict], artifact_file: str) -> None:
        import mlflow

        columns: Dict[str, list] = {}
        for row in rows:
            for key, value in row.items():
                columns.setdefault(key, []).append(value)
        self._submit(f"table {artifact_file}",
                     lambda: mlflow.log_table(data=columns, artifact_file=artifact_file))

    def finish(self, error: Optional[BaseException] = None) -> None:
        """Delivers everything queued, then ends the run: FINISHED, FAILED or KILLED.

        Raises :class:`TrackingError` (after ending the run as FAILED) when something queued
        could not be logged, so a run never looks complete in MLflow while it is not.
        """
        import mlflow

        if self.run_id is None:
            return
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        status = "FINISHED"
        message = None
        if error is not None:
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            message = f"{type(error).__name__}: {error}"
        elif self._errors:
            status = "FAILED"
            message = "Could not log " + "; ".join(self._errors)
        if message:
            try:
                self._client.set_tag(self.run_id, "error", message[:5000])
            except Exception:
                pass
        mlflow.end_run(status=status)
        if error is None and self._errors:
            raise TrackingError(f"MLflow run {self.run_id} is incomplete: {message[:2000]}")


def make_tracker(cfg: TrackingConfig) -> Tracker:
    return Tracker() if cfg.name == "off" else MlflowTracker(cfg)


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
