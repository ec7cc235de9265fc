"""Opening the run: the MLflow run with its params and tags, and the run's checkpoint folder."""

from __future__ import annotations

import logging
import uuid
from typing import Dict, Optional

from tfharness import sources as sources_lib
from tfharness import tracking
from tfharness.artifacts import checkpoint as ckpt_lib
from tfharness.config import flatten
from tfharness.config.targets import option_name
from tfharness.pipeline import data_record
from tfharness.pipeline.context import RunContext
from tfharness.tracking import naming
from tfharness.tracking import record as run_record

log = logging.getLogger("tfharness")


def open_run(ctx: RunContext, parent_run_id: Optional[str], extra_tags: Dict[str, str]) -> None:
    """Starts (or, resuming, reopens) the MLflow run with the config as params."""
    cfg, source = ctx.cfg, ctx.source
    data_name, model_name = option_name(cfg.data), option_name(cfg.model)
    ctx.run_name = cfg.tracking.run_name or naming.run_name(
        ctx.overrides, fallback=f"{data_name}-{model_name}")
    # With a source, the model group played no part: the tag says what the model came from.
    model_tag = model_name if source is None else f"source:{source.kind}"
    tags = tracking.run_tags(data_name, model_tag, {
        "save_format": cfg.save_format.name, "finetune": cfg.finetune.name,
        "replicas": str(ctx.strategy.num_replicas_in_sync),
        "tfharness.config_hash": ctx.config_hash, **extra_tags,
        **({"model_logging": "skipped: save_format.in_memory=true writes no model file"}
           if cfg.save_format.in_memory and cfg.tracking.log_models else {})})
    if parent_run_id:
        # MLflow's UI nests a run under the run this tag names.
        tags["mlflow.parentRunId"] = parent_run_id
    # Params: what defines the model and its training; the folders go to tags, the rest of the
    # operational settings are in the config.yaml artifact.
    params, operational = run_record.split_params(flatten(cfg))
    tags.update(operational)
    if source is not None:
        ctx.lineage = sources_lib.lineage_tags(source)
        tags.update(ctx.lineage)
        params["source"] = source.artifact.location
    resumed, tracker = ctx.resumed, ctx.tracker
    same_store = resumed is not None and resumed.tracking_uri == cfg.tracking.uri
    tracker.start(ctx.run_name, params, tags,
                  resume_run_id=resumed.run_id if same_store and tracker.run_id is None
                  and cfg.tracking.name != "off" else None)
    data_record.log_data(ctx)


def end_abandoned_runs(ctx: RunContext) -> None:
    """Marks runs whose process died while RUNNING as KILLED (found by this later run)."""
    cfg, resumed = ctx.cfg, ctx.resumed
    for abandoned in ckpt_lib.abandoned_runs(cfg.checkpoint_root):
        if resumed is not None and abandoned.run_id == resumed.run_id:
            continue
        if abandoned.tracking_uri == cfg.tracking.uri:
            ctx.tracker.mark_abandoned(abandoned.run_id,
                                       "its process died while the run was RUNNING")
        ckpt_lib.RunCheckpoints(cfg.checkpoint_root, abandoned).end(
            "killed", "process died (found by a later run)")


def open_checkpoints(ctx: RunContext,
                     held: Optional[ckpt_lib.RunCheckpoints]) -> ckpt_lib.RunCheckpoints:
    """Holds the run's checkpoint folder for this process (``held``: a resumed run's own,
    locked already)."""
    cfg, tracker = ctx.cfg, ctx.tracker
    if held is not None:
        ckpt = held
    else:
        state = ckpt_lib.RunState(run_id=tracker.run_id or f"local-{uuid.uuid4().hex}",
                                  config_hash=ctx.config_hash, output_dir=str(cfg.output_dir),
                                  # The store the run really is in: a spooled run's is the
                                  # spool, so resuming it on the server starts a server run.
                                  tracking_uri=getattr(tracker, "uri", "") if tracker.run_id
                                  else "",
                                  experiment=cfg.tracking.experiment)
        ckpt = ckpt_lib.RunCheckpoints(cfg.checkpoint_root, state)
        ckpt.acquire()
    ctx.result.run_id = tracker.run_id
    if tracker.run_id:
        log.info("MLflow run %s ('%s') in experiment '%s' at %s", tracker.run_id, ctx.run_name,
                 cfg.tracking.experiment, cfg.tracking.uri)
    return ckpt
