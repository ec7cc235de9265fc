"""Pretrain once, fine-tune many: reuse the pretrained model of an earlier run with the same
pretraining fingerprint (:mod:`tfharness.pipeline.fingerprint`).

``pretrain_cache`` (top-level key):

- ``auto``: a FINISHED run in the same MLflow store (any experiment) that pretrained, logged and
  verified its ``pretrained`` model under the same fingerprint is reused: its model is loaded
  from MLflow (sha256 checked, as a ``source=mlflow`` model is), pretraining is skipped, and the
  run fine-tunes it. Its pretraining metrics stay on the run that measured them: the reusing run
  names it in ``tfharness.pretrain_reused_from`` and links its model as an input.
- ``refresh``: pretrain, whatever the store holds; later runs reuse this one (the newest).
- ``off``: always pretrain, and never make other jobs wait.

In a sweep, jobs with the same fingerprint pretrain once even when they run at the same time:
each one that finds nothing to reuse claims the pretraining by logging the param
``tfharness.pretrain_claim.<fingerprint>`` on the sweep's parent run, with its own run id. MLflow
params are write-once (the store refuses another value for a logged key), so on any store and
any launcher exactly one job's claim lands; the others wait for that job's pretrained model, up
to ``pretrain_wait_s``, and fail with a clear error if its run fails first.

The cache applies to runs that pretrain from scratch and then fine-tune, with tracking on and
models logged to a file (``save_format.in_memory=false``): anything else always pretrains.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from tfharness import sources as sources_lib
from tfharness.config import MlflowSourceConfig
from tfharness.errors import HarnessError
from tfharness.pipeline.context import RunContext
from tfharness.pipeline.fingerprint import FINGERPRINT_TAG
from tfharness.tracking.models import MODEL_URI_TAG

log = logging.getLogger("tfharness")

# "trained": this run pretrained (a run later runs may reuse); "reused": it did not.
PRETRAIN_TAG = "tfharness.pretrain"
REUSED_FROM_TAG = "tfharness.pretrain_reused_from"
REUSED_MODEL_TAG = "tfharness.pretrain_reused_model"
CLAIM_PARAM = "tfharness.pretrain_claim"
SHA256_PRETRAINED_TAG = "tfharness.sha256.pretrained"
REUSE_REPORT = "reports/pretrain_reused.md"
POLL_S = 1.0


@dataclass
class Reusable:
    """A run whose verified pretrained model this run can start from."""

    run_id: str
    model_uri: str
    run_name: str = ""
    metrics: Optional[Dict[str, float]] = None


def why_not(ctx: RunContext) -> Optional[str]:
    """Why the cache does not apply to this run (None: it does)."""
    cfg = ctx.cfg
    if cfg.pretrain_cache == "off":
        return "pretrain_cache=off"
    if cfg.trainer.strategy == "multi_worker":
        # Every worker runs every step, and the workers other than the chief never see the
        # store: a chief that skipped pretraining would wait in fine-tuning for workers that
        # pretrain.
        return "trainer.strategy=multi_worker: every worker pretrains"
    if ctx.source is not None or ctx.fingerprint is None:
        return "the run starts from a source"
    if not cfg.finetune.enabled:
        return "the run does not fine-tune (its pretraining is the whole run)"
    if cfg.tracking.name == "off" or not ctx.tracker.run_id:
        return "tracking is off"
    if getattr(ctx.tracker, "spooled_run", False):
        return "the MLflow store is unreachable (the run is spooled)"
    if not cfg.tracking.log_models or cfg.save_format.in_memory:
        return "no pretrained model is logged (tracking.log_models=false or save_format.in_memory)"
    return None


def usable(run) -> Optional[Reusable]:
    """The run's verified pretrained model, if it logged one (its sha256 and its URI)."""
    tags = run.data.tags
    uri = tags.get(f"{MODEL_URI_TAG}.pretrained")
    if not uri or not tags.get(SHA256_PRETRAINED_TAG) or tags.get(PRETRAIN_TAG) != "trained":
        return None
    return Reusable(run.info.run_id, uri, run.info.run_name,
                    {k: v for k, v in run.data.metrics.items() if k.startswith("pretrain/")})


def find_finished(client, digest: str) -> Optional[Reusable]:
    """The newest FINISHED run of the store that pretrained under fingerprint ``digest``."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(ViewType.ACTIVE_ONLY)]
    if not experiments:
        return None
    runs = client.search_runs(
        experiments, filter_string=f"tags.`{FINGERPRINT_TAG}` = '{digest}' and "
                                   f"tags.`{PRETRAIN_TAG}` = 'trained' and "
                                   f"attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=50)
    return next((found for found in map(usable, runs) if found is not None), None)


def claim(client, parent_run_id: str, digest: str, run_id: str) -> str:
    """Claims this sweep's pretraining under ``digest`` for ``run_id``; returns the holder."""
    from mlflow.exceptions import MlflowException

    key = f"{CLAIM_PARAM}.{digest[:16]}"
    try:
        client.log_param(parent_run_id, key, run_id)
        return run_id
    except MlflowException:
        # Another job's claim landed first (params are write-once): it is the holder.
        holder = client.get_run(parent_run_id).data.params.get(key)
        if holder is None:
            raise
        return holder


def holder_state(client, holder: str) -> Tuple[Optional[Reusable], str, str, str]:
    """Run ``holder``'s verified pretrained model (None: not yet), status, name and error."""
    run = client.get_run(holder)
    return (usable(run), run.info.status, run.info.run_name,
            run.data.tags.get("error", "no error recorded"))


def wait_for(query: Callable, holder: str, wait_s: float, digest: str) -> Reusable:
    """Waits until run ``holder`` has logged its verified pretrained model.

    ``query``: :meth:`~tfharness.tracking.Tracker.query` (or any callable that returns
    ``function(client, *args)``).
    """
    deadline = time.monotonic() + wait_s
    logged = False
    while True:
        found, status, name, error = query(holder_state, holder)
        if found is not None:
            return found
        where = f"run {holder} ('{name}'), which pretrains fingerprint {digest[:16]}"
        if status in ("FAILED", "KILLED"):
            raise HarnessError(f"pretrain_cache: {where} for this sweep, ended {status} "
                               f"({error[:300]}) "
                               f"before logging its pretrained model; this job does not "
                               f"pretrain again. Rerun the sweep, or use pretrain_cache=off.")
        if status == "FINISHED":
            raise HarnessError(f"pretrain_cache: {where}, finished without a verified "
                               f"pretrained model to reuse.")
        if time.monotonic() > deadline:
            raise HarnessError(f"pretrain_cache: waited pretrain_wait_s={wait_s:g} s for {where} "
                               f"(still {status}); raise pretrain_wait_s, or use "
                               f"pretrain_cache=off.")
        if not logged:
            logged = True
            log.info("pretrain_cache: waiting for %s", where)
        time.sleep(POLL_S)


def find_or_claim(ctx: RunContext) -> Optional[Reusable]:
    """What this run reuses (None: it pretrains, and is tagged as the one that did)."""
    reason = why_not(ctx)
    if reason is not None:
        if ctx.cfg.pretrain_cache != "off":
            log.info("pretrain_cache: not used (%s)", reason)
        return None
    # The store is asked where the tracker talks to it: MLflow stays out of this process when
    # a tracking process runs (tfharness.tracking.process).
    query, digest = ctx.tracker.query, ctx.fingerprint.digest
    found = None
    if ctx.cfg.pretrain_cache == "auto":
        found = query(find_finished, digest)
    if found is None and ctx.parent_run_id:
        holder = query(claim, ctx.parent_run_id, digest, ctx.tracker.run_id)
        if holder != ctx.tracker.run_id:
            found = wait_for(query, holder, ctx.cfg.pretrain_wait_s, digest)
    return found


def load(ctx: RunContext, found: Reusable):
    """Loads the reused model from MLflow (sha256 checked, outputs verified); returns it."""
    cfg = ctx.cfg
    loaded = sources_lib.load_source(
        MlflowSourceConfig(uri=found.model_uri), tracking_uri=ctx.tracker.uri,
        workdir=Path(cfg.output_dir) / "pretrained_reused", input_shape=ctx.data.input_shape,
        probe=ctx.probe, atol=cfg.save_format.verify_atol)
    log.info("pretrain_cache: reusing the pretrained model of run %s ('%s'), %s; sha256 %s",
             found.run_id, found.run_name, found.model_uri, loaded.integrity)
    return loaded


def report(found: Reusable, fingerprint: str, integrity: str) -> str:
    """Markdown for ``reports/pretrain_reused.md``: where the pretraining came from."""
    lines = [f"# Pretraining reused from run {found.run_id}", "",
             f"- run: {found.run_id} ('{found.run_name}')",
             f"- model: {found.model_uri}",
             f"- sha256: {integrity}",
             f"- pretrain fingerprint: {fingerprint}", "",
             "Its pretraining metrics, as measured in that run:", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in sorted((found.metrics or {}).items())]
    return "\n".join(lines) + "\n"


def reuse(ctx: RunContext, found: Reusable):
    """Loads ``found``'s pretrained model and records on this run where it came from; returns
    the model fine-tuning starts from."""
    loaded = load(ctx, found)
    ctx.pretrain_reused_from = ctx.result.pretrain_reused_from = found.run_id
    lineage = {PRETRAIN_TAG: "reused", REUSED_FROM_TAG: found.run_id,
               REUSED_MODEL_TAG: found.model_uri}
    # The fine-tuned model carries them too, as a model fine-tuned from a source does.
    ctx.lineage.update({REUSED_FROM_TAG: found.run_id, REUSED_MODEL_TAG: found.model_uri})
    ctx.result.artifacts["pretrained"] = loaded.artifact.path
    if ctx.ckpt.done("pretrain-reused"):
        return loaded.model
    ctx.ckpt.complete("pretrain-reused", pretrain_reused=dict(vars(found)))
    ctx.tracker.set_tags(lineage)
    model_id = loaded.artifact.lineage.get("tfharness.source_model_id")
    if model_id:
        ctx.tracker.log_model_input(model_id)
    ctx.tracker.log_text(report(found, ctx.fingerprint.digest, loaded.integrity), REUSE_REPORT)
    return loaded.model


def reused_before(ctx: RunContext) -> Optional[Reusable]:
    """What an earlier process of this (resumed) run reused, if it did."""
    values = ctx.ckpt.state.values.get("pretrain_reused")
    return Reusable(**values) if values else None
