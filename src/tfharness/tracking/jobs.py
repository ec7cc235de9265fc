"""The logging calls a tracker queues: one small dataclass per kind, each able to deliver itself.

A job is delivered to a client and run id that it is given, so the same job goes to the tracking
store or, when that stays unreachable, to the spool (:mod:`tfharness.tracking.spool`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from tfharness.tracking.retries import retrying
from tfharness.tracking.models import (MODEL_URI_TAG, ModelSpec, link_model_metrics,
                                       log_model_spec, model_id_of)


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
class LinkJob(Job):
    """Links the run's latest figures ``keys`` to its logged model ``name``."""

    name: str
    keys: List[str]
    model_uris: Dict[str, str]  # the tracker's, as filled by earlier ModelJobs

    def deliver(self, client, run_id: str) -> None:
        model_id = model_id_of(client, run_id, self.name, self.model_uris)
        link_model_metrics(client, run_id, model_id, self.keys)


@dataclass
class FigureJob(Job):
    """Draws ``data`` with ``plots.DRAWERS[kind]`` and logs the PNG as ``file``."""

    kind: str
    data: Dict
    file: str

    def deliver(self, client, run_id: str) -> None:
        from tfharness.tracking import plots

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(self.file).name
            plots.DRAWERS[self.kind](self.data, path)
            client.log_artifact(run_id, str(path), str(Path(self.file).parent))


@dataclass
class InputsJob(Job):
    """Records the run's datasets (``DatasetRecord.to_dict()`` of :mod:`tfharness.data.records`)."""

    datasets: List[Dict[str, Optional[str]]]

    def deliver(self, client, run_id: str) -> None:
        # MLflow's store looks a dataset up, then inserts it when it was not there: runs that
        # log the same new dataset at once (a parallel sweep) race, and all but one get the
        # table's unique-key error. The dataset exists after that, so the call is tried again.
        retrying(lambda: client.log_inputs(run_id, datasets=dataset_inputs(self.datasets)),
                 is_duplicate_key, what="Datasets lost the race to insert them",
                 attempts=DATASET_RACE_ATTEMPTS, first_delay_s=0.05, max_delay_s=0.4,
                 level=logging.DEBUG)


# How often a dataset's logging is tried when it lost the race to insert the dataset.
DATASET_RACE_ATTEMPTS = 5
# How SQLite, PostgreSQL and MySQL word a unique-key violation (MLflow passes the text on).
DUPLICATE_KEY_WORDS = ("UNIQUE constraint failed", "UniqueViolation", "duplicate key value",
                       "Duplicate entry")


def is_duplicate_key(error: BaseException) -> bool:
    """Whether the store refused a call because another writer inserted the same row first."""
    return any(words in str(error) for words in DUPLICATE_KEY_WORDS)


def dataset_inputs(datasets: List[Dict[str, Optional[str]]]) -> list:
    """MLflow's dataset inputs for plain descriptions, each tagged with its context."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return [DatasetInput(Dataset(name=d["name"], digest=d["digest"],
                                 source_type=d["source_type"], source=d["source"],
                                 schema=d.get("schema"), profile=d.get("profile")),
                         tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])])
            for d in datasets]


@dataclass
class CallJob(Job):
    """Anything else that must happen in order with the calls before it (a registration)."""

    call: Callable[[], None]

    def deliver(self, client, run_id: str) -> None:
        self.call()
