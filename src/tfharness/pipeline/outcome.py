"""What a finished run adds to its record: each logged model's own final figures (MLflow's
logged-model metrics, shown on the Models page), the learning-curve plot, a one-line description.
"""

from __future__ import annotations

from typing import Dict, List

from tfharness import finetune as ft_lib
from tfharness.config import HarnessConfig
from tfharness.pipeline.context import RunContext
from tfharness.tracking import plots
from tfharness.tracking import record as run_record

# Timings of fit: figures of the machine, not of a model, so no logged model carries them.
_TIMINGS = ("train_seconds", "samples_per_second")
# What a fine-tune epoch reports besides validation: the training loss and metrics.
_EPOCH_FIGURES = ("loss", "accuracy")


def record_outcome(ctx: RunContext) -> None:
    """Links each logged model's figures, logs ``plots/learning_curves.png`` and sets the
    run's description (``mlflow.note.content``)."""
    cfg, tracker, source = ctx.cfg, ctx.tracker, ctx.source
    if cfg.tracking.log_models and not cfg.save_format.in_memory:
        for stem, keys in model_metric_keys(cfg, ctx.result.metrics).items():
            tracker.link_model_metrics(stem, keys)
    stages = ft_lib.stages_of(cfg.finetune) if cfg.finetune.enabled else []
    tracker.log_figure("learning_curves", plots.learning_curve_data(
        ctx.ckpt.state.metrics, cfg.trainer.epochs if source is None else 0,
        [(s.name, s.epochs) for s in stages]), plots.LEARNING_CURVES)
    what = run_record.run_summary(cfg, None if source is None else source.kind, stages)
    tracker.set_tags({run_record.DESCRIPTION_TAG: run_record.describe(
        what=what, metrics=ctx.result.metrics)})


def model_metric_keys(cfg: HarnessConfig, metrics: Dict[str, float]) -> Dict[str, List[str]]:
    """The run metrics each logged model carries: its own final figures, test figures first
    (the Models page shows them in this order).

    The pretrained model: its pretraining test and last validation figures, where it came from
    (``source/*``) and its reload figures. The fine-tuned model: the test figures of the final
    model, its last fine-tune epoch, the largest change of a frozen weight and its reload
    figures. Without fine-tuning the pretrained model is the final one and carries the test
    figures.
    """
    def own(prefix: str, names=None) -> List[str]:
        return sorted(k for k in metrics if k.startswith(prefix)
                      and k.count("/") == 1 and k.rsplit("/", 1)[-1] not in _TIMINGS
                      and (names is None or names(k.rsplit("/", 1)[-1])))

    def reload(stem: str) -> List[str]:
        return sorted(k for k in metrics if k.startswith(f"reload/{stem}/"))

    test = own("test/")
    pretrained = (own("pretrain/", lambda n: n.startswith("test_")) +
                  own("pretrain/", lambda n: n.startswith("val_")) + own("source/") +
                  reload("pretrained"))
    if not cfg.finetune.enabled:
        return {"pretrained": test + pretrained}
    epoch = own("finetune/", lambda n: n in _EPOCH_FIGURES or n.startswith("val_"))
    return {"pretrained": pretrained,
            "finetuned": test + epoch + own("finetune/", lambda n: n.endswith("_change_max"))
            + reload("finetuned")}
