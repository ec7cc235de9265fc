"""The spool: a local MLflow store that keeps what a tracking server could not take.

Two cases put a run here (see :class:`tfharness.tracking.MlflowTracker`):

* the server is unreachable when the run starts and ``tracking.on_unavailable=spool``: the whole
  run is logged to ``<tracking.spool_dir>/spool.db`` and tagged with the server it was meant for;
* the server goes down mid-run and stays down past ``tracking.drain_timeout_s``: the calls still
  queued (and the run's final status) go to a *tail* run in the spool, tagged with the server run
  they belong to.

``python -m tfharness.sync`` (:mod:`tfharness.sync`) replays both onto the server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from tfharness.config import TrackingConfig
from tfharness.tracking.store import open_experiment
from tfharness.tracking.jobs import CallJob, Job, LinkJob, ModelJob, TagsJob
from tfharness.tracking.models import ModelSpec

TARGET_URI = "tfharness.spool.target_uri"
TARGET_RUN = "tfharness.spool.target_run_id"
FINAL_STATUS = "tfharness.spool.final_status"
SPOOL_REASON = "tfharness.spool.reason"
SYNCED_TO = "tfharness.spool.synced_to"
TAG_PREFIX = "tfharness.spool.tag."
MODELS_FILE = "tfharness-spool/models.json"
DB_NAME = "spool.db"


def spool_uri(spool_dir: str) -> str:
    return f"sqlite:///{(Path(spool_dir).expanduser().resolve() / DB_NAME)}"


def model_spec_json(specs: List[ModelSpec]) -> str:
    """The model-logging calls of a spooled run, replayable from the saved artifacts on disk."""
    return json.dumps([spec.to_json() for spec in specs])


def model_specs_of(text: str) -> List[ModelSpec]:
    return [ModelSpec.from_json(data) for data in json.loads(text)]


def spool_tail(cfg: TrackingConfig, run_id: str, spooled_run: bool, jobs: List[Job],
               models: List[ModelSpec], status: str, tags: Dict[str, str]) -> str:
    """Ends ``run_id`` in the spool store: delivers ``jobs`` there and records the run's final
    ``status`` and ``tags``, for the sync to set on the server.

    A run spooled whole (``spooled_run``) is in the spool already, with its ``models``; for a
    server run, the calls the server never got go to a new *tail* run that names it.
    """
    Path(cfg.spool_dir).mkdir(parents=True, exist_ok=True)
    uri = spool_uri(cfg.spool_dir)
    client, experiment_id = open_experiment(uri, cfg.experiment)
    if not spooled_run:
        server_run = run_id
        run_id = client.create_run(experiment_id, run_name=f"tail of {server_run}", tags={
            TARGET_URI: cfg.uri, TARGET_RUN: server_run}).info.run_id
        models, skipped = [], []
        for job in jobs:
            if isinstance(job, ModelJob):
                models.append(job.spec)
            elif isinstance(job, TagsJob):
                tags = {**job.tags, **tags}  # set on the server run by the sync
            elif isinstance(job, (CallJob, LinkJob)):
                # A model registration, or figures linked to a logged model, need the server's
                # registry and models: they cannot wait in a spool.
                skipped.append(job.description)
            else:
                job.deliver(client, run_id)
        if skipped:
            tags = {**tags, "tfharness.not_spooled": "; ".join(skipped)}
    if models:
        client.log_text(run_id, model_spec_json(models), MODELS_FILE)
    for key, value in tags.items():
        client.set_tag(run_id, TAG_PREFIX + key, value)
    client.set_tag(run_id, FINAL_STATUS, status)
    client.set_terminated(run_id, status=status if spooled_run else "FINISHED")
    return uri
