"""The logging calls a tracker queues: one small dataclass per kind, each able to deliver itself.

A job is delivered to a client and run id that it is given, so the same job goes to the tracking
store or, when that stays unreachable, to the spool (:mod:`tfharness.tracking.spool`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

from tfharness.tracking.models import MODEL_URI_TAG, ModelSpec, log_model_spec


@dataclass
class Job:
    """A logging call; ``description`` names it in errors ("metrics at step 3")."""

    description: str

    def deliver(self, client, run_id: str) -> None:
        raise NotImplementedError


@dataclass
class MetricsJob(Job):
    metrics: List  # mlflow.entities.Metric

    def deliver(self, client, run_id: str) -> None:
        client.log_batch(run_id, metrics=self.metrics)


@dataclass
class TextJob(Job):
    text: str
    file: str

    def deliver(self, client, run_id: str) -> None:
        client.log_text(run_id, self.text, self.file)


@dataclass
class TableJob(Job):
    columns: Dict[str, list]
    file: str

    def deliver(self, client, run_id: str) -> None:
        client.log_table(run_id, data=self.columns, artifact_file=self.file)


@dataclass
class TagsJob(Job):
    tags: Dict[str, str]

    def deliver(self, client, run_id: str) -> None:
        for key, value in self.tags.items():
            client.set_tag(run_id, key, value)


@dataclass
class ModelJob(Job):
    """Logs a model; ``logged(name, uri)`` is told its URI."""

    spec: ModelSpec
    logged: Callable[[str, str], None]

    def deliver(self, client, run_id: str) -> None:
        uri = log_model_spec(self.spec, run_id)
        self.logged(self.spec.name, uri)
        # Lets a sweep find the model of its best trial from the run alone.
        client.set_tag(run_id, f"{MODEL_URI_TAG}.{self.spec.name}", uri)


@dataclass
class CallJob(Job):
    """Anything else that must happen in order with the calls before it (a registration)."""

    call: Callable[[], None]

    def deliver(self, client, run_id: str) -> None:
        self.call()
