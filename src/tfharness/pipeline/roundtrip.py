"""Steps 4 and 6: save a model, reload it into a fresh one, verify, record, log the model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tfharness import data as data_lib
from tfharness import sources as sources_lib
from tfharness.artifacts import inmemory, integrity, serialization, serving
from tfharness.pipeline import data_record
from tfharness.pipeline.context import RunContext
from tfharness.tracking import record as run_record

log = logging.getLogger("tfharness")


def probe_batch(split, size: int) -> np.ndarray:
    """A fixed batch to compare a model and its reload on: test samples, then validation."""
    return data_lib.probe_features(split, size)


def model_step(cfg, stem: str, source) -> int:
    """The epoch a model was produced at, on one axis: pretraining, then every fine-tune stage.

    It is the step MLflow records the logged model at, and MLflow links the run's metrics at
    that step to the model when it is logged: no metric is at that step yet, so the model
    carries only the figures linked to it on purpose (``pipeline/outcome.py``).
    """
    from tfharness import finetune as ft_lib

    pretrain = cfg.trainer.epochs if source is None else 0
    if stem == "pretrained":
        return pretrain
    return pretrain + sum(stage.epochs for stage in ft_lib.stages_of(cfg.finetune))


def round_trip(ctx: RunContext, model, stem: str, step: int, probe: np.ndarray):
    """Save, reload, verify; record the measurements; log the model. Returns the reload.

    The measurements are one-off figures, logged once as ``reload/<stem>/<figure>``; ``step`` is
    the epoch the model was produced at (:func:`model_step`), the step MLflow records the logged
    model at. A resumed run that did this already loads the verified artifact instead.
    """
    if ctx.ckpt.done(f"saved:{stem}"):
        return _already_saved(ctx, stem)
    cfg, sf = ctx.cfg, ctx.cfg.save_format
    if sf.in_memory:
        trip = inmemory.save_reload_verify(model, sf.name, probe, sf.verify_atol, sf.signatures)
    else:
        target = serialization.artifact_path(Path(cfg.output_dir) / "models", stem, sf.name)
        if sf.versioned:
            target = serving.next_version_path(target)
        trip = serialization.save_reload_verify(model, target, sf.name, probe, sf.verify_atol,
                                                sf.signatures)
    measured = {
        "reload/max_abs_diff": trip.max_abs_diff,
        "reload/save_seconds": trip.save_seconds,
        "reload/load_seconds": trip.load_seconds,
        "reload/size_bytes": float(trip.size_bytes),
    }
    if trip.serving_max_abs_diff is not None:
        measured["reload/serving_max_abs_diff"] = trip.serving_max_abs_diff
    record = _keep(ctx, trip, stem, measured, step)
    log.info("%s: saved as %s to %s (%d bytes, %.2f s), reloaded in %.2f s, max abs diff %.3g",
             stem, sf.name, trip.path or "memory", trip.size_bytes, trip.save_seconds,
             trip.load_seconds, max(trip.max_abs_diff, trip.serving_max_abs_diff or 0.0))
    ctx.result.metrics.update(reload_names(stem, measured))
    if trip.path is None:
        # MLflow logs models from files; writing one would defeat in_memory, so say so instead.
        if cfg.tracking.log_models:
            log.warning("%s: not logged as an MLflow model: save_format.in_memory=true writes no "
                        "model file (set save_format.in_memory=false to log it)", stem)
        return trip.model
    ctx.result.artifacts[stem] = trip.path
    ctx.tracker.set_tags({f"tfharness.sha256.{stem}": record.sha256})
    ctx.result.digests[stem] = record.sha256
    if cfg.tracking.log_models:
        extra = {"sha256": integrity.record_path(trip.path)}
        classes = data_record.class_names_file(ctx, stem)
        if classes is not None:
            extra["class_names"] = classes
        ctx.tracker.log_model(model, stem, probe[:5], trip.path,
                              tags={sources_lib.SHA256_TAG: record.sha256, **ctx.lineage,
                                    **run_record.model_tags()},
                              extra_artifacts=extra, step=step)
    return trip.model


def _already_saved(ctx: RunContext, stem: str):
    """The verified artifact an earlier process of this run saved."""
    values = ctx.ckpt.state.values
    path = Path(values["models"][stem])
    if not ctx.cfg.save_format.in_memory:
        ctx.result.artifacts[stem] = path
    digest = values.get("digests", {}).get(stem)
    if digest:
        ctx.result.digests[stem] = digest
    log.info("%s: already saved and verified at %s (resumed run)", stem, path)
    return serialization.load_model(path)


def reload_names(stem: str, measured: dict) -> dict:
    """``reload/<figure>`` of a round trip as the run logs them: ``reload/<stem>/<figure>``."""
    return {f"reload/{stem}/{k.split('/', 1)[1]}": v for k, v in measured.items()}


def _keep(ctx: RunContext, trip, stem: str, measured: dict, step: int):
    """Records the saved model in the run state (and its digest beside it); logs the metrics.

    Returns the integrity record (None for an in-memory round trip).
    """
    ckpt, record = ctx.ckpt, None
    path = trip.path
    if path is None:
        # In memory, nothing is in the output folder; a resumed run reloads the verified model
        # from the checkpoint folder instead (checkpoints are on disk anyway).
        path = ckpt.dir / f"{stem}.keras"
        serialization.atomic_write(path, lambda tmp: trip.model.save(str(tmp)))
    else:
        # The digest goes into MLflow and beside the artifact, so a later load can tell a
        # damaged copy from a good one (see artifacts/integrity.py).
        record = integrity.write_record(trip.path)
    models = {**ckpt.state.values.get("models", {}), stem: str(path)}
    digests = {**ckpt.state.values.get("digests", {}),
               **({stem: record.sha256} if record else {})}
    logged = reload_names(stem, measured)
    ckpt.complete(f"saved:{stem}", logged, 0, models=models, digests=digests)
    ctx.tracker.log_metrics(logged)
    return record
