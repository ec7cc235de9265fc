"""The spool: a local MLflow store that keeps what a tracking server could not take.

Two cases put a run here (see ``tracking.MlflowTracker``):

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

from tfharness.tracking import store

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


def model_spec_json(specs: List[Dict]) -> str:
    """The model-logging calls of a spooled run, replayable from the saved artifacts on disk."""
    return json.dumps([{"name": s["name"], "artifact": s["artifact"],
                        "signature": s["signature"].to_dict() if s["signature"] else None,
                        "example": s["example"].tolist(),
                        "requirements": s["requirements"], "tags": s.get("tags") or {},
                        "extra_artifacts": s.get("extra_artifacts") or {}} for s in specs])


def spool_tail(tracker, jobs: List[list], status: str, tags: Dict[str, str]) -> str:
    """Writes ``jobs`` and the run's final ``status`` and ``tags`` into the spool store."""

    Path(tracker.cfg.spool_dir).mkdir(parents=True, exist_ok=True)
    uri = spool_uri(tracker.cfg.spool_dir)
    client, experiment_id = store.open_experiment(uri, tracker.cfg.experiment)
    if tracker.spooled_run:
        run_id = tracker.run_id
        models = list(tracker.model_specs)
    else:
        run_id = client.create_run(experiment_id, run_name=f"tail of {tracker.run_id}", tags={
            TARGET_URI: tracker.cfg.uri, TARGET_RUN: tracker.run_id}).info.run_id
        models, skipped = [], []
        for job in jobs:
            if job[0] == "model":
                models.append(job[2])
            elif job[0] == "tags":
                tags = {**job[2], **tags}  # set on the server run by the sync
            elif job[0] in ("call", "link"):
                # A model registration, or figures linked to a logged model, need the server's
                # registry and models: they cannot wait in a spool.
                skipped.append(job[1])
            else:
                tracker.deliver(job, client, run_id)
        if skipped:
            tags = {**tags, "tfharness.not_spooled": "; ".join(skipped)}
    if models:
        client.log_text(run_id, model_spec_json(models), MODELS_FILE)
    for key, value in tags.items():
        client.set_tag(run_id, TAG_PREFIX + key, value)
    client.set_tag(run_id, FINAL_STATUS, status)
    client.set_terminated(run_id, status=status if tracker.spooled_run else "FINISHED")
    return uri
