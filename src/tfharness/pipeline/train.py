"""Steps 3 and 5: pretraining and fine-tuning, each resumable from its last completed epoch."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, List, Sequence

from tfharness import data as data_lib
from tfharness import finetune as ft_lib
from tfharness import models as model_lib
from tfharness import sources as sources_lib
from tfharness.artifacts import checkpoint as ckpt_lib
from tfharness.pipeline import distribute
from tfharness.pipeline.context import RunContext

log = logging.getLogger("tfharness")


def fit(model, split: data_lib.Split, *, epochs: int, batch_size: int, seed: int,
        callbacks: Sequence, verbose: int, initial_epoch: int = 0) -> tuple:
    """Trains epochs ``initial_epoch..epochs-1``; returns (wall time and throughput of ``fit``,
    the last epoch's metrics).

    Epoch ``e`` is shuffled by ``(seed, e)`` alone, so a run resumed at ``e`` trains on the same
    batches as one that was never interrupted.
    """
    todo = epochs - initial_epoch
    if todo <= 0:
        return {}, {}
    train = data_lib.make_dataset(split.train, batch_size, shuffle=True, seed=seed,
                                  epochs=(initial_epoch, epochs))
    val = (data_lib.make_dataset(split.val, batch_size, shuffle=False, seed=seed,
                                 pad_to_multiple=replicas(model))
           if len(split.val[0]) else None)
    start = time.perf_counter()
    history = model.fit(train, validation_data=val, epochs=epochs, initial_epoch=initial_epoch,
                        steps_per_epoch=data_lib.steps_per_epoch(split.train, batch_size),
                        callbacks=list(callbacks), verbose=verbose,
                        shuffle=False)  # the tf.data pipeline already shuffles, seeded
    seconds = time.perf_counter() - start
    last = {k: float(v[-1]) for k, v in history.history.items() if v}
    return ({"train_seconds": seconds,
             "samples_per_second": len(split.train[0]) * todo / seconds}, last)


def replicas(model) -> int:
    """How many replicas the model trains on (1 unless built under a multi-replica strategy)."""
    return model.distribute_strategy.num_replicas_in_sync


def evaluate(model, split: data_lib.Split, batch_size: int) -> Dict[str, float]:
    """The model's loss and metrics on the split's test part ({} when it has none)."""
    if not len(split.test[0]):
        return {}
    if not model.compiled:
        # A model straight from disk has no loss or metrics yet; the optimizer is irrelevant here.
        model_lib.compile_model(model, "sgd", 0.0)
    test = data_lib.make_dataset(split.test, batch_size, shuffle=False, seed=0,
                                 pad_to_multiple=replicas(model))
    return {k: float(v) for k, v in model.evaluate(test, verbose=0, return_dict=True).items()}


def pretrain(ctx: RunContext) -> None:
    """Pretrains from the last completed epoch (all of them in a new run), then evaluates."""
    cfg, ckpt, model, tracker = ctx.cfg, ctx.ckpt, ctx.model, ctx.tracker
    split = ctx.data.pretrain
    with ctx.strategy.scope():
        model_lib.compile_model(model, cfg.trainer.optimizer, cfg.trainer.learning_rate)
    if ckpt.done("saved:pretrained"):
        return
    with ctx.strategy.scope():
        done = ckpt.restore(model, "pretrain")
    speed, last_epoch = fit(model, split, epochs=cfg.trainer.epochs,
                            batch_size=cfg.trainer.batch_size, seed=cfg.trainer.seed,
                            verbose=cfg.trainer.verbose, initial_epoch=done,
                            callbacks=[ckpt_lib.epoch_checkpointer(ckpt, tracker, "pretrain",
                                                                   "pretrain",
                                                                   label="pretraining")])
    # The last epoch's values, for callers comparing runs (sweep objectives); the histories
    # themselves are in MLflow.
    ctx.result.metrics.update({f"pretrain/{k}": v for k, v in last_epoch.items()})
    if ckpt.done("pretrain-test"):
        return
    pretrain_test = evaluate(model, split, cfg.trainer.batch_size)
    measured = {**{f"pretrain/test_{k}": v for k, v in pretrain_test.items()},
                **{f"pretrain/{k}": v for k, v in speed.items()}}
    ckpt.complete("pretrain-test", measured, cfg.trainer.epochs)
    tracker.log_metrics(measured, step=cfg.trainer.epochs)
    ctx.result.metrics.update(measured)
    log.info("pretrain: %d epochs on %d samples, test accuracy %.4f", cfg.trainer.epochs,
             len(split.train[0]), pretrain_test.get("accuracy", float("nan")))


def finetune(ctx: RunContext, pretrained):
    """Fine-tunes the reloaded model stage by stage; returns it (None if an earlier process of
    this run saved the fine-tuned model already) and records the layer report rows."""
    if ctx.ckpt.done("saved:finetuned"):
        tuned, speed = None, {}
        reports = [ft_lib.StageReport(**ctx.ckpt.state.values[f"finetune-stage:{i}"])
                   for i in range(len(ctx.frozen_by_stage))]
    else:
        tuned, reports, speed = _finetune_stages(ctx, pretrained)
    ctx.result.metrics.update(speed)
    ctx.result.report = [row for report in reports for row in report.rows]
    ctx.result.metrics["finetune/frozen_weight_change_max"] = max(
        r.frozen_weight_change_max for r in reports)
    return tuned


def _finetune_stages(ctx: RunContext, pretrained) -> tuple:
    cfg, ckpt = ctx.cfg, ctx.ckpt
    head = cfg.finetune.new_head()
    # Reseeded so the new head starts from the same weights whether or not this process also
    # pretrained (a resumed run may start here).
    import keras

    keras.utils.set_random_seed(cfg.trainer.seed + 1)
    with ctx.strategy.scope():
        pretrained = distribute.into_scope(pretrained, ctx.strategy)
        model = ft_lib.attach_head(pretrained, head) if head else pretrained
    reports: List[ft_lib.StageReport] = []
    totals = {"last_epoch": {}, "epochs_done": 0, "seconds": 0.0, "samples": 0}
    # Variables frozen inside an opaque SavedModel block (source.freeze_variables): the layer
    # check sees the block as one trainable layer, so they get their own check.
    frozen_variables = sources_lib.frozen_block_variables(model)
    for index, (stage, frozen) in enumerate(zip(ft_lib.stages_of(cfg.finetune),
                                                ctx.frozen_by_stage)):
        reports.append(_finetune_stage(ctx, model, index, stage, frozen, totals))
        totals["epochs_done"] += stage.epochs
    seconds = totals["seconds"]
    # All stages done in an earlier process: the tuned weights are in the newest checkpoint.
    if seconds == 0.0 and ckpt.state.checkpoint and ckpt.state.checkpoint.startswith("finetune"):
        ckpt.load_newest_weights(model)
    speed = {"finetune/train_seconds": seconds,
             "finetune/samples_per_second": totals["samples"] / seconds} if seconds else {}
    if frozen_variables:
        change = sources_lib.check_frozen_block_variables(frozen_variables, model)
        speed["finetune/frozen_variable_change_max"] = change
        ctx.tracker.log_metrics({"finetune/frozen_variable_change_max": change})
    speed.update({f"finetune/{k}": v for k, v in totals["last_epoch"].items()})
    return model, reports, speed


def _finetune_stage(ctx: RunContext, model, index: int, stage, frozen: set,
                    totals: dict) -> ft_lib.StageReport:
    """One stage: freeze, recompile, fit, check the frozen weights, record the report."""
    cfg, ckpt, ft = ctx.cfg, ctx.ckpt, ctx.cfg.finetune
    phase, milestone = f"finetune/{index}", f"finetune-stage:{index}"
    if ckpt.done(milestone):
        return ft_lib.StageReport(**ckpt.state.values[milestone])
    ft_lib.apply_freeze(model, frozen)
    # A new compile is what makes the trainable flags above take effect.
    with ctx.strategy.scope():
        model_lib.compile_model(model, ft.optimizer or cfg.trainer.optimizer,
                                stage.learning_rate)
        done = ckpt.restore(model, phase)
    if done == 0 and ckpt.state.checkpoint and ckpt.state.checkpoint.startswith("finetune"):
        # Resumed before this stage's first epoch ended: start from the previous stage's end.
        ckpt.load_newest_weights(model)
    before = ckpt.load_arrays(f"stage-{index}-before") if done else None
    if before is None:
        before = ft_lib.snapshot(model)
        ckpt.save_arrays(f"stage-{index}-before", before)
    split = ctx.data.finetune
    speed, stage_last = fit(
        model, split, epochs=stage.epochs, batch_size=ft.batch_size or cfg.trainer.batch_size,
        seed=cfg.trainer.seed + 1 + index, verbose=cfg.trainer.verbose, initial_epoch=done,
        callbacks=[ckpt_lib.epoch_checkpointer(ckpt, ctx.tracker, phase, "finetune",
                                               step_offset=totals["epochs_done"],
                                               label=f"fine-tune stage '{stage.name}'")])
    totals["last_epoch"] = stage_last or totals["last_epoch"]
    totals["seconds"] += speed.get("train_seconds", 0.0)
    totals["samples"] += len(split.train[0]) * (stage.epochs - done)
    report = ft_lib.stage_report(model, stage.name, frozen, before, ft_lib.snapshot(model))
    measured = {
        "finetune/trainable_params": report.trainable_params,
        "finetune/frozen_params": report.frozen_params,
        "finetune/frozen_weight_change_max": report.frozen_weight_change_max,
        **{f"finetune/{k}": v for k, v in speed.items()},
    }
    ckpt.complete(milestone, measured, index, **{milestone: dataclasses.asdict(report)})
    ctx.tracker.log_metrics(measured, step=index)
    log.info("finetune stage '%s': %d epochs at lr %g, %d trainable / %d frozen params, "
             "frozen weight change %g", stage.name, stage.epochs, stage.learning_rate,
             report.trainable_params, report.frozen_params, report.frozen_weight_change_max)
    return report
