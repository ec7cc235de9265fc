"""Steps 3 and 5: pretraining and fine-tuning, each resumable from its last completed epoch."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from tfharness import data as data_lib
from tfharness import finetune as ft_lib
from tfharness import models as model_lib
from tfharness import sources as sources_lib
from tfharness.artifacts import checkpoint as ckpt_lib
from tfharness.config import HarnessConfig
from tfharness.pipeline import distribute
from tfharness.pipeline.context import RunContext

log = logging.getLogger("tfharness")


@dataclass
class Fitted:
    """What one ``fit`` call did."""

    # train_seconds and samples_per_second ({} when there was nothing left to train).
    speed: Dict[str, float] = field(default_factory=dict)
    # The last epoch's metrics as Keras reported them.
    last_epoch: Dict[str, float] = field(default_factory=dict)
    samples: int = 0
    # Epochs trained by this call.
    epochs: int = 0
    # A callback (EarlyStopping) stopped training before the last planned epoch.
    stopped: bool = False


def fit(model, split: data_lib.Split, *, epochs: int, batch_size: int, seed: int,
        callbacks: Sequence, verbose: int, initial_epoch: int = 0) -> Fitted:
    """Trains epochs ``initial_epoch..epochs-1`` (fewer if a callback stops training).

    Array epoch ``e`` is shuffled by ``(seed, e)`` alone, so a run resumed at ``e`` trains on the
    same batches as one that was never interrupted; a dataset part is iterated as it is.
    """
    todo = epochs - initial_epoch
    if todo <= 0:
        return Fitted()
    train, steps = data_lib.fit_input(split.train, batch_size, shuffle=True, seed=seed,
                                      epochs=(initial_epoch, epochs))
    counter = None
    if steps is None:
        train, counter = data_lib.counting(train)
    val = (data_lib.fit_input(split.val, batch_size, shuffle=False, seed=seed,
                              pad_to_multiple=replicas(model))[0]
           if data_lib.has_samples(split.val) else None)
    distribute.fit_ready(model)
    start = time.perf_counter()
    history = model.fit(train, validation_data=val, epochs=epochs, initial_epoch=initial_epoch,
                        steps_per_epoch=steps, callbacks=list(callbacks), verbose=verbose,
                        shuffle=False)  # the tf.data pipeline already shuffles, seeded
    seconds = time.perf_counter() - start
    last = {k: float(v[-1]) for k, v in history.history.items() if v}
    # Epochs actually trained: fewer than planned when a callback stopped training.
    samples = (int(counter.numpy()) if counter is not None
               else data_lib.num_samples(split.train) * len(history.epoch))
    return Fitted({"train_seconds": seconds, "samples_per_second": samples / seconds}, last,
                  samples, epochs=len(history.epoch), stopped=len(history.epoch) < todo)


def replicas(model) -> int:
    """How many replicas the model trains on (1 unless built under a multi-replica strategy)."""
    return model.distribute_strategy.num_replicas_in_sync


def compile_for(cfg: HarnessConfig, model, optimizer, learning_rate: float,
                optimizer_key: str = "trainer.optimizer") -> None:
    """Compiles with the trainer's loss, metrics, ``jit_compile`` and ``steps_per_execution``
    (fine-tune stages too: they train the same way)."""
    trainer = cfg.trainer
    model_lib.compile_model(model, optimizer, learning_rate, trainer.loss, trainer.metrics,
                            optimizer_key, jit_compile=trainer.jit_compile,
                            steps_per_execution=trainer.steps_per_execution)


def evaluate(cfg: HarnessConfig, model, split: data_lib.Split) -> Dict[str, float]:
    """The model's loss and metrics on the split's test part ({} when it has none)."""
    if not data_lib.has_samples(split.test):
        return {}
    if not model.compiled:
        # A model straight from disk has no loss or metrics yet; the optimizer is irrelevant here.
        compile_for(cfg, model, "sgd", 0.0)
    test = data_lib.fit_input(split.test, cfg.trainer.batch_size, shuffle=False, seed=0,
                              pad_to_multiple=replicas(model))[0]
    distribute.fit_ready(model)
    return {k: float(v) for k, v in model.evaluate(test, verbose=0, return_dict=True).items()}


def _restore(ctx: RunContext, model, phase: str) -> int:
    """Loads ``phase``'s last checkpoint into ``model``; returns the epochs already done."""
    ckpt = ctx.ckpt
    with ctx.strategy.scope():
        done = ckpt.restore(model, phase)
    if done == 0 and phase.startswith("finetune") and ckpt.state.checkpoint and \
            ckpt.state.checkpoint.startswith("finetune"):
        # Resumed before this stage's first epoch ended: start from the previous stage's end.
        ckpt.load_newest_weights(model)
    return done


def _train_phase(ctx: RunContext, model, split: data_lib.Split, *, phase: str, prefix: str,
                 done: int, epochs: int, batch_size: int, seed: int, callbacks: tuple,
                 step_offset: int, label: str) -> Fitted:
    """Trains the rest of ``phase``'s epochs with the configured callbacks, then the
    checkpoint callback (it records a stop they asked for)."""
    ckpt = ctx.ckpt
    specs, key = callbacks
    fitted = fit(model, split, epochs=epochs, batch_size=batch_size, seed=seed,
                 verbose=ctx.cfg.trainer.verbose, initial_epoch=done,
                 callbacks=[*model_lib.make_callbacks(specs, key),
                            ckpt_lib.epoch_checkpointer(ckpt, ctx.tracker, phase, prefix,
                                                        step_offset=step_offset, label=label,
                                                        end_epoch=epochs)])
    if fitted.stopped:
        # EarlyStopping's restore_best_weights sets the weights only at the end of fit: the
        # checkpoint of the phase's end holds the model as fit left it.
        ckpt.save_epoch(model, phase, ckpt.state.phase_epochs(phase), {}, step_offset)
        log.info("%s: stopped by a callback after epoch %d of %d", label,
                 done + fitted.epochs, epochs)
    return fitted


def pretrain(ctx: RunContext) -> None:
    """Pretrains from the last completed epoch (all of them in a new run), then evaluates."""
    cfg, ckpt, model, tracker = ctx.cfg, ctx.ckpt, ctx.model, ctx.tracker
    split, trainer = ctx.data.pretrain, cfg.trainer
    with ctx.strategy.scope():
        compile_for(cfg, model, trainer.optimizer, trainer.learning_rate)
    if ckpt.done("saved:pretrained"):
        return
    fitted = _train_phase(ctx, model, split, phase="pretrain", prefix="pretrain",
                          done=_restore(ctx, model, "pretrain"), epochs=trainer.epochs,
                          batch_size=trainer.batch_size, seed=trainer.seed,
                          callbacks=(trainer.callbacks, "trainer.callbacks"),
                          step_offset=0, label="pretraining")
    # The last epoch's values, for callers comparing runs (sweep objectives); the histories
    # themselves are in MLflow.
    ctx.result.metrics.update({f"pretrain/{k}": v for k, v in fitted.last_epoch.items()})
    if ckpt.done("pretrain-test"):
        return
    # When it is the final model, step 7 measures it (record.test_metrics).
    pretrain_test = {} if ctx.pretrained_is_final else evaluate(cfg, model, split)
    measured = {**{f"pretrain/test_{k}": v for k, v in pretrain_test.items()},
                **{f"pretrain/{k}": v for k, v in fitted.speed.items()}}
    # One-off figures of pretraining: one point each, not a point on the epoch axis.
    ckpt.complete("pretrain-test", measured, 0)
    tracker.log_metrics(measured)
    ctx.result.metrics.update(measured)
    if pretrain_test:
        log.info("pretrain: %d epochs, test accuracy %.4f", trainer.epochs,
                 pretrain_test.get("accuracy", float("nan")))


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
    # Reseeded so the new head starts from the same weights whether or not this process also
    # pretrained (a resumed run may start here).
    import keras

    keras.utils.set_random_seed(cfg.trainer.seed + 1)
    with ctx.strategy.scope():
        pretrained = distribute.into_scope(pretrained, ctx.strategy)
        model, _ = ft_lib.prepare(pretrained, cfg.finetune)
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
    if len(reports) > 1 and not ckpt.done("finetune-summary"):
        # Several stages: the largest change of any frozen weight, one figure to compare runs on.
        summary = {"finetune/frozen_weight_change_max":
                   max(r.frozen_weight_change_max for r in reports)}
        ckpt.complete("finetune-summary", summary, 0)
        ctx.tracker.log_metrics(summary)
    if frozen_variables:
        change = sources_lib.check_frozen_block_variables(frozen_variables, model)
        speed["finetune/frozen_variable_change_max"] = change
        ctx.tracker.log_metrics({"finetune/frozen_variable_change_max": change})
    speed.update({f"finetune/{k}": v for k, v in totals["last_epoch"].items()})
    return model, reports, speed


def stage_prefix(cfg: HarnessConfig, index: int, name: str) -> str:
    """``finetune`` for a single stage, ``finetune/<stage name>`` for each of several."""
    if not cfg.finetune.stages:
        return "finetune"
    safe = "".join(c if c.isalnum() or c in "_-. " else "_" for c in name) or str(index)
    return f"finetune/{safe}"


def _finetune_stage(ctx: RunContext, model, index: int, stage, frozen: set,
                    totals: dict) -> ft_lib.StageReport:
    """One stage: freeze, recompile, fit, check the frozen weights, record the report."""
    cfg, ckpt, ft = ctx.cfg, ctx.ckpt, ctx.cfg.finetune
    phase, milestone = f"finetune/{index}", f"finetune-stage:{index}"
    if ckpt.done(milestone):
        return ft_lib.StageReport(**ckpt.state.values[milestone])
    ft_lib.apply_freeze(model, frozen, ft.freeze_batchnorm)
    # A new compile is what makes the trainable flags above take effect.
    with ctx.strategy.scope():
        compile_for(cfg, model, ft.optimizer or cfg.trainer.optimizer, stage.learning_rate,
                    "finetune.optimizer" if ft.optimizer else "trainer.optimizer")
    done = _restore(ctx, model, phase)
    before = ckpt.load_arrays(f"stage-{index}-before") if done else None
    if before is None:
        before = ft_lib.snapshot(model)
        ckpt.save_arrays(f"stage-{index}-before", before)
    fitted = _train_phase(
        ctx, model, ctx.data.finetune, phase=phase, prefix="finetune", done=done,
        epochs=stage.epochs,
        batch_size=ft.batch_size or cfg.trainer.batch_size, seed=cfg.trainer.seed + 1 + index,
        callbacks=model_lib.finetune_specs(cfg.trainer.callbacks, ft.callbacks),
        step_offset=totals["epochs_done"], label=f"fine-tune stage '{stage.name}'")
    totals["last_epoch"] = fitted.last_epoch or totals["last_epoch"]
    totals["seconds"] += fitted.speed.get("train_seconds", 0.0)
    totals["samples"] += fitted.samples
    report = ft_lib.stage_report(model, stage.name, before, ft_lib.snapshot(model))
    prefix = stage_prefix(cfg, index, stage.name)
    measured = {
        f"{prefix}/trainable_params": report.trainable_params,
        f"{prefix}/frozen_params": report.frozen_params,
        f"{prefix}/frozen_weight_change_max": report.frozen_weight_change_max,
        **{f"{prefix}/{k}": v for k, v in fitted.speed.items()},
    }
    # One-off figures of the stage: one point each, under the stage's name.
    ckpt.complete(milestone, measured, 0, **{milestone: dataclasses.asdict(report)})
    ctx.tracker.log_metrics(measured)
    log.info("finetune stage '%s': %d epochs at lr %g, %d trainable / %d frozen params, "
             "frozen weight change %g", stage.name, stage.epochs, stage.learning_rate,
             report.trainable_params, report.frozen_params, report.frozen_weight_change_max)
    return report


def transfer_gain(ctx: RunContext, tuned, split: data_lib.Split,
                  tuned_accuracy: float) -> Dict[str, float]:
    """Trains the fine-tune architecture from random initialization on the fine-tune data, with
    the same stages' epochs, learning rates, optimizer and batch size and nothing frozen (a
    frozen random layer is no baseline); logs its per-epoch metrics as ``scratch/*`` and
    returns its test metrics and ``transfer/gain`` (fine-tuned test accuracy minus its own)."""
    import keras

    cfg, ft = ctx.cfg, ctx.cfg.finetune
    keras.utils.set_random_seed(cfg.trainer.seed + 2)
    with ctx.strategy.scope():
        # clone_model builds new layers from their configs: same architecture, fresh weights.
        scratch = keras.models.clone_model(tuned)
    ft_lib.apply_freeze(scratch, set())
    tracker = ctx.tracker

    class EpochLogger(keras.callbacks.Callback):
        def __init__(self, offset: int):
            super().__init__()
            self.offset = offset

        def on_epoch_end(self, epoch, logs=None):
            tracker.log_metrics({f"scratch/{k}": float(v) for k, v in (logs or {}).items()},
                                step=self.offset + epoch)

    offset = 0
    for index, stage in enumerate(ft_lib.stages_of(ft)):
        with ctx.strategy.scope():
            compile_for(cfg, scratch, ft.optimizer or cfg.trainer.optimizer,
                        stage.learning_rate,
                        "finetune.optimizer" if ft.optimizer else "trainer.optimizer")
        fit(scratch, split, epochs=stage.epochs, batch_size=ft.batch_size or
            cfg.trainer.batch_size, seed=cfg.trainer.seed + 1 + index,
            verbose=cfg.trainer.verbose, callbacks=[EpochLogger(offset)])
        offset += stage.epochs
    test = evaluate(cfg, scratch, split)
    measured = {f"scratch/test_{k}": v for k, v in test.items()}
    measured["transfer/gain"] = tuned_accuracy - test.get("accuracy", float("nan"))
    log.info("transfer gain: fine-tuned test accuracy %.4f, from scratch %.4f (gain %+.4f)",
             tuned_accuracy, test.get("accuracy", float("nan")), measured["transfer/gain"])
    return measured
