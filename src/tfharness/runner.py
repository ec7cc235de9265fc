"""The runner: one experiment from config to MLflow, in the order a user would do it by hand.

1. validate the config and load the data (no TensorFlow yet, so bad input fails fast);
2. build the model and resolve every freeze selector, before any run is opened;
3. pretrain; 4. save atomically, reload into a fresh model, verify outputs;
5. fine-tune the *reloaded* model (new head, frozen layers, stages) and prove frozen weights
   did not move; 6. save, reload and verify again; 7. evaluate on the test split.

``run(cfg)`` is plain Python: the CLI is a thin Hydra wrapper around it, and tests call it directly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from tfharness import checkpoint as ckpt_lib
from tfharness import data as data_lib
from tfharness import distribute
from tfharness import finetune as ft_lib
from tfharness import models as model_lib
from tfharness import sources as sources_lib
from tfharness import inmemory, integrity, naming, plots, run_record, serialization, serving, tracking
from tfharness.config import HarnessConfig, flatten, to_typed, validate
from tfharness.errors import ConfigError, HarnessError, RunInterrupted

log = logging.getLogger("tfharness")

REPORT_TABLE = "reports/trainable_layers.json"
REPORT_MARKDOWN = "reports/trainable_layers.md"
SOURCE_REPORT = "reports/source.md"


@dataclass
class RunResult:
    """What a run produced, for callers of :func:`run` (the CLI, sweeps, tests)."""

    run_id: Optional[str]
    metrics: Dict[str, float] = field(default_factory=dict)
    report: List[Dict] = field(default_factory=list)
    artifacts: Dict[str, Path] = field(default_factory=dict)
    model_uris: Dict[str, str] = field(default_factory=dict)
    # sha256 of each artifact written (see integrity.py), by name.
    digests: Dict[str, str] = field(default_factory=dict)
    # reports/source.md of a run that started from a source.
    source: Optional[str] = None
    registered_versions: Dict[str, str] = field(default_factory=dict)
    # The value of sweep.objective, set when the run was asked for it (sweep trials).
    objective: Optional[float] = None


def _objective(cfg: HarnessConfig, metrics: Dict[str, float]) -> float:
    """The sweep objective of a finished run; a missing or non-finite one fails the trial."""
    key = cfg.sweep.objective
    if key not in metrics:
        raise ConfigError("sweep.objective", key,
                          f"a metric this run records: {', '.join(sorted(metrics))}")
    value = metrics[key]
    if not math.isfinite(value):
        raise HarnessError(f"The objective {key} of this trial is {value}: a failed trial")
    return value


def _check_classes(cfg: HarnessConfig, bundle: data_lib.DataBundle,
                   pretrained_classes: Optional[int] = None) -> None:
    """``pretrained_classes``: the output width of a loaded source (default: the data's)."""
    ft = cfg.finetune
    if not ft.enabled:
        return
    needed = bundle.finetune.num_classes
    if ft.new_head() is not None:
        if ft.head.num_classes < needed:
            raise ConfigError("finetune.head.num_classes", ft.head.num_classes,
                              f"an integer >= {needed}, the number of fine-tune classes in the "
                              f"'{bundle.name}' data")
    elif (pretrained_classes or bundle.pretrain.num_classes) < needed:
        raise ConfigError("finetune.head.num_classes", None,
                          f"a new head: the fine-tune data has {needed} classes, the pretrained "
                          f"output only {pretrained_classes or bundle.pretrain.num_classes}")


def _probe_batch(split: data_lib.Split, size: int) -> np.ndarray:
    """A fixed batch to compare a model and its reload on: test samples, then validation."""
    # Slice before concatenating: copying the whole training set for 64 rows cost 190 MB of
    # peak memory on the 60,000-sample benchmark.
    return np.concatenate([split.test[0][:size], split.val[0][:size], split.train[0][:size]])[:size]


def _import_tensorflow_meanwhile() -> Optional[threading.Thread]:
    """Imports Keras and TensorFlow on a thread while this one loads and checks the data.

    The import takes seconds, and so can the data (1.9 s for the benchmark's 60,000 synthetic
    samples); NumPy's random generators and BLAS release the GIL, so the two overlap. It starts
    once the config is valid: a config error still answers without TensorFlow. The first use
    of TensorFlow waits for this import (Python's per-module import lock); if it failed, that
    use imports again and reports the error itself. Returns the thread (None: nothing to load).
    """
    if "keras" in sys.modules:
        return None

    def load() -> None:
        try:
            import keras  # noqa: F401  (loads TensorFlow, its backend)
        except BaseException:  # noqa: BLE001 - reported by the import that needs it
            pass

    thread = threading.Thread(target=load, name="tfharness-import-tensorflow", daemon=True)
    thread.start()
    return thread


def _seed_everything(seed: int, deterministic: bool) -> None:
    import keras
    import tensorflow as tf

    # Each run starts from a clean Keras state: in a sweep, many runs share one process.
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def _fit(model, split: data_lib.Split, *, epochs: int, batch_size: int, seed: int,
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
                                 pad_to_multiple=_replicas(model))
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


def _replicas(model) -> int:
    """How many replicas the model trains on (1 unless built under a multi-replica strategy)."""
    return model.distribute_strategy.num_replicas_in_sync


def _evaluate(model, split: data_lib.Split, batch_size: int) -> Dict[str, float]:
    if not len(split.test[0]):
        return {}
    if not model.compiled:
        # A model straight from disk has no loss or metrics yet; the optimizer is irrelevant here.
        model_lib.compile_model(model, "sgd", 0.0)
    test = data_lib.make_dataset(split.test, batch_size, shuffle=False, seed=0,
                                 pad_to_multiple=_replicas(model))
    return {k: float(v) for k, v in model.evaluate(test, verbose=0, return_dict=True).items()}


def _round_trip(cfg: HarnessConfig, tracker: tracking.Tracker, ckpt: ckpt_lib.RunCheckpoints,
                model, stem: str, step: int, probe: np.ndarray, result: RunResult,
                model_tags: Optional[Dict] = None):
    """Save, reload, verify; record the measurements; log the model. Returns the reload.

    The measurements are one-off figures, logged once as ``reload/<stem>/<figure>``; ``step`` is
    the epoch the model was produced at (see :func:`_model_step`), the step MLflow records the
    logged model at. A resumed run that did this already loads the verified artifact instead.
    """
    milestone = f"saved:{stem}"
    if ckpt.done(milestone):
        path = Path(ckpt.state.values["models"][stem])
        if not cfg.save_format.in_memory:
            result.artifacts[stem] = path
        digest = ckpt.state.values.get("digests", {}).get(stem)
        if digest:
            result.digests[stem] = digest
        log.info("%s: already saved and verified at %s (resumed run)", stem, path)
        return serialization.load_model(path)
    fmt, sf = cfg.save_format.name, cfg.save_format
    if sf.in_memory:
        trip = inmemory.save_reload_verify(model, fmt, probe, sf.verify_atol, sf.signatures)
    else:
        target = serialization.artifact_path(Path(cfg.output_dir) / "models", stem, fmt)
        if sf.versioned:
            target = serving.next_version_path(target)
        trip = serialization.save_reload_verify(model, target, fmt, probe, sf.verify_atol,
                                                sf.signatures)
    measured = {
        "reload/max_abs_diff": trip.max_abs_diff,
        "reload/save_seconds": trip.save_seconds,
        "reload/load_seconds": trip.load_seconds,
        "reload/size_bytes": float(trip.size_bytes),
    }
    if trip.serving_max_abs_diff is not None:
        measured["reload/serving_max_abs_diff"] = trip.serving_max_abs_diff
    path, record = trip.path, None
    if path is None:
        # In memory, nothing is in the output folder; a resumed run reloads the verified model
        # from the checkpoint folder instead (checkpoints are on disk anyway).
        path = ckpt.dir / f"{stem}.keras"
        serialization.atomic_write(path, lambda tmp: trip.model.save(str(tmp)))
    else:
        # The digest goes into MLflow and beside the artifact, so a later load can tell a
        # damaged copy from a good one (see integrity.py).
        record = integrity.write_record(trip.path)
    models = {**ckpt.state.values.get("models", {}), stem: str(path)}
    digests = {**ckpt.state.values.get("digests", {}),
               **({stem: record.sha256} if record else {})}
    logged = {f"reload/{stem}/{k.split('/', 1)[1]}": v for k, v in measured.items()}
    ckpt.complete(milestone, logged, 0, models=models, digests=digests)
    tracker.log_metrics(logged)
    log.info("%s: saved as %s to %s (%d bytes, %.2f s), reloaded in %.2f s, max abs diff %.3g",
             stem, fmt, trip.path or "memory", trip.size_bytes, trip.save_seconds,
             trip.load_seconds, max(trip.max_abs_diff, trip.serving_max_abs_diff or 0.0))
    result.metrics.update({f"{k}@{stem}": v for k, v in measured.items()})
    if trip.path is None:
        # MLflow logs models from files; writing one would defeat in_memory, so say so instead.
        if cfg.tracking.log_models:
            log.warning("%s: not logged as an MLflow model: save_format.in_memory=true writes no "
                        "model file (set save_format.in_memory=false to log it)", stem)
        return trip.model
    result.artifacts[stem] = trip.path
    tracker.set_tags({f"tfharness.sha256.{stem}": record.sha256})
    result.digests[stem] = record.sha256
    if cfg.tracking.log_models:
        tracker.log_model(model, stem, probe[:5], trip.path,
                          tags={sources_lib.SHA256_TAG: record.sha256, **(model_tags or {})},
                          extra_artifacts={"sha256": integrity.record_path(trip.path)},
                          step=step)
    return trip.model


def _finetune(cfg: HarnessConfig, tracker: tracking.Tracker, ckpt: ckpt_lib.RunCheckpoints,
              pretrained, split: data_lib.Split, frozen_by_stage: List[set], strategy) -> tuple:
    ft = cfg.finetune
    head = ft.new_head()
    # Reseeded so the new head starts from the same weights whether or not this process also
    # pretrained (a resumed run may start here).
    import keras

    keras.utils.set_random_seed(cfg.trainer.seed + 1)
    with strategy.scope():
        pretrained = distribute.into_scope(pretrained, strategy)
        model = ft_lib.attach_head(pretrained, head) if head else pretrained
    optimizer = ft.optimizer or cfg.trainer.optimizer
    batch_size = ft.batch_size or cfg.trainer.batch_size
    reports: List[ft_lib.StageReport] = []
    last_epoch: Dict[str, float] = {}
    epochs_done, seconds, samples = 0, 0.0, 0
    # Variables frozen inside an opaque SavedModel block (source.freeze_variables): the layer
    # check below sees the block as one trainable layer, so they get their own check.
    frozen_variables = sources_lib.frozen_block_variables(model)
    for index, (stage, frozen) in enumerate(zip(ft_lib.stages_of(ft), frozen_by_stage)):
        phase, milestone = f"finetune/{index}", f"finetune-stage:{index}"
        if ckpt.done(milestone):
            reports.append(ft_lib.StageReport(**ckpt.state.values[milestone]))
            epochs_done += stage.epochs
            continue
        ft_lib.apply_freeze(model, frozen)
        # A new compile is what makes the trainable flags above take effect.
        with strategy.scope():
            model_lib.compile_model(model, optimizer, stage.learning_rate)
            done = ckpt.restore(model, phase)
        if done == 0 and ckpt.state.checkpoint and ckpt.state.checkpoint.startswith("finetune"):
            # Resumed before this stage's first epoch ended: start from the previous stage's end.
            ckpt.load_newest_weights(model)
        before = ckpt.load_arrays(f"stage-{index}-before") if done else None
        if before is None:
            before = ft_lib.snapshot(model)
            ckpt.save_arrays(f"stage-{index}-before", before)
        label = f"fine-tune stage '{stage.name}'"
        speed, stage_last = _fit(model, split, epochs=stage.epochs, batch_size=batch_size,
                     seed=cfg.trainer.seed + 1 + index, verbose=cfg.trainer.verbose,
                     initial_epoch=done,
                     callbacks=[ckpt_lib.epoch_checkpointer(ckpt, tracker, phase, "finetune",
                                                            step_offset=epochs_done,
                                                            label=label)])
        last_epoch = stage_last or last_epoch
        epochs_done += stage.epochs
        seconds += speed.get("train_seconds", 0.0)
        samples += len(split.train[0]) * (stage.epochs - done)
        report = ft_lib.stage_report(model, stage.name, frozen, before, ft_lib.snapshot(model))
        prefix = _stage_prefix(cfg, index, stage.name)
        measured = {
            f"{prefix}/trainable_params": report.trainable_params,
            f"{prefix}/frozen_params": report.frozen_params,
            f"{prefix}/frozen_weight_change_max": report.frozen_weight_change_max,
            **{f"{prefix}/{k}": v for k, v in speed.items()},
        }
        # One-off figures of the stage: one point each, under the stage's name.
        ckpt.complete(milestone, measured, 0, **{milestone: dataclasses.asdict(report)})
        tracker.log_metrics(measured)
        reports.append(report)
        log.info("finetune stage '%s': %d epochs at lr %g, %d trainable / %d frozen params, "
                 "frozen weight change %g", stage.name, stage.epochs, stage.learning_rate,
                 report.trainable_params, report.frozen_params, report.frozen_weight_change_max)
    # All stages done in an earlier process: the tuned weights are in the newest checkpoint.
    if seconds == 0.0 and ckpt.state.checkpoint and ckpt.state.checkpoint.startswith("finetune"):
        ckpt.load_newest_weights(model)
    speed = {"finetune/train_seconds": seconds,
             "finetune/samples_per_second": samples / seconds} if seconds else {}
    if len(reports) > 1 and not ckpt.done("finetune-summary"):
        # Several stages: the largest change of any frozen weight, one figure to compare runs on.
        summary = {"finetune/frozen_weight_change_max":
                   max(r.frozen_weight_change_max for r in reports)}
        ckpt.complete("finetune-summary", summary, 0)
        tracker.log_metrics(summary)
    if frozen_variables:
        change = sources_lib.check_frozen_block_variables(frozen_variables, model)
        speed["finetune/frozen_variable_change_max"] = change
        tracker.log_metrics({"finetune/frozen_variable_change_max": change})
    speed.update({f"finetune/{k}": v for k, v in last_epoch.items()})
    return model, reports, speed


def _stage_prefix(cfg: HarnessConfig, index: int, name: str) -> str:
    """``finetune`` for a single stage, ``finetune/<stage name>`` for each of several."""
    if not cfg.finetune.stages:
        return "finetune"
    safe = "".join(c if c.isalnum() or c in "_-. " else "_" for c in name) or str(index)
    return f"finetune/{safe}"


def _model_step(cfg: HarnessConfig, stem: str, source) -> int:
    """The epoch a model was produced at, on one axis: pretraining, then every fine-tune stage.

    It is the step MLflow records the logged model at, and MLflow links the run's metrics at
    that step to the model when it is logged: no epoch metric is at that step yet, so the model
    carries only the figures linked to it on purpose (:func:`_link_model_metrics`).
    """
    pretrain = cfg.trainer.epochs if source is None else 0
    if stem == "pretrained":
        return pretrain
    return pretrain + sum(stage.epochs for stage in ft_lib.stages_of(cfg.finetune))


def _check_source_fits(cfg: HarnessConfig, source: sources_lib.LoadedSource) -> None:
    """What a loaded source rules out, checked before a run is opened."""
    if source.kind == sources_lib.OPAQUE_SAVEDMODEL:
        head = cfg.finetune.new_head() if cfg.finetune.enabled else None
        if head is not None and head.pop != 0:
            raise ConfigError("finetune.head.pop", head.pop,
                              "0 for a SavedModel without Keras metadata: it loads as one opaque "
                              "block, so the new head goes on top of its output")
        if cfg.save_format.name != "savedmodel":
            raise ConfigError("save_format", cfg.save_format.name,
                              "savedmodel for a source loaded as an opaque SavedModel block "
                              "(only a SavedModel can carry the block's graph)")


def _record_source(tracker: tracking.Tracker, source: sources_lib.LoadedSource,
                   result: RunResult) -> None:
    measured = {"source/load_seconds": source.load_seconds}
    if source.parity_max_abs_diff is not None:
        measured["source/max_abs_diff"] = source.parity_max_abs_diff
    tracker.log_metrics(measured)
    result.metrics.update(measured)
    description = source.describe()
    tracker.log_text(description, SOURCE_REPORT)
    result.source = description
    log.info("source: %s loaded from %s (%s) in %.2f s%s", source.kind, source.artifact.location,
             "layers kept" if source.layers_kept else "one opaque block", source.load_seconds,
             f", max abs diff {source.parity_max_abs_diff:.3g} against {source.parity_against}"
             if source.parity_against else "")


def print_report(rows: List[Dict], metrics: Dict[str, float], run_id: Optional[str],
                 cfg: HarnessConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        # Piped or logged output has no width to fit; 80 columns would wrap every cell.
        console.width = 160
    if rows:
        table = Table(title="Trainable layers per fine-tune stage")
        for column in rows[0]:
            table.add_column(column, justify="right" if column != "layer" else "left")
        for row in rows:
            table.add_row(*(tracking.format_cell(row[c]) for c in row))
        console.print(table)
    summary = Table(title="Results")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for key in sorted(metrics):
        summary.add_row(key, f"{metrics[key]:.6g}")
    console.print(summary)
    if run_id:
        console.print(f"MLflow run {run_id} in experiment '{cfg.tracking.experiment}' at "
                      f"{cfg.tracking.uri}")


def _check_writable(key: str, folder: str) -> None:
    """Fails before any training when ``folder`` cannot be created or written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tfharness-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(key, folder, f"a folder this process can write ({exc.strerror})") \
            from None


def _deliver_missing(cfg: HarnessConfig, tracker: tracking.Tracker,
                     ckpt: ckpt_lib.RunCheckpoints, bundle: data_lib.DataBundle) -> None:
    """Logs what the dead process recorded as done but may not have delivered to the store."""
    state = ckpt.state
    missing = tracker.missing_points(state.metrics)
    by_step: Dict[int, Dict[str, float]] = {}
    for key, value, step in missing:
        by_step.setdefault(step, {})[key] = value
    for step, metrics in sorted(by_step.items()):
        tracker.log_metrics(metrics, step=step)
    texts = state.values.get("texts", {})
    for file in tracker.missing_artifacts(texts):
        tracker.log_text(texts[file], file)
    if state.values.get("report_rows") and tracker.missing_artifacts([REPORT_TABLE]):
        tracker.log_table(state.values["report_rows"], REPORT_TABLE)
    if cfg.tracking.log_models and not cfg.save_format.in_memory and state.values.get("models"):
        logged = set(tracker.logged_model_names())
        for stem, path in state.values["models"].items():
            if stem not in logged:
                split = bundle.finetune if stem == "finetuned" else bundle.pretrain
                probe = _probe_batch(split, cfg.save_format.verify_batch_size)
                digest = state.values.get("digests", {}).get(stem)
                source = None if cfg.source.name == "scratch" else cfg.source.name
                tracker.log_model(
                    serialization.load_model(path), stem, probe[:5], Path(path),
                    tags={sources_lib.SHA256_TAG: digest} if digest else None,
                    extra_artifacts={"sha256": integrity.record_path(Path(path))}
                    if digest else None, step=_model_step(cfg, stem, source))
    if missing:
        log.info("resumed run: delivered %d metric points the interrupted process had not",
                 len(missing))


def run(cfg: HarnessConfig | DictConfig, overrides: Sequence[str] = (), *,
        parent_run_id: Optional[str] = None, require_objective: bool = False,
        tags: Optional[Dict[str, str]] = None) -> RunResult:
    """Runs one experiment end to end and returns what it measured and wrote.

    With ``resume`` set, continues an interrupted run from its last completed epoch instead (see
    :mod:`tfharness.checkpoint`).

    Args:
        cfg: a composed config (``DictConfig``) or a :class:`HarnessConfig`.
        overrides: the command-line overrides, recorded as an artifact and the default run name.
        parent_run_id: nest the MLflow run under this run (a sweep's parent run).
        require_objective: fail the run when ``sweep.objective`` is missing or not finite (a
            sweep trial: a NaN objective is a failed trial, recorded as a FAILED run).
        tags: extra MLflow run tags.
    """
    return _run(cfg, overrides, parent_run_id, require_objective, tags or {})


def _run(cfg, overrides: Sequence[str], parent_run_id: Optional[str], require_objective: bool,
         extra_tags: Dict[str, str]) -> RunResult:
    resolved_yaml = OmegaConf.to_yaml(cfg, resolve=True) if isinstance(cfg, DictConfig) else None
    cfg = to_typed(cfg)
    validate(cfg)
    cfg_hash = ckpt_lib.config_hash(cfg)
    resumed = ckpt_lib.find_resumable(cfg.checkpoint_root, cfg.resume, cfg_hash)
    if resumed is not None:
        # One run, one folder: the resumed run keeps writing where it started.
        log.info("Resuming run %s (%s) from %s", resumed.run_id,
                 ", ".join(f"{p}: {n} epochs" for p, n in resumed.epochs.items()) or "no epoch",
                 resumed.output_dir)
        cfg.output_dir = resumed.output_dir
    elif cfg.resume is True:
        log.info("resume=true: no interrupted run with this config in %s; starting a new run",
                 cfg.checkpoint_root)
    # The tracker first: by default its process opens the store (imports MLflow, checks the
    # schema) on the other core while this one loads the data and TensorFlow.
    tracker = tracking.make_tracker(cfg.tracking)
    importer = _import_tensorflow_meanwhile()
    try:
        bundle = data_lib.load_data(cfg.data)
        from_scratch = cfg.source.name == "scratch"
        if from_scratch:
            _check_classes(cfg, bundle)
        probe = _probe_batch(bundle.pretrain, cfg.save_format.verify_batch_size)
        _check_writable("output_dir", cfg.output_dir)
        _check_writable("checkpoint_root", cfg.checkpoint_root)
        models_dir = Path(cfg.output_dir) / "models"
        # Versioned exports live one level down (models/<stem>/<version>).
        for folder in [models_dir, *(models_dir.iterdir() if models_dir.is_dir() else []),
                       Path(cfg.output_dir) / "reports"]:
            if folder.is_dir() and not folder.name.startswith("."):
                serialization.sweep_partial_writes(folder)

        # TensorFlow is used from here on (waiting for its import, if that is still going).
        _seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
        # Models built in the strategy's scope train under it (a no-op scope by default); saving
        # and reloading happen outside it (a SavedModel does not load in a replica context).
        strategy = distribute.make_strategy(cfg.trainer)
        replicas = strategy.num_replicas_in_sync
        for key, size in (("trainer.batch_size", cfg.trainer.batch_size),
                          ("finetune.batch_size", cfg.finetune.batch_size)):
            if size is not None and size % replicas:
                # Each global batch is split across the replicas; Keras evaluates only even splits.
                raise ConfigError(key, size, f"a multiple of the {replicas} replicas of "
                                             f"trainer.strategy={cfg.trainer.strategy}")
        source = None
        if from_scratch:
            with strategy.scope():
                model = model_lib.build_model(cfg.model, bundle.input_shape,
                                              bundle.pretrain.num_classes)
        else:
            # Loaded, checked and verified before any run is opened: a bad source leaves no run.
            # Outside the strategy's scope, like every reload (see above).
            source = sources_lib.load_source(
                cfg.source, tracking_uri=cfg.tracking.uri, workdir=Path(cfg.output_dir) / "source",
                input_shape=bundle.input_shape, probe=probe, atol=cfg.save_format.verify_atol)
            _check_source_fits(cfg, source)
            _check_classes(cfg, bundle, source.num_classes)
            model = source.model
        frozen_by_stage: List[set] = []
        if cfg.finetune.enabled:
            base_names = model_lib.layer_names(model)
            head = cfg.finetune.new_head()
            planned = ft_lib.planned_layers(base_names, head)
            base_count = len(base_names) - (head.pop if head else 0)
            for index, stage in enumerate(ft_lib.stages_of(cfg.finetune)):
                frozen_by_stage.append(ft_lib.resolve_selectors(
                    stage.freeze, planned, base_count, ft_lib.stage_key(cfg.finetune, index)))

        run_name = cfg.tracking.run_name or naming.run_name(
            overrides, fallback=f"{cfg.data.name}-{cfg.model.name}")
        # With a source, the model group played no part: the tag says what the model came from.
        model_tag = cfg.model.name if source is None else f"source:{source.kind}"
        tags = tracking.run_tags(cfg.data.name, model_tag, {
            "save_format": cfg.save_format.name, "finetune": cfg.finetune.name,
            "replicas": str(strategy.num_replicas_in_sync), "tfharness.config_hash": cfg_hash,
            **extra_tags,
            **({"model_logging": "skipped: save_format.in_memory=true writes no model file"}
               if cfg.save_format.in_memory and cfg.tracking.log_models else {})})
        if parent_run_id:
            # MLflow's UI nests a run under the run this tag names.
            tags["mlflow.parentRunId"] = parent_run_id
        # Params: what defines the model and its training; the folders go to tags, the rest of
        # the operational settings are in the config.yaml artifact.
        params, operational = run_record.split_params(flatten(cfg))
        tags.update(operational)
        lineage: Dict[str, str] = {}
        if source is not None:
            lineage = sources_lib.lineage_tags(source)
            tags.update(lineage)
            params["source"] = source.artifact.location
        same_store = resumed is not None and resumed.tracking_uri == cfg.tracking.uri
        tracker.start(run_name, params, tags,
                      resume_run_id=resumed.run_id if same_store and tracker.run_id is None
                      and cfg.tracking.name != "off" else None)
    except BaseException as error:
        tracker.finish(error)  # no run was opened: this only lets go of the tracker
        if importer is not None:
            # A process that exits while TensorFlow is still loading on another thread can
            # crash in the interpreter's shutdown (seen: SIGSEGV after a data error).
            importer.join()
        raise
    for abandoned in ckpt_lib.abandoned_runs(cfg.checkpoint_root):
        if resumed is not None and abandoned.run_id == resumed.run_id:
            continue
        # Found by a later run: a RUNNING run whose process is gone is KILLED, not running.
        if abandoned.tracking_uri == cfg.tracking.uri:
            tracker.mark_abandoned(abandoned.run_id, "its process died while the run was RUNNING")
        ckpt_lib.RunCheckpoints(cfg.checkpoint_root, abandoned).end(
            "killed", "process died (found by a later run)")

    if resumed is not None:
        state = resumed
        state.status, state.reason, state.resumes = "running", None, state.resumes + 1
    else:
        state = ckpt_lib.RunState(run_id=tracker.run_id or f"local-{uuid.uuid4().hex}",
                                  config_hash=cfg_hash, output_dir=str(cfg.output_dir),
                                  # The store the run really is in: a spooled run's is the
                                  # spool, so resuming it on the server starts a server run.
                                  tracking_uri=getattr(tracker, "uri", "") if tracker.run_id
                                  else "",
                                  experiment=cfg.tracking.experiment)
    ckpt = ckpt_lib.RunCheckpoints(cfg.checkpoint_root, state)
    try:
        ckpt.acquire()
    except BaseException as error:
        tracker.finish(error)
        raise
    result = RunResult(run_id=tracker.run_id)
    if tracker.run_id:
        log.info("MLflow run %s ('%s') in experiment '%s' at %s", tracker.run_id, run_name,
                 cfg.tracking.experiment, cfg.tracking.uri)
    try:
        with ckpt_lib.interrupt_on_signals():
            final_model, final_split = _run_phases(cfg, tracker, ckpt, bundle, model,
                                                   frozen_by_stage, resolved_yaml, overrides,
                                                   result, strategy, source, probe,
                                                   {**lineage, **run_record.model_tags(tags)})
            if not ckpt.done("test"):
                test = _evaluate(final_model, final_split, cfg.trainer.batch_size)
                test = {f"test/{k}": v for k, v in test.items()}
                ckpt.complete("test", test, 0)
                tracker.log_metrics(test)
            # Results measured by an earlier process of a resumed run come from the ledger:
            # the value at the latest step of each metric (the last epoch's, for sweeps).
            latest: Dict[str, tuple] = {}
            for key, value, step in ckpt.state.metrics:
                if key.startswith("reload/"):
                    _, stem, figure = key.split("/", 2)
                    result.metrics.setdefault(f"reload/{figure}@{stem}", value)
                elif key not in latest or step >= latest[key][0]:
                    latest[key] = (step, value)
            for key, (_, value) in latest.items():
                result.metrics.setdefault(key, value)
            test = {k: v for k, v in result.metrics.items() if k.startswith("test/")}
            log.info("test: loss %.4f, accuracy %.4f", test.get("test/loss", float("nan")),
                     test.get("test/accuracy", float("nan")))
            if require_objective:
                result.objective = _objective(cfg, result.metrics)
                tracker.log_metrics({"objective": result.objective})
            if cfg.tracking.register:
                tracker.register_model("finetuned" if cfg.finetune.enabled else "pretrained",
                                       cfg.tracking.register)
            _record_outcome(cfg, tracker, ckpt, result, source)
    except BaseException as error:
        status = "killed" if isinstance(error, KeyboardInterrupt) else "failed"
        ckpt.end(status, f"{type(error).__name__}: {error}")
        tracker.finish(error)
        if isinstance(error, RunInterrupted):
            log.warning("Run %s interrupted by %s: marked KILLED; its checkpoint is kept in %s; "
                        "continue it with resume=true", state.run_id, error.signal_name, ckpt.dir)
        raise
    try:
        tracker.finish()
    except BaseException as error:
        ckpt.end("failed", f"{type(error).__name__}: {error}")
        raise
    ckpt.end("finished")
    result.model_uris.update(tracker.model_uris)
    result.registered_versions.update(tracker.registered_versions)
    if cfg.print_report:
        print_report(result.report, result.metrics, result.run_id, cfg)
    return result


def _record_outcome(cfg: HarnessConfig, tracker: tracking.Tracker,
                    ckpt: ckpt_lib.RunCheckpoints, result: RunResult, source) -> None:
    """What a finished run adds to its record: each logged model's own final figures, the
    learning-curve plot and a one-line description."""
    if cfg.tracking.log_models and not cfg.save_format.in_memory:
        for stem, keys in _model_metric_keys(cfg, result.metrics).items():
            tracker.link_model_metrics(stem, keys)
    stages = ft_lib.stages_of(cfg.finetune) if cfg.finetune.enabled else []
    tracker.log_figure("learning_curves", plots.learning_curve_data(
        ckpt.state.metrics, cfg.trainer.epochs if source is None else 0,
        [(s.name, s.epochs) for s in stages]), plots.LEARNING_CURVES)
    what = run_record.run_summary(cfg, None if source is None else source.kind, stages)
    tracker.set_tags({run_record.DESCRIPTION_TAG: run_record.describe(
        what=what, metrics=result.metrics)})


# Timings of fit: figures of the machine, not of a model, so no logged model carries them.
_TIMINGS = ("train_seconds", "samples_per_second")
# What a fine-tune epoch reports besides validation: the training loss and metrics.
_EPOCH_FIGURES = ("loss", "accuracy")


def _model_metric_keys(cfg: HarnessConfig, metrics: Dict[str, float]) -> Dict[str, List[str]]:
    """The run metrics each logged model carries: its own final figures, test figures first
    (the Models page shows them in this order).

    The pretrained model: its pretraining test and last validation figures, where it came from
    (``source/*``) and its reload figures. The fine-tuned model: the test figures of the final
    model, its last fine-tune epoch, the largest change of a frozen weight and its reload
    figures. Without fine-tuning the pretrained model is the final one and carries the test
    figures.
    """
    def own(prefix: str, names=None) -> List[str]:
        return sorted(k for k in metrics if k.startswith(prefix) and "@" not in k
                      and k.count("/") == 1 and k.rsplit("/", 1)[-1] not in _TIMINGS
                      and (names is None or names(k.rsplit("/", 1)[-1])))

    def reload(stem: str) -> List[str]:
        # RunResult names them reload/<figure>@<stem>; the run logs reload/<stem>/<figure>.
        suffix = f"@{stem}"
        return [f"reload/{stem}/{k[len('reload/'):-len(suffix)]}"
                for k in metrics if k.startswith("reload/") and k.endswith(suffix)]

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


def _run_phases(cfg: HarnessConfig, tracker: tracking.Tracker, ckpt: ckpt_lib.RunCheckpoints,
                bundle: data_lib.DataBundle, model, frozen_by_stage: List[set],
                resolved_yaml: Optional[str], overrides: Sequence[str], result: RunResult,
                strategy, source, probe: np.ndarray, lineage: Dict[str, str]):
    """Pretrain (or record the source), save and verify, fine-tune, save and verify; skips
    what a resumed run did."""
    if ckpt.state.resumes:
        _deliver_missing(cfg, tracker, ckpt, bundle)
    if not ckpt.done("texts"):
        texts = {"config.yaml": resolved_yaml or OmegaConf.to_yaml(OmegaConf.structured(cfg)),
                 "overrides.yaml": OmegaConf.to_yaml(list(overrides))}
        ckpt.complete("texts", texts=texts)
        for file, text in texts.items():
            tracker.log_text(text, file)

    if source is not None:
        if not ckpt.done("source"):
            ckpt.complete("source")
            _record_source(tracker, source, result)
    else:
        _pretrain(cfg, tracker, ckpt, model, bundle, result, strategy)

    # With a source, this saves the loaded model in tfharness' format and reloads it, so
    # fine-tuning starts from a verified model exactly as it does after pretraining.
    reloaded = _round_trip(cfg, tracker, ckpt, model, "pretrained",
                           _model_step(cfg, "pretrained", source), probe, result, lineage)
    final_model, final_split = reloaded, bundle.pretrain
    if cfg.finetune.enabled:
        if ckpt.done("saved:finetuned"):
            tuned, speed = None, {}
            reports = [ft_lib.StageReport(**ckpt.state.values[f"finetune-stage:{i}"])
                       for i in range(len(frozen_by_stage))]
        else:
            tuned, reports, speed = _finetune(cfg, tracker, ckpt, reloaded, bundle.finetune,
                                              frozen_by_stage, strategy)
        result.metrics.update(speed)
        result.report = [row for report in reports for row in report.rows]
        result.metrics["finetune/frozen_weight_change_max"] = max(
            r.frozen_weight_change_max for r in reports)
        ft_probe = _probe_batch(bundle.finetune, cfg.save_format.verify_batch_size)
        final_model = _round_trip(cfg, tracker, ckpt, tuned, "finetuned",
                                  _model_step(cfg, "finetuned", source), ft_probe, result,
                                  lineage)
        final_split = bundle.finetune
        if result.report and not ckpt.done("report"):
            markdown = (tracking.markdown_table(result.report)
                        + sources_lib.block_report(final_model))
            report_file = Path(cfg.output_dir) / REPORT_MARKDOWN
            serialization.atomic_write(report_file, lambda tmp: tmp.write_text(markdown))
            texts = {**ckpt.state.values.get("texts", {}), REPORT_MARKDOWN: markdown}
            ckpt.complete("report", texts=texts, report_rows=result.report)
            tracker.log_table(result.report, REPORT_TABLE)
            tracker.log_text(markdown, REPORT_MARKDOWN)
        if result.report:
            result.artifacts["report"] = Path(cfg.output_dir) / REPORT_MARKDOWN
    return final_model, final_split


def _pretrain(cfg: HarnessConfig, tracker: tracking.Tracker, ckpt: ckpt_lib.RunCheckpoints,
              model, bundle: data_lib.DataBundle, result: RunResult, strategy) -> None:
    """Pretrains from the last completed epoch (all of them in a new run), then evaluates."""
    with strategy.scope():
        model_lib.compile_model(model, cfg.trainer.optimizer, cfg.trainer.learning_rate)
    if not ckpt.done("saved:pretrained"):
        with strategy.scope():
            done = ckpt.restore(model, "pretrain")
        speed, last_epoch = _fit(model, bundle.pretrain, epochs=cfg.trainer.epochs,
                     batch_size=cfg.trainer.batch_size, seed=cfg.trainer.seed,
                     verbose=cfg.trainer.verbose, initial_epoch=done,
                     callbacks=[ckpt_lib.epoch_checkpointer(ckpt, tracker, "pretrain",
                                                            "pretrain", label="pretraining")])
        # The last epoch's values, for callers comparing runs (sweep objectives); the
        # histories themselves are in MLflow.
        result.metrics.update({f"pretrain/{k}": v for k, v in last_epoch.items()})
        if not ckpt.done("pretrain-test"):
            pretrain_test = _evaluate(model, bundle.pretrain, cfg.trainer.batch_size)
            measured = {**{f"pretrain/test_{k}": v for k, v in pretrain_test.items()},
                        **{f"pretrain/{k}": v for k, v in speed.items()}}
            # One-off figures of pretraining: one point each, not a point on the epoch axis.
            ckpt.complete("pretrain-test", measured, 0)
            tracker.log_metrics(measured)
            result.metrics.update(measured)
            log.info("pretrain: %d epochs on %d samples, test accuracy %.4f",
                     cfg.trainer.epochs, len(bundle.pretrain.train[0]),
                     pretrain_test.get("accuracy", float("nan")))
