"""The runner: one experiment from config to MLflow, in the order a user would do it by hand.

1. validate the config and load the data (no TensorFlow yet, so bad input fails fast);
2. build the model and resolve every freeze selector, before any run is opened;
3. pretrain; 4. save atomically, reload into a fresh model, verify outputs;
5. fine-tune the *reloaded* model (new head, frozen layers, stages) and prove frozen weights
   did not move; 6. save, reload and verify again; 7. evaluate on the test split.

Steps 1-2 are in ``prepare``, 3 and 5 in ``train``, 4 and 6 in ``roundtrip``, 7 and what else a
run records in ``record``; ``ending`` decides how the run ends. ``pretrain_cache`` replaces steps
3-4 by an earlier run's verified pretrained model when one with the same ``fingerprint`` exists;
``promotion`` decides whether a registered version takes ``tracking.promote``'s alias.
``run(cfg)`` is plain Python: the CLI is a thin Hydra wrapper around it, and tests call it
directly.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from tfharness import heap
from tfharness import models as model_lib
from tfharness import tracking
from tfharness.artifacts import checkpoint as ckpt_lib
from tfharness.config import HarnessConfig, to_typed, validate
from tfharness.pipeline import (
    data_record,
    distribute,
    opening,
    outcome,
    prepare,
    pretrain_cache,
    promotion,
    record,
    roundtrip,
    train,
)
from tfharness.pipeline.context import RunContext, RunResult
from tfharness.pipeline.ending import run_ending

__all__ = ["run", "RunResult"]


def run(cfg: HarnessConfig | DictConfig, overrides: Sequence[str] = (), *,
        parent_run_id: Optional[str] = None, require_objective: bool = False,
        tags: Optional[Dict[str, str]] = None) -> RunResult:
    """Runs one experiment end to end and returns what it measured and wrote.

    With ``resume`` set, continues an interrupted run from its last completed epoch instead (see
    :mod:`tfharness.artifacts.checkpoint`).

    Args:
        cfg: a composed config (``DictConfig``) or a :class:`HarnessConfig`.
        overrides: the command-line overrides, recorded as an artifact and the default run name.
        parent_run_id: nest the MLflow run under this run (a sweep's parent run).
        require_objective: fail the run when ``sweep.objective`` is missing or not finite (a
            sweep trial: a NaN objective is a failed trial, recorded as a FAILED run).
        tags: extra MLflow run tags.
    """
    heap.collect_frozen_run()  # an earlier run's objects in this process, frozen with its imports
    resolved_yaml = OmegaConf.to_yaml(cfg, resolve=True) if isinstance(cfg, DictConfig) else None
    cfg = to_typed(cfg)
    validate(cfg)
    not_a_trial = distribute.sweep_error(cfg) if require_objective else None
    if not_a_trial is not None:
        raise not_a_trial
    cfg = distribute.for_this_worker(cfg)  # a multi_worker worker other than the chief: no record
    cfg_hash = ckpt_lib.config_hash(cfg)
    held = prepare.resume_target(cfg, cfg_hash)  # a resumed run's checkpoints, locked
    resumed = held.state if held is not None else None
    # TensorFlow imports on a thread while this one loads the data; the tracker then opens the
    # store (imports MLflow, checks the schema) on another, while this one builds the model.
    importer = prepare.import_tensorflow_meanwhile()
    tracker = tracking.make_tracker(cfg.tracking, after=importer)
    # The run sets its dtype policy (prepare); the caller's comes back when it ends.
    with model_lib.restoring_policy(importer), \
            run_ending(tracker, importer, held) as ending:
        ctx = prepare.prepare(cfg, tracker, cfg_hash, resumed, overrides, resolved_yaml,
                              importer)
        opening.open_run(ctx, parent_run_id, tags or {})
        opening.end_abandoned_runs(ctx)
        ending.ckpt = ctx.ckpt = opening.open_checkpoints(ctx, held)
        with ckpt_lib.interrupt_on_signals():
            final_model, final_split = _phases(ctx)
            record.test_metrics(ctx, final_model, final_split)
            record.transfer_gain(ctx, final_model, final_split)
            record.gather_results(ctx)
            if require_objective:
                ctx.result.objective = record.objective(cfg, ctx.result.metrics)
                tracker.log_metrics({"objective": ctx.result.objective})
            _register(ctx, final_model, final_split)
            outcome.record_outcome(ctx)
    result = ctx.result
    result.model_uris.update(tracker.model_uris)
    result.registered_versions.update(tracker.registered_versions)
    if cfg.print_report:
        record.print_report(result.report, result.metrics, result.run_id, cfg,
                            data_record.classes_markdown(ctx), result.pretrain_reused_from)
        if result.promotion is not None and cfg.tracking.register:
            promotion.print_decision(result.promotion)
    return result


def _register(ctx: RunContext, final_model, final_split) -> None:
    """``tracking.register`` (with ``tracking.promote``: the alias only for a better model);
    a sweep trial with ``sweep.register_best`` measures the comparison its sweep decides on."""
    cfg = ctx.cfg
    name = cfg.tracking.register or (cfg.sweep.register_best if ctx.parent_run_id else None)
    decision = None
    if cfg.tracking.promote and name:
        decision = ctx.result.promotion = promotion.compare(ctx, final_model, final_split, name)
        promotion.record(ctx.tracker, decision, decided=bool(cfg.tracking.register))
    if cfg.tracking.register:
        ctx.tracker.register_model("finetuned" if cfg.finetune.enabled else "pretrained",
                                   cfg.tracking.register,
                                   alias=decision.alias if decision and decision.promoted
                                   else None)


def _phases(ctx: RunContext):
    """Steps 3-6: pretrain (or record the source), save and verify, fine-tune, save and verify;
    skips what an earlier process of a resumed run did. Returns the final model and its data."""
    if ctx.ckpt.state.resumes:
        record.deliver_missing(ctx)
    record.log_texts(ctx)
    if ctx.source is not None:
        record.record_source(ctx)
        # This saves the loaded model in tfharness' format and reloads it, so fine-tuning
        # starts from a verified model exactly as it does after pretraining.
        step = roundtrip.model_step(ctx.cfg, "pretrained", ctx.source)
        reloaded = roundtrip.round_trip(ctx, ctx.model, "pretrained", step, ctx.probe)
    else:
        reloaded = _pretrained(ctx)
    if not ctx.cfg.finetune.enabled:
        return reloaded, ctx.data.pretrain
    tuned = train.finetune(ctx, reloaded)
    probe = roundtrip.probe_batch(ctx.data.finetune, ctx.cfg.save_format.verify_batch_size)
    step = roundtrip.model_step(ctx.cfg, "finetuned", ctx.source)
    final_model = roundtrip.round_trip(ctx, tuned, "finetuned", step, probe)
    record.layer_report(ctx, final_model)
    return final_model, ctx.data.finetune


def _pretrained(ctx: RunContext):
    """Steps 3-4, or the verified pretrained model of an earlier run with the same fingerprint
    (``pretrain_cache``). Returns the model fine-tuning starts from."""
    ckpt = ctx.ckpt
    started = ckpt.done("saved:pretrained") or ckpt.state.phase_epochs("pretrain") > 0
    found = pretrain_cache.reused_before(ctx) or (
        None if started else pretrain_cache.find_or_claim(ctx))
    if found is not None:
        return pretrain_cache.reuse(ctx, found)
    if ctx.fingerprint is not None and not started:
        # Marks the run that later runs with this fingerprint may reuse (once it FINISHED).
        ctx.tracker.set_tags({pretrain_cache.PRETRAIN_TAG: "trained"})
    train.pretrain(ctx)
    step = roundtrip.model_step(ctx.cfg, "pretrained", ctx.source)
    return roundtrip.round_trip(ctx, ctx.model, "pretrained", step, ctx.probe)
