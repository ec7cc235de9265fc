"""Steps 1 and 2: everything settled before an MLflow run opens.

The config is checked, the data loaded, the model built (or the source loaded and verified) and
every freeze selector resolved here, so bad input of any kind stops the command before a run
exists. TensorFlow is imported on a thread meanwhile (:func:`import_tensorflow_meanwhile`).
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Sequence

from tfharness import data as data_lib
from tfharness import finetune as ft_lib
from tfharness import heap
from tfharness import models as model_lib
from tfharness import sources as sources_lib
from tfharness.artifacts import checkpoint as ckpt_lib
from tfharness.artifacts import serialization
from tfharness.config.targets import option_name
from tfharness.config import HarnessConfig
from tfharness.errors import ConfigError
from tfharness.pipeline import data_record, distribute
from tfharness.pipeline.context import RunContext
from tfharness.pipeline.fingerprint import fingerprint
from tfharness.pipeline.roundtrip import probe_batch

log = logging.getLogger("tfharness")


def resume_target(cfg: HarnessConfig, cfg_hash: str) -> Optional[ckpt_lib.RunCheckpoints]:
    """The checkpoints of the interrupted run ``cfg.resume`` asks to continue, locked by this
    process; points ``output_dir`` at its folder. None: a new run.

    The lock comes first, before the run's MLflow run is touched: of two processes resuming the
    same run at once, one gets it and the other stops here (a ConfigError on ``resume``),
    having changed nothing.
    """
    resumed = ckpt_lib.find_resumable(cfg.checkpoint_root, cfg.resume, cfg_hash)
    if resumed is None:
        if cfg.resume is True:
            log.info("resume=true: no interrupted run with this config in %s; starting a new "
                     "run", cfg.checkpoint_root)
        return None
    held = ckpt_lib.RunCheckpoints(cfg.checkpoint_root, resumed)
    resumed.status, resumed.reason, resumed.resumes = "running", None, resumed.resumes + 1
    held.acquire(resuming=True)
    # One run, one folder: the resumed run keeps writing where it started.
    log.info("Resuming run %s (%s) from %s", resumed.run_id,
             ", ".join(f"{p}: {n} epochs" for p, n in resumed.epochs.items()) or "no epoch",
             resumed.output_dir)
    cfg.output_dir = resumed.output_dir
    return held


def import_tensorflow_meanwhile() -> Optional[threading.Thread]:
    """Imports Keras and TensorFlow on a thread while this one loads and checks the data.

    Both take seconds; NumPy's random generators and BLAS release the GIL, so the two overlap.
    It starts once the config is valid: a config error still answers without TensorFlow. The
    first use of TensorFlow waits for this import (Python's per-module import lock); if it
    failed, that use imports again and reports the error itself. Returns the thread (None:
    nothing to load).
    """
    if "keras" in sys.modules:
        return None

    def load() -> None:
        try:
            with KerasWithoutScikitLearn():
                heap.import_frozen("keras")  # loads TensorFlow, its backend
        except BaseException:  # noqa: BLE001 - reported by the import that needs it
            pass

    thread = threading.Thread(target=load, name="tfharness-import-tensorflow", daemon=True)
    thread.start()
    return thread


class KerasWithoutScikitLearn(importlib.abc.MetaPathFinder):
    """While in this block, this thread's ``import sklearn`` fails as if scikit-learn were not
    installed; other threads, and this one afterwards, import it as usual.

    Keras imports scikit-learn when it is installed (MLflow installs it), only for its
    scikit-learn estimators (``keras.wrappers.SKLearnClassifier`` and co.), which a run does not
    use, and that import brings SciPy's statistics with it: CPU time in every run, on the path
    to training (figures in benchmarks/results.md). That Keras then defines those wrappers
    without scikit-learn (they say it is missing when built) is Keras' private behaviour,
    checked in tests/test_private_apis.py.
    """

    def __enter__(self) -> "KerasWithoutScikitLearn":
        if "sklearn" not in sys.modules:
            self.thread = threading.get_ident()
            sys.meta_path.insert(0, self)
        return self

    def __exit__(self, *exc) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] == "sklearn" and threading.get_ident() == self.thread:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden from Keras' import "
                                      f"by tfharness)", name=fullname)
        return None


def prepare(cfg: HarnessConfig, tracker, cfg_hash: str, resumed, overrides: Sequence[str],
            resolved_yaml: Optional[str], importer: Optional[threading.Thread]) -> RunContext:
    """Loads the data, builds or loads the model and plans the fine-tuning; opens no run."""
    data_record.resolve_auto_keys(cfg)
    bundle, description, data_seconds = data_record.load(cfg, lambda: data_lib.load_data(
        cfg.data, importer.join if importer is not None else None))
    if cfg.source.name == "scratch":
        check_classes(cfg, bundle)
    probe = probe_batch(bundle.pretrain, cfg.save_format.verify_batch_size)
    check_writable("output_dir", cfg.output_dir)
    check_writable("checkpoint_root", cfg.checkpoint_root)
    sweep_output_folders(cfg)
    # TensorFlow is used from here on (waiting for its import, if that is still going).
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    model_lib.set_policy(cfg.trainer.precision)  # after seed_everything's clear_session
    strategy = make_strategy(cfg)
    check_training_parts(cfg)
    model, source = build_or_load(cfg, bundle, strategy, probe)
    model_lib.warn_if_low_precision_output(model, cfg.trainer.precision)
    return RunContext(cfg=cfg, tracker=tracker, data=bundle, probe=probe, strategy=strategy,
                      model=model, source=source,
                      frozen_by_stage=plan_freezes(cfg, model, source),
                      config_hash=cfg_hash, resumed=resumed, overrides=list(overrides),
                      resolved_yaml=resolved_yaml, description=description,
                      data_seconds=data_seconds,
                      fingerprint=fingerprint(cfg, description) if source is None else None)


def check_training_parts(cfg: HarnessConfig) -> None:
    """Builds every optimizer, loss, metric and callback the run will use once, so a bad
    ``_target_`` (or arguments it rejects) stops the run before it opens."""
    trainer, ft = cfg.trainer, cfg.finetune
    model_lib.make_optimizer(trainer.optimizer, trainer.learning_rate, "trainer.optimizer")
    model_lib.make_loss(trainer.loss)
    model_lib.make_metrics(trainer.metrics)
    model_lib.make_callbacks(trainer.callbacks, "trainer.callbacks")
    if ft.enabled:
        if ft.optimizer is not None:
            model_lib.make_optimizer(ft.optimizer, ft.learning_rate, "finetune.optimizer")
        if ft.callbacks is not None:
            model_lib.make_callbacks(ft.callbacks, "finetune.callbacks")


def check_classes(cfg: HarnessConfig, bundle: data_lib.DataBundle,
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


def check_writable(key: str, folder: str) -> None:
    """Fails before any training when ``folder`` cannot be created or written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tfharness-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(key, folder, f"a folder this process can write ({exc.strerror})") \
            from None


def sweep_output_folders(cfg: HarnessConfig) -> None:
    """Removes what an interrupted write left in the output folder (temporary names only)."""
    models_dir = Path(cfg.output_dir) / "models"
    # Versioned exports live one level down (models/<stem>/<version>).
    for folder in [models_dir, *(models_dir.iterdir() if models_dir.is_dir() else []),
                   Path(cfg.output_dir) / "reports"]:
        if folder.is_dir() and not folder.name.startswith("."):
            serialization.sweep_partial_writes(folder)


def seed_everything(seed: int, deterministic: bool) -> None:
    import keras
    import tensorflow as tf

    # Each run starts from a clean Keras state: in a sweep, many runs share one process. Without
    # Python's full garbage collection, which Keras' docs advise skipping in a loop: it walks
    # every object TensorFlow made, and Python's own collector frees the last run's anyway.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def make_strategy(cfg: HarnessConfig):
    """The ``trainer.strategy``; each global batch size must split evenly across its replicas."""
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
    return strategy


def build_or_load(cfg: HarnessConfig, bundle: data_lib.DataBundle, strategy, probe) -> tuple:
    """The model to start from and the loaded source (None when built from scratch)."""
    if cfg.source.name == "scratch":
        with strategy.scope():
            model = model_lib.build_model(cfg.model, bundle.input_shape,
                                          bundle.pretrain.num_classes)
            # The data's own preprocessing (normalization, pixel scaling) goes inside the model.
            return data_record.with_preprocessing(model, bundle.pretrain), None
    # Loaded, checked and verified before any run is opened: a bad source leaves no run.
    # Outside the strategy's scope, like every reload (see make_strategy).
    source = sources_lib.load_source(
        cfg.source, tracking_uri=cfg.tracking.uri, workdir=Path(cfg.output_dir) / "source",
        input_shape=bundle.input_shape, probe=probe, atol=cfg.save_format.verify_atol)
    check_source_fits(cfg, source)
    check_classes(cfg, bundle, source.num_classes)
    return source.model, source


def check_source_fits(cfg: HarnessConfig, source: sources_lib.LoadedSource) -> None:
    """What a loaded source rules out, checked before a run is opened."""
    if source.kind == sources_lib.OPAQUE_SAVEDMODEL:
        head = cfg.finetune.new_head() if cfg.finetune.enabled else None
        if head is not None and head.pop != 0 and head.cut is None:
            raise ConfigError("finetune.head.pop", head.pop,
                              "0 for a SavedModel without Keras metadata: it loads as one opaque "
                              "block, so the new head goes on top of its output")
        if cfg.finetune.enabled and cfg.finetune.transfer_gain:
            raise ConfigError("finetune.transfer_gain", True,
                              "false for a SavedModel without Keras metadata: its opaque block "
                              "cannot be rebuilt from random initialization")
        if cfg.save_format.name != "savedmodel":
            raise ConfigError("save_format", cfg.save_format.name,
                              "savedmodel for a source loaded as an opaque SavedModel block "
                              "(only a SavedModel can carry the block's graph)")


def plan_freezes(cfg: HarnessConfig, model, source=None) -> List[set]:
    """The layers each fine-tune stage freezes, checked on the model as it will be fine-tuned.

    Also checks that the model has one input and one output and that the head can be attached
    (the cut exists and everything after it hangs from it; a feature map gets pooling); a
    selector that matches nothing is an error listing the layers it could match.
    """
    ft_lib.check_single_io(model, *(("model", option_name(cfg.model)) if source is None else
                                    (sources_lib.source_key(cfg.source),
                                     source.artifact.location)))
    return ft_lib.plan(model, cfg.finetune) if cfg.finetune.enabled else []
